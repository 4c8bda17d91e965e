"""MultiTaskModule: the LightningModule that trains any backbone on the multitask objective.

The module owns the loss (weighted per-task BCE on logits), the metrics (per split and task:
exact AUC, log loss, calibration) and the optimizer built from a Hydra config or partial.
Its hyperparameters are plain Python containers only, so a checkpoint loads with
``torch.load(weights_only=True)`` and ``MultiTaskModule.load_from_checkpoint(path)`` rebuilds a
working model without the data.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import hydra.utils
import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.layers import as_metadata, has_sparse_embeddings
from mtl_clippy.models.param_groups import optimizer_with_groups, param_groups_config
from mtl_clippy.models.schedules import WarmupCosineLR

Batch = Sequence[Tensor]
ConfigLike = Mapping[str, Any] | DictConfig
OptimizerLike = ConfigLike | Callable[..., torch.optim.Optimizer]
SchedulerLike = ConfigLike | Callable[..., Any]

#: Scheduler arguments holding the schedule's length; ``null`` is filled at fit time in the
#: unit of ``scheduler_interval`` (optimizer steps or epochs).
LENGTH_KEYS: tuple[str, ...] = ("total_steps", "T_max")

#: Optimizer classes known to accept sparse gradients (checked with ``isinstance``); any other
#: optimizer class may declare ``supports_sparse_gradients = True`` to be accepted too.
SPARSE_CAPABLE_OPTIMIZERS: tuple[str, ...] = (
    "mtl_clippy.optim.ClippyAdagrad",
    "torch.optim.Adagrad",
    "torch.optim.SGD",
)


# --------------------------------------------------------------------------------------------
# Hyperparameters as plain containers
# --------------------------------------------------------------------------------------------


def _import_path(obj: Any) -> str:
    """``module.qualname`` of an importable class or function; ``ValueError`` otherwise."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise ValueError(
            f"{obj!r} cannot be stored in the checkpoint's hyperparameters: it is not an "
            "importable class or function (a lambda or a local definition). Pass a Hydra "
            "config ({'_target_': ..., '_partial_': True, ...}) or a functools.partial of an "
            "importable callable."
        )
    path = f"{module}.{qualname}"
    try:
        found = hydra.utils.get_object(path)
    except Exception:
        found = None
    if found is not obj:
        raise ValueError(f"{obj!r} is not importable as {path!r}; pass a Hydra config instead")
    return path


def _plain(value: Any, where: str) -> Any:
    """Recursively convert ``value`` to YAML-able Python (dict, list, str, int, float, bool, None).

    OmegaConf containers are resolved; tuples become lists; NumPy scalars become Python
    scalars; paths become strings; a ``functools.partial`` becomes a Hydra partial config and
    an importable function or class a ``hydra.utils.get_object`` config, so that
    ``hydra.utils.instantiate`` gives the same object back.
    """
    if isinstance(value, DictConfig | ListConfig):
        return _plain(OmegaConf.to_container(value, resolve=True), where)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, DatasetMetadata):
        return _plain(value.to_dict(), where)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, functools.partial):
        if value.args:
            raise ValueError(
                f"{where}: functools.partial with positional arguments cannot be stored; "
                "bind them by keyword"
            )
        return {
            "_target_": _import_path(value.func),
            "_partial_": True,
            **{k: _plain(v, f"{where}.{k}") for k, v in value.keywords.items()},
        }
    if callable(value):
        return {"_target_": "hydra.utils.get_object", "path": _import_path(value)}
    raise ValueError(
        f"{where}: {type(value).__name__} value {value!r} cannot be stored in the checkpoint's "
        "hyperparameters; use plain numbers, strings, lists and dicts"
    )


def factory_config(
    factory: OptimizerLike | SchedulerLike | None, where: str
) -> dict[str, Any] | None:
    """Normalize an optimizer / scheduler spec to a plain Hydra partial config (or ``None``).

    Accepts a Hydra config (dict or ``DictConfig`` with ``_target_``), a ``functools.partial``
    or an importable class / function; the result always has ``_partial_: true``.
    """
    if factory is None:
        return None
    if isinstance(factory, Mapping | DictConfig):
        cfg = _plain(factory, where)
        if "_target_" not in cfg:
            raise ValueError(f"{where}: a config needs a '_target_' key, got keys {sorted(cfg)}")
    elif isinstance(factory, functools.partial):
        cfg = _plain(factory, where)
    elif callable(factory):
        cfg = {"_target_": _import_path(factory)}
    else:
        raise TypeError(
            f"{where} must be a Hydra config or a callable, got {type(factory).__name__}"
        )
    cfg["_partial_"] = True
    return cfg


