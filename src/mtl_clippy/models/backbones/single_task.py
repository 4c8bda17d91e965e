"""Single-Task: a separate network per task, the no-sharing baseline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.layers import MLP, FeatureEmbedding, as_metadata


class _TaskNetwork(nn.Module):
    """Input layer, bottom MLP and tower of one task."""

    def __init__(
        self,
        meta: DatasetMetadata,
        embed_dim: int,
        bottom_dims: Sequence[int],
        tower_dims: Sequence[int],
        dropout: float,
        sparse: bool,
        norm: str,
    ) -> None:
        super().__init__()
        self.embedding = FeatureEmbedding(meta, embed_dim, sparse=sparse)
        self.mlp = MLP(
            self.embedding.output_dim, [*bottom_dims, *tower_dims], dropout, output_dim=1, norm=norm
        )

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        return self.mlp(self.embedding(categorical, numerical).flatten(1))


class SingleTask(nn.Module):
    """One independent network per task: its own input layer, bottom (512, 256), tower (128, 64).

    Nothing is shared, so it is the reference point that tells whether sharing helps or hurts
    (negative transfer). Arguments as :class:`~mtl_clippy.models.SharedBottom` (``norm`` in
    every block of each network).

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        embed_dim: int = 128,
        bottom_dims: Sequence[int] = (512, 256),
        tower_dims: Sequence[int] = (128, 64),
        dropout: float = 0.2,
        sparse_embeddings: bool = False,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        meta = as_metadata(metadata)
        self.networks = nn.ModuleList(
            _TaskNetwork(meta, embed_dim, bottom_dims, tower_dims, dropout, sparse_embeddings, norm)
            for _ in range(meta.n_tasks)
        )

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return per-task logits ``[batch, n_tasks]``."""
        return torch.cat([net(categorical, numerical) for net in self.networks], dim=1)
