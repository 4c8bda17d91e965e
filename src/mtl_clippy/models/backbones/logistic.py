"""Logistic regression per task: the linear baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.backbones.base import Backbone


class LogisticRegression(Backbone):
    """Per task: one weight per categorical value, a linear term on the numerical features, a bias.

    The one-hot weights are an embedding table of width ``n_tasks`` (row = categorical value,
    column = task), so no dense one-hot matrix is ever built; the numerical term is
    ``Linear(n_numerical -> n_tasks)`` whose bias is the per-task bias. The logit of task
    ``t`` is ``sum_f W[offset_f + x_f, t] + numerical @ V[:, t] + b_t``. Roles: the table is
    ``embeddings``, the numerical term ``numerical``; there are no towers.

    Args:
        metadata: the data's :class:`DatasetMetadata`.
        sparse_embeddings: sparse gradients for the one-hot weight table.
        norm: only ``"none"``: the model has no hidden layer to normalise, and any other
            value is rejected (it would do nothing). Accepted so that a sweep over
            ``model.norm`` can include the linear baseline.

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    shared_input = False

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        sparse_embeddings: bool = False,
        norm: str = "none",
    ) -> None:
        if norm != "none":
            raise ValueError(
                f"norm: logistic regression has no hidden layer to normalise, so only 'none' "
                f"applies; got {norm!r} (remove the norm option or set it to none)"
            )
        super().__init__(metadata, sparse_embeddings=sparse_embeddings, norm=norm)
        self.weights = self.declare_input(self.new_input(embed_dim=self.n_tasks))

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return per-task logits ``[batch, n_tasks]``."""
        return self.weights(categorical, numerical).sum(dim=1)
