"""Evaluate a trained checkpoint on a data split, or write its per-row probabilities for a CSV.

The task functions of ``python eval.py`` and ``python predict.py``. What a checkpoint needs
besides its weights comes from the run that wrote it:

* the model: the checkpoint's own hyper-parameters (``MultiTaskModule.load_from_checkpoint``:
  the backbone's config and the data's metadata, loaded with ``weights_only=True``);
* the id mapping: the vocabularies are those of the training run, rebuilt from its data as
  its ``<run>/.hydra/config.yaml`` describes it (the same files, rows, ``val_fraction`` and
  ``min_count``), never from the data being evaluated; an id of the new data that the run
  did not keep maps to the field's out-of-vocabulary slot, as in training. The rebuilt
  vocabulary sizes must equal the checkpoint's embedding tables, else the run's data has
  changed since it trained and the evaluation stops, saying so (only the sizes: the run
  records no digest of its ids, so a change that keeps every size goes unnoticed);
* the numeric precision: the run's (``precision`` in its ``metrics.json``), so that the
  checkpoint's test split evaluates to exactly the test numbers of that file.

Everything the user may get wrong is one line (``ConfigError`` / ``DataError``, exit status
2), checked before any weight is loaded where it can be.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mtl_clippy.data.errors import DataError
from mtl_clippy.errors import ConfigError, innermost_message, user_error_types

log = logging.getLogger("mtl_clippy")

#: The splits ``eval.py split=`` evaluates: ``test`` (the folder's ``test.csv``) or ``val``
#: (the last ``data.val_fraction`` of its ``train.csv``, as in training).
SPLITS = ("test", "val")
#: What ``predict.py output=`` can write, by the file's suffix.
OUTPUT_SUFFIXES = (".csv", ".parquet")
#: The checkpoint ``ckpt_path=<run folder>`` stands for.
DEFAULT_CHECKPOINT = Path("checkpoints") / "best.ckpt"
#: What Hydra writes into the task's folder before the task starts (removed again when the
#: task stops on a user's mistake before writing anything of its own).
_HYDRA_START_FILES = {".hydra", "eval.log", "predict.log"}


# ----------------------------------------------------------------------------- the checkpoint


@dataclass
class Checkpoint:
    """A checkpoint file, the folder of the run that wrote it and what that run recorded."""

    path: Path
    run_dir: Path
    run_config: DictConfig
    run_cwd: Path | None  # the folder the run was started from (its relative paths start there)
    run_metrics: dict[str, Any]
    content: dict[str, Any]

    @property
    def hparams(self) -> dict[str, Any]:
        return self.content.get("hyper_parameters") or {}

    @property
    def vocab_sizes(self) -> list[int]:
        return list((self.hparams.get("metadata") or {}).get("vocab_sizes") or [])

    @property
    def tested_by_run(self) -> bool:
        """Whether this is the checkpoint the run tested (its metrics.json's
        ``best.checkpoint``), whose numbers its ``val`` and ``test`` are."""
        tested = (self.run_metrics.get("best") or {}).get("checkpoint")
        if not isinstance(tested, str) or not tested:
            return False
        try:
            return (self.run_dir / tested).resolve() == self.path.resolve()
        except OSError:
            return False

    def describe(self) -> dict[str, Any]:
        """What metrics.json records of the checkpoint."""
        m = self.run_metrics
        return {
            "path": str(self.path.resolve()),
            "run_dir": str(self.run_dir),
            "model": m.get("model") or _choice(self.run_dir, "model"),
            "optim": m.get("optim") or _choice(self.run_dir, "optim"),
            "lr": m.get("lr"),
            "seed": m.get("seed"),
            "epoch": self.content.get("epoch"),
            "global_step": self.content.get("global_step"),
        }


def checkpoint_path(value: Any) -> Path:
    """The checkpoint file ``ckpt_path`` names (a run folder stands for its best.ckpt);
    ``ConfigError`` naming the value where there is none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(
            "ckpt_path: give the checkpoint to use, e.g. "
            "ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt (or the run folder itself)"
        )
    path = Path(str(value)).expanduser()
    if path.is_dir():
        if (path / DEFAULT_CHECKPOINT).is_file():
            return path / DEFAULT_CHECKPOINT
        raise ConfigError(
            f"ckpt_path={value}: a folder, not a checkpoint file, and it holds no "
            f"{DEFAULT_CHECKPOINT} (name a .ckpt file, or a run folder with one)"
        )
    if not path.exists():
        raise ConfigError(f"ckpt_path={value}: no such file")
    return path


