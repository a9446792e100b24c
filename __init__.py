"""sdm: Sequential Deep Matching (Lv et al., CIKM 2019) as a batch pipeline.

`sdm sessionize` -> `sdm train` -> `sdm evaluate`; see README.md.
"""

import os

# OpenMP threads that busy-wait make PyTorch's CPU kernels (the LSTM above all)
# about 50x slower as soon as another process competes for the cores (measured
# on a loaded 2-core machine: 3.5 s with busy-waiting threads, 16 ms with
# passive ones, for one LSTM forward/backward). It must be set before torch
# starts its OpenMP runtime; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Polars' allocator (jemalloc) keeps freed pages for reuse for 5 s. Left at its
# defaults it handed the large blocks of each sessionizer stage back to the kernel
# at once, and the next stage or bucket faulted them in again, zeroed: at 100M
# events (9 buckets) 5.1-5.2M minor page faults and 35.4-36.9 s, against 2.1M and
# 29.5-31.3 s with this setting; one bucket's peak stayed under 8 GB (7.2-7.6 GB,
# against 7.0-7.3 GB). jemalloc reads it when polars loads, so it only takes effect
# when sdm is imported before polars (the CLI always is); a user's own setting wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:5000")

__version__ = "0.1.0"
