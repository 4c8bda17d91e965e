"""The task function of ``python train.py``: seed, build, fit, test, summarise.

Every run writes ``metrics.json`` in its folder (the single source for sweep tables and
reports), whatever its outcome: ``completed``, ``diverged`` or ``failed``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mtl_clippy import best as best_mod
from mtl_clippy import config_checks, launch, preemption
from mtl_clippy import resume as resume_mod
from mtl_clippy.atomic import remove_dead_temporaries, write_atomically
from mtl_clippy.callbacks import (
    AtomicCheckpointIO,
    DivergenceMonitor,
    ResumeState,
    ThroughputMeter,
    TrainingDiverged,
)
from mtl_clippy.errors import (
    ConfigError,
    DiskFull,
    disk_full_message,
    full_disk_reported,
    reported,
    user_error_types,
)

log = logging.getLogger("mtl_clippy")

METRICS_FILE = "metrics.json"

#: A task whose test AUC ends within this distance of 0.5 is listed in ``collapsed``.
COLLAPSE_TOLERANCE = 0.01


def register_resolvers() -> None:
    """Config resolvers used by configs/hydra (a process id keeps sweep folders unique)."""
    if not OmegaConf.has_resolver("mtl_clippy.pid"):
        OmegaConf.register_new_resolver("mtl_clippy.pid", lambda: str(os.getpid()), use_cache=True)
    # The launch folder, usable before Hydra's runtime config exists (sweep folders are
    # resolved by the launcher, where ${hydra:runtime.cwd} is not available yet).
    if not OmegaConf.has_resolver("mtl_clippy.cwd"):
        OmegaConf.register_new_resolver("mtl_clippy.cwd", os.getcwd, use_cache=True)
    resume_mod.register_resolvers()
    launch.register_resolvers()


register_resolvers()


# ----------------------------------------------------------------------------- helpers


def _choices() -> dict[str, str]:
    """The config-group choices of this run (model=..., optim=...), when run under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices)
    except Exception:
        return {}


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []


def _name_of(cfg_node: Any, choice: str | None) -> str | None:
    if choice:
        return choice
    if isinstance(cfg_node, Mapping | DictConfig) and "_target_" in cfg_node:
        return str(cfg_node["_target_"]).rsplit(".", 1)[-1]
    return None


def _float(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x.item() if isinstance(x, torch.Tensor) else x)
    return v if math.isfinite(v) else None


def _split_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float | None]:
    """``{"val/auc_click": t}`` -> ``{"auc_click": 0.71}`` for one split prefix."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(prefix + "/") and not key.endswith("_best"):
            out[key[len(prefix) + 1 :]] = _float(value)
    return dict(sorted(out.items()))


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON to a temporary name, then rename: a reader never sees half a file, and a
    full disk leaves no temporary file and raises ``DiskFull`` naming ``path``."""
    text = json.dumps(payload, indent=2, default=str) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX), read from Linux's
    /proc/cpuinfo; elsewhere False (bfloat16 would be emulated, slower than float32)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """``trainer.precision=auto``: bfloat16 autocast where the hardware computes it natively
    (same AUC, about 1.5x the samples per second on this project's CPU runs), else float32."""
    if str(precision) != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """The callbacks of ``group``; a value a constructor rejects is one line naming
    ``callbacks.<name>.<key>`` (Hydra would print a multi-line report)."""
    if not group:
        return []
    return [
        _instantiate_config(c, f"callbacks.{name}")
        for name, c in group.items()
        if c and "_target_" in c
    ]


# ----------------------------------------------------------------------------- the task


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Data module (set up, so its metadata is known) and the LightningModule of a config.

    Configuration problems surface here, before any training, as ``ConfigError`` naming the
    config key.
    """
    datamodule = _instantiate_config(cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, datamodule.metadata)
    _check_gradient_clipping(cfg, module)
    _check_batch_norm_batches(datamodule, module)
    return datamodule, module


def _check_batch_norm_batches(datamodule: Any, module: pl.LightningModule) -> None:
    """BatchNorm cannot train on a batch of one row (torch raises mid-fit). The training
    loader drops an incomplete last batch (``drop_last``), so the smallest training batch is
    ``data.batch_size``, or the whole training split when it is smaller (one process)."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
    batch = getattr(datamodule, "batch_size", None)
    rows = ((getattr(datamodule.metadata, "extra", None) or {}).get("rows") or {}).get("train")
    if not has_bn or batch is None:
        return
    if batch < 2:
        raise ConfigError(
            f"data.batch_size={batch}: model.norm=batch (BatchNorm) needs at least 2 rows per "
            "training batch; use model.norm=layer, or a larger data.batch_size"
        )
    if rows is not None and rows < 2:
        raise ConfigError(
            f"data: the training split has {rows} row, too few for model.norm=batch "
            "(BatchNorm needs at least 2 rows per batch); use model.norm=layer, or more rows"
        )


