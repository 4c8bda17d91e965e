"""The checks a run makes before it fits, on what only exists once things are built (the
data's metadata, the module, the scheduler, the trainer): each one turns what would fail
mid-fit, deep inside torch or Lightning, into one ``ConfigError`` line naming the key.

The checks of the configuration values alone, before anything is built, are
``mtl_clippy.config_checks``'s rules; :func:`check_values` applies them and records a refused
run in its ``metrics.json``.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from mtl_clippy import config_checks, distributed, launch
from mtl_clippy import resume as resume_mod
from mtl_clippy.errors import ConfigError, innermost_message
from mtl_clippy.summary import RunSummary, exists


def check_values(cfg: DictConfig, summary: RunSummary, out_dir: Path, t_start: float) -> None:
    """Every configuration value against its rule (``mtl_clippy.config_checks``), before
    anything reads it; a bad one fails the run in one line naming the key, recorded in
    metrics.json. A folder that already holds one (the run being resumed) keeps it: this
    attempt changed nothing there."""
    try:
        config_checks.check_config(cfg)
    except ConfigError as exc:
        summary.error = f"ConfigError: {exc}"
        summary.wall_time_s = round(time.perf_counter() - t_start, 3)
        if distributed.is_global_zero() and not exists(out_dir):
            summary.write(out_dir)
        raise


def check_batch_norm_batches(datamodule: Any, module: pl.LightningModule) -> None:
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


def check_checkpoint_vocabulary(ckpt_path: str | None, metadata: Any) -> None:
    """A checkpoint's embedding tables have one row per id of the vocabularies it was trained
    with; data whose vocabularies differ (another data.min_count, other files) cannot load
    them (torch would report a size mismatch per table). Compared before any weight loads;
    the checkpoint is memory-mapped (``resume.load_checkpoint``), so reading its metadata
    does not read its weights."""
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


def check_checkpoint_param_groups(ckpt_path: str | None, module: Any) -> None:
    """A checkpoint's optimizer state holds one entry per parameter group, by position, and
    torch loads it into this run's groups by position too: other ``param_groups`` (another
    number of groups: torch's raw "different number of parameter groups"; the same sizes
    but other roles: the state of one role's parameters loaded silently into another's)
    cannot resume it. The groups' names and sizes are compared before anything loads (the
    checkpoint memory-mapped, ``resume.load_checkpoint``). A checkpoint from before named
    groups has one unnamed group, as a run without ``param_groups``."""
    if not ckpt_path or not hasattr(module, "build_optimizer"):
        return
    try:
        ckpt = resume_mod.load_checkpoint(ckpt_path)  # weights_only=True: runs no code
        states = ckpt.get("optimizer_states") or []
        theirs = [_group_of(g) for g in states[0]["param_groups"]] if states else None
        their_spec = (ckpt.get("hyper_parameters") or {}).get("param_groups")
    except resume_mod.UnsafeCheckpoint:
        raise
    except Exception:  # unreadable, or no optimizer state: Lightning's own loading reports it
        return
    if theirs is None:
        return
    ours = [_group_of(g) for g in module.build_optimizer().param_groups]
    if theirs == ours:
        return
    raise ConfigError(
        f"param_groups: the checkpoint {ckpt_path} was trained with parameter groups "
        f"{_groups_text(theirs)}; this run has {_groups_text(ours)}; resume with the same "
        f"param_groups ({_spec_text(their_spec)})"
    )


def _group_of(group: Mapping[str, Any]) -> tuple[str, int]:
    """(name, number of parameters) of an optimizer group (or of its saved state)."""
    from mtl_clippy.models.param_groups import DEFAULT_GROUP

    return str(group.get("name") or DEFAULT_GROUP), len(group["params"])


def _groups_text(groups: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} ({n} tensor{'' if n == 1 else 's'})" for name, n in groups)


def _spec_text(spec: Any) -> str:
    """The checkpoint's ``param_groups`` as an override: the name of the choice of
    ``configs/param_groups/`` with exactly its values (under Hydra), else its value."""
    if not spec:
        return "param_groups=none"
    for path in _param_groups_choices():
        try:
            from omegaconf import OmegaConf

            if OmegaConf.to_container(OmegaConf.load(path), resolve=True) == spec:
                return f"param_groups={path.stem}"
        except Exception:  # an unreadable choice file: not this one
            continue
    return f"param_groups={spec}"


def _param_groups_choices() -> list[Path]:
    """The ``param_groups/*.yaml`` files of this Hydra run's config folders (none outside
    a Hydra run, or for config sources that are not folders)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        sources = HydraConfig.get().runtime.config_sources
    except Exception:  # not under Hydra
        return []
    found: list[Path] = []
    for source in sources:
        if source.get("schema") == "file" and source.get("path"):
            found.extend(sorted((Path(source["path"]) / "param_groups").glob("*.yaml")))
    return found


def keeps_previous_metrics(
    summary: RunSummary, ckpt_path: str | None, trainer: Any, out_dir: Path
) -> bool:
    """Whether a resumed run that stopped must leave the folder's ``metrics.json`` as it was:
    it was refused by a ``ConfigError`` before fitting (another ``param_groups``, another
    vocabulary), so this attempt changed nothing there, and the metrics.json of the run it
    resumes (completed, say) must not become this attempt's "failed", as
    :func:`check_values` keeps it for a refused value. Only where a metrics.json exists."""
    before_fit = trainer is None or getattr(trainer.state, "fn", None) is None
    refused = str(summary.error or "").startswith(f"{ConfigError.__name__}:")
    return bool(ckpt_path) and refused and before_fit and exists(out_dir)


def check_gradient_clipping(cfg: DictConfig, module: pl.LightningModule) -> None:
    """Lightning's gradient clipping (by norm or by value) fails on sparse gradients."""
    from mtl_clippy.models.layers import has_sparse_embeddings

    clip = (cfg.get("trainer") or {}).get("gradient_clip_val")
    if clip is not None and clip > 0 and has_sparse_embeddings(module):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip}: Lightning's gradient clipping cannot take the "
            "sparse embedding gradients of model.sparse_embeddings=true; set one of them off "
            "(ClippyAdagrad clips its own updates)"
        )


def check_scheduler_numbers(scheduler: dict[str, Any] | None) -> None:
    """A text value for a scheduler argument whose default is a number (``eta_min=abc``)
    would only fail at the first step, deep inside torch."""
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


def check_scheduler_use(cfg: DictConfig, scheduler: Any, monitor: str) -> None:
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


def check_scheduler_step(scheduler: Any) -> None:
    """Step the (throwaway) scheduler once, so that a value it only uses when stepping is
    reported now in one line, not as a traceback after the first training step."""
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
            f"({type(exc).__name__}: {innermost_message(exc)}); check its arguments"
        ) from exc


#: Trainer options that must be whole numbers (Lightning would fail on them mid-fit).
TRAINER_INTS = ("max_epochs", "min_epochs", "max_steps", "log_every_n_steps",
                "check_val_every_n_epoch", "num_nodes", "accumulate_grad_batches")  # fmt: skip


def check_trainer_values(trainer_cfg: DictConfig) -> None:
    """The trainer options of ``TRAINER_INTS`` are whole numbers."""
    for key in TRAINER_INTS:
        value = trainer_cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"trainer.{key}: expected a whole number, got {value!r}")


def check_processes(trainer: pl.Trainer) -> None:
    """Processes started together (srun, torchrun) need a trainer that runs on all of
    them; a one-process trainer in each would train the same run several times over."""
    if trainer.world_size == 1 and launch.started_separately(trainer.num_nodes):
        raise ConfigError(
            f"trainer: this is one of {launch.launched_world_size()} processes started "
            "together (srun, torchrun), but the trainer runs on one process; use "
            "trainer=ddp with trainer.devices=<processes per node> trainer.num_nodes=<nodes>"
        )
