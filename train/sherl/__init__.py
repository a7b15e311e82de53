"""SHERL: a side network that aggregates the cached layers and runs its result through the backbone's frozen
last block (read from the backbone folder, hash-checked; never trained nor saved)."""

from ._frozen import ARCHITECTURES, FrozenLastBlock, weights_sha256
from .config import SHERLConfig
from .model import SHERL, SHERLClassifier, bind_store

__all__ = ["SHERLConfig", "SHERL", "SHERLClassifier", "FrozenLastBlock", "ARCHITECTURES", "bind_store",
           "weights_sha256"]
