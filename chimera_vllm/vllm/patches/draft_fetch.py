"""The engine core fetches a Chimera draft's tokens only after steps that proposed some.

After every step vLLM's engine core asks the worker for the step's drafts
(``take_draft_token_ids``, one RPC). A batch-size schedule
(``num_speculative_tokens_per_batch_size``) gives the steps of a large batch K = 0: the Chimera
proposer then writes the draft's context and proposes nothing (vllm/proposer.py), and the
scheduler has already emptied each scheduled request's drafts when it scheduled them, so the
reply would change nothing: it is skipped after such steps, a part of the schedule's "off" state's
cost against no speculation (docs/results/vllm-cpu.md). Other drafts are left alone: vLLM's
``custom_class`` proposers, for one, ignore K.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from chimera_vllm.vllm.patches import patch_once
from chimera_vllm.vllm.proposer import is_chimera_vllm_config

SCHEDULED_K = "chimera_scheduled_num_spec_tokens"  # set on the scheduler by its patched schedule()


def record_scheduled_k(original: Callable) -> Callable:
    """Scheduler.schedule that also keeps the K it gave the step's proposer."""

    @functools.wraps(original)
    def schedule(self, *args, **kwargs):
        scheduler_output = original(self, *args, **kwargs)
        setattr(self, SCHEDULED_K, scheduler_output.num_spec_tokens_to_schedule)
        return scheduler_output

    return schedule


def drafts_to_fetch(engine_core) -> bool:
    """Whether the step just run may have proposed drafts: False only where a Chimera draft's
    step was scheduled with K = 0, in the engine core's one-batch-at-a-time loop."""
    return not (
        getattr(engine_core.scheduler, SCHEDULED_K, None) == 0
        and engine_core.batch_queue is None
        and is_chimera_vllm_config(engine_core.vllm_config)
    )


def skip_empty_fetch(original: Callable) -> Callable:
    """EngineCore.post_step (in vLLM 0.32 only the draft fetch) skipped after a K = 0 step."""

    @functools.wraps(original)
    def post_step(self, model_executed: bool) -> None:
        if model_executed and not drafts_to_fetch(self):
            return
        original(self, model_executed)

    return post_step


def install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    patch_once(Scheduler, "schedule", record_scheduled_k)
    patch_once(EngineCore, "post_step", skip_empty_fetch)
