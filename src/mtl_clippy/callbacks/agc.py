"""Adaptive gradient clipping (AGC, Brock et al. 2021), one of the paper's baselines.

AGC bounds each *unit* of a gradient relative to the same unit of the weights. A unit is one
output unit of a layer: a row of a ``Linear`` weight ``[out, in]``, a row of an embedding
table, the slice ``W[i]`` of any tensor with two or more dimensions; a bias or any other
vector (or scalar) is one unit as a whole. With ``lambda`` the clipping threshold and
``eps`` the floor on weight norms, for every unit ``i``:

    ratio_i = ||g_i|| / max(||W_i||, eps)
    if ratio_i > lambda:  g_i <- g_i * lambda * max(||W_i||, eps) / ||g_i||

so a unit whose gradient is large next to its weights is scaled down to exactly that bound,
its direction kept; every other unit is left untouched. ``eps`` keeps freshly initialised
(zero) weights, a zero bias say, from freezing: their gradient may still reach
``lambda * eps``. Unlike clipping by the global norm, the bound is per unit and relative, so
a layer whose gradients explode is clipped without shrinking the others.

Brock et al. leave the final classifier layer unclipped; :class:`AdaptiveGradientClipping`
does the same by default (``skip_heads``): the output layer of every task tower, found by
structure (the head ``Linear`` of each tower MLP, :func:`tower_heads`), not by name or shape.

Sparse gradients (``model.sparse_embeddings=true``) are clipped exactly: the gradient is
coalesced (duplicate rows summed, as the optimizer would do anyway) and each row it touches
is clipped against that row of the table; untouched rows have a zero gradient, which AGC
never changes. This gives the numbers of the dense gradient, at the cost of the touched rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

__all__ = ["AdaptiveGradientClipping", "adaptive_clip_", "tower_heads", "unit_norms"]

#: The floor on a unit's gradient norm in the division (a zero gradient gives a huge ratio
#: that the min(1, .) turns into 1: nothing changes, and no 0/0).
_TINY = 1e-30


def _check(name: str, value: Any) -> float:
    """A positive finite number, or ``ValueError`` naming the option."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


#: The precision of the norms and factors. In 32 or 16 bits the sum of squares of a finite
#: but exploding gradient (elements above about 1e19) overflows: its norm reads as inf and
#: the unit's gradient would become 0 instead of being scaled to the bound; in 16 bits the
#: bound ``clipping * eps`` itself can round to 0. The gradients stay in their own dtype.
_NORM_DTYPE = torch.float64


