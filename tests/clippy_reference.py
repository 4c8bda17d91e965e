"""An independent NumPy statement of one Clippy step, written from the algorithm's text (the
reference implementation is TensorFlow Recommenders' ClippyAdagrad; its semantics are spelled
out in mtl_clippy.optim.ClippyAdagrad's docstring), shared by the optimizer's tests. Nothing
here imports the package."""

from __future__ import annotations

import numpy as np


def reference_step(w, g, acc, *, lr, eps, rel, acc_rel, abs_t, wd, clip_acc, standard):
    """One step for one tensor, in the arrays' dtype. Returns (w, acc, sigma) as new arrays."""
    dt = w.dtype.type
    lr, eps, rel, acc_rel, abs_t, wd = (dt(v) for v in (lr, eps, rel, acc_rel, abs_t, wd))
    w, g, acc = w.copy(), g.copy(), acc.copy()
    if wd > 0:
        w = w - w * wd * lr
    if standard:
        acc = acc + g * g
    p = dt(1) / np.sqrt(acc + eps)
    delta = lr * g * p
    with np.errstate(invalid="ignore"):  # inf * 0 for the "never clip" thresholds
        bound = abs_t + rel * np.abs(w) + acc_rel * p
    ratio = np.ones_like(w)
    moving = delta != 0
    # a subnormal delta overflows the ratio to inf: that element never clips (as intended)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio[moving] = bound[moving] / np.abs(delta[moving])
    sigma = dt(min(dt(1), ratio.min())) if ratio.size else dt(1)
    if not standard:
        acc = acc + (sigma * g) ** 2 if clip_acc else acc + g * g
    return w - sigma * delta, acc, sigma
