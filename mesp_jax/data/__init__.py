"""Data: image sources (Debian IDX files, TF-free tfds, folders), the grain
pipeline for encoded images and the in-memory loader for small sets.

Images leave this package as ``[B, H, W, C]`` float32 in ``[-1, 1]``.
"""

from mesp_jax.data.loader import Loader, eval_batches  # noqa: F401
from mesp_jax.data.sources import (  # noqa: F401
    DataNotFoundError,
    data_channels,
    get_source,
    image_channels,
    source_from_config,
    train_eval_sources,
    train_loader,
)