def _check_checkpoint_vocabulary(ckpt_path: str | None, metadata: Any) -> None:
    """A checkpoint's embedding tables have one row per id of the vocabularies it was trained
    with; data whose vocabularies differ (another data.min_count, other files) cannot load
    them (torch would report a size mismatch per table). Compared before any weight loads."""
    if not ckpt_path or metadata is None:
        return
    try:
        ckpt = resume_mod.load_checkpoint(ckpt_path)  # weights_only=True: runs no code
        theirs_meta = (ckpt.get("hyper_parameters") or {}).get("metadata") or {}
    except resume_mod.UnsafeCheckpoint:
        raise
    except Exception:  # unreadable: Lightning's own loading reports it
        return
    theirs = theirs_meta.get("vocab_sizes")
    ours = list(metadata.vocab_sizes)
    if theirs is None or list(theirs) == ours:
        return
    their_min = (theirs_meta.get("extra") or {}).get("min_count")
    ours_min = (getattr(metadata, "extra", None) or {}).get("min_count")
    was = (
        f"data.min_count={their_min}"
        if their_min is not None
        else "no data.min_count (made before it existed: every training id kept, as with 1)"
    )
    raise ConfigError(
        f"checkpoint {ckpt_path} was trained with a different vocabulary: its vocabulary "
        f"sizes {list(theirs)} vs this data's {ours}; it was trained with {was}, this run has "
        f"data.min_count={ours_min}: resume with the checkpoint's data and data.min_count"
    )


def _check_gradient_clipping(cfg: DictConfig, module: pl.LightningModule) -> None:
    """Lightning's gradient clipping (by norm or by value) fails on sparse gradients."""
    from mtl_clippy.models.layers import has_sparse_embeddings

    clip = (cfg.get("trainer") or {}).get("gradient_clip_val")
    if clip is not None and clip > 0 and has_sparse_embeddings(module):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip}: Lightning's gradient clipping cannot take the "
            "sparse embedding gradients of model.sparse_embeddings=true; set one of them off "
            "(ClippyAdagrad clips its own updates)"
        )


def build_module(cfg: DictConfig, metadata: Any) -> pl.LightningModule:
    """The LightningModule of a config's model, optim, scheduler and task_weights for data of
    ``metadata``; its optimizer and scheduler are built once to check them (``ConfigError``
    naming the key)."""
    from mtl_clippy.models import MultiTaskModule

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
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(_keyed("model", _cause(exc), cfg.model)) from exc
    # Build the optimizer and the scheduler once now, so that invalid arguments, or an
    # optimizer that cannot take the model's sparse gradients, are reported before training.
    try:
        optimizer = module.build_optimizer()
    except (TypeError, ValueError) as exc:
        raise ConfigError(_keyed("optim", _cause(exc), cfg.optim)) from exc
    _check_scheduler_numbers(scheduler)
    try:  # the trainer fills a length: null at fit time; any whole number checks the rest
        built = module.build_scheduler(optimizer, total_steps=1000)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_keyed("scheduler", _cause(exc), cfg.scheduler)) from exc
    if built is not None:
        _check_scheduler_use(cfg, built, monitor)
        _trial_step(built)
    return module


def _check_scheduler_numbers(scheduler: dict[str, Any] | None) -> None:
    """A text value for a scheduler argument whose default is a number (``eta_min=abc``)
    would only fail at the first step, deep inside torch."""
    import inspect

    if not scheduler or "_target_" not in scheduler:
        return
    try:
        params = inspect.signature(hydra.utils.get_object(str(scheduler["_target_"]))).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return  # instantiating it reports a bad target
    for key, value in scheduler.items():
        default = params[key].default if key in params else None
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if numeric and isinstance(value, str):
            raise ConfigError(f"scheduler.{key}: expected a number, got {value!r}")


