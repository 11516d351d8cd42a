"""orz_jax: Open-Reasoner-Zero in JAX/Flax."""

__version__ = "0.1.0"