def load(value: Any) -> Checkpoint:
    """The checkpoint ``ckpt_path`` names, checked, with its run's config and metrics."""
    path = checkpoint_path(value)
    from mtl_clippy.resume import UnsafeCheckpoint, load_checkpoint

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ConfigError(f"ckpt_path={value}: cannot read it: {exc.strerror or exc}") from None
    if head != b"PK\x03\x04":  # torch.save's zip archive (train.py writes no other kind)
        raise ConfigError(
            f"ckpt_path={value}: not a checkpoint file (a checkpoint is the zip archive "
            "torch.save writes, as <run>/checkpoints/best.ckpt)"
        )
    try:
        content = load_checkpoint(path)
    except UnsafeCheckpoint:
        raise
    except Exception as exc:
        reason = innermost_message(exc).rstrip(".")
        raise ConfigError(
            f"ckpt_path={value}: the checkpoint cannot be read (damaged, or cut short by an "
            f"interrupted copy?): {reason}"
        ) from None
    hparams = content.get("hyper_parameters") if isinstance(content, dict) else None
    if not isinstance(hparams, dict) or not {"backbone", "metadata"} <= set(hparams):
        raise ConfigError(
            f"ckpt_path={value}: not a checkpoint of this project's models (it has no "
            "model hyper-parameters; checkpoints are written by python train.py)"
        )
    run_dir = path.resolve().parent.parent
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ConfigError(
            f"ckpt_path={value}: the config of the run that wrote it is not there "
            f"({config}); the checkpoint must sit in its run folder, as "
            "<run>/checkpoints/<name>.ckpt, because the id mapping (vocabularies) is "
            "rebuilt from that run's training data"
        )
    try:
        run_config = OmegaConf.load(config)
    except Exception as exc:
        raise ConfigError(
            f"ckpt_path={value}: the run's config {config} cannot be read: {innermost_message(exc)}"
        ) from None
    metrics: dict[str, Any] = {}
    try:
        loaded = json.loads((run_dir / "metrics.json").read_text())
        metrics = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    return Checkpoint(path, run_dir, run_config, _run_cwd(run_dir), metrics, content)


def _hydra_record(run_dir: Path) -> Any:
    try:
        return OmegaConf.load(run_dir / ".hydra" / "hydra.yaml")
    except Exception:
        return None


def _run_cwd(run_dir: Path) -> Path | None:
    record = _hydra_record(run_dir)
    cwd = OmegaConf.select(record, "hydra.runtime.cwd", default=None) if record else None
    return Path(cwd) if cwd else None


def _choice(run_dir: Path, group: str) -> str | None:
    record = _hydra_record(run_dir)
    return OmegaConf.select(record, f"hydra.runtime.choices.{group}", default=None)


def folder_name(ckpt_path: Any) -> str:
    """``<model>-<optim>`` of the run that wrote a checkpoint, for the task's folder name;
    ``checkpoint`` where that cannot be told (a wrong ckpt_path is reported by the task)."""
    try:
        path = checkpoint_path(ckpt_path).resolve()
        run_dir = path.parent.parent
        try:
            m = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            m = {}
        model = m.get("model") or _choice(run_dir, "model")
        optim = m.get("optim") or _choice(run_dir, "optim")
        names = [str(n) for n in (model, optim) if n]
        name = "-".join(names) or "checkpoint"
        return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
    except Exception:
        return "checkpoint"


