"""Process settings every command shares: an offline hub and vLLM's log away from stdout."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def vllm_log_to_file(path: Path | None) -> Iterator[None]:
    """While inside, vLLM's log goes to path (appended to): the engine processes started meanwhile
    read vLLM's logging config (VLLM_LOGGING_CONFIG_PATH, a file written beside the log), and so
    does this process if it imports vLLM for the first time. None, or a config the user set
    already, leaves vLLM's logging alone."""
    if path is None or "VLLM_LOGGING_CONFIG_PATH" in os.environ:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"vllm": {"format": "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(path.resolve()), "formatter": "vllm", "mode": "a"}
        },
        "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    }
    config_path = path.with_suffix(".logging.json")
    config_path.write_text(json.dumps(config))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_path.resolve())
    try:
        yield
    finally:
        del os.environ["VLLM_LOGGING_CONFIG_PATH"]
