"""Shared-Bottom: one MLP over the input layer shared by all tasks, one tower per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.layers import MLP, FeatureEmbedding, as_metadata


class SharedBottom(nn.Module):
    """Shared-Bottom multitask network (Caruana 1997), the simplest hard-sharing baseline.

    ``input layer -> bottom MLP (512, 256) -> per task: tower MLP (128, 64) -> 1``.

    Args:
        metadata: the data's :class:`DatasetMetadata` (field sizes, tasks).
        embed_dim: width of each field vector.
        bottom_dims: hidden widths of the shared bottom.
        tower_dims: hidden widths of each task tower.
        dropout: dropout after every hidden layer.
        sparse_embeddings: sparse gradients for the embedding table.
        norm: ``"batch"`` (BatchNorm in every MLP block, as published), ``"layer"``
            (LayerNorm) or ``"none"``.

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
        self.embedding = FeatureEmbedding(meta, embed_dim, sparse=sparse_embeddings)
        self.bottom = MLP(self.embedding.output_dim, bottom_dims, dropout, norm=norm)
        self.towers = nn.ModuleList(
            MLP(self.bottom.output_dim, tower_dims, dropout, output_dim=1, norm=norm)
            for _ in range(meta.n_tasks)
        )

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return per-task logits ``[batch, n_tasks]``."""
        h = self.bottom(self.embedding(categorical, numerical).flatten(1))
        return torch.cat([tower(h) for tower in self.towers], dim=1)
