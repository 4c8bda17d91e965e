"""Entire Space Multi-task Model (ESMM): pCTCVR = pCTR * pCVR over all impressions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.backbones.base import Backbone
from mtl_clippy.models.layers import as_metadata


def product_logit(a: Tensor, b: Tensor) -> Tensor:
    """Logit of ``sigmoid(a) * sigmoid(b)``, computed stably for any finite ``a`` and ``b``.

    With ``p = sigmoid(a) sigmoid(b) = 1 / ((1 + e^-a)(1 + e^-b))``,
    ``1 - p = (e^-a + e^-b + e^-(a+b)) / ((1 + e^-a)(1 + e^-b))``, so
    ``logit(p) = log p - log(1 - p) = -logsumexp(-a, -b, -(a + b))``: no ``log(0)``,
    no overflow, and gradients stay finite even when ``p`` rounds to 0 or 1.
    """
    return -torch.logsumexp(torch.stack([-a, -b, -(a + b)], dim=-1), dim=-1)


class ESMM(Backbone):
    """ESMM (Ma et al., SIGIR 2018): CTR and CVR networks on a shared input layer.

    Each network is an MLP ``bottom_dims + tower_dims -> 1`` over the shared input layer
    (its ``bottom_dims`` blocks have the role ``bottom``, the rest ``towers``). The outputs
    are logits, in ``metadata.tasks`` order:

    * task 0 (click): the CTR logit ``a``;
    * task 1 (conversion): the logit of ``pCTCVR = pCTR * pCVR = sigmoid(a) * sigmoid(b)``
      (``b`` = CVR logit), computed by :func:`product_logit`. AliExpress's ``conversion``
      label is click AND purchase over all impressions, so training it with BCE on this
      logit is ESMM's entire-space CTCVR loss and the CVR network is never trained on
      the clicked subset alone. The post-click ``pCVR`` is available as
      :meth:`cvr_logit`.

    Requires exactly two tasks (click, conversion). ``norm`` (``"batch"``, ``"layer"`` or
    ``"none"``) is the normalisation of every hidden block of both networks.

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, 2]``.
    """

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        *,
        bottom_dims: Sequence[int] = (512, 256),
        **options: Any,
    ) -> None:
        tasks = as_metadata(metadata).tasks
        if len(tasks) != 2:
            raise ValueError(
                f"ESMM models exactly two funnel tasks (click, conversion), got tasks {list(tasks)}"
            )
        super().__init__(metadata, **options)
        dims, d_in, n = (
            [*bottom_dims, *self.tower_dims],
            self.embedding.output_dim,
            len(bottom_dims),
        )
        self.ctr = self.declare_split(self.new_mlp(d_in, dims, output_dim=1), n)
        self.cvr = self.declare_split(self.new_mlp(d_in, dims, output_dim=1), n)

    def cvr_logit(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Post-click conversion logit ``b`` (``pCVR = sigmoid(b)``), shape ``[batch, 1]``."""
        return self.cvr(self.embedding(categorical, numerical).flatten(1))

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return ``[CTR logit, logit(pCTR * pCVR)]``, shape ``[batch, 2]``."""
        x = self.embedding(categorical, numerical).flatten(1)
        a = self.ctr(x)
        b = self.cvr(x)
        return torch.cat([a, product_logit(a, b)], dim=1)
