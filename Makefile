# `make demo`: set up .venv and run the main job; `make test`: set up .venv and run the tests.
.PHONY: setup demo test

setup:
	bash scripts/setup_venv.sh

demo: setup
	.venv/bin/chimera-vllm demo

test: setup
	.venv/bin/ruff check chimera_vllm kernels tests benchmarks
	.venv/bin/python -m pytest -q tests
