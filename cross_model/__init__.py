"""cross_model: communication between language models through latent channels."""

__version__ = "0.1.0"
