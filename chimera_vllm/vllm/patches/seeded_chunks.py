"""A request with its own seed whose prompt is prefilled in chunks keeps its random stream, on a CPU.

A step that schedules only part of a request's prompt samples a token for it anyway and drops
it. On a GPU, vLLM then rewinds the request's Philox generator past that draw
(``gen.set_offset(gen.get_offset() - 4)`` in ``GPUModelRunner._bookkeeping_sync``), so the
request's first kept token is drawn as if its prefill had been one step. A CPU generator
(Mersenne Twister) has no offset: the call raises ``CPU Generator does not use offset`` and the
engine dies, with every request in it, with or without speculation. Here the runner saves such a
request's generator state before it samples and puts it back after, which undoes the dropped
draw as the rewind does; the rewind is then skipped for CPU generators. The fix is installed
only where the installed vLLM has the bug (:func:`bug_present`).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch

from chimera_vllm.vllm.patches import patch_once


def bug_present() -> bool:
    """Whether vLLM's model runner rewinds a dropped draw by an offset a CPU generator lacks."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    try:
        torch.Generator("cpu").get_offset()
    except RuntimeError:
        return "set_offset" in inspect.getsource(GPUModelRunner._bookkeeping_sync)
    return False


def _dropped_draw_generators(runner) -> list[torch.Generator]:
    """The CPU generators of the requests whose token this step's sampling will drop."""
    num_reqs = runner.input_batch.num_reqs
    rows = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    generators = (runner.input_batch.generators.get(int(i)) for i in rows)
    return [g for g in generators if g is not None and g.device.type == "cpu"]


def keep_stream(original):
    """``_sample``, leaving the generators of requests whose token is dropped as they were."""

    @functools.wraps(original)
    def _sample(self, logits, spec_decode_metadata):
        saved = [(g, g.get_state()) for g in _dropped_draw_generators(self)]
        try:
            return original(self, logits, spec_decode_metadata)
        finally:
            for generator, state in saved:
                generator.set_state(state)

    return _sample


def skip_cpu_rewind(original):
    """``_bookkeeping_sync`` without the offset rewind of CPU generators (:func:`keep_stream` did it)."""

    @functools.wraps(original)
    def _bookkeeping_sync(self, *args, **kwargs):
        generators = self.input_batch.generators
        self.input_batch.generators = {i: g for i, g in generators.items() if g.device.type != "cpu"}
        try:
            return original(self, *args, **kwargs)
        finally:
            self.input_batch.generators = generators

    return _bookkeeping_sync


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    patch_once(GPUModelRunner, "_sample", keep_stream)
    patch_once(GPUModelRunner, "_bookkeeping_sync", skip_cpu_rewind)
