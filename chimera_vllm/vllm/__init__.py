"""Chimera inside vLLM: plugin, draft model, proposer, offline engine helpers, prompt lookup.

This package's name shadows nothing: every module here imports vLLM absolutely (``import vllm``)."""
