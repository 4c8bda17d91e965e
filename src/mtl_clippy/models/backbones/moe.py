"""Mixture-of-experts multitask networks: MMoE (a gate per task) and OMoE (one gate)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.backbones.base import Backbone


class _MixtureOfExperts(Backbone):
    """Experts over the input layer, softmax gates mixing them, one tower per task.

    Subclasses choose ``gate_per_task``: a gate for each task (MMoE) or one shared (OMoE).
    ``n_experts`` expert MLPs of widths ``expert_dims`` (role ``bottom``); the gates
    ``Linear(input -> n_experts)`` have the role ``gates``. The other keyword arguments are
    :class:`Backbone`'s (``norm`` in every expert and tower block).
    """

    gate_per_task: bool = True

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        *positional: Any,
        n_experts: int = 8,
        expert_dims: Sequence[int] = (512, 256),
        **options: Any,
    ) -> None:
        if positional:  # Python's message, naming MMoE / OMoE rather than this private base
            raise TypeError(
                f"{type(self).__name__}.__init__() takes 2 positional arguments but "
                f"{2 + len(positional)} were given"
            )
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        super().__init__(metadata, **options)
        d_in = self.embedding.output_dim
        self.experts = self.declare(
            "bottom", nn.ModuleList(self.new_mlp(d_in, expert_dims) for _ in range(n_experts))
        )
        n_gates = self.n_tasks if self.gate_per_task else 1
        self.gates = self.declare(
            "gates", nn.ModuleList(nn.Linear(d_in, n_experts) for _ in range(n_gates))
        )
        self.add_towers(self.experts[0].output_dim)

    def tower_inputs(self, fields: Tensor) -> list[Tensor]:
        """Each gate's softmax mixture of the experts (one gate: the same for every task)."""
        x = fields.flatten(1)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, D]
        mixed = [
            torch.bmm(torch.softmax(g(x), dim=-1).unsqueeze(1), experts).squeeze(1)
            for g in self.gates
        ]
        return mixed * self.n_tasks if len(mixed) == 1 else mixed


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