def _check_scheduler_use(cfg: DictConfig, scheduler: Any, monitor: str) -> None:
    """``monitor`` belongs to a plateau scheduler, which needs the metric's split."""
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if not plateau and "monitor" in cfg.scheduler:
        raise ConfigError(
            f"scheduler.monitor: only a ReduceLROnPlateau scheduler watches a metric, "
            f"{type(scheduler).__name__} does not; remove scheduler.monitor"
        )
    val_fraction = (cfg.get("data") or {}).get("val_fraction")
    if plateau and monitor.startswith("val/") and val_fraction == 0:
        raise ConfigError(
            f"scheduler.monitor: {monitor} is computed on the validation rows, but "
            "data.val_fraction=0 holds none out; set data.val_fraction > 0"
        )


def _trial_step(scheduler: Any) -> None:
    """Step the (throwaway) scheduler once, so that a value it only uses when stepping is
    reported now in one line, not as a traceback after the first training step."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler stepped before the optimizer"
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(0.5)
            else:
                scheduler.step()
    except Exception as exc:  # any failure of a scheduler's own step
        raise ConfigError(
            f"scheduler: {type(scheduler).__name__} fails on its first step "
            f"({type(exc).__name__}: {_cause(exc)}); check its arguments"
        ) from exc


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


#: Trainer options that must be whole numbers (Lightning would fail on them mid-fit).
_TRAINER_INTS = ("max_epochs", "min_epochs", "max_steps", "log_every_n_steps",
                 "check_val_every_n_epoch", "num_nodes", "accumulate_grad_batches")  # fmt: skip


def _check_trainer_values(trainer_cfg: DictConfig) -> None:
    for key in _TRAINER_INTS:
        value = trainer_cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"trainer.{key}: expected a whole number, got {value!r}")


def _instantiate_config(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with a value the target rejects reported as a
    ``ConfigError`` naming the config key (Hydra would print a multi-line report)."""
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, TypeError | ValueError | MisconfigurationException):
            message = _cause(exc)
            if message.split(" ", 1)[0] in node:  # "batch_size must be ..." -> data.batch_size
                raise ConfigError(f"{key}.{message}") from exc
            raise ConfigError(f"{key}: {message}") from exc
        raise


