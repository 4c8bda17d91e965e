"""Neural collaborative filtering (NeuMF) on AliExpress's user and item sides."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.backbones.base import Backbone


class NCF(Backbone):
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

    ``mlp_dims`` are the MLP branch's widths (role ``bottom``); the other keyword arguments
    are :class:`Backbone`'s.

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        *,
        mlp_dims: Sequence[int] = (512, 256),
        **options: Any,
    ) -> None:
        super().__init__(metadata, **options)
        meta = self.metadata
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
        self.mlp = self.declare("bottom", self.new_mlp(self.embedding.output_dim, mlp_dims))
        self.add_towers(self.embed_dim + self.mlp.output_dim)

    def numerical_groups(self) -> list[tuple[int, ...]]:
        """The user and the item numerical features, one field vector each."""
        return [g for g in (self.metadata.user_numerical, self.metadata.item_numerical) if g]

    def tower_inputs(self, fields: Tensor) -> Tensor:
        """``[GMF: user * item, MLP branch]``, read by every tower."""
        user = fields.index_select(1, self.user_index).mean(dim=1)
        item = fields.index_select(1, self.item_index).mean(dim=1)
        return torch.cat([user * item, self.mlp(fields.flatten(1))], dim=1)
