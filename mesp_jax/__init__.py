"""mesp_jax: binary-latent image generation (BL-AE + gamma-ARVM) in JAX/Flax.

Implements "Exploring Image Generation via Mutually Exclusive Probability
Spaces and Local Correlation Hypothesis" (Zhao & Basu).
"""

__version__ = "0.1.0"
