"""Learning-rate schedules that torch does not ship (configs/scheduler/)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """Linear warm-up, then cosine decay, stepped once per optimizer step.

    With ``W = round(warmup_fraction * total_steps)`` warm-up steps, the learning rate of
    optimizer step ``s`` (0, 1, ...) is ``base_lr * f(s)`` with

    * ``f(s) = (s + 1) / (W + 1)`` for ``s < W`` (rising linearly to the base rate);
    * ``f(s) = m + (1 - m) (1 + cos(pi p)) / 2``, ``p = min(1, (s - W) / (total_steps - W))``
      afterwards, ``m = min_lr_ratio``: the base rate at ``s = W``, ``m * base_lr`` at the end.

    Args:
        optimizer: the optimizer whose groups' learning rates it sets.
        total_steps: optimizer steps of the whole run (configs pass ``null``, which
            ``MultiTaskModule`` fills with Lightning's ``trainer.estimated_stepping_batches``).
        warmup_fraction: the share of ``total_steps`` spent warming up, in ``[0, 1)``.
        min_lr_ratio: the final learning rate as a fraction of the base rate, in ``[0, 1]``.

    When ``MultiTaskModule`` filled ``total_steps`` from the trainer it sets
    ``length_from_trainer``; a checkpoint loaded then keeps this run's ``total_steps`` (a
    resumed run with a longer ``trainer.max_epochs`` decays over the new length, with a
    one-line warning), not the checkpoint's. Loading always sets the optimizer's rates to
    this schedule's rates at the restored step.
    """

    #: True when ``total_steps`` was filled from the trainer rather than given.
    length_from_trainer: bool = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a whole number >= 1, got {total_steps!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.total_steps = total_steps
        self.warmup_steps = min(round(warmup_fraction * total_steps), total_steps - 1)
        self.min_lr_ratio = float(min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """``f(step)``: the learning rate of optimizer step ``step`` over the base rate."""
        w = self.warmup_steps
        if step < w:
            return (step + 1) / (w + 1)
        progress = min(1.0, (step - w) / max(1, self.total_steps - w))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if self.length_from_trainer:
            saved = state.pop("total_steps", self.total_steps)
            state.pop("warmup_steps", None)
            state.pop("length_from_trainer", None)
            if saved != self.total_steps:
                warnings.warn(
                    f"WarmupCosineLR: the checkpoint's schedule was {saved} steps long, this "
                    f"run's is {self.total_steps}; continuing on the new length",
                    stacklevel=2,
                )
        super().load_state_dict(state)
        lrs = self.get_lr()  # the restored optimizer holds the rates of the old schedule
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.factor(max(self.last_epoch, 0))
        return [base * f for base in self.base_lrs]
