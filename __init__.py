"""sdm: Sequential Deep Matching (Lv et al., CIKM 2019) as a batch pipeline.

`sdm sessionize` -> `sdm train` -> `sdm evaluate`; see README.md.
"""

__version__ = "0.1.0"
