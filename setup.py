"""dapo-megatron: DAPO reinforcement learning on Megatron-core, Ray and SGLang."""

from setuptools import find_packages, setup

setup(
    name="dapo-megatron",
    version="0.1.0",
    description="DAPO (arXiv 2503.14476) RL trainer on Megatron-core, Ray and SGLang",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dapo_megatron", "dapo_megatron.*"]),
    install_requires=[
        # Ranges admit both the CPU build pinned in the README (2.13.0) and the
        # torch/transformers that the sglang GPU extra pins (2.14.1 / 5.19.0).
        "torch>=2.13.0,<2.15",
        "megatron-core==0.16.1",
        "ray>=2.40",
        "transformers>=4.56,<6",
        "sentencepiece>=0.2",
        "sympy>=1.13",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pyarrow>=15",
        "matplotlib>=3.8",
        "psutil>=5.9",  # megatron dist_checkpointing imports it
    ],
    extras_require={
        # GPU only; imported lazily. NVIDIA apex is detected at run time, never listed:
        # the PyPI package named `apex` is an unrelated project.
        # sglang pinned: its weight-update API moved within 0.5.x (sessions, per-rank
        # payloads); tests/contract/ check our requests against exactly this version.
        # TE: the range megatron-core 0.16.1's own dev extra declares (>=2.9, <2.12);
        # transformer-engine[pytorch] is an sdist that must build against the installed
        # torch (pip install --no-build-isolation), with the core_cu12/core_cu13 extra
        # matching torch.version.cuda.
        "gpu": ["sglang==0.5.23", "transformer-engine[pytorch]>=2.9,<2.12"],
        "dev": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "math-verify>=0.7", "pandas>=2"],
        # tests/contract/ also need sglang 0.5.23 without its GPU dependencies; pip cannot
        # express --no-deps in an extra, so the README's test command installs it (with the
        # modules it imports) as a second step: pip install --no-deps -r tests/sglang-cpu.txt
        "tensorboard": ["tensorboard>=2.15"],
    },
    entry_points={"console_scripts": ["dapo-megatron=dapo_megatron.cli:main"]},
)
