"""Where one engine step's time goes, per method: vLLM's torch profiler summed by component.

    python benchmarks/profile_step.py --target HuggingFaceTB/SmolLM2-135M-Instruct \
        --draft smollm2-135m-instruct --methods none chimera:2 --batch-size 16 --num-prompts 16 \
        --out benchmarks/results/profile-step-batch16

The same as `chimera-vllm profile-step` (chimera_vllm/step_profile.py): prints milliseconds per
engine step by component (target forward, sampling/verification, draft proposal and its parts)
and writes OUT.json, OUT.md and the raw traces under OUT-traces/.
"""

import sys

from chimera_vllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile-step", *sys.argv[1:]]))