def _cause(exc: BaseException, run_dir: Path | None = None) -> str:
    """The innermost message of an exception chain (Hydra wraps instantiation errors); a
    ConfigError's own message, which names the config key, is kept; a full disk anywhere in
    the chain is told as such, naming the file (``mtl_clippy.errors.DiskFull``; advising a
    resume only where ``run_dir`` has a checkpoint)."""
    full = disk_full_message(exc, run_dir)
    if full is not None:
        return full
    while exc.__cause__ is not None and not isinstance(exc, ConfigError):
        exc = exc.__cause__
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _select(cfg: DictConfig, key: str) -> Any:
    """The value of ``key``, or None where it is missing or cannot be resolved."""
    return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one configuration; returns (and writes) its ``metrics.json`` content."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    choices = _choices()
    summary: dict[str, Any] = {
        "status": "failed",
        "model": _name_of(cfg.model, choices.get("model")),
        "optim": _name_of(cfg.optim, choices.get("optim")),
        # a bad value is the run's error (below): recorded as None here, never a crash
        # (an interpolation that cannot be resolved reads as None too)
        "lr": config_checks.number_or_none(_select(cfg, "optim.lr")),
        "seed": config_checks.whole_or_none(_select(cfg, "seed")),
        "overrides": _overrides(),
        "epochs": 0,
        "steps": 0,
        "wall_time_s": None,
        "samples_per_s": None,
        "optimizer_path": None,
        "val": {},
        "best": {},
        "test": None,
        "bayes": None,
        "divergence": {
            "step": None,
            "last_finite_loss": None,
            "spikes": 0,
            "spike_steps": [],
            "reason": None,
        },
        "max_abs_logit": None,
        "collapsed": [],
        "error": None,
        "output_dir": str(out_dir),
    }
    t_start = time.perf_counter()
    _check_values(cfg, summary, out_dir, t_start)
    # Lightning's rank-zero utilities (its loggers, rank_zero_only) take the rank that the
    # Trainer will give this process from now on, not only once the Trainer exists.
    rank_zero_only.rank = launch.global_rank(
        cfg.trainer.get("devices"),
        cfg.trainer.get("num_nodes", 1),
        cfg.trainer.get("accelerator", "auto"),
    )
    trainer: pl.Trainer | None = None
    if _is_global_zero():  # metrics.json.tmp<pid> (...) of a run killed while writing them
        remove_dead_temporaries(out_dir)
    ckpt_path, ckpt_step, previous = _resume_point(cfg, out_dir)
    if previous is not None:  # resume=true on a run that had already finished
        log.info("this run had already completed; nothing to resume (%s)", out_dir)
        return previous
    summary["resumed_from"] = os.path.relpath(ckpt_path, out_dir) if ckpt_path else None
    try:
        # SIGTERM / SIGINT (/ SLURM's SIGUSR1): checkpoint the current step, then stop.
        stop_on_signal = preemption.StopOnSignal.for_config(cfg)
        threads = _threads(cfg.get("threads"))
        if threads:
            torch.set_num_threads(threads)
        summary["threads"] = torch.get_num_threads()
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        datamodule, module = build(cfg)
        undefined = config_checks.check_data(cfg, datamodule)  # val metrics that stay NaN
        _check_checkpoint_vocabulary(ckpt_path, datamodule.metadata)
        extra = getattr(datamodule.metadata, "extra", {}) or {}
        if extra.get("bayes_auc"):
            summary["bayes"] = {f"auc_{k}": v for k, v in extra["bayes_auc"].items()}
            summary["bayes"].update(
                {f"logloss_{k}": v for k, v in extra.get("bayes_logloss", {}).items()}
            )
        # share of categorical cells mapped to the OOV slot, per split (and per field)
        summary["oov_rate"] = getattr(datamodule, "oov_rate", None) or None

        throughput = ThroughputMeter()
        loggers = _instantiate_loggers(cfg.get("logger"), ckpt_step)
        callbacks = [*_instantiate_all(cfg.get("callbacks")), throughput, ResumeState(),
                     stop_on_signal, best_mod.ValidationRecord()]  # fmt: skip
        validation = config_checks.has_validation(cfg)
        if not validation or undefined:  # early stopping off, best.ckpt = the last epoch
            callbacks, summary["early_stopping"] = config_checks.without_validation(
                callbacks, undefined if validation else None
            )
        if validation and summary.get("early_stopping") is None:
            summary["early_stopping"] = next(
                (c.monitor for c in callbacks if isinstance(c, pl.callbacks.EarlyStopping)), None
            )
        if not loggers:  # the learning-rate monitor needs a logger to write to
            callbacks = [
                c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)
            ]
        precision = resolve_precision(
            cfg.trainer.get("precision", "32-true"), str(cfg.trainer.get("accelerator", "auto"))
        )
        summary["precision"] = str(precision)
        _check_trainer_values(cfg.trainer)
        trainer: pl.Trainer = _instantiate_config(
            cfg.trainer,
            "trainer",
            callbacks=callbacks,
            logger=loggers or False,
            precision=precision,
            plugins=[AtomicCheckpointIO()],
        )
        if trainer.world_size == 1 and launch.started_separately(trainer.num_nodes):
            raise ConfigError(
                f"trainer: this is one of {launch.launched_world_size()} processes started "
                "together (srun, torchrun), but the trainer runs on one process; use "
                "trainer=ddp with trainer.devices=<processes per node> trainer.num_nodes=<nodes>"
            )
        config_checks.check_batches(cfg, datamodule, trainer.world_size)
        if trainer.world_size > 1:
            _ddp_children_run_this_job()
        monitor = next((c for c in callbacks if isinstance(c, DivergenceMonitor)), None)
        diverged = False
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except TrainingDiverged:
            diverged = True
        if monitor is not None:
            summary["divergence"] = monitor.summary()
            summary["max_abs_logit"] = monitor.max_abs_logit
        summary["epochs"] = int(trainer.current_epoch)
        summary["steps"] = int(trainer.global_step)
        summary["samples_per_s"] = throughput.samples_per_s
        # Which ClippyAdagrad implementation the steps ran (None for other optimizers).
        opt = trainer.optimizers[0] if trainer.optimizers else None
        summary["optimizer_path"] = getattr(opt, "implementation", lambda: None)()
        summary["val"] = _split_metrics(trainer.callback_metrics, "val")

        ckpt_cb = trainer.checkpoint_callback
        best_path = getattr(ckpt_cb, "best_model_path", "") or ""
        # what chose best.ckpt, its score, that epoch's val/auc_mean (mtl_clippy.best)
        summary["best"] = best_mod.summary(ckpt_cb, validation, out_dir, summary["val"])
        if diverged:
            # A result, not a crash: no test numbers from a broken model.
            summary["status"] = "diverged"
            return summary
        if cfg.get("test", True):
            results = trainer.test(
                module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False
            )
            summary["test"] = _split_metrics(results[0] if results else {}, "test")
            summary["collapsed"] = collapsed_tasks(summary["test"])
        summary["status"] = "completed"
        params = OmegaConf.to_container(cfg, resolve=True)
        final = {f"final/{k}": v for k, v in (summary["test"] or {}).items() if v is not None}
        for lg in trainer.loggers:
            if isinstance(lg, pl.loggers.TensorBoardLogger):  # hparams tab with the results
                lg.log_hyperparams(params, final)  # type: ignore[arg-type]
            else:
                lg.log_hyperparams(params)  # type: ignore[arg-type]
                if final:
                    lg.log_metrics(final, step=trainer.global_step)
            lg.finalize("success")
    except BaseException as exc:
        stop = preemption.interruption(exc)
        if stop is not None:  # status interrupted, the steps, the resume command
            preemption.record(summary, stop, trainer, out_dir)
            if stop is exc:
                raise
            raise stop from exc  # Lightning's SIGTERMException, a KeyboardInterrupt
        summary["status"] = "failed"
        # A full disk in any wrapper (a logger's thread, a library's error) is named now, so
        # that it stays the first failure reported when metrics.json then fails too.
        full = reported(exc, out_dir) if isinstance(exc, Exception) else None
        shown = full if full is not None else exc
        summary["error"] = f"{type(shown).__name__}: {_cause(shown, out_dir)}"
        if not isinstance(shown, user_error_types()):
            summary["traceback"] = traceback.format_exc()
        if full is not None and full is not exc:
            raise full from exc
        raise
    finally:
        preemption.settle()  # the result stands: a signal from here on changes nothing
        summary["wall_time_s"] = round(time.perf_counter() - t_start, 3)
        if _is_global_zero(trainer):
            write_json_atomic(out_dir / METRICS_FILE, summary)
        preemption.uninstall()
    return summary


