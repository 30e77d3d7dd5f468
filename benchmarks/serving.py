"""vLLM's OpenAI-compatible server under load, with and without speculation.

    python benchmarks/serving.py --target HuggingFaceTB/SmolLM2-135M-Instruct --draft DRAFT \
        [--methods none ngram:3 chimera:2] [--concurrency 1 4 16] [--request-rates 1 4] \
        [--num-prompts 40] [--out benchmarks/results/serving-cpu] [any vLLM server argument...]

The same as `chimera-vllm bench-serving` (chimera_vllm/serving_bench.py): one server on
127.0.0.1 per method, vLLM's serving client for each load (at most --num-prompts requests
and --timeout seconds), TTFT/TPOT/E2EL percentiles; prints a table and writes OUT.json,
OUT.md and OUT.png.
"""

import sys

from chimera_vllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-serving", *sys.argv[1:]]))
