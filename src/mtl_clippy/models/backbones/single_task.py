"""Single-Task: a separate network per task, the no-sharing baseline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.backbones.base import Backbone
from mtl_clippy.models.layers import MLP, FeatureEmbedding


class _TaskNetwork(nn.Module):
    """Input layer, bottom MLP and tower of one task."""

    def __init__(self, embedding: FeatureEmbedding, mlp: MLP) -> None:
        super().__init__()
        self.embedding = embedding
        self.mlp = mlp

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        return self.mlp(self.embedding(categorical, numerical).flatten(1))


class SingleTask(Backbone):
    """One independent network per task: its own input layer, bottom (512, 256), tower (128, 64).

    Nothing is shared, so it is the reference point that tells whether sharing helps or hurts
    (negative transfer). Arguments as :class:`~mtl_clippy.models.SharedBottom` (``norm`` in
    every block of each network). Each network is one MLP ``bottom_dims + tower_dims -> 1``:
    its ``bottom_dims`` blocks have the role ``bottom``, the rest ``towers``.

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    shared_input = False

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        *,
        bottom_dims: Sequence[int] = (512, 256),
        **options: Any,
    ) -> None:
        super().__init__(metadata, **options)
        networks = []
        for _ in range(self.n_tasks):  # input layer, then MLP, task after task
            embedding = self.declare_input(self.new_input())
            dims = [*bottom_dims, *self.tower_dims]
            mlp = self.declare_split(self.new_mlp(embedding.output_dim, dims, 1), len(bottom_dims))
            networks.append(_TaskNetwork(embedding, mlp))
        self.networks = nn.ModuleList(networks)

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return per-task logits ``[batch, n_tasks]``."""
        return torch.cat([net(categorical, numerical) for net in self.networks], dim=1)