def _check_values(cfg: DictConfig, summary: dict[str, Any], out_dir: Path, t_start: float) -> None:
    """Every configuration value against its rule (``mtl_clippy.config_checks``), before
    anything reads it; a bad one fails the run in one line naming the key, recorded in
    metrics.json. A folder that already holds one (the run being resumed) keeps it: this
    attempt changed nothing there."""
    try:
        config_checks.check_config(cfg)
    except ConfigError as exc:
        summary["error"] = f"ConfigError: {exc}"
        summary["wall_time_s"] = round(time.perf_counter() - t_start, 3)
        if _is_global_zero() and not (out_dir / METRICS_FILE).exists():
            write_json_atomic(out_dir / METRICS_FILE, summary)
        raise


def _threads(value: Any) -> int | None:
    """The ``threads`` setting, checked (None: leave torch's default)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"threads: expected a positive whole number or null, got {value!r}")
    return value


def _ddp_children_run_this_job() -> None:
    """In a sweep, make Lightning's DDP launcher start the other ranks on this job alone.

    Lightning starts rank k by re-running the command line (``sys.argv``) with
    ``hydra.run.dir=<HydraConfig run.dir>``; in a sweep that would be the whole sweep, in the
    wrong folder. Point both at this job: its overrides, and its output folder.
    """
    if not _is_multirun():
        return
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    hc = HydraConfig.get()
    sys.argv = [sys.argv[0], *hc.overrides.task]
    with read_write(hc.run):
        hc.run.dir = hc.runtime.output_dir


class _ResumePoint(NamedTuple):
    ckpt_path: str | None = None  # the checkpoint to continue from (None: start afresh)
    step: int | None = None  # its global step
    previous: dict[str, Any] | None = None  # resume=true on a finished run: its summary


def _resume_point(cfg: DictConfig, out_dir: Path) -> _ResumePoint:
    """Where this run starts: a checkpoint (``ckpt_path``, or the newest of this run folder
    with ``resume=true``), afresh, or nowhere because it had already finished."""
    if cfg.get("ckpt_path"):
        path = Path(str(cfg.ckpt_path)).expanduser()
        if not path.is_file():
            raise ConfigError(f"ckpt_path: no checkpoint file at {path}")
        found = resume_mod.checkpoint_step(path)
        if found is None:
            raise ConfigError(f"ckpt_path: {path} is not a readable checkpoint")
        return _ResumePoint(str(path), found[0])
    if not resume_mod.resume_requested(cfg):
        return _ResumePoint()
    metrics = out_dir / METRICS_FILE
    previous = {}
    if metrics.is_file():
        try:
            previous = json.loads(metrics.read_text())
        except ValueError:
            previous = {}
        if previous.get("status") in ("completed", "diverged"):
            return _ResumePoint(previous=previous)
    newest = resume_mod.find_checkpoint(out_dir)
    if newest is not None:
        log.info("resuming from %s", newest[0])
        return _ResumePoint(str(newest[0]), newest[1])
    if _is_multirun():  # a sweep job that had not started (or saved nothing): start it
        return _ResumePoint()
    if isinstance(previous, dict) and previous.get("status") == "interrupted":
        # This folder's run was stopped (a requeued SLURM job, say) before its first
        # checkpoint: there is nothing to resume, so it starts again, in the same folder.
        log.info("resume: %s stopped before its first checkpoint; starting it afresh", out_dir)
        return _ResumePoint()
    raise ConfigError(
        f"resume={cfg.resume}: found no checkpoint of an earlier run with the same overrides "
        f"under {Path(cfg.paths.log_dir) / 'runs'} (compare the overrides in "
        "<run>/.hydra/overrides.yaml); start it without resume=true, or name the run with "
        "resume=<run folder> or a checkpoint with ckpt_path=<file>"
    )


def _instantiate_loggers(group: DictConfig | None, step: int | None) -> list[Any]:
    """The loggers. Resuming from global step ``step``, TensorBoard hides what the killed run
    logged from that step on (``purge_step``) and the CSV file keeps the rows before it, so
    the resumed run's curves continue without overlap."""

    def make(node: DictConfig) -> Any:
        target = str(node["_target_"])
        if step is not None and target.endswith("CSVLogger"):
            return _resumed_csv_logger(node, step)
        if step is not None and target.endswith("TensorBoardLogger"):
            return hydra.utils.instantiate(node, purge_step=step)
        return hydra.utils.instantiate(node)

    return [make(c) for c in (group or {}).values() if c and "_target_" in c]


