"""Progressive Layered Extraction (PLE): stacked customized gate control levels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.backbones.base import Backbone
from mtl_clippy.models.layers import MLP


def _mix(gate: nn.Linear, x: Tensor, experts: Tensor) -> Tensor:
    """Softmax-gated sum of ``experts [B, E, D]`` with the gate read from ``x``."""
    weights = torch.softmax(gate(x), dim=-1).unsqueeze(1)  # [B, 1, E]
    return torch.bmm(weights, experts).squeeze(1)


class _ExtractionLevel(nn.Module):
    """One CGC level: task-specific and shared experts, a gate per task (and a shared gate)."""

    def __init__(
        self,
        task_dims: Sequence[int],
        shared_dim: int,
        width: int,
        n_tasks: int,
        n_task_experts: int,
        n_shared_experts: int,
        dropout: float,
        last: bool,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(
            nn.ModuleList(
                MLP(task_dims[t], [width], dropout, norm=norm) for _ in range(n_task_experts)
            )
            for t in range(n_tasks)
        )
        self.shared_experts = nn.ModuleList(
            MLP(shared_dim, [width], dropout, norm=norm) for _ in range(n_shared_experts)
        )
        self.task_gates = nn.ModuleList(
            nn.Linear(task_dims[t], n_task_experts + n_shared_experts) for t in range(n_tasks)
        )
        # The last level has no shared output: its gate would receive no gradient.
        self.shared_gate = (
            None if last else nn.Linear(shared_dim, n_tasks * n_task_experts + n_shared_experts)
        )

    def forward(
        self, task_inputs: list[Tensor], shared_input: Tensor
    ) -> tuple[list[Tensor], Tensor | None]:
        shared = [e(shared_input) for e in self.shared_experts]
        own = [
            [e(x) for e in experts]
            for experts, x in zip(self.task_experts, task_inputs, strict=True)
        ]
        outputs = [
            _mix(gate, x, torch.stack(o + shared, dim=1))
            for gate, x, o in zip(self.task_gates, task_inputs, own, strict=True)
        ]
        shared_out = None
        if self.shared_gate is not None:
            every = [h for o in own for h in o] + shared
            shared_out = _mix(self.shared_gate, shared_input, torch.stack(every, dim=1))
        return outputs, shared_out


class PLE(Backbone):
    """Progressive Layered Extraction (Tang et al., RecSys 2020).

    ``len(expert_dims)`` extraction levels (2 at the published sizes, (512, 256)); level ``l``
    has ``n_task_experts`` experts per task and ``n_shared_experts`` shared experts, each one
    MLP block of width ``expert_dims[l]``. Each task's gate mixes its own and the shared
    experts; every level but the last also has a shared gate over all experts that feeds the
    next level's shared experts. Each task's last-level output goes to its tower
    (128, 64) -> 1. ``norm`` (``"batch"``, ``"layer"`` or ``"none"``) is the normalisation
    of every expert and tower block. Roles: the experts are ``bottom``, the task and shared
    gates ``gates``; the other keyword arguments are :class:`Backbone`'s.

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        *,
        expert_dims: Sequence[int] = (512, 256),
        n_shared_experts: int = 4,
        n_task_experts: int = 4,
        **options: Any,
    ) -> None:
        if not expert_dims:
            raise ValueError("PLE needs at least one level (a non-empty expert_dims)")
        if n_task_experts < 1 or n_shared_experts < 1:
            raise ValueError(
                f"PLE needs n_task_experts >= 1 and n_shared_experts >= 1, got "
                f"{n_task_experts} and {n_shared_experts}"
            )
        super().__init__(metadata, **options)
        n = self.n_tasks
        levels = []
        task_dims, shared_dim = [self.embedding.output_dim] * n, self.embedding.output_dim
        for i, width in enumerate(expert_dims):
            level = _ExtractionLevel(
                task_dims,
                shared_dim,
                width,
                n,
                n_task_experts,
                n_shared_experts,
                self.dropout,
                last=i == len(expert_dims) - 1,
                norm=self.norm,
            )
            self.declare("bottom", level.task_experts, level.shared_experts)
            shared_gate = [] if level.shared_gate is None else [level.shared_gate]
            self.declare("gates", level.task_gates, *shared_gate)
            levels.append(level)
            task_dims, shared_dim = [width] * n, width
        self.levels = nn.ModuleList(levels)
        self.add_towers(expert_dims[-1])

    def tower_inputs(self, fields: Tensor) -> list[Tensor]:
        """Each task's output of the last level."""
        x = fields.flatten(1)
        task_inputs: list[Tensor] = [x] * self.n_tasks
        shared: Tensor | None = x
        for level in self.levels:
            assert shared is not None
            task_inputs, shared = level(task_inputs, shared)
        return task_inputs
