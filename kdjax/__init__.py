"""kdjax: knowledge distillation research in JAX."""

__version__ = "0.1.0"
