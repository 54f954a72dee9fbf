"""The Llama 4 text network and nothing else: no training, parallelism, files or serving."""

from behemoth.model.moe import RouterOutput
from behemoth.model.transformer import Transformer, init_weights

__all__ = ["Transformer", "RouterOutput", "init_weights"]
