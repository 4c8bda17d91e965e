"""Shared-Bottom: one MLP over the input layer shared by all tasks, one tower per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.backbones.base import Backbone


class SharedBottom(Backbone):
    """Shared-Bottom multitask network (Caruana 1997), the simplest hard-sharing baseline.

    ``input layer -> bottom MLP (512, 256) -> per task: tower MLP (128, 64) -> 1``.

    Args:
        metadata: the data's :class:`DatasetMetadata` (field sizes, tasks).
        bottom_dims: hidden widths of the shared bottom.
        **options: the shared keyword arguments of :class:`Backbone` (``embed_dim``,
            ``tower_dims``, ``dropout``, ``sparse_embeddings``, ``norm``).

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        *,
        bottom_dims: Sequence[int] = (512, 256),
        **options: Any,
    ) -> None:
        super().__init__(metadata, **options)
        self.bottom = self.declare("bottom", self.new_mlp(self.embedding.output_dim, bottom_dims))
        self.add_towers(self.bottom.output_dim)

    def tower_inputs(self, fields: Tensor) -> Tensor:
        """The shared bottom's output, read by every tower."""
        return self.bottom(fields.flatten(1))
