"""The learning rate under the same TensorBoard tag for every optimizer.

Lightning's ``LearningRateMonitor`` names its tags after the optimizer's class
(``lr-ClippyAdagrad``, ``lr-Adam``, ``lr-Adagrad``), so runs of different optimizers land in
different charts and cannot be compared. :class:`LearningRateMonitor` logs the same values
under tags that name what they are, whatever the optimizer:

* ``lr`` for an optimizer with one parameter group;
* ``lr/<group>`` for named parameter groups (``param_groups=embedding_lr``: ``lr/default``
  and ``lr/embeddings``; ``mtl_clippy.models.param_groups`` names them by role);
* ``momentum``, ``momentum/<group>`` and ``weight_decay``, ``weight_decay/<group>`` in the
  same way, with ``log_momentum=true`` / ``log_weight_decay=true``.

A scheduler's own ``name`` (Lightning's documented hook) is kept as Lightning uses it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLearningRateMonitor

#: The tag of the learning rate (the prefix of its per-group tags).
LR_TAG = "lr"
#: Lightning's suffixes of the momentum and weight-decay tags (``<lr tag>-momentum``).
_SUFFIXES = {"-momentum": "momentum", "-weight_decay": "weight_decay"}


def _renamed(names: list[list[str]], optimizers: list[Any]) -> list[list[str]]:
    """Lightning's names (``lr-<Class>``, ``lr-<Class>/<group>``, ``lr-<Class>-1`` for a
    second optimizer of a class) with ``lr-<Class>`` replaced by ``lr``."""
    out = []
    for group_names, optimizer in zip(names, optimizers, strict=True):
        prefix = f"lr-{type(optimizer).__name__}"
        out.append([LR_TAG + n[len(prefix) :] if n.startswith(prefix) else n for n in group_names])
    return out


def _other_tag(key: str) -> str:
    """``lr-momentum`` -> ``momentum``, ``lr/embeddings-momentum`` -> ``momentum/embeddings``
    (and the same for weight decay); any other key as it is."""
    for suffix, tag in _SUFFIXES.items():
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            if base == LR_TAG or base.startswith(LR_TAG + "/"):
                return tag + base[len(LR_TAG) :]
    return key


class LearningRateMonitor(_LightningLearningRateMonitor):
    """Lightning's learning-rate monitor, with the tags of this module's docstring. The same
    options (``logging_interval``, ``log_momentum``, ``log_weight_decay``), the same values
    at the same steps; only the tag names differ."""

    def _find_names_from_schedulers(self, lr_scheduler_configs: list[Any]) -> Any:
        names, optimizers, types = super()._find_names_from_schedulers(lr_scheduler_configs)
        named = [c.scheduler.optimizer for c in lr_scheduler_configs]
        return _renamed(names, named), optimizers, types

    def _find_names_from_optimizers(
        self, optimizers: list[Any], seen_optimizers: list[Any], seen_optimizer_types: Any
    ) -> Any:
        names, left = super()._find_names_from_optimizers(
            optimizers, seen_optimizers=seen_optimizers, seen_optimizer_types=seen_optimizer_types
        )
        return _renamed(names, left), left

    def _get_optimizer_stats(self, optimizer: Any, names: list[str]) -> dict[str, float]:
        stats = super()._get_optimizer_stats(optimizer, names)
        return {_other_tag(key): value for key, value in stats.items()}
