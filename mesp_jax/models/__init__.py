"""Flax models: the binary latent autoencoder and the gamma-ARVM."""
