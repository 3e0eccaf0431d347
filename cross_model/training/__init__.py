"""Training the learned parts of methods: one loop (`training.loop`), the registry the train stage
asks (`training.trainables`), and AC's projection (`training.ac_projection`)."""
