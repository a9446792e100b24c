"""Log acquisition, the first room of the pipeline: logs -> shards (`sessionize`) -> model (`pipeline`,
`model`) -> recommendations (`serve`).

- `synth`: a synthetic e-commerce log with planted sequential structure (`sdm synth`).
- `convert`: public datasets' raw files to the SDM log schema (`sdm convert`).
  Its readers: `formats` (the event logs), `movielens`; what they share: `reading`.
- `download`: public datasets with a stable address, checksum-verified (`sdm download`).
"""
