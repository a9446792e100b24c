"""Arrow list columns as numpy arrays: `list_parts` splits a list column into its offsets and
flat values, `gather` cuts right-padded rows out of flat values.

The streaming dataset (`pipeline/dataset.py`) gathers each session's items and its
long-term window with them; `pipeline/tables.py` pads the value lists of multi-valued
features with them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, flat values) of a list column, as numpy arrays."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]] if len(offsets) else values


def gather(values: np.ndarray, start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """Rows values[start[i] : start[i]+length[i]] right-padded with 0 to `width`."""
    idx = start[:, None] + np.arange(width)[None, :]  # (S, W)
    mask = np.arange(width)[None, :] < length[:, None]
    if len(values) == 0:
        return np.zeros(idx.shape, dtype=np.int64)
    return np.where(mask, values[np.minimum(idx, len(values) - 1)], 0).astype(np.int64)
