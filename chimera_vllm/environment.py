"""Process settings every command shares: an offline hub and vLLM's log away from stdout."""

from __future__ import annotations

import os


def use_offline_hub() -> None:
    """Resolve hub names from the local cache only: nothing is downloaded at run time.

    Set HF_HUB_OFFLINE=0 to allow downloads. The environment variable also reaches
    subprocesses (vLLM's workers); the constant is what an already imported
    huggingface_hub consults.
    """
    if "HF_HUB_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = "1"
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True


def logs_to_stderr() -> None:
    """vLLM logs to stdout by default; the commands print their results (e.g. --json) there."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
