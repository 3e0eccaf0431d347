"""C2C-style KV communication between models of different shapes (Fu et al., ICLR 2026): a learned
projector maps the sender's cache into the receiver's head layout, layer by layer, with learned gates.
`align` pairs tokens of two tokenisers by characters, `projector` is the trained map, `train_projector` the
train stage's job; the method is `cross_model.methods.c2c`."""
