"""Sparse and ragged tensor helpers of the session-kNN baselines (`sessionknn.py`, `sessionindex.py`).

CSR row pointers, the elements of many index ranges at once, per-group maxima,
sorted COO matrices and their products, and a per-row top-k. All on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdm.pipeline.baselines.scoring import _quiet_sparse


def ptr(owner: Tensor, n: int) -> Tensor:
    """CSR row pointer (n + 1,) of entries sorted by `owner`."""
    ptr = torch.zeros(n + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(owner, minlength=n), 0)
    return ptr


def ranges(starts: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
    """For ranges [starts[e], starts[e] + lens[e]): (owner e, index) of every element, range by range."""
    owner = torch.repeat_interleave(torch.arange(lens.shape[0]), lens)
    first = torch.cumsum(lens, 0) - lens
    return owner, starts[owner] + torch.arange(owner.shape[0]) - first[owner]


def group_max(values: Tensor, group: Tensor, n_groups: int) -> Tensor:
    return torch.zeros(n_groups, dtype=values.dtype).scatter_reduce_(0, group, values, "amax", include_self=False)


def coo(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """Sparse COO matrix of entries already sorted by (row, col), each once."""
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, shape, dtype=torch.float64, is_coalesced=True, check_invariants=False
    )


def spmm(mats: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(row, col, [values of each]) of sparse products a @ b that share one sparsity pattern.

    COO products (CSR ones leak their output on CPU in this torch) come out
    coalesced: entries sorted by (row, col), so the products line up.
    """
    with _quiet_sparse():
        outs = [torch.sparse.mm(x, y).coalesce() for x, y in mats]
    idx = outs[0].indices()
    if not all(torch.equal(o.indices(), idx) for o in outs[1:]):
        raise RuntimeError("sparse products with one pattern gave different patterns")
    return idx[0], idx[1], [o.values() for o in outs]


def top_per_row(key: Tensor, row: Tensor, n_rows: int, k: int) -> Tensor:
    """Indices of the (at most) k entries of largest `key` (>= 0) of each row, row by row.

    `row` must be sorted; keys of one row must be distinct for a deterministic choice.
    """
    if row.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(row, minlength=n_rows)
    width = int(counts.max())
    if width <= k:
        return torch.arange(row.shape[0])
    first = torch.cumsum(counts, 0) - counts
    pos = torch.arange(row.shape[0]) - first[row]
    dense = torch.full((n_rows, width), -1, dtype=torch.long)
    dense[row, pos] = key
    top, at = dense.topk(k, dim=1)
    return (first.unsqueeze(1) + at)[top >= 0]
