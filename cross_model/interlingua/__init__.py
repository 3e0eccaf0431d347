"""LatentWire: a learned continuous interlingua (docs/METHODS.md, "LatentWire").

A small byte-level encoder reads A's context and pools it into M latent vectors of width d_z (what
crosses the wire); each frozen receiver has an adapter (d_z -> its embedding width) and an RMS
calibration, and reads the M vectors as soft tokens before the question. Modules: `encoder` (bytes ->
Z), `receiver_io` (adapters, the one prompt composer, losses, decoding, scoring), `wire` (Z as bytes),
`train_interlingua` (the train stage's job, DDP or DeepSpeed).
"""
