"""Optimizer telemetry per group of parameters, without a host sync on every step.

``OptimizerTelemetry`` groups the model's parameters by the roles its backbone declares
(:func:`mtl_clippy.models.backbones.base.module_parameter_roles`, the same as the
optimizer's ``param_groups``: every backbone's :meth:`~mtl_clippy.models.Backbone.parameter_roles`;
``embeddings`` (the tables),
``numerical`` (the projections of the numerical features), ``bottom`` (shared bottoms,
experts, MLPs, attention), ``gates``, ``towers``). A parameter outside any ``Backbone`` (a
module of your own) is grouped by its name instead (:func:`group_of`).

It logs to the Lightning loggers, every ``log_every_n_steps`` steps:

* ``telemetry/grad_norm/<group>``: the L2 norm of the group's gradient (all its tensors as one
  vector), averaged over the N steps; sparse gradients count their coalesced values;
* ``telemetry/update_ratio/<group>``: ``||w_after - w_before|| / ||w_before||`` of the group
  over the logging step's optimizer step (the weights are copied only on that step);
* only when the optimizer keeps ``state[p]["clipping_factor"]`` (Clippy):
  ``telemetry/clip_min/<group>`` (the smallest sigma of the group's tensors over the N steps),
  ``telemetry/clip_mean/<group>`` (mean over tensors and steps) and
  ``telemetry/clip_fraction/<group>`` (the fraction of the N steps in which some tensor of
  the group was clipped, sigma < 1).

Every step adds a handful of small device operations (one multi-tensor norm, a stack and an
``index_add_`` per quantity) into device accumulators; the host reads them once per N steps.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from mtl_clippy.models.backbones.base import ROLES, module_parameter_roles

__all__ = ["GROUPS", "OptimizerTelemetry", "group_of"]

#: The groups: the backbones' parameter roles.
GROUPS: tuple[str, ...] = ROLES


def group_of(name: str, module: nn.Module | None = None) -> str:
    """The group of parameter ``name`` (owned by ``module``, if known) outside a
    :class:`~mtl_clippy.models.Backbone`, which declares its roles: "embedding" in the name
    or an ``nn.Embedding`` / ``nn.EmbeddingBag`` module, else "tower", else "gate", else
    ``bottom``."""
    lname = name.lower()
    if "embedding" in lname or isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embeddings"
    if "tower" in lname:
        return "towers"
    if "gate" in lname:
        return "gates"
    return "bottom"


def _grad_norm(grad: Tensor) -> Tensor:
    if grad.is_sparse:
        g = grad if grad.is_coalesced() else grad.coalesce()
        return g._values().float().norm()
    return grad.float().norm()


class OptimizerTelemetry(pl.Callback):
    """Log per-group gradient norms, update-to-weight ratios and Clippy's clipping factors.

    Args:
        log_every_n_steps: N: the accumulators are read and logged every N optimizer steps.
    """

    def __init__(self, log_every_n_steps: int = 50) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = int(log_every_n_steps)
        self._params: list[Tensor] = []
        self._gidx: Tensor | None = None
        self._groups: list[str] = []

    # -- setup -------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        owner = {}
        for mname, mod in pl_module.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                owner[id(p)] = (f"{mname}.{pname}" if mname else pname, mod)
        # the same roles as the optimizer's param_groups: every outermost backbone's
        roles = module_parameter_roles(pl_module) or {}
        role = {id(p): r for r, named in roles.items() for _, p in named}
        params, groups = [], []
        for p in pl_module.parameters():
            if not p.requires_grad:
                continue
            name, mod = owner[id(p)]
            params.append(p)
            groups.append(GROUPS.index(role.get(id(p)) or group_of(name, mod)))
        self._params = params
        device = pl_module.device
        self._device = device
        self._gidx = torch.tensor(groups, dtype=torch.long, device=device)
        present = sorted(set(groups))
        self._groups = [GROUPS[i] for i in present]
        self._present = torch.tensor(present, dtype=torch.long, device=device)
        self._clip_params: list[Tensor] | None = None
        self._state_len = 0  # len(optimizer.state) when _clip_params was chosen
        self._where: dict[tuple[int, ...], Tensor] = {}
        self._reset_accumulators()

    def _reset_accumulators(self) -> None:
        g, dev = len(GROUPS), self._device
        self._grad_sum = torch.zeros(g, device=dev)
        self._clip_min = torch.full((g,), float("inf"), device=dev)
        self._clip_sum = torch.zeros(g, device=dev)
        self._clip_count = torch.zeros(g, device=dev)
        self._clip_steps = torch.zeros(g, device=dev)
        self._steps = 0
        self._snapshot: list[Tensor] | None = None

    def _is_logging_step(self, trainer: pl.Trainer) -> bool:
        # global_step counts the steps taken; the one about to be taken is global_step + 1
        return (trainer.global_step + 1) % self.log_every_n_steps == 0

    # -- per step ----------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._gidx is None:
            return
        idx, norms = [], []
        dense_i, dense_g = [], []
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                idx.append(i)
                norms.append(_grad_norm(g))
            else:
                dense_i.append(i)
                dense_g.append(g)
        if dense_g:
            idx.extend(dense_i)
            norms.extend(n.float() for n in torch._foreach_norm(dense_g))
        if norms:
            sq = torch.stack(norms).square()
            key = tuple(idx)  # which tensors had gradients: usually the same every step
            where = self._where.get(key)
            if where is None:  # built once per pattern: no host-to-device copy per step
                where = self._where[key] = self._gidx[torch.tensor(idx, device=self._device)]
            per_group = torch.zeros_like(self._grad_sum).index_add_(0, where, sq)
            self._grad_sum.add_(per_group.sqrt_())
        if self._is_logging_step(trainer):
            self._snapshot = [p.detach().clone() for p in self._params]

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._gidx is None:
            return
        self._steps += 1
        self._accumulate_clipping(trainer)
        if self._snapshot is not None:
            self._log(trainer)
            self._reset_accumulators()

    def _accumulate_clipping(self, trainer: pl.Trainer) -> None:
        if not trainer.optimizers:
            return
        state = trainer.optimizers[0].state
        # Which tensors have a clipping factor: the optimizer creates a tensor's state on its
        # first step, so a tensor without a gradient yet (a task absent from the first
        # batches, a layer unfrozen later) joins when the state grows; len() is host-side.
        if self._clip_params is None or len(state) != self._state_len:
            self._state_len = len(state)
            keep = [i for i, p in enumerate(self._params) if "clipping_factor" in state.get(p, {})]
            self._clip_params = [self._params[i] for i in keep]
            self._clip_gidx = self._gidx[torch.tensor(keep, dtype=torch.long, device=self._device)]
            self._clip_n = torch.zeros(len(GROUPS), device=self._device).index_add_(
                0, self._clip_gidx, torch.ones(len(keep), device=self._device)
            )
        if not self._clip_params:
            return
        sigma = torch.stack([state[p]["clipping_factor"] for p in self._clip_params]).float()
        step_min = torch.full_like(self._clip_min, float("inf")).scatter_reduce_(
            0, self._clip_gidx, sigma, reduce="amin"
        )
        torch.minimum(self._clip_min, step_min, out=self._clip_min)
        self._clip_sum.index_add_(0, self._clip_gidx, sigma)
        self._clip_count.add_(self._clip_n)
        self._clip_steps.add_(step_min < 1)

    # -- logging -----------------------------------------------------------------------------

    def _log(self, trainer: pl.Trainer) -> None:
        snapshot, self._snapshot = self._snapshot, None
        assert snapshot is not None
        now = [p.detach() for p in self._params]
        diff_sq = torch.stack(
            [n.float().square() for n in torch._foreach_norm(torch._foreach_sub(now, snapshot))]
        )
        w_sq = torch.stack([n.float().square() for n in torch._foreach_norm(snapshot)])
        g = torch.zeros_like(self._grad_sum)
        ratio = g.clone().index_add_(0, self._gidx, diff_sq).sqrt() / g.clone().index_add_(
            0, self._gidx, w_sq
        ).sqrt().clamp_min(1e-30)
        rows = {
            "grad_norm": self._grad_sum / max(self._steps, 1),
            "update_ratio": ratio,
        }
        if self._clip_params:
            rows["clip_min"] = self._clip_min
            rows["clip_mean"] = self._clip_sum / self._clip_count.clamp_min(1)
            rows["clip_fraction"] = self._clip_steps / max(self._steps, 1)
            has_clip = (self._clip_n > 0)[self._present].tolist()
        else:
            has_clip = []
        names = list(rows)
        values = torch.stack([rows[k][self._present] for k in names]).cpu().tolist()  # one sync
        metrics: dict[str, float] = {}
        for k, row in zip(names, values):
            for j, (group, v) in enumerate(zip(self._groups, row)):
                if k.startswith("clip_") and not has_clip[j]:
                    continue
                metrics[f"telemetry/{k}/{group}"] = float(v)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
