"""Logistic regression per task: the linear baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.layers import FeatureEmbedding, as_metadata


class LogisticRegression(nn.Module):
    """Per task: one weight per categorical value, a linear term on the numerical features, a bias.

    The one-hot weights are an embedding table of width ``n_tasks`` (row = categorical value,
    column = task), so no dense one-hot matrix is ever built; the numerical term is
    ``Linear(n_numerical -> n_tasks)`` whose bias is the per-task bias. The logit of task
    ``t`` is ``sum_f W[offset_f + x_f, t] + numerical @ V[:, t] + b_t``.

    Args:
        metadata: the data's :class:`DatasetMetadata`.
        sparse_embeddings: sparse gradients for the one-hot weight table.
        norm: only ``"none"``: the model has no hidden layer to normalise, and any other
            value is rejected (it would do nothing). Accepted so that a sweep over
            ``model.norm`` can include the linear baseline.

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        sparse_embeddings: bool = False,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if norm != "none":
            raise ValueError(
                f"norm: logistic regression has no hidden layer to normalise, so only 'none' "
                f"applies; got {norm!r} (remove the norm option or set it to none)"
            )
        meta = as_metadata(metadata)
        self.weights = FeatureEmbedding(meta, embed_dim=meta.n_tasks, sparse=sparse_embeddings)

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return per-task logits ``[batch, n_tasks]``."""
        return self.weights(categorical, numerical).sum(dim=1)
