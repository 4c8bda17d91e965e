"""Neural collaborative filtering (NeuMF) on AliExpress's user and item sides."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.layers import MLP, FeatureEmbedding, as_metadata


class NCF(nn.Module):
    """NeuMF (He et al., WWW 2017) adapted to multi-field users and items, with per-task towers.

    AliExpress has no user or item ids, only feature fields of each side, so each side is a
    set of fields:

    * user side: the user categorical fields (``metadata.user_fields``, 0..8) plus one vector
      ``Linear(23 -> embed_dim)`` of the user numerical features (``metadata.user_numerical``,
      0..22);
    * item side: the item categorical fields (9..15) plus ``Linear(40 -> embed_dim)`` of the
      item numerical features (23..62).

    The input layer therefore has ``16 + 2`` field vectors (the numerical features are split
    into the two sides instead of one 63-wide projection). Branches:

    * GMF: the user vector (mean of the user-side field vectors) times the item vector (mean
      of the item-side field vectors), element-wise, ``embed_dim`` wide;
    * MLP: all 18 field vectors, flattened, through an MLP (512, 256).

    Both branches share the embedding table (the shared input layer of all our backbones;
    NeuMF's separate GMF/MLP tables are a choice we do not copy). Their outputs are
    concatenated and fed to one tower (128, 64) -> 1 per task.

    ``norm``: ``"batch"`` (BatchNorm in every MLP block, as published), ``"layer"`` (LayerNorm)
    or ``"none"``.

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        embed_dim: int = 128,
        mlp_dims: Sequence[int] = (512, 256),
        tower_dims: Sequence[int] = (128, 64),
        dropout: float = 0.2,
        sparse_embeddings: bool = False,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        meta = as_metadata(metadata)
        groups = [g for g in (meta.user_numerical, meta.item_numerical) if g]
        self.embedding = FeatureEmbedding(
            meta, embed_dim, sparse=sparse_embeddings, numerical_groups=groups
        )
        user = list(meta.user_fields)
        item = list(meta.item_fields)
        if meta.user_numerical:
            user.append(meta.n_fields)
        if meta.item_numerical:
            item.append(meta.n_fields + (1 if meta.user_numerical else 0))
        if not user or not item:
            raise ValueError("NCF needs at least one user-side and one item-side feature")
        self.register_buffer("user_index", torch.tensor(user), persistent=False)
        self.register_buffer("item_index", torch.tensor(item), persistent=False)
        self.mlp = MLP(self.embedding.output_dim, mlp_dims, dropout, norm=norm)
        self.towers = nn.ModuleList(
            MLP(embed_dim + self.mlp.output_dim, tower_dims, dropout, output_dim=1, norm=norm)
            for _ in range(meta.n_tasks)
        )

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return per-task logits ``[batch, n_tasks]``."""
        fields = self.embedding(categorical, numerical)
        user = fields.index_select(1, self.user_index).mean(dim=1)
        item = fields.index_select(1, self.item_index).mean(dim=1)
        h = torch.cat([user * item, self.mlp(fields.flatten(1))], dim=1)
        return torch.cat([tower(h) for tower in self.towers], dim=1)
