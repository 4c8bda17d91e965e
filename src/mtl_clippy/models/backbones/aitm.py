"""Adaptive Information Transfer Multi-task (AITM) for sequential conversion tasks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.backbones.base import Backbone


class _TransferAttention(nn.Module):
    """Attention over {transferred info, own representation}: ``sum_u softmax(<Qu, Ku>/sqrt(d)) Vu``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, transferred: Tensor, own: Tensor) -> Tensor:
        x = torch.stack([transferred, own], dim=1)  # [B, 2, D]
        scores = (self.query(x) * self.key(x)).sum(-1) * self.scale  # [B, 2]
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)
        return (weights * self.value(x)).sum(dim=1)


class AITM(Backbone):
    """AITM (Xi et al., KDD 2021): tasks in funnel order, each passing information to the next.

    Task ``t`` has its own bottom MLP (512, 256) over the shared input layer, giving ``q_t``
    (256-d at the published sizes). Task 0 (click) uses ``z_0 = q_0``; task ``t > 0``
    (conversion) receives ``p = info_t(z_{t-1})`` (``Linear -> ReLU``, 256 -> 256) and mixes it
    with its own ``q_t`` by attention, ``z_t = AIT(p, q_t)``. Each ``z_t`` feeds its tower
    (128, 64) -> 1. The tasks are chained in ``metadata.tasks`` order (click -> conversion).
    The paper's behavioral expectation calibrator (an extra loss term) is not included: the
    module's loss is the same weighted BCE for every backbone. ``norm`` (``"batch"``,
    ``"layer"`` or ``"none"``) is the normalisation of every bottom and tower block (the
    transfer layer ``Linear -> ReLU`` has none, as published). Roles: the bottoms, transfer
    layers and attention are ``bottom``; the other keyword arguments are :class:`Backbone`'s.

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        *,
        bottom_dims: Sequence[int] = (512, 256),
        **options: Any,
    ) -> None:
        if not bottom_dims:
            raise ValueError("AITM needs a non-empty bottom_dims (the transferred width)")
        super().__init__(metadata, **options)
        d_in, width, n = self.embedding.output_dim, bottom_dims[-1], self.n_tasks
        self.bottoms = self.declare(
            "bottom", nn.ModuleList(self.new_mlp(d_in, bottom_dims) for _ in range(n))
        )
        # Transfer modules exist for tasks 1.. only: the last task passes nothing on.
        self.info = self.declare(
            "bottom",
            nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(n - 1)),
        )
        self.attention = self.declare(
            "bottom", nn.ModuleList(_TransferAttention(width) for _ in range(n - 1))
        )
        self.add_towers(width)

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return per-task logits ``[batch, n_tasks]`` (each tower right after its task's
        representation, down the chain)."""
        x = self.embedding(categorical, numerical).flatten(1)
        z = self.bottoms[0](x)
        logits = [self.towers[0](z)]
        for t in range(1, len(self.towers)):
            z = self.attention[t - 1](self.info[t - 1](z), self.bottoms[t](x))
            logits.append(self.towers[t](z))
        return torch.cat(logits, dim=1)
