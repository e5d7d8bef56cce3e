"""Data: image sources (Debian IDX files, TF-free tfds, folders), the grain
pipeline for encoded images and the in-memory loader for small sets.

Images leave this package as ``[B, H, W, C]`` float32 in ``[-1, 1]``.

Errors the user can fix: :class:`DataNotFoundError` (the data is not on this
machine) and :class:`DataError` (a file is there but damaged, truncated, of
another format or holds out-of-range values); both messages name the file
and what to do, and ``main.py`` prints them without a traceback.
"""

from mesp_jax.data.loader import Loader, eval_batches  # noqa: F401
from mesp_jax.data.sources import (  # noqa: F401
    DataError,
    DataNotFoundError,
    data_channels,
    get_source,
    image_channels,
    source_from_config,
    train_eval_sources,
    train_loader,
)
