"""Every change this project makes to vLLM's internals, listed in one place.

The plugin (vllm/plugin.py) registers Chimera through vLLM's public hooks where vLLM has one
(the model registry, the speculators config registry). What has no hook is a replacement of a
vLLM symbol, and each is a :class:`Patch` in :data:`PATCHES`: the symbol, the vLLM versions it was
checked against, why it exists, where it applies and its test. ``chimera-vllm doctor`` prints
this list with what applies on the machine at hand.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_PATCHED = "_chimera_vllm_patched"
CHECKED_VLLM = ("0.32", "0.33")


def patch_once(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """owner.name = make(owner.name), unless it is already one of this project's replacements."""
    original = getattr(owner, name)
    if getattr(original, _PATCHED, False):
        return
    patched = make(original)
    setattr(patched, _PATCHED, True)
    setattr(owner, name, patched)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def always() -> bool:
    return True


@dataclass(frozen=True)
class Patch:
    """One replaced vLLM symbol. ``install`` names a function "module:function" of this package."""

    symbols: tuple[str, ...]
    why: str
    scope: str
    install: str
    test: str
    applies: Callable[[], bool] = always

    def run_install(self) -> None:
        module, _, function = self.install.partition(":")
        getattr(importlib.import_module(module), function)()


PATCHES = (
    Patch(
        symbols=("vllm.engine.arg_utils.EngineArgs.create_speculative_config",),
        why="vLLM's speculative methods are a fixed list: a config whose model is a Chimera draft is routed "
        "to the EAGLE machinery, its K and prompt-lookup settings read, and the draft checked against the target",
        scope="acts on Chimera drafts only; other configs pass through unchanged",
        install="chimera_vllm.vllm.plugin:route_chimera_drafts_to_eagle",
        test="tests/test_vllm.py",
    ),
    Patch(
        symbols=("vllm.v1.worker.gpu_model_runner.EagleProposer",),
        why="the V1 model runner builds its EAGLE proposer by this name: ChimeraProposer subclasses it and "
        "hands any non-Chimera draft to EagleProposer's own code",
        scope="acts on Chimera drafts only",
        install="chimera_vllm.vllm.plugin:install_proposer",
        test="tests/test_vllm.py",
    ),
    Patch(
        symbols=("vllm.config.VllmConfig._get_v2_model_runner_unsupported_features",),
        why="Model Runner V2 has no place for an outside proposer: a Chimera draft keeps the V1 runner",
        scope="acts on Chimera drafts only",
        install="chimera_vllm.vllm.plugin:keep_v1_model_runner",
        test="tests/test_vllm.py",
    ),
    Patch(
        symbols=(
            "vllm.v1.core.sched.scheduler.Scheduler.schedule",
            "vllm.v1.engine.core.EngineCore.post_step",
        ),
        why="the engine core asks the worker for draft tokens after every step; after a step that proposed "
        "none (a batch-size schedule's K = 0) there are none to fetch",
        scope="acts on Chimera drafts only (other proposers keep vLLM's fetch)",
        install="chimera_vllm.vllm.patches.draft_fetch:install",
        test="tests/test_vllm_draft_fetch.py",
    ),
    Patch(
        symbols=(
            "vllm.utils.cpu_triton_utils._expand_kernel_impl",
            "vllm.v1.sample.rejection_sampler.sample_recovered_tokens",
            "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample",
            "vllm.v1.sample.rejection_sampler.RejectionSampler.forward",
        ),
        why="vLLM-CPU's speculative sampling: a bug that leaves the expanded temperatures uninitialised "
        "(wrong distributions at T > 0), and three costs of the CPU path (noise for requests without "
        "drafts, the rejection sampler on steps without drafts, float32 copies on greedy steps)",
        scope="on a CPU, every speculative method (vLLM's n-gram and EAGLE too)",
        install="chimera_vllm.vllm.patches.cpu_sampling:install",
        test="tests/test_vllm_cpu_fix.py",
        applies=on_cpu,
    ),
)


def install_all() -> list[Patch]:
    """Install every patch that applies here; returns them."""
    installed = [patch for patch in PATCHES if patch.applies()]
    for patch in installed:
        patch.run_install()
    return installed
