"""Meta Hybrid Experts and Critics (MetaHeac) for multitask click/conversion prediction."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.backbones.base import Backbone

#: How the critics' predictions become a task's probability (``critic_output``).
CRITIC_OUTPUTS = ("mixture", "mean")


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 when it is in a half type (bfloat16 autocast), else as it is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _TaskEmbedding(nn.Module):
    """One learned vector per task ``[n_tasks, D]``: what tells the shared gates which task
    they serve. A plain parameter, dense even with ``sparse_embeddings`` (it is tiny and the
    meta-learning step differentiates its gradient)."""

    def __init__(self, n_tasks: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_tasks, dim))
        nn.init.normal_(self.weight)  # as nn.Embedding


class MetaHeac(Backbone):
    """MetaHeac (Zhu et al., KDD 2021): experts and critics shared by every task, chosen per
    task by gates that read a learned task embedding; the task embedding is meta-learned.

    Structure (published sizes): the shared input layer (17 field vectors of 128); ``n_experts``
    expert MLPs (512, 256) over the flattened fields; ``n_critics`` critic MLPs
    (128, 64) -> 1 over an expert mixture. Task ``t``'s gate input is its task embedding
    ``e_t`` (``embed_dim``) next to the mean of the field vectors; an expert gate
    ``Linear(2 embed_dim -> n_experts)`` and a critic gate ``Linear(2 embed_dim -> n_critics)``
    (both shared by the tasks, softmax) give the task its mixture of the experts, which every
    critic scores, and the weights of the critics' probabilities:
    ``p_t = sum_j w_tj sigmoid(c_j(h_t))`` (``critic_output="mixture"``). MTReclib averages
    the weighted terms instead, ``p_t = mean_j w_tj sigmoid(c_j(h_t))``, which can never
    exceed ``1 / n_critics``; ``critic_output="mean"`` reproduces it. The logit of ``p_t`` is
    computed in log space (float32 also under bfloat16 autocast).

    Training (:meth:`training_outputs`, which the module's training step calls): each batch is
    cut into ``episodes`` consecutive pieces, each into a support half and a query half. The
    support half's loss gives one gradient step on the task embeddings only,
    ``e' = e - inner_lr * grad_e L_support`` (kept in the graph: the outer gradient is second
    order, as in MAML), and the training loss is the query halves' loss under ``e'``. Every
    parameter, ``e`` included, is trained by that loss. Evaluation and prediction
    (:meth:`forward`) use the meta-learned ``e`` itself: AliExpress has no support set at test
    time. ``inner_lr=0`` trains the plain Heac network on the query halves.

    Roles: the experts are ``bottom``, the two gates and the task embeddings ``gates``, the
    critics (shared by the tasks, each ending in one logit) ``towers``. The other keyword
    arguments are :class:`Backbone`'s (``tower_dims`` are the critics' hidden widths).

    ``forward(categorical [B, F], numerical [B, N]) -> logits [B, n_tasks]``.
    """

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        *,
        n_experts: int = 8,
        n_critics: int = 5,
        expert_dims: Sequence[int] = (512, 256),
        inner_lr: float = 1e-4,
        episodes: int = 2,
        critic_output: str = "mixture",
        **options: Any,
    ) -> None:
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be a whole number >= 1, got {n_experts!r}")
        if isinstance(n_critics, bool) or not isinstance(n_critics, int) or n_critics < 1:
            raise ValueError(f"n_critics must be a whole number >= 1, got {n_critics!r}")
        if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
            raise ValueError(f"episodes must be a whole number >= 1, got {episodes!r}")
        if (
            isinstance(inner_lr, bool)
            or not isinstance(inner_lr, int | float)
            or not math.isfinite(inner_lr)
            or inner_lr < 0
        ):
            raise ValueError(f"inner_lr must be a finite number >= 0, got {inner_lr!r}")
        if critic_output not in CRITIC_OUTPUTS:
            raise ValueError(
                f"critic_output must be one of {list(CRITIC_OUTPUTS)}, got {critic_output!r}"
            )
        super().__init__(metadata, **options)
        self.inner_lr = float(inner_lr)
        self.episodes = episodes
        self.critic_output = critic_output
        d_in, dim = self.embedding.output_dim, self.embed_dim
        self.experts = self.declare(
            "bottom", nn.ModuleList(self.new_mlp(d_in, expert_dims) for _ in range(n_experts))
        )
        width = self.experts[0].output_dim
        self.task_embedding = self.declare("gates", _TaskEmbedding(self.n_tasks, dim))
        self.expert_gate = self.declare("gates", nn.Linear(2 * dim, n_experts))
        self.critic_gate = self.declare("gates", nn.Linear(2 * dim, n_critics))
        self.critics = self.declare(
            "towers",
            nn.ModuleList(
                self.new_mlp(width, self.tower_dims, output_dim=1) for _ in range(n_critics)
            ),
        )

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self, categorical: Tensor, numerical: Tensor, task_embedding: Tensor | None = None
    ) -> Tensor:
        """Per-task logits ``[batch, n_tasks]``; ``task_embedding`` ``[n_tasks, embed_dim]``
        replaces the learned one (the meta-learning step's adapted vectors)."""
        fields = self.embedding(categorical, numerical)  # [B, F, D]
        x = fields.flatten(1)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        tasks = self.task_embedding.weight if task_embedding is None else task_embedding
        n, t = fields.shape[0], tasks.shape[0]
        summary = fields.mean(dim=1)  # [B, D]
        gate_in = torch.cat(
            [
                tasks.to(summary.dtype).unsqueeze(0).expand(n, t, -1),
                summary.unsqueeze(1).expand(n, t, -1),
            ],
            dim=-1,
        )  # [B, T, 2D]
        mixed = torch.bmm(torch.softmax(self.expert_gate(gate_in), dim=-1), experts)  # [B, T, H]
        # each critic on each task's mixture separately (batch statistics per task, as published)
        scores = torch.stack(
            [torch.cat([c(mixed[:, i]) for c in self.critics], dim=1) for i in range(t)], dim=1
        )  # [B, T, C]
        log_w = torch.log_softmax(_wide(self.critic_gate(gate_in)), dim=-1)
        return self._mixture_logit(log_w, _wide(scores))

    def _mixture_logit(self, log_w: Tensor, scores: Tensor) -> Tensor:
        """``logit(p)`` of ``p = sum_j w_j sigmoid(s_j)`` ("mixture") or of ``p / C``
        ("mean"), without forming ``p``: ``1 - sum_j w_j sigmoid(s_j) = sum_j w_j sigmoid(-s_j)``
        since the weights sum to 1."""
        log_p = torch.logsumexp(log_w + F.logsigmoid(scores), dim=-1)
        log_q = torch.logsumexp(log_w + F.logsigmoid(-scores), dim=-1)  # log(1 - p)
        c = scores.shape[-1]
        if self.critic_output == "mean" and c > 1:
            # logit(p / C) = log p - log(C - p) = log p - log((C - 1) + (1 - p))
            log_q = torch.logaddexp(log_q, log_q.new_tensor(math.log(c - 1)))
        return log_p - log_q

    # -- training ------------------------------------------------------------------------------

    def training_outputs(
        self,
        categorical: Tensor,
        numerical: Tensor,
        labels: Tensor,
        loss: Callable[[Tensor, Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """The meta-learning step: ``(logits, labels)`` of the query halves, each under the
        task embeddings adapted on its support half by ``loss`` (the training loss of the
        module, a scalar). A batch too small to cut (under 4 rows an episode) uses fewer
        episodes, down to none (then the plain forward on the whole batch)."""
        n = categorical.shape[0]
        episodes = min(self.episodes, n // 4)
        if episodes == 0 or not torch.is_grad_enabled():
            return self(categorical, numerical), labels
        e = self.task_embedding.weight
        logits, targets = [], []
        bounds = [n * k // episodes for k in range(episodes + 1)]
        for start, stop in itertools.pairwise(bounds):
            mid = (start + stop) // 2
            support = slice(start, mid)
            query = slice(mid, stop)
            adapted = e
            if self.inner_lr > 0:
                inner = loss(self(categorical[support], numerical[support]), labels[support])
                (grad,) = torch.autograd.grad(inner, e, create_graph=True)
                adapted = e - self.inner_lr * grad
            logits.append(self(categorical[query], numerical[query], task_embedding=adapted))
            targets.append(labels[query])
        return torch.cat(logits), torch.cat(targets)