def _resumed_csv_logger(node: DictConfig, step: int) -> Any:
    """A CSV logger that keeps the rows logged before ``step`` (Lightning's CSV writer deletes
    an existing metrics.csv when it starts; the killed run's rows after the checkpoint go)."""
    import csv

    logger = hydra.utils.instantiate(node)
    path = Path(logger.log_dir) / "metrics.csv"
    header: list[str] = []
    rows: list[dict[str, str]] = []
    if path.is_file() and _is_global_zero():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") and int(float(r["step"])) < step]
    writer = logger.experiment  # the writer starts here (and deletes the old file)
    if rows and _is_global_zero():
        writer.metrics_keys = sorted(header)

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=writer.metrics_keys)
                out.writeheader()
                out.writerows(rows)

        write_atomically(path, write)  # a full disk: DiskFull, no temporary file left
    return logger


def collapsed_tasks(test: Mapping[str, Any] | None) -> list[str]:
    """Tasks whose test AUC is within ``COLLAPSE_TOLERANCE`` of 0.5 (a constant predictor)."""
    return sorted(
        key[len("auc_") :]
        for key, value in (test or {}).items()
        if key.startswith("auc_")
        and key != "auc_mean"
        and isinstance(value, float)
        and abs(value - 0.5) <= COLLAPSE_TOLERANCE
    )


def _is_global_zero(trainer: pl.Trainer | None = None) -> bool:
    """Lightning's global rank 0: the trainer's, or before it exists ``rank_zero_only.rank``,
    which ``train`` sets to the rank Lightning will give this process (``mtl_clippy.launch``:
    ``SLURM_PROCID`` under srun, ``RANK`` under torchrun, else ``NODE_RANK`` and
    ``LOCAL_RANK``)."""
    if trainer is not None:
        return bool(trainer.is_global_zero)
    return rank_zero_only.rank == 0


# ----------------------------------------------------------------------------- reporting


