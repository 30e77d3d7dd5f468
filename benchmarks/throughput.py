"""vLLM offline throughput on MT-bench turn 1: no speculation, vLLM's n-gram and Chimera.

    python benchmarks/throughput.py --target HuggingFaceTB/SmolLM2-135M-Instruct --draft DRAFT \
        [--methods none ngram:4 chimera:1 chimera:4] [--batch-sizes 1 4 16 64] [--dtypes bfloat16 float32] \
        [--temperatures 0 0.7] [--out benchmarks/results/throughput-cpu]

The same as `chimera-vllm bench` (chimera_vllm/bench.py): one engine per dtype, method and batch
size; prints a table and writes OUT.json, OUT.md and OUT.png.
"""

import sys

from chimera_vllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
