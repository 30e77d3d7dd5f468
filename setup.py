from setuptools import find_packages, setup

setup(
    name="chimera-vllm",
    version="0.1.0",
    description="Chimera speculative decoding (arXiv 2402.15758) as a vLLM extension",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder (design card) but install
    # as chimera_vllm.kernels, so no bare top-level package named `kernels` is created.
    packages=["chimera_vllm", *(f"chimera_vllm.{p}" for p in find_packages("chimera_vllm")), "chimera_vllm.kernels"],
    package_dir={"chimera_vllm.kernels": "kernels"},
    package_data={
        "chimera_vllm.drafts": ["*/*.json", "*/*.safetensors", "*/*.md", "*/*.png"],
        "chimera_vllm.data": ["*.jsonl", "*.jsonl.gz", "*.txt", "*.md"],
    },
    install_requires=[
        "torch>=2.5",
        "transformers>=4.57",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm",
        "matplotlib",
        "huggingface_hub",
        # reading the GGUF files real targets ship in (chimera-vllm fetch-target)
        "gguf>=0.10",
        "accelerate",
        # vLLM's serving benchmark client reads its prompt file with pandas (chimera-vllm bench-serving)
        "pandas",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff>=0.6"],
    },
    entry_points={
        "console_scripts": ["chimera-vllm=chimera_vllm.cli:main"],
        "vllm.general_plugins": ["chimera=chimera_vllm.vllm.plugin:register"],
    },
)
