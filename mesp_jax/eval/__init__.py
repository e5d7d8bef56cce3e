"""Evaluation: Frechet distances, memorisation, overlap coefficients."""