def _instantiate_partial(cfg: Mapping[str, Any]) -> Callable[..., Any]:
    """Build the callable that a plain partial config describes."""
    return hydra.utils.instantiate(cfg, _partial_=True, _convert_="all")


def _supports_sparse(optimizer: torch.optim.Optimizer) -> bool:
    if getattr(optimizer, "supports_sparse_gradients", False):
        return True
    for path in SPARSE_CAPABLE_OPTIMIZERS:
        try:
            cls = hydra.utils.get_class(path)
        except Exception:  # e.g. ClippyAdagrad not importable in this install
            continue
        if isinstance(optimizer, cls):
            return True
    return False


#: Where the classes a checkpoint's hyper-parameters name may come from
#: (``MultiTaskModule.load_from_checkpoint``): the project's models and optimizers, torch's.
SAFE_TARGET_PREFIXES: tuple[str, ...] = ("mtl_clippy.", "torch.optim.", "torch.nn.")


def _read_checkpoint(source: Any) -> dict[str, Any]:
    """A checkpoint (a path or an open binary file) loaded with ``weights_only=True``; an open
    file is rewound for the loader that reads it next."""
    if hasattr(source, "read"):
        position = source.tell()
        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        finally:
            source.seek(position)
    from mtl_clippy.resume import load_checkpoint

    return load_checkpoint(source)


