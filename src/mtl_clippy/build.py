"""The objects of a run, made from its config: the data module, the LightningModule, the
callbacks and the trainer.

Configuration problems surface here, before any training, as ``ConfigError`` naming the
config key (Hydra would print a multi-line report, torch a traceback after the first step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from mtl_clippy import config_checks, run_checks
from mtl_clippy.errors import ConfigError, innermost_message


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Data module (set up, so its metadata is known) and the LightningModule of a config.

    Configuration problems surface here, before any training, as ``ConfigError`` naming the
    config key.
    """
    datamodule = instantiate_config(cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, datamodule.metadata)
    run_checks.check_gradient_clipping(cfg, module)
    run_checks.check_batch_norm_batches(datamodule, module)
    return datamodule, module


def build_module(cfg: DictConfig, metadata: Any) -> pl.LightningModule:
    """The LightningModule of a config's model, optim, scheduler and task_weights for data of
    ``metadata``; its optimizer and scheduler are built once to check them (``ConfigError``
    naming the key)."""
    from mtl_clippy.models import MultiTaskModule
    from mtl_clippy.models.backbones.base import module_parameter_roles
    from mtl_clippy.models.param_groups import KEY as PARAM_GROUPS

    scheduler, interval, monitor = scheduler_settings(cfg.get("scheduler"))
    try:
        module = MultiTaskModule(
            backbone=cfg.model,
            metadata=metadata,
            optimizer=cfg.optim,
            scheduler=scheduler,
            scheduler_interval=interval,
            scheduler_monitor=monitor,
            task_weights=cfg.get("task_weights"),
            param_groups=cfg.get("param_groups"),
        )
        # every parameter's role, once: a backbone of your own that leaves a module
        # undeclared is named now, not when the telemetry or param_groups first ask at fit
        module_parameter_roles(module)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_keyed("model", innermost_message(exc), cfg.model)) from exc
    # Build the optimizer and the scheduler once now, so that invalid arguments, or an
    # optimizer that cannot take the model's sparse gradients, are reported before training.
    try:
        optimizer = module.build_optimizer()
    except (TypeError, ValueError) as exc:
        message = innermost_message(exc)
        if message.startswith(f"{PARAM_GROUPS}.") or message.startswith(f"{PARAM_GROUPS}:"):
            raise ConfigError(message) from exc  # it names its own key
        raise ConfigError(_keyed("optim", message, cfg.optim)) from exc
    run_checks.check_scheduler_numbers(scheduler)
    try:  # the trainer fills a length: null at fit time; any whole number checks the rest
        built = module.build_scheduler(optimizer, total_steps=1000)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_keyed("scheduler", innermost_message(exc), cfg.scheduler)) from exc
    if built is not None:
        run_checks.check_scheduler_use(cfg, built, monitor)
        run_checks.check_scheduler_step(built)
    return module


#: Keys of a scheduler config that say how Lightning steps it; not scheduler arguments.
SCHEDULER_KEYS = ("interval", "monitor")


def scheduler_settings(node: Any) -> tuple[dict[str, Any] | None, str, str]:
    """(the scheduler's partial config without ``interval`` / ``monitor``, its interval,
    its monitor) of a ``scheduler`` config; (None, "epoch", "val/auc_mean") without one."""
    if not node:
        return None, "epoch", "val/auc_mean"
    cfg = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    interval = cfg.pop("interval", "epoch")
    monitor = cfg.pop("monitor", "val/auc_mean")
    if interval not in ("step", "epoch"):
        raise ConfigError(f"scheduler.interval: expected 'step' or 'epoch', got {interval!r}")
    if not isinstance(monitor, str) or not monitor:
        raise ConfigError(f"scheduler.monitor: expected a metric name, got {monitor!r}")
    return cfg, interval, monitor


def _keyed(group: str, message: str, node: Any) -> str:
    """``"norm must be ..."`` -> ``"model.norm must be ..."`` when the message starts with a
    key of the group's config (or ``"model: ..."`` otherwise)."""
    first = message.split(" ", 1)[0].rstrip(":")
    keys = set(node or ()) | (set(SCHEDULER_KEYS) if group == "scheduler" else set())
    return f"{group}.{message}" if first in keys else f"{group}: {message}"


def instantiate_config(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with a value the target rejects reported as a
    ``ConfigError`` naming the config key (Hydra would print a multi-line report)."""
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, TypeError | ValueError | MisconfigurationException):
            message = innermost_message(exc)
            if message.split(" ", 1)[0] in node:  # "batch_size must be ..." -> data.batch_size
                raise ConfigError(f"{key}.{message}") from exc
            raise ConfigError(f"{key}: {message}") from exc
        raise


def instantiate_callbacks(group: DictConfig | None) -> list[Any]:
    """The callbacks of ``group``; a value a constructor rejects is one line naming
    ``callbacks.<name>.<key>`` (Hydra would print a multi-line report)."""
    if not group:
        return []
    return [
        instantiate_config(c, f"callbacks.{name}")
        for name, c in group.items()
        if c and "_target_" in c
    ]


def build_callbacks(
    cfg: DictConfig, ours: list[Any], undefined: Mapping[str, str], has_loggers: bool
) -> tuple[list[Any], str | None]:
    """The run's callbacks (the config's, then ``ours``) and what its early stopping
    watches (metrics.json's ``early_stopping``). Without validation rows, or with
    validation metrics that stay undefined (``undefined``, from ``check_data``), early
    stopping is off and best.ckpt is the last epoch (``config_checks.without_validation``);
    without a logger the learning-rate monitor, which needs one, is dropped."""
    callbacks = [*instantiate_callbacks(cfg.get("callbacks")), *ours]
    early_stopping = None
    validation = config_checks.has_validation(cfg)
    if not validation or undefined:
        callbacks, early_stopping = config_checks.without_validation(
            callbacks, undefined if validation else None
        )
    if validation and early_stopping is None:
        early_stopping = next(
            (c.monitor for c in callbacks if isinstance(c, pl.callbacks.EarlyStopping)), None
        )
    if not has_loggers:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    return callbacks, early_stopping


def build_trainer(
    cfg: DictConfig, callbacks: list[Any], loggers: list[Any], precision: Any, plugins: list[Any]
) -> pl.Trainer:
    """The trainer of ``cfg.trainer`` with these callbacks, loggers (none: ``logger=False``),
    precision (``runtime.precision_of``) and plugins."""
    run_checks.check_trainer_values(cfg.trainer)
    return instantiate_config(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=loggers or False,
        precision=precision,
        plugins=plugins,
    )
