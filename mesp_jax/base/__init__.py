"""Infrastructure every layer may use; imports nothing of mesp_jax above it.

sharding (mesh, rules, placement, host gather, padded batch map), bits (pack,
unpack, Hamming distance), gamma (the observation-range grammar), io (atomic
files, grids), image (conversions, PSNR), config (loading and the schema).
"""