# ----------------------------------------------------------------------------- the command line


def _overrides(argv: list[str]) -> list[tuple[str, str]]:
    """(key, value) of each ``key=value`` override of a command line, as typed."""
    pairs = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        pairs.append((key.strip(), value.strip().strip("'\"")))
    return pairs


def check_command_line(argv: list[str], task: str) -> str | None:
    """What is wrong with an ``eval.py`` / ``predict.py`` command line that the check of
    overrides cannot tell, as one line (None: nothing); run before Hydra writes anything.

    * ``data.<key>=...`` without ``data=...``: eval.py has no data config unless one is
      chosen (the run's own is read from the run), so Hydra would find no key ``data``;
    * an output folder (``hydra.run.dir``, or ``paths.log_dir``, under which the task makes
      its folder) that is the checkpoint's run folder or inside it: Hydra would write the
      task's ``.hydra/config.yaml`` over the run's, and the run could not be evaluated again.
    """
    pairs = _overrides(argv)
    keys = {k.lstrip("+~") for k, _ in pairs}
    if task == "eval" and "data" not in keys:
        for key, value in pairs:
            if key.lstrip("+~").startswith("data."):
                return (
                    f"override '{key}={value}': the run's own data is used unless a data "
                    "config is chosen, and data.* overrides apply to a chosen one: put "
                    "data=aliexpress (with data.data_dir=DIR) or data=synthetic before it"
                )
    values = dict((k.lstrip("+"), v) for k, v in pairs)
    ckpt_value = values.get("ckpt_path")
    if not ckpt_value:
        return None
    try:
        run_dir = checkpoint_path(ckpt_value).resolve().parent.parent
    except Exception:  # a wrong ckpt_path: the task says what is wrong with it
        return None
    for key, under in (
        ("hydra.run.dir", False),
        ("hydra.sweep.dir", False),
        ("paths.log_dir", True),
    ):
        value = values.get(key)
        if not value or "${" in value:
            continue
        folder = Path(value).expanduser().resolve()
        if folder == run_dir or run_dir in folder.parents:
            where = "the folder of" if folder == run_dir else "inside the folder of"
            made = f" (the task's folder is made under it: {task}/...)" if under else ""
            return (
                f"{key}={value}: {where} the checkpoint's run ({run_dir}){made}; the task "
                "writes its own .hydra/config.yaml into its folder, which would replace the "
                "run's and leave the run unusable for eval.py and predict.py; name a folder "
                "outside the run, or leave it out (a new folder under outputs/)"
            )
    return None


def before_hydra(argv: list[str], configs: Path, task: str) -> None:
    """What ``eval.py`` and ``predict.py`` do before Hydra starts: a bad command line (a
    mistyped override; ``data.*`` without ``data=``; an output folder in the checkpoint's run)
    is one line and status 2, before Hydra writes anything; Python's warnings then go to the
    task's log file too, as they print (``mtl_clippy.run_log``)."""
    from mtl_clippy.cli import exit_on_bad_overrides
    from mtl_clippy.run_log import log_warnings_to_file

    exit_on_bad_command_line(argv, task)
    exit_on_bad_overrides(argv, configs, task)
    log_warnings_to_file()


def exit_on_bad_command_line(argv: list[str], task: str) -> None:
    """``error: <one line>`` and status 2 for what :func:`check_command_line` refuses."""
    try:
        message = check_command_line(argv, task)
    except Exception:  # the check's own failure must never stop the task: it goes on
        return
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- the run's data


def _absolute(value: Any, base: Path | None) -> Any:
    if value is None or base is None:
        return value
    path = Path(str(value)).expanduser()
    return str(path if path.is_absolute() else base / path)


