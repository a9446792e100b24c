"""Retrieval primitives shared by evaluation and serving: the item index and the final ranking.

- `index`: exact chunked scoring and faiss indexes (flat, IVF, HNSW) over item vectors;
- `rank`: index top-K merged with the repeat head's re-scored history candidates.

`sdm.pipeline.ranking` and `sdm.serve` both build on these, so the scores a
served request gets are computed by the code `sdm evaluate` measured.
"""
