"""What the baseline scorers share.

The score-function type, sparse query scores sliced by item range (`_Entries`),
and a context that silences torch's sparse-CSR notice.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

ScoreFn = Callable[[int, int], Tensor]


@contextlib.contextmanager
def _quiet_sparse() -> Iterator[None]:
    """Silence torch's "CSR support is in beta" notice; the operations used here are stable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        yield



class _Entries:
    """(rows, cols, values) of sparse query scores, sliced by column range.

    Sorting by column is only paid for when a chunk does not cover every item.
    """

    def __init__(self, rows: Tensor, cols: Tensor, vals: Tensor) -> None:
        self.rows, self.cols, self.vals = rows, cols, vals
        self.sorted = False

    def in_range(self, start: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
        """Entries with start <= col < end."""
        if not self.sorted:
            if start == 0 and (self.cols.numel() == 0 or end > int(self.cols.max())):
                return self.rows, self.cols, self.vals
            order = torch.argsort(self.cols)
            self.rows, self.cols, self.vals = self.rows[order], self.cols[order], self.vals[order]
            self.sorted = True
        lo, hi = torch.searchsorted(self.cols, torch.tensor([start, end])).tolist()
        return self.rows[lo:hi], self.cols[lo:hi], self.vals[lo:hi]