def _targets(node: Any, where: str) -> list[tuple[str, Any]]:
    """Every ``_target_`` in a nested config, with where it is (``hyper_parameters.backbone``)."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, Mapping):
        if "_target_" in node:
            found.append((where, node["_target_"]))
        for key, value in node.items():
            found += _targets(value, f"{where}.{key}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            found += _targets(value, f"{where}[{i}]")
    return found


def _name(source: Any) -> str:
    return os.fspath(source) if isinstance(source, str | os.PathLike) else repr(source)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def rank_scores(logits: Tensor) -> Tensor:
    """An order-preserving code of float32 logits in (0, 1), float64: what the AUC ranks.

    The AUC depends on the order of the scores only. Handing torchmetrics logits is wrong (it
    applies a sigmoid to a batch only when some value of the batch lies outside [0, 1], so
    batches whose logits all fall inside [0, 1] would be ranked on another scale), and so are
    float32 probabilities (``sigmoid`` rounds to exactly 1.0 above a logit of about 17, which
    ties scores the model ranks apart; even float64 probabilities tie distinct float32 logits
    above about 24). This code ties two logits exactly when they are equal: the float32 bit
    pattern read as a sign-magnitude integer (``-m`` for negative numbers, ``+m`` otherwise,
    so -0.0 and +0.0 are one value) is increasing in the float's value, and shifted and
    divided by 2**32 it is exact in float64 and lies in (0, 1) for every float32, infinities
    and NaN included (a NaN logit never reaches torchmetrics as NaN; see ``ExactAUC``).
    bfloat16 and float16 logits are widened to float32 first, which is exact.

    Two cases get probabilities instead, the sigmoid in the widest dtype available: float64
    logits (``trainer.precision=64``), as float64 probabilities (distinct logits tie only
    beyond about |36|), and devices without float64 (Apple's MPS), as float32 probabilities
    (ties beyond about 17, as any float32 probability would have).
    """
    logits = logits.detach()
    if logits.device.type == "mps":
        return torch.sigmoid(logits.float())
    if logits.dtype == torch.float64:
        return torch.sigmoid(logits)
    bits = logits.float().contiguous().view(torch.int32).to(torch.int64)
    magnitude = bits & 0x7FFFFFFF
    key = torch.where(bits < 0, -magnitude, magnitude)
    return (key + 2**31).to(torch.float64) / 2**32


#: What each task's metrics are called: ``<split>/<kind>_<task>`` (plus ``<split>/auc_mean``).
METRIC_KINDS: tuple[str, ...] = ("auc", "logloss", "calibration")


class ExactAUC(BinaryAUROC):
    """Exact AUC of one task (column ``column`` of ``[B, n_tasks]`` logits and labels).

    ``thresholds=None`` keeps every prediction, so it is exact. It is fed :func:`rank_scores`
    of the logits, an order-preserving code in (0, 1) (never logits, never rounded
    probabilities), so the AUC is the Mann-Whitney AUC of the logits themselves, ties counted
    half, however the epoch is split into batches. It is undefined when the epoch holds a
    single class, and meaningless when some logit is NaN: :meth:`compute` then returns NaN
    and warns, naming the metric ``label`` (``val/auc_click``). Updates never sync the host.
    """

    def __init__(self, column: int, label: str) -> None:
        super().__init__(thresholds=None, validate_args=False)
        self.column = column
        self.label = label
        self.add_state("positives", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("rows", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("nan_logits", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        """Add one batch: logits and 0/1 labels ``[B, n_tasks]``."""
        raw = logits[:, self.column].detach()
        target = labels[:, self.column].detach().float()
        super().update(rank_scores(raw), target.long())
        self.positives += target.to(self.positives.dtype).sum()
        self.rows += target.numel()
        self.nan_logits += torch.isnan(raw).sum()

    def compute(self) -> Tensor:
        nan = torch.full_like(self.rows, float("nan"))
        nan_logits, rows = int(self.nan_logits), int(self.rows)
        if nan_logits:
            rank_zero_warn(
                f"{self.label}: AUC is undefined because {nan_logits} of {rows} logits are NaN; "
                "logging NaN"
            )
            return nan
        if bool(self.positives > 0) and bool(self.positives < self.rows):
            return super().compute().to(nan)
        only = "positive" if bool(self.positives > 0) else "negative"
        rank_zero_warn(
            f"{self.label}: AUC is undefined because every label of the epoch is {only} "
            f"({rows} rows); logging NaN"
        )
        return nan


class LogLoss(MeanMetric):
    """Log loss of one task: the mean BCE of its logits over every row of the epoch."""

    def __init__(self, column: int) -> None:
        super().__init__(nan_strategy="disable")
        self.column = column

    def update(self, logits: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        """Add one batch: logits and 0/1 labels ``[B, n_tasks]``."""
        super().update(
            F.binary_cross_entropy_with_logits(
                logits[:, self.column].detach().float(),
                labels[:, self.column].detach().float(),
                reduction="none",
            )
        )


class Calibration(Metric):
    """Calibration of one task: ``sum(predicted probabilities) / sum(labels)`` over the epoch
    (mean predicted over mean observed rate; 1 is calibrated); NaN without positives."""

    full_state_update = False

    def __init__(self, column: int) -> None:
        super().__init__()
        self.column = column
        self.add_state("predicted", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("observed", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add one batch: logits and 0/1 labels ``[B, n_tasks]``."""
        dtype = self.predicted.dtype
        self.predicted += torch.sigmoid(logits[:, self.column].detach().float()).to(dtype).sum()
        self.observed += labels[:, self.column].detach().to(dtype).sum()

    def compute(self) -> Tensor:
        if bool(self.observed > 0):
            return self.predicted / self.observed
        return torch.full_like(self.predicted, float("nan"))


def split_metrics(tasks: Sequence[str], prefix: str) -> MetricCollection:
    """The epoch metrics of one split: ``<prefix><kind>_<task>`` for every task and kind of
    :data:`METRIC_KINDS`, updated together with ``update(logits, labels)`` (``[B, n_tasks]``
    each) and computed over every rank's rows. ``prefix`` is ``"val/"`` or ``"test/"``."""
    metrics: dict[str, Metric] = {}
    for i, task in enumerate(tasks):
        metrics[f"auc_{task}"] = ExactAUC(i, label=f"{prefix}auc_{task}")
        metrics[f"logloss_{task}"] = LogLoss(i)
        metrics[f"calibration_{task}"] = Calibration(i)
    # compute_groups=False: no state sharing between tasks whose first batches look alike
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


class MultiTaskModule(pl.LightningModule):
    """Train a multitask backbone on weighted per-task BCE; evaluate AUC, log loss, calibration.

    Args:
        backbone: Hydra-style config of the backbone: ``_target_`` (e.g.
            ``mtl_clippy.models.SharedBottom``) plus its keyword arguments; the module adds
            ``metadata=``.
        metadata: the data's :class:`~mtl_clippy.data.schema.DatasetMetadata` or its dict form;
            stored in the checkpoint so that the model is rebuilt without the data.
        optimizer: Hydra config of the optimizer (``_target_``, usually with ``_partial_:
            true``) or a callable ``params -> Optimizer`` (a ``functools.partial`` or an
            importable class). ``None`` is allowed for inference-only use.
        scheduler: optional learning-rate scheduler, same forms, called with the optimizer.
        scheduler_interval: ``"step"`` or ``"epoch"``: when Lightning steps the scheduler.
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` scheduler watches.
        task_weights: loss weight per task (``metadata.tasks`` order); 1.0 each by default,
            i.e. the plain sum of the task losses.
        param_groups: optimizer options per parameter role of the backbone, e.g.
            ``{"embeddings": {"lr": 0.01}}`` (:mod:`mtl_clippy.models.param_groups`); the
            other parameters form one group with the optimizer's options. ``None`` or empty:
            one group of all parameters.

    Logged: ``train/loss``, ``train/loss_<task>`` every step; for ``val`` and ``test``,
    ``<split>/{auc,logloss,calibration}_<task>`` and ``<split>/auc_mean`` per epoch, plus
    ``val/auc_mean_best``. An undefined AUC (a single class in the epoch) is logged as NaN
    with a warning, which makes ``auc_mean`` NaN for that epoch; ``auc_mean_best`` ignores it.
    """

    def __init__(
        self,
        backbone: ConfigLike,
        metadata: DatasetMetadata | Mapping[str, Any],
        optimizer: OptimizerLike | None = None,
        scheduler: SchedulerLike | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/auc_mean",
        task_weights: Sequence[float] | None = None,
        param_groups: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, Mapping | DictConfig) or "_target_" not in backbone:
            raise TypeError(
                "backbone must be a Hydra config with a '_target_' key "
                "(e.g. {'_target_': 'mtl_clippy.models.SharedBottom', 'embed_dim': 128})"
            )
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
            )
        meta = as_metadata(metadata)
        backbone_cfg = _plain(backbone, "backbone")
        backbone_cfg.pop("metadata", None)
        if task_weights is None:
            weights = [1.0] * meta.n_tasks
        else:
            weights = [float(w) for w in _plain(task_weights, "task_weights")]
            if len(weights) != meta.n_tasks:
                raise ValueError(
                    f"task_weights has {len(weights)} entries but the data has "
                    f"{meta.n_tasks} tasks {list(meta.tasks)}"
                )
        self.save_hyperparameters(
            {
                "backbone": backbone_cfg,
                "metadata": _plain(meta.to_dict(), "metadata"),
                "optimizer": factory_config(optimizer, "optimizer"),
                "scheduler": factory_config(scheduler, "scheduler"),
                "scheduler_interval": scheduler_interval,
                "scheduler_monitor": scheduler_monitor,
                "task_weights": weights,
                "param_groups": param_groups_config(param_groups),
            }
        )
        self.metadata = meta
        self.tasks: tuple[str, ...] = tuple(meta.tasks)
        self.backbone: nn.Module = _instantiate_partial(backbone_cfg)(metadata=meta)
        self.register_buffer("task_weights", torch.tensor(weights), persistent=False)
        self.val_metrics = split_metrics(self.tasks, "val/")
        self.test_metrics = split_metrics(self.tasks, "test/")
        self.val_auc_best = MaxMetric(nan_strategy="ignore")

    # -- model ---------------------------------------------------------------------------------

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Per-task logits ``[batch, n_tasks]``."""
        return self.backbone(categorical, numerical)

    def task_losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean BCE of each task over the batch, ``[n_tasks]``."""
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)

    # -- steps ---------------------------------------------------------------------------------

    def training_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The training objective: the weighted sum of the per-task BCE losses (a scalar)."""
        return (self.task_losses(logits, labels) * self.task_weights).sum()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Weighted sum of the per-task BCE losses; logs the total and each task's loss.

        The loss is taken on the backbone's ``training_outputs`` where it has them (a
        :class:`~mtl_clippy.models.Backbone`: the forward on the batch, or MetaHeac's query
        rows under its adapted task embeddings), else on the forward."""
        categorical, numerical, labels = batch
        n = labels.shape[0]
        outputs = getattr(self.backbone, "training_outputs", None)
        if callable(outputs):
            logits, labels = outputs(categorical, numerical, labels, self.training_loss)
        else:
            logits = self(categorical, numerical)
        per_task = self.task_losses(logits, labels)
        loss = (per_task * self.task_weights).sum()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        for i, task in enumerate(self.tasks):
            self.log(f"train/loss_{task}", per_task[i], on_step=True, on_epoch=False, batch_size=n)
        return loss

    def _update(self, metrics: MetricCollection, batch: Batch) -> None:
        categorical, numerical, labels = batch
        metrics.update(self(categorical, numerical), labels)

    def _compute(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """The split's epoch values, task by task, and their ``auc_mean``; then a reset."""
        computed, p = metrics.compute(), metrics.prefix
        metrics.reset()
        values = {f"{p}{k}_{t}": computed[f"{p}{k}_{t}"] for t in self.tasks for k in METRIC_KINDS}
        values[f"{p}auc_mean"] = torch.stack([values[f"{p}auc_{t}"] for t in self.tasks]).mean()
        return values

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulate the validation metrics (computed and logged at the end of the epoch)."""
        self._update(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        values = self._compute(self.val_metrics)
        if not self.trainer.sanity_checking:  # the sanity check's numbers never count as best
            self.val_auc_best.update(values["val/auc_mean"])
            values["val/auc_mean_best"] = self.val_auc_best.compute()
        self._log_epoch(values)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulate the test metrics (computed and logged at the end of the epoch)."""
        self._update(self.test_metrics, batch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self._compute(self.test_metrics))

    def _log_epoch(self, values: dict[str, Tensor]) -> None:
        # The metrics gathered every rank's predictions before computing, so each rank holds
        # the same numbers; "max" over ranks keeps them exactly (a mean could round).
        self.log_dict(values, sync_dist=True, reduce_fx="max")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Per-task probabilities ``[batch, n_tasks]``; labels in the batch are ignored."""
        categorical, numerical = batch[0], batch[1]
        # float32 probabilities also under bf16 autocast (a bfloat16 sigmoid ties most scores)
        return torch.sigmoid(self(categorical, numerical).float())

    def on_train_start(self) -> None:
        # The sanity check runs validation before training; start "best" from scratch, or
        # from the checkpoint's value when resuming.
        self.val_metrics.reset()
        self.val_auc_best.reset()
        resumed = getattr(self, "_resumed_val_auc_best", None)
        if resumed is not None:
            self.val_auc_best.update(resumed.to(self.device))
            self._resumed_val_auc_best = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # torchmetrics states are not in the state_dict; keep the best validation AUC so
        # far so that a resumed run logs the same val/auc_mean_best.
        if self.val_auc_best.update_count:
            checkpoint["val_auc_mean_best"] = self.val_auc_best.compute().detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_val_auc_best = checkpoint.get("val_auc_mean_best")

    @_restricted_classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike[str] | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        *,
        trusted_targets: Sequence[str] = (),
        **kwargs: Any,
    ) -> MultiTaskModule:
        """Lightning's ``load_from_checkpoint``, safe for a checkpoint from anywhere.

        The file is read with ``torch.load(weights_only=True)`` whatever ``weights_only`` and
        the environment say (Lightning leaves it to torch's default, which
        ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns off); a file that needs more raises
        :class:`~mtl_clippy.resume.UnsafeCheckpoint` naming it. Its hyper-parameters name the
        classes the model is built from (``_target_``), which would be imported and called:
        each must lie in ``mtl_clippy``, ``torch.optim`` or ``torch.nn``, or start with one of
        ``trusted_targets`` (your own backbone's module, say), else ``UnsafeCheckpoint`` too.
        """
        import pickle

        from mtl_clippy import resume

        del weights_only  # always True
        try:
            checkpoint = _read_checkpoint(checkpoint_path)
        except pickle.UnpicklingError as exc:
            if resume.refused_for_safety(checkpoint_path, exc):
                raise resume.UnsafeCheckpoint(
                    resume.unsafe_checkpoint_message(_name(checkpoint_path), exc)
                ) from None
            raise
        allowed = (*SAFE_TARGET_PREFIXES, *trusted_targets)
        hparams = checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {}
        for where, target in _targets(hparams, "hyper_parameters"):
            if not isinstance(target, str) or not target.startswith(allowed):
                raise resume.UnsafeCheckpoint(
                    f"checkpoint {_name(checkpoint_path)} is refused: {where}._target_ is "
                    f"{target!r}, which building the model would import and call; only "
                    f"classes of {', '.join(p.rstrip('.') for p in allowed)} are built from a "
                    "checkpoint: pass trusted_targets=[<its module>] if you trust the file"
                )
        return super().load_from_checkpoint(  # type: ignore[misc]
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=True,
            **kwargs,
        )

    # -- optimization --------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """Build the optimizer (and scheduler) from the stored configs.

        Raises ``ValueError`` before training when the backbone has sparse embeddings and the
        optimizer cannot take sparse gradients. The scheduler is stepped every
        ``scheduler_interval`` (``"epoch"`` or ``"step"``); a ``ReduceLROnPlateau`` watches
        ``scheduler_monitor``.
        """
        optimizer = self.build_optimizer()
        if self.hparams["scheduler"] is None:
            return optimizer
        scheduler = self.build_scheduler(optimizer)
        entry: dict[str, Any] = {
            "scheduler": scheduler,
            "interval": self.hparams["scheduler_interval"],
        }
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            entry["monitor"] = self.hparams["scheduler_monitor"]
            every = getattr(self._trainer, "check_val_every_n_epoch", None)
            if entry["interval"] == "epoch" and entry["monitor"].startswith("val/") and every:
                entry["frequency"] = int(every)  # only after the epochs that validate
        return {"optimizer": optimizer, "lr_scheduler": entry}

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of the stored config over this module's parameters (in groups by
        role with ``param_groups``)."""
        cfg = self.hparams["optimizer"]
        if cfg is None:
            raise ValueError(
                "MultiTaskModule has no optimizer: pass optimizer= (a Hydra config with "
                "_target_ or a callable params -> Optimizer) to train it"
            )
        optimizer = optimizer_with_groups(
            _instantiate_partial(cfg), self, self.hparams.get("param_groups")
        )
        if getattr(optimizer, "_step_supports_amp_scaling", False) and self._clips_gradients():
            # torch's fused optimizers (optim=adam's fused: true) unscale gradients inside their
            # step, so Lightning refuses to clip their gradients: take the unfused kernel.
            rank_zero_warn(
                f"{type(optimizer).__name__}(fused=True) cannot be combined with gradient "
                "clipping (trainer.gradient_clip_val, as grad_clip=norm sets); this run uses "
                "its unfused implementation: the same update, more slowly",
                category=UserWarning,
            )
            cfg = {**dict(cfg), "fused": False}
            optimizer = optimizer_with_groups(
                _instantiate_partial(cfg), self, self.hparams.get("param_groups")
            )
        if has_sparse_embeddings(self.backbone) and not _supports_sparse(optimizer):
            raise ValueError(
                f"The backbone was built with sparse_embeddings=true (model config "
                f"'{self.hparams['backbone']['_target_']}'), so its embedding table produces "
                f"sparse gradients, but the optimizer {type(optimizer).__name__} "
                f"({cfg['_target_']}) cannot take sparse gradients. Set sparse_embeddings=false "
                f"or use an optimizer that supports them: "
                f"{', '.join(p.rsplit('.', 1)[-1] for p in SPARSE_CAPABLE_OPTIMIZERS)}."
            )
        if has_sparse_embeddings(self.backbone) and not (
            torch.sparse.check_sparse_tensor_invariants.is_enabled()
        ):
            # torch's Adagrad builds sparse tensors from the gradients and warns, once a
            # process, that the sparse invariant checks are "implicitly disabled". Off is
            # torch's default, made explicit here: the same behaviour, without the warning
            # (checks a user turned on stay on).
            torch.sparse.check_sparse_tensor_invariants.disable()
        return optimizer

    def _clips_gradients(self) -> bool:
        """Whether the attached trainer clips gradients (Lightning's gradient_clip_val)."""
        trainer = getattr(self, "_trainer", None)
        return bool(trainer is not None and getattr(trainer, "gradient_clip_val", None))

    def build_scheduler(
        self, optimizer: torch.optim.Optimizer, total_steps: int | None = None
    ) -> Any:
        """The stored scheduler config called with ``optimizer`` (``None`` without one).

        A length argument (``LENGTH_KEYS``: ``total_steps`` of ``WarmupCosineLR`` /
        ``OneCycleLR``, ``T_max`` of ``CosineAnnealingLR``) given as ``null`` is filled with
        the run's length in the unit in which the scheduler is stepped: ``total_steps`` if
        given, else the attached trainer's ``estimated_stepping_batches`` (optimizer steps) at
        ``scheduler_interval="step"`` or its ``max_epochs`` at ``"epoch"``; a given length
        must be a whole number >= 1. A ``ReduceLROnPlateau`` must watch a metric this module
        logs at the scheduler's interval, in the direction in which it improves.
        ``ValueError`` otherwise (its message starts with the option's name).
        """
        cfg = self.hparams["scheduler"]
        if cfg is None:
            return None
        cfg = dict(cfg)
        filled = False
        for key in LENGTH_KEYS:
            if key not in cfg:
                continue
            if cfg[key] is None:
                cfg[key] = self._run_length(key) if total_steps is None else int(total_steps)
                filled = True
            elif isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
                raise ValueError(f"{key} must be a whole number >= 1, got {cfg[key]!r}")
        scheduler = _instantiate_partial(cfg)(optimizer)
        if filled and isinstance(scheduler, WarmupCosineLR):
            scheduler.length_from_trainer = True  # a resumed run keeps this length
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self._check_plateau(scheduler)
        return scheduler

    def monitorable_metrics(self) -> list[str]:
        """The names this module logs, which a ``ReduceLROnPlateau`` can watch."""
        names = ["train/loss", *(f"train/loss_{t}" for t in self.tasks)]
        for kind in ("auc", "logloss", "calibration"):
            names += [f"val/{kind}_{t}" for t in self.tasks]
        return [*names, "val/auc_mean", "val/auc_mean_best"]

    def _check_plateau(self, scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau) -> None:
        monitor = self.hparams["scheduler_monitor"]
        known = self.monitorable_metrics()
        if monitor not in known:
            raise ValueError(
                f"monitor: {monitor!r} is not a metric of this run; choose from {', '.join(known)}"
            )
        if self.hparams["scheduler_interval"] == "step" and not monitor.startswith("train/"):
            raise ValueError(
                f"monitor: {monitor} is computed once per epoch, but the scheduler is stepped "
                "every step (interval=step); watch a train/ metric or set interval=epoch"
            )
        if self.hparams["scheduler_interval"] == "epoch" and monitor.startswith("train/"):
            raise ValueError(
                f"monitor: {monitor} is logged per step only, so stepped per epoch "
                "(interval=epoch) the scheduler would judge the epoch's last batch; watch a "
                "val/ metric or set interval=step"
            )
        kind = monitor.rsplit("/", 1)[-1]
        if kind.startswith("calibration"):
            raise ValueError(
                f"monitor: {monitor} (predicted over observed positives, best at 1) has no "
                "better direction for mode max or min; watch an AUC or a log loss"
            )
        better = "max" if kind.startswith("auc") else "min" if "loss" in kind else None
        if better is not None and scheduler.mode != better:
            raise ValueError(
                f"mode: {scheduler.mode} is the wrong direction for {monitor} (better is "
                f"{'higher' if better == 'max' else 'lower'}); set mode={better}"
            )

    def _run_length(self, key: str) -> int:
        """The run's length in the unit of ``scheduler_interval``, for a ``key: null``."""
        from mtl_clippy.errors import ConfigError

        if self.hparams["scheduler_interval"] == "epoch":
            epochs = self.trainer.max_epochs
            if epochs is None or epochs < 1:
                raise ConfigError(
                    f"scheduler.{key}: stepped per epoch, it is filled with trainer.max_epochs, "
                    f"which is {epochs}; set trainer.max_epochs or scheduler.{key}"
                )
            return int(epochs)
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ConfigError(
                f"scheduler.{key}: the run has no fixed length (trainer.max_epochs=-1 "
                "and no trainer.max_steps), so it cannot be filled in; set it"
            )
        return max(1, int(steps))
