"""Optimizers: Clippy AdaGrad (adaptive update clipping) and its functional form."""

from mtl_clippy.optim.clippy import ClippyAdagrad, ClippyWorkspace, clippy_adagrad, clippy_step

__all__ = ["ClippyAdagrad", "ClippyWorkspace", "clippy_adagrad", "clippy_step"]