def unit_norms(x: Tensor) -> Tensor:
    """The L2 norm of each unit of ``x``, in float64: one per slice ``x[i]`` (shape
    ``[n, 1, ...]``, to broadcast against ``x``) for two or more dimensions, the whole
    tensor's for fewer (a 0-dim tensor)."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x, dtype=_NORM_DTYPE)
    dims = tuple(range(1, x.dim()))
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=_NORM_DTYPE)


def _scale_(weight_norm: Tensor, grad_norm: Tensor, clipping: float, eps: float) -> Tensor:
    """In place on ``weight_norm``: ``min(1, clipping * max(weight_norm, eps) / grad_norm)``,
    the factor of each unit (1 where the unit is within the bound, or its gradient is 0)."""
    bound = weight_norm.clamp_min_(eps).mul_(clipping)
    return bound.div_(grad_norm.clamp_min(_TINY)).clamp_max_(1.0)


def _clip_sparse_(p: Tensor, clipping: float, eps: float) -> None:
    """AGC on the sparse (COO, one sparse dimension: embedding rows) gradient of ``p``,
    coalesced in place of the original (``p.grad``), each touched row against its row of
    ``p``."""
    grad = p.grad
    assert grad is not None
    if grad.sparse_dim() != 1:
        raise ValueError(
            "adaptive gradient clipping takes sparse gradients of embedding tables (one "
            f"sparse dimension, the rows), got one with {grad.sparse_dim()}"
        )
    if not grad.is_coalesced():
        grad = grad.coalesce()  # duplicate rows summed: the row's whole gradient
        p.grad = grad
    rows = grad._indices()[0]
    values = grad._values()  # [touched rows, *row shape], a view of the gradient's values
    if values.numel() == 0:
        return
    if p.dim() <= 1:  # a vector is one unit as a whole, as for a dense gradient
        values.mul_(_scale_(unit_norms(p.detach()), unit_norms(values), clipping, eps))
        return
    weights = p.detach().index_select(0, rows)
    values.mul_(_scale_(unit_norms(weights), unit_norms(values), clipping, eps))


@torch.no_grad()
def adaptive_clip_(params: Iterable[Tensor], clipping: float = 0.01, eps: float = 1e-3) -> None:
    """Clip the gradients of ``params`` in place, unit-wise, by AGC (the module docstring):
    ``g_i <- g_i * min(1, clipping * max(||W_i||, eps) / ||g_i||)``.

    Parameters without a gradient are skipped. Dense gradients of vectors and scalars are
    handled together (two multi-tensor norms); each tensor of two or more dimensions takes
    one norm over its units for the weights and one for the gradient. Nothing reads a value
    back to the host (no synchronisation with a GPU), except the coalescing of a sparse
    gradient, whose size depends on the batch.
    """
    clipping, eps = _check("clipping", clipping), _check("eps", eps)
    flat_p, flat_g, grads, scales = [], [], [], []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            _clip_sparse_(p, clipping, eps)
        elif p.dim() <= 1:
            flat_p.append(p.detach())
            flat_g.append(g)
        else:
            grads.append(g)
            scales.append(_scale_(unit_norms(p.detach()), unit_norms(g), clipping, eps))
    if flat_g:
        weight_norms = torch._foreach_norm(flat_p, 2, dtype=_NORM_DTYPE)
        grad_norms = torch._foreach_norm(flat_g, 2, dtype=_NORM_DTYPE)
        grads += flat_g
        scales += [_scale_(w, n, clipping, eps) for w, n in zip(weight_norms, grad_norms)]
    for g, s in zip(grads, scales):
        # 16-bit gradients are scaled in float32: a small factor (1e-10) is 0 in float16
        g.mul_(s.to(torch.promote_types(g.dtype, torch.float32)))


def tower_heads(module: nn.Module) -> list[nn.Linear]:
    """The output layer of every task tower inside ``module``: the head ``Linear`` (the
    ``output_dim`` layer after the hidden blocks) of each :class:`~mtl_clippy.models.layers.MLP`
    whose parameters have the role ``towers`` (docs/models.md, parameter roles). That is one
    per task for every backbone of this project but logistic regression, which has no
    layer apart from its weights. Without a backbone (no roles), every MLP's head."""
    from mtl_clippy.models.backbones.base import module_parameter_roles
    from mtl_clippy.models.layers import MLP

    roles = module_parameter_roles(module)
    towers = {id(p) for _, p in roles.get("towers", [])} if roles is not None else None
    heads: list[nn.Linear] = []
    for m in module.modules():
        if not isinstance(m, MLP) or len(m) <= m.block_starts[-1]:
            continue  # no output layer
        head = m[m.block_starts[-1]]
        if isinstance(head, nn.Linear) and (
            towers is None or all(id(p) in towers for p in head.parameters())
        ):
            heads.append(head)
    return heads


class AdaptiveGradientClipping(pl.Callback):
    """Adaptive gradient clipping (Brock et al. 2021) of every gradient before each optimizer
    step: ``grad_clip=agc`` (the module docstring gives the rule).

    It acts in ``on_before_optimizer_step``, after the backward pass, after Lightning has
    unscaled 16-bit mixed-precision gradients and all-reduced DDP ones, and before Lightning's
    own clipping (``trainer.gradient_clip_val``) and the optimizer's step; it works with any
    optimizer, and with sparse embedding gradients (clipped exactly, row by row).

    Args:
        clipping: lambda, the largest ratio ``||g_i|| / max(||W_i||, eps)`` of a unit's
            gradient norm to its weight norm (0.01: Brock et al.'s value for large batches;
            they use up to 0.16 for small ones).
        eps: the floor on a unit's weight norm (1e-3), so that zero weights can still move.
        skip_heads: leave the output layer of each task tower (:func:`tower_heads`)
            unclipped, as Brock et al. leave the final classifier layer.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, skip_heads: bool = True) -> None:
        self.clipping = _check("clipping", clipping)
        self.eps = _check("eps", eps)
        if not isinstance(skip_heads, bool):
            raise ValueError(f"skip_heads must be true or false, got {skip_heads!r}")
        self.skip_heads = skip_heads
        self._params: list[Tensor] | None = None

    def clipped_parameters(self, pl_module: nn.Module) -> list[Tensor]:
        """The parameters this callback clips: every trainable one, but the tower heads'
        with ``skip_heads``."""
        skipped = (
            {id(p) for head in tower_heads(pl_module) for p in head.parameters()}
            if self.skip_heads
            else set()
        )
        return [p for p in pl_module.parameters() if p.requires_grad and id(p) not in skipped]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = self.clipped_parameters(pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._params is None:
            self._params = self.clipped_parameters(pl_module)
        adaptive_clip_(self._params, self.clipping, self.eps)