def run_data_config(ckpt: Checkpoint) -> dict[str, Any]:
    """The run's ``data`` config, resolved as the run resolved it (its paths from the folder
    it was started in)."""
    cfg = ckpt.run_config.copy()
    if ckpt.run_cwd is not None and OmegaConf.select(cfg, "paths") is not None:
        cfg.paths.root_dir = str(ckpt.run_cwd)
    try:
        data = OmegaConf.to_container(cfg.data, resolve=True)
    except Exception as exc:
        raise ConfigError(
            f"the run's config {ckpt.run_dir / '.hydra' / 'config.yaml'}: its data config "
            f"cannot be resolved: {innermost_message(exc)}"
        ) from None
    for key in ("data_dir", "cache_dir"):
        if key in data:
            data[key] = _absolute(data[key], ckpt.run_cwd)
    return data


def training_vocabularies(ckpt: Checkpoint) -> tuple[Any, Any]:
    """(the run's data module, set up: its vocabularies and metadata; the vocabularies),
    rebuilt from the run's training data and checked against the checkpoint's tables."""
    from mtl_clippy.build import instantiate_config

    data = run_data_config(ckpt)
    data["progress"] = False
    dm = instantiate_config(OmegaConf.create(data), "data")
    # what setup() logs about the OOV cells of the training data is the run's (in its log)
    quiet = logging.getLogger("mtl_clippy.data.datamodule")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if dm.data_dir is None:
            dm.prepare_data()  # generated data: made again if its cache was removed
        dm.setup("fit")
    except DataError as err:
        raise DataError(
            err.path,
            err.problem,
            line=err.line,
            column=err.column,
            hint=(
                "the vocabularies are rebuilt from the training data of the checkpoint's "
                f"run ({ckpt.run_dir}), which must still be readable"
                + (f"; {err.hint}" if err.hint else "")
            ),
        ) from None
    finally:
        quiet.setLevel(level)
    theirs, ours = ckpt.vocab_sizes, list(dm.metadata.vocab_sizes)
    if theirs != ours:
        differ = [i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b]
        f = differ[0] if differ else 0
        raise DataError(
            dm.source_dir,
            "the training data of the checkpoint's run no longer gives the vocabularies the "
            f"checkpoint was trained with (categorical_{f + 1}: "
            f"{theirs[f] if f < len(theirs) else '-'} embedding rows in the checkpoint, "
            f"{ours[f] if f < len(ours) else '-'} from the data now)",
            hint="its train.csv was changed or replaced after training",
        )
    return dm, dm.vocabularies


# ----------------------------------------------------------------------------- evaluation data


@dataclass
class Rows:
    """Rows to evaluate or predict, encoded with the training vocabularies."""

    categorical: np.ndarray  # int32 vocabulary indices [N, 16]
    numerical: np.ndarray
    labels: np.ndarray
    source: Path  # the CSV file they come from
    first: int  # their first row in it (0-based, after the header)
    oov: list[int]  # per field, cells mapped to the OOV slot

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _encoded(split: Any, vocabularies: Any, lo: int = 0, hi: int | None = None) -> Rows:
    from mtl_clippy.data.vocab import count_equal, encode_all

    hi = len(split) if hi is None else hi
    categorical = encode_all(split.categorical[lo:hi], vocabularies)
    oov = count_equal(categorical, np.array([v.oov for v in vocabularies]))
    return Rows(categorical, split.numerical[lo:hi], split.labels[lo:hi], split.source, lo, oov)


def split_source(data_cfg: Any, split: str) -> tuple[Any, Path]:
    """(the data module of the data ``data_cfg`` describes, not set up; the CSV file that
    ``split`` reads), checked to exist before anything long is done."""
    from mtl_clippy.build import instantiate_config

    node = OmegaConf.create(data_cfg) if not isinstance(data_cfg, DictConfig) else data_cfg
    node = node.copy()
    OmegaConf.set_struct(node, False)
    node.progress = False
    dm = instantiate_config(node, "data")
    if dm.data_dir is None:
        dm.prepare_data()  # generated data: made once, into the cache
    name = "test" if split == "test" else "train"
    path = dm.source_dir / f"{name}.csv"
    if not path.is_file():
        present = None
        if dm.source_dir.is_dir():
            present = ", ".join(sorted(p.name for p in dm.source_dir.iterdir())[:8]) or "nothing"
        other = (
            "split=val reads the end of train.csv"
            if split == "test"
            else "split=test reads test.csv"
        )
        raise DataError(
            path,
            "file not found" if present is not None else "folder not found",
            hint=(
                f"split={split} reads {name}.csv of the data folder"
                + (f", which holds: {present}" if present is not None else "")
                + f"; {other}"
            ),
        )
    return dm, path