def format_summary(summary: Mapping[str, Any]) -> str:
    """The per-task table printed at the end of a run."""
    tasks = sorted(
        {
            k.split("_", 1)[1]
            for k in [*(summary.get("val") or {}), *(summary.get("test") or {})]
            if k.startswith("auc_") and k != "auc_mean"
        }
    )
    val, test, bayes = (
        summary.get("val") or {},
        summary.get("test") or {},
        summary.get("bayes") or {},
    )

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "  -   "

    lines = [
        f"{summary.get('model')} + {summary.get('optim')} (lr {summary.get('lr')}, seed {summary.get('seed')}): "
        f"{summary.get('status')}, {summary.get('epochs')} epochs, {summary.get('steps')} steps, "
        f"{summary.get('wall_time_s')} s"
        + (f", {summary['samples_per_s']:,.0f} samples/s" if summary.get("samples_per_s") else ""),
        "",
        f"| {'task':<12} | val AUC | test AUC | Bayes AUC | val logloss | test logloss |",
        f"|{'-' * 14}|---------|----------|-----------|-------------|--------------|",
    ]
    for t in [*tasks, "mean"]:
        lines.append(
            f"| {t:<12} | {fmt(val.get(f'auc_{t}'))}  | {fmt(test.get(f'auc_{t}'))}   | "
            f"{fmt(bayes.get(f'auc_{t}'))}    | {fmt(val.get(f'logloss_{t}'))}      | "
            f"{fmt(test.get(f'logloss_{t}'))}       |"
        )
    return "\n".join(lines)


def main(cfg: DictConfig) -> float | None:
    """Entry point used by ``train.py`` under ``@hydra.main``.

    A single run re-raises user mistakes as one clear line (exit status 2) and other errors
    as usual. In a sweep, a failing job is recorded (``metrics.json`` with status ``failed``
    and its error) and the sweep goes on; the results table lists it. A full disk ends the
    sweep (one line, status 2): every later job would fail on it too.

    Returns metrics.json's ``best.score`` (``mtl_clippy.best.score``), which a Hydra sweeper
    (Optuna) optimises: the best value of ``callbacks.model_checkpoint.monitor``, higher is
    better for the default ``val/auc_mean`` (``direction: maximize``), lower for a loss;
    None when no metric chose the checkpoint, or the job failed.
    """
    multirun = _is_multirun()
    env_before = {k: os.environ.get(k) for k in _DDP_ENV}
    run_dir = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False)
    try:
        with full_disk_reported(run_dir):  # a full disk, however it arrives: one line, status 2
            summary = train(cfg)
    except preemption.RunInterrupted as exc:  # one line, 143 / 130; ends a sweep too
        preemption.exit_interrupted(exc)
    except user_error_types() as exc:
        message = f"error: {_cause(exc, run_dir)}"
        if multirun and isinstance(exc, DiskFull):  # the next jobs would fail too: stop
            print(message, file=sys.stderr)
            sys.exit(2)
        if multirun:
            log.error("job failed: %s", message)
            return None
        print(message, file=sys.stderr)
        sys.exit(2)
    except Exception:
        if multirun:
            log.exception("job failed")
            return None
        raise
    finally:
        if multirun:
            _end_distributed(env_before)
    if not _is_global_zero():  # other DDP ranks: rank 0 reports
        return best_mod.score(summary.get("best"))
    print()
    print(format_summary(summary))
    if summary.get("status") == "diverged":
        div = summary.get("divergence") or {}
        line = f"run diverged at step {div.get('step')}: {div.get('reason')} (no test: status diverged)"
        if multirun:
            log.warning(line)
        print(f"\n{line}")
    if summary.get("collapsed"):
        print(
            f"\ncollapsed tasks (test AUC within {COLLAPSE_TOLERANCE} of 0.5): "
            + ", ".join(summary["collapsed"])
        )
    chosen = str((summary.get("best") or {}).get("monitor"))
    if chosen == config_checks.NO_VALIDATION:
        print("\nno validation: early stopping off, the last epoch's checkpoint was tested")
    elif chosen.startswith("last epoch ("):  # a validation metric that stayed undefined
        print(f"\nbest.ckpt: {chosen}; the last epoch's checkpoint was tested")
    print(f"\nrun folder: {cfg.paths.output_dir}")
    return best_mod.score(summary.get("best"))  # what a sweeper optimises: best.score


#: Set by Lightning's DDP launcher in the launching process; a later job of the same sweep
#: would take them as "the other ranks already exist" and wait for them forever.
_DDP_ENV = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _end_distributed(env_before: Mapping[str, str | None]) -> None:
    """After a sweep job: close its process group and restore the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in env_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False
