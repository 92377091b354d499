"""dapo-megatron: the DAPO algorithm (arXiv 2503.14476) on Megatron-core, Ray and SGLang."""

__version__ = "0.1.0"