def split_rows(dm: Any, path: Path, split: str, vocabularies: Any) -> Rows:
    """The rows of ``split`` (in the file ``path`` of the data module ``dm``), encoded with
    ``vocabularies``: test.csv's first ``data.test_rows`` (all without a cap), or the last
    ``data.val_fraction`` of train.csv's first ``data.train_rows``, as the data module
    splits them."""
    from mtl_clippy.data.reader import read_split

    cache_dir = dm.cache_dir / "splits" if dm.data_dir is not None else None
    read = read_split(path, cache_dir=cache_dir)
    capped = dm.data_dir is not None
    if split == "test":
        return _encoded(read.head(dm.test_rows if capped else None), vocabularies)
    read = read.head(dm.train_rows if capped else None)
    n = len(read)
    n_val = max(round(n * dm.val_fraction), 1) if dm.val_fraction > 0 else 0
    if n_val == 0 or n - n_val < 1:
        raise ConfigError(
            f"split=val: data.val_fraction={dm.val_fraction} leaves no validation rows in "
            f"{path} ({n} rows); use split=test or set data.val_fraction"
        )
    return _encoded(read, vocabularies, n - n_val, n)


def loader(rows: Rows, batch_size: int) -> Any:
    """Batches of ``rows`` in their order, as the data module's evaluation loaders make
    them (the same batches, so the same numbers)."""
    from mtl_clippy.data.datamodule import BatchDataset, BatchLoader, EpochBatchSampler

    dataset = BatchDataset(rows.categorical, rows.numerical, rows.labels)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False)
    return BatchLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)


# ----------------------------------------------------------------------------- the model


def module_of(ckpt: Checkpoint) -> Any:
    from mtl_clippy.models import MultiTaskModule

    return MultiTaskModule.load_from_checkpoint(ckpt.path, map_location="cpu")


def precision_of(cfg: DictConfig, ckpt: Checkpoint) -> Any:
    """``precision`` of the config, else the run's (recorded in its metrics.json, else its
    trainer config, resolved for this machine)."""
    from mtl_clippy import runtime

    if cfg.get("precision") is not None:
        return runtime.resolve_precision(cfg.precision, str(cfg.get("accelerator") or "auto"))
    if ckpt.run_metrics.get("precision"):
        return ckpt.run_metrics["precision"]
    trainer = {
        key: OmegaConf.select(ckpt.run_config, f"trainer.{key}", default=None)
        for key in ("precision", "accelerator")
    }
    return runtime.precision_of({k: v for k, v in trainer.items() if v is not None})


