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

# Polars' allocator (jemalloc) keeps freed pages for reuse for 5 s. Polars sets
# 0.5 s when it loads (dirty_decay_ms:500) and appends this variable, which wins.
# With 0.5 s every sessionizer bucket handed its large blocks back to the kernel
# and faulted them in again, zeroed: at 100M events (9 buckets) 5.1-5.2M minor page
# faults and 35.4-36.9 s, against 2.1M and 29.5-31.3 s with 5 s; one bucket's peak
# stayed under 8 GB (7.2-7.6 GB, against 7.0-7.3 GB). It must be set before polars
# is imported (the CLI and `import sdm...` do so); a user's own setting wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:5000")

__version__ = "0.1.0"
