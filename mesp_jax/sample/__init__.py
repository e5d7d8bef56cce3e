"""Samplers: the neural ARVM decoder (KV cache) and the kernel ARVM."""
