"""lorenza: memory-efficient optimizers for LLM fine-tuning, built on lorenza_kernels."""

__version__ = "0.1.0"
