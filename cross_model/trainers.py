"""Every trainable component the train stage knows, registered here one line each (each trainer's
module defines its `TRAINABLE`). The order is the order the train stage runs them."""

from cross_model.c2c import train_fuser, train_projector
from cross_model.interlingua import train_interlingua
from cross_model.training import ac_projection, linear_probe
from cross_model.training.trainables import register_trainable, registered_trainables  # noqa: F401 - the pipeline asks it

register_trainable(train_fuser.TRAINABLE)  # "c2c": C2C's fuser
register_trainable(train_projector.TRAINABLE)  # "kv_translate": the KV translator's projector
register_trainable(ac_projection.TRAINABLE)  # "projection": AC's linear map W
register_trainable(train_interlingua.TRAINABLE)  # "interlingua": LatentWire's encoder and adapters
register_trainable(
    linear_probe.TRAINABLE
)  # "linear_probe": LatentWire's probe baseline on A's states