def trainer_for(cfg: DictConfig, ckpt: Checkpoint, out_dir: Path) -> Any:
    """A one-device trainer for the evaluation: no logger, callbacks or checkpoints; a value
    of ``accelerator`` or ``precision`` it rejects is a ``ConfigError`` naming the key."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    accelerator = cfg.get("accelerator") or "auto"
    precision = precision_of(cfg, ckpt)
    try:
        return pl.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=precision,
            logger=False,
            callbacks=[],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            default_root_dir=str(out_dir),
        )
    except (ValueError, TypeError, ImportError, RuntimeError, MisconfigurationException) as exc:
        message = innermost_message(exc)
        key = "precision" if "precision" in message.lower() else "accelerator"
        raise ConfigError(
            f"{key}={accelerator if key == 'accelerator' else precision}: {message}"
        ) from None


def _batch_size(cfg: DictConfig, data_cfg: Any) -> int:
    value = cfg.get("batch_size")
    if value is None:
        value = data_cfg.get("eval_batch_size") or data_cfg.get("batch_size") or 8192
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"batch_size: expected a positive whole number or null, got {value!r}")
    return int(value)


def run_batch_size(ckpt: Checkpoint) -> int | None:
    """The batch size the run tested in (its data's ``eval_batch_size``); None if unknown."""
    try:
        data = run_data_config(ckpt)
    except Exception:
        return None
    value = data.get("eval_batch_size") or data.get("batch_size") or 8192
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def note_other_batch_size(batch_size: int, ckpt: Checkpoint) -> None:
    """One line when the batches are not the run's: its numbers are then not exactly the
    run's (other sums in the matrix products change the logits in their last bits)."""
    theirs = run_batch_size(ckpt)
    if theirs is not None and batch_size != theirs:
        log.info(
            "note: batch_size=%d, the run tested in batches of %d: the metrics (the AUC "
            "too) can differ from the run's in their last digits",
            batch_size,
            theirs,
        )


# ----------------------------------------------------------------------------- eval.py


def _check_split(split: Any) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    return str(split)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split`` of ``cfg.data`` (the run's own data when
    no ``data=`` is chosen); returns (and writes) the folder's ``metrics.json`` content."""
    from mtl_clippy import runtime
    from mtl_clippy.summary import split_metrics, write_json_atomic

    t_start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    split = _check_split(cfg.get("split", "test"))
    runtime.apply_threads(cfg.get("threads"))
    ckpt = load(cfg.get("ckpt_path"))
    own = cfg.get("data") is None
    data_cfg = run_data_config(ckpt) if own else OmegaConf.to_container(cfg.data, resolve=True)
    batch_size = _batch_size(cfg, data_cfg)
    note_other_batch_size(batch_size, ckpt)
    dm, path = split_source(data_cfg, split)
    run_dm, vocabularies = training_vocabularies(ckpt)
    rows = split_rows(dm, path, split, vocabularies)
    module = module_of(ckpt)
    trainer = trainer_for(cfg, ckpt, out_dir)
    # the split's own hooks: a warning names the metric as val/... or test/...
    run_split = trainer.test if split == "test" else trainer.validate
    results = run_split(module, dataloaders=loader(rows, batch_size), verbose=False)
    metrics = split_metrics(results[0] if results else {}, split)
    bayes = None
    if split == "test" and own:  # the Bayes figures hold for the run's whole test split
        extra = run_dm.metadata.extra or {}
        if extra.get("bayes_auc"):
            bayes = {f"auc_{k}": v for k, v in extra["bayes_auc"].items()}
            bayes.update({f"logloss_{k}": v for k, v in extra.get("bayes_logloss", {}).items()})
    record = {
        "status": "completed",
        "checkpoint": ckpt.describe(),
        "data": {
            "source": "synthetic" if dm.data_dir is None else str(dm.data_dir),
            "run_data": own,
            "split": split,
            "file": str(rows.source),
            "rows": [rows.first, rows.first + len(rows)],
            "n_rows": len(rows),
            "oov_rate": sum(rows.oov) / max(1, rows.categorical.size),
        },
        "precision": str(trainer.precision),
        "batch_size": batch_size,
        "metrics": metrics,
        "bayes": bayes,
        "run_metrics": ckpt.run_metrics.get(split) if own and ckpt.tested_by_run else None,
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "output_dir": str(out_dir),
    }
    write_json_atomic(out_dir / "metrics.json", record)
    return record


def format_evaluation(record: dict[str, Any]) -> str:
    """The per-task table of an evaluation (train.py's table, the split's column filled)."""
    from mtl_clippy.summary import RunSummary, format_summary

    c, d = record["checkpoint"], record["data"]
    summary = RunSummary(status="completed", model=c["model"], optim=c["optim"])
    summary.bayes = record.get("bayes")
    if d["split"] == "test":
        summary.test = record["metrics"]
    else:
        summary.val = record["metrics"]
    table = format_summary(summary).split("\n", 2)[2]  # without train.py's first line
    head = (
        f"{c['model']} + {c['optim']} (lr {c['lr']}, seed {c['seed']}), checkpoint "
        f"{c['path']} (step {c['global_step']}), on {d['split']} of {d['source']}: "
        f"{d['n_rows']} rows, {record['wall_time_s']} s"
    )
    return f"{head}\n\n{table}"


# ----------------------------------------------------------------------------- predict.py


def output_path(cfg: DictConfig) -> Path:
    """``output``, checked: a known suffix, and not an existing file unless overwrite."""
    value = cfg.get("output")
    if not value:
        raise ConfigError(
            "output: give the file to write, e.g. output=predictions.parquet (or .csv)"
        )
    path = Path(str(value)).expanduser()
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(
            f"output={value}: unknown file type {path.suffix or '(no suffix)'!r}; end the "
            f"name with {' or '.join(OUTPUT_SUFFIXES)}"
        )
    if path.is_dir():
        raise ConfigError(f"output={value}: a folder; name a file in it")
    for parent in path.parents:  # the folder it goes in must be one, or be creatable
        if parent.exists() and not parent.is_dir():
            raise ConfigError(
                f"output={value}: {parent} is a file, not a folder, so the output cannot be "
                "written under it; name a file in a folder"
            )
    if path.exists() and not cfg.get("overwrite", False):
        raise ConfigError(
            f"output={value}: the file exists; choose another name, or add overwrite=true "
            "to replace it"
        )
    return path


def input_path(cfg: DictConfig) -> Path:
    value = cfg.get("input")
    if not value:
        raise ConfigError(
            "input: give the CSV to predict, e.g. input=data/AliExpress_NL/test.csv (the 82 "
            "processed AliExpress columns)"
        )
    return Path(str(value)).expanduser()


def search_ids(path: Path, rows: int) -> Any:
    """The ``search_id`` column of a processed CSV (pyarrow, vectorised), one per row the
    reader read (lines that are no rows at the end of the file are dropped, as it does).

    Read as text, exactly as the file spells each id: no type is guessed, so ``007``, an id
    beyond 2**53 or ``1.5e3`` are copied through unchanged (a number type would drop the
    zeros, round the digits or rewrite the id), and the column is text in every file."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    options = pacsv.ConvertOptions(
        include_columns=["search_id"],
        column_types={"search_id": pa.string()},
        strings_can_be_null=False,
    )
    table = pacsv.read_csv(path, convert_options=options)
    column = table.column("search_id")
    if len(column) < rows:  # the reader validated the file: cannot happen
        raise DataError(path, f"{len(column)} search ids for {rows} rows")
    return column.slice(0, rows).combine_chunks()


def write_table(table: Any, path: Path) -> None:
    """``table`` to ``path`` as Parquet or CSV (by its suffix), whole or not at all."""
    import re

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from mtl_clippy.atomic import remove_unused_temporary, write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    # what a predict.py killed while writing this file left (<name>.tmp<pid>, no writer)
    leftover = re.compile(re.escape(path.name) + r"\.tmp\d+")
    for tmp in path.parent.glob(f"{path.name}.tmp*"):
        if leftover.fullmatch(tmp.name):
            remove_unused_temporary(tmp)
    if path.suffix.lower() == ".parquet":
        write = lambda tmp: pq.write_table(table, tmp)  # noqa: E731
    else:
        write = lambda tmp: pacsv.write_csv(table, tmp)  # noqa: E731
    write_atomically(path, write, hint="free some space, then run the same command again")


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Write the per-row probabilities of every task for ``cfg.input`` to ``cfg.output``."""
    import pyarrow as pa
    import torch

    from mtl_clippy import runtime
    from mtl_clippy.data.reader import read_split
    from mtl_clippy.summary import write_json_atomic

    t_start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    output = output_path(cfg)  # before anything long: a wrong name is told at once
    source = input_path(cfg)
    runtime.apply_threads(cfg.get("threads"))
    ckpt = load(cfg.get("ckpt_path"))
    read = read_split(source, cache=False)  # the user's file: no cache beside it
    ids = search_ids(source, len(read))
    _, vocabularies = training_vocabularies(ckpt)
    rows = _encoded(read, vocabularies)
    data_cfg = run_data_config(ckpt)
    batch_size = _batch_size(cfg, data_cfg)
    module = module_of(ckpt)
    trainer = trainer_for(cfg, ckpt, out_dir)
    batches = trainer.predict(module, dataloaders=loader(rows, batch_size))
    probs = torch.cat(batches).float().cpu().numpy() if batches else np.empty((0, 2), "f4")
    columns = {"search_id": ids}
    for i, task in enumerate(module.tasks):
        columns[f"{task}_probability"] = pa.array(probs[:, i], type=pa.float32())
    write_table(pa.table(columns), output)
    record = {
        "status": "completed",
        "checkpoint": ckpt.describe(),
        "input": str(source),
        "output": str(output),
        "n_rows": len(rows),
        "oov_rate": sum(rows.oov) / max(1, rows.categorical.size),
        "columns": list(columns),
        "precision": str(trainer.precision),
        "wall_time_s": round(time.perf_counter() - t_start, 3),
    }
    write_json_atomic(out_dir / "predict.json", record)
    return record


# ----------------------------------------------------------------------------- entry points


def _remove_start_files(out_dir: Path) -> None:
    """Remove the task's folder if it holds only what Hydra wrote at the start."""
    try:
        if out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= _HYDRA_START_FILES:
            shutil.rmtree(out_dir)
    except OSError:
        pass


def main(cfg: DictConfig, task: str) -> None:
    """``eval.py`` (``task="eval"``) or ``predict.py`` (``"predict"``) under Hydra: a user's
    mistake is one line on stderr and status 2 (and the task's folder, empty, is removed)."""
    from mtl_clippy import run_log

    run_log.quiet_libraries()  # other libraries' noise off; Lightning's lines to the log file
    out_dir = Path(cfg.paths.output_dir)
    try:
        if task == "eval":
            record = evaluate(cfg)
        else:
            record = predict(cfg)
    except user_error_types() as exc:
        print(f"error: {innermost_message(exc)}", file=sys.stderr)
        _remove_start_files(out_dir)
        sys.exit(2)
    if task == "eval":
        print()
        print(format_evaluation(record))
        _to_log_file(format_evaluation(record))
        print(f"\nwritten: {out_dir / 'metrics.json'}")
    else:
        print(
            f"\n{record['n_rows']} rows: probabilities of "
            f"{', '.join(record['columns'][1:])} written to {record['output']}"
        )
        _to_log_file(f"predictions of {record['input']} written to {record['output']}")
        print(f"record: {out_dir / 'predict.json'}")


def _to_log_file(text: str) -> None:
    """``text`` into the task's log file only (the terminal has it printed)."""
    record = logging.LogRecord(log.name, logging.INFO, __file__, 0, "%s", (text,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def register_resolvers() -> None:
    """The resolvers of configs/eval.yaml and configs/predict.yaml: the folder's name, and
    the launch folder of configs/paths (as ``mtl_clippy.train`` registers it, without
    importing Lightning)."""
    if not OmegaConf.has_resolver("mtl_clippy.cwd"):
        OmegaConf.register_new_resolver("mtl_clippy.cwd", os.getcwd, use_cache=True)
    if not OmegaConf.has_resolver("mtl_clippy.eval_name"):
        OmegaConf.register_new_resolver("mtl_clippy.eval_name", folder_name, use_cache=True)


register_resolvers()

__all__ = ["evaluate", "format_evaluation", "main", "predict", "register_resolvers"]
