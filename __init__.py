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

__version__ = "0.1.0"
