"""The paper's experiments as stages: the gamma sweep and the MESP study."""
