"""The engine core's draft fetch, skipped after a Chimera draft's K = 0 steps
(chimera_vllm/vllm_draft_fetch.py). That the skip loses nothing is tested in test_vllm.py: the
batch-size schedules there switch K between 0 and more within one engine, and their outputs and
draft counts would change if drafts went unfetched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from chimera_vllm.vllm.model import CHIMERA_CONFIG_KEY  # noqa: E402
from chimera_vllm.vllm.patches.draft_fetch import record_scheduled_k, skip_empty_fetch  # noqa: E402


class Executor:
    def __init__(self):
        self.fetches = 0

    def take_draft_token_ids(self):
        self.fetches += 1
        return None


def vllm_post_step(self, model_executed: bool) -> None:
    """vLLM 0.32's EngineCore.post_step, the part that runs here."""
    if self.check_for_draft_tokens and not self.async_scheduling and model_executed:
        self.model_executor.take_draft_token_ids()


def engine_core(scheduled_k: int | None, chimera: bool = True, batch_queue=None) -> SimpleNamespace:
    hf_config = SimpleNamespace(**{CHIMERA_CONFIG_KEY: {"num_heads": 4} if chimera else None})
    spec = SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=hf_config))
    schedule = record_scheduled_k(lambda self: SimpleNamespace(num_spec_tokens_to_schedule=scheduled_k))
    scheduler = SimpleNamespace()
    if scheduled_k is not None:
        schedule(scheduler)
    return SimpleNamespace(
        scheduler=scheduler,
        vllm_config=SimpleNamespace(speculative_config=spec),
        batch_queue=batch_queue,
        check_for_draft_tokens=True,
        async_scheduling=False,
        model_executor=Executor(),
    )


def fetches(core: SimpleNamespace, model_executed: bool = True) -> int:
    skip_empty_fetch(vllm_post_step)(core, model_executed)
    return core.model_executor.fetches


def test_a_chimera_step_scheduled_with_k_0_fetches_no_drafts():
    assert fetches(engine_core(0)) == 0


@pytest.mark.parametrize(
    "core",
    [
        engine_core(2),  # drafts proposed
        engine_core(1),
        engine_core(None),  # no step scheduled since the patch: unknown K
        engine_core(0, chimera=False),  # another method's proposer may ignore K
        engine_core(0, batch_queue=[]),  # the batch queue's loop: post_step's step is not the last scheduled
    ],
    ids=["k2", "k1", "unknown", "other-draft", "batch-queue"],
)
def test_every_other_step_fetches_as_vllm_does(core):
    assert fetches(core) == 1


def test_a_step_that_ran_no_model_fetches_nothing_either_way():
    assert fetches(engine_core(2), model_executed=False) == 0
