"""One runner for every forward pass: embedding, blocks with taps (or their statistics summed in the block's
program), the one cross-entropy, loss and gradients, over batches of windows split across a device mesh.

>>> import jaxprune as jp
>>> from jaxprune.runner import Runner
"""
from jaxprune.runner._batches import Batches
from jaxprune.runner._forward import CE_CHUNK, split, static_config
from jaxprune.runner._mesh import data_mesh, data_size, make_mesh
from jaxprune.runner._runner import Runner, as_input, windows_in_turn

__all__ = ["Batches", "CE_CHUNK", "Runner", "as_input", "data_mesh", "data_size", "make_mesh", "split", "static_config",
           "windows_in_turn"]
