"""Mixture-of-experts multitask networks: MMoE (a gate per task) and OMoE (one gate)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.layers import MLP, FeatureEmbedding, as_metadata


class _MixtureOfExperts(nn.Module):
    """Experts over the input layer, softmax gates mixing them, one tower per task.

    Subclasses choose ``gate_per_task``: a gate for each task (MMoE) or one shared (OMoE).
    ``norm`` (``"batch"``, ``"layer"`` or ``"none"``) is the normalisation of every expert and
    tower block.
    """

    gate_per_task: bool = True

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        embed_dim: int = 128,
        n_experts: int = 8,
        expert_dims: Sequence[int] = (512, 256),
        tower_dims: Sequence[int] = (128, 64),
        dropout: float = 0.2,
        sparse_embeddings: bool = False,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        meta = as_metadata(metadata)
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.n_tasks = meta.n_tasks
        self.embedding = FeatureEmbedding(meta, embed_dim, sparse=sparse_embeddings)
        d_in = self.embedding.output_dim
        self.experts = nn.ModuleList(
            MLP(d_in, expert_dims, dropout, norm=norm) for _ in range(n_experts)
        )
        n_gates = meta.n_tasks if self.gate_per_task else 1
        self.gates = nn.ModuleList(nn.Linear(d_in, n_experts) for _ in range(n_gates))
        self.towers = nn.ModuleList(
            MLP(self.experts[0].output_dim, tower_dims, dropout, output_dim=1, norm=norm)
            for _ in range(meta.n_tasks)
        )

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return per-task logits ``[batch, n_tasks]``."""
        x = self.embedding(categorical, numerical).flatten(1)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, D]
        mixed = [
            torch.bmm(torch.softmax(g(x), dim=-1).unsqueeze(1), experts).squeeze(1)
            for g in self.gates
        ]
        if len(mixed) == 1:
            mixed = mixed * self.n_tasks
        return torch.cat([tower(h) for tower, h in zip(self.towers, mixed, strict=True)], dim=1)


class MMoE(_MixtureOfExperts):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

    8 expert MLPs (512, 256) over the input layer; each task has its own softmax gate
    ``Linear(input -> n_experts)`` that mixes the experts into that task's tower (128, 64) -> 1.

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    gate_per_task = True


class OMoE(_MixtureOfExperts):
    """One-gate Mixture-of-Experts: MMoE's experts with a single gate shared by all tasks.

    The ablation of Ma et al. (KDD 2018) that isolates the benefit of per-task gates.

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    gate_per_task = False
