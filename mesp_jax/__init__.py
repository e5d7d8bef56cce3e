"""mesp_jax: binary-latent image generation (BL-AE + gamma-ARVM) in JAX/Flax.

Implements "Exploring Image Generation via Mutually Exclusive Probability
Spaces and Local Correlation Hypothesis" (Zhao & Basu); docs/method.md has
the method. ``mesp_jax.load_generator(run_dir)`` restores trained models
(:mod:`mesp_jax.api`).
"""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so importing a submodule does not pull in the whole library.
  if name in ("load_generator", "Generator"):
    from mesp_jax import api
    return getattr(api, name)
  raise AttributeError(f"module 'mesp_jax' has no attribute {name!r}")
