"""Optimizers: Clippy AdaGrad (adaptive update clipping) and its functional core."""

from mtl_clippy.optim.clippy import ClippyAdagrad, clippy_step

__all__ = ["ClippyAdagrad", "clippy_step"]
