"""Triton kernels for Chimera, installed as ``chimera_vllm.kernels`` (see README.md here)."""
