"""Benchmarks run by ``python -m mesp_jax.bench NAME``."""
