"""Checkpoints that survive a kill and resume to the same numbers.

* ``StepCheckpoint``: a checkpoint every N optimizer steps, inside an epoch (the epoch-end
  checkpoints are ``ModelCheckpoint``'s ``last.ckpt`` / ``best.ckpt``).
* ``ResumeState``: what Lightning's checkpoint does not hold and an exact resume needs: the
  random number generators (dropout), and an early stop that was already decided.
* ``AtomicCheckpointIO``: every checkpoint is written to a temporary file in the same folder
  and renamed into place, so a kill during the write never leaves a truncated checkpoint;
  every checkpoint Lightning opens is loaded with ``torch.load(weights_only=True)``, so a
  crafted file cannot run code. The temporary file of a writer that was killed is deleted
  when the next run starts (``remove_dead_checkpoint_temps``).

The data order is restored by the data module's resumable train loader (see
``mtl_clippy.data.datamodule.ResumableDataLoader``), the optimizer state (Clippy's
accumulators) and the loops' progress by Lightning itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mtl_clippy.atomic import lock_for_writing, remove_unused_temporary
from mtl_clippy.callbacks.divergence import check_pending_losses
from mtl_clippy.data.cache import writer_tag
from mtl_clippy.errors import RUN_FOLDER_HINT, disk_full
from mtl_clippy.resume import (
    UnsafeCheckpoint,
    is_regular_file,
    load_checkpoint,
    refused_for_safety,
    unsafe_checkpoint_message,
)

log = logging.getLogger("mtl_clippy")


def _moved_state(state: dict[str, Any], new: str) -> dict[str, Any] | None:
    """``ModelCheckpoint``'s state with its paths moved from the saved ``dirpath`` to ``new``,
    where the run folder was moved or copied (its best checkpoint is there, under the same
    relative name); None otherwise (a checkpoint of another run: not this run's record)."""
    old = state.get("dirpath")
    best = state.get("best_model_path")
    if not old or not best:
        return None

    def move(path: Any) -> Any:
        try:
            return str(Path(new) / Path(path).relative_to(old)) if path else path
        except (TypeError, ValueError):  # not under the old dirpath: left as it is
            return path

    moved = move(best)
    if moved == best or not Path(moved).is_file():
        return None
    out = dict(state, dirpath=new)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        out[key] = move(state.get(key))
    out["best_k_models"] = {move(k): v for k, v in (state.get("best_k_models") or {}).items()}
    return out


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that keeps its record of the best checkpoint (score,
    path) when a run folder was moved or copied and then resumed (``ckpt_path=`` a file in
    the new place, ``resume=<folder>``). Lightning drops the record whenever the saved
    ``dirpath`` differs from the present one, so the first epoch after the resume became the
    "best" (``best-v1.ckpt``), however much worse, and was tested. Here the paths are moved
    when the best checkpoint is found under the same name in the new folder; a checkpoint of
    another run (not found there) is left to Lightning, which starts a fresh record."""

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's own key ("ModelCheckpoint{'monitor': ...}"): checkpoints written
        # with Lightning's class restore into this one and the other way round
        key = super().state_key
        name = type(self).__qualname__
        return "ModelCheckpoint" + key[len(name) :] if key.startswith(name + "{") else key

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.dirpath and state_dict.get("dirpath") not in (None, self.dirpath):
            state_dict = _moved_state(state_dict, str(self.dirpath)) or state_dict
        super().load_state_dict(state_dict)

    #: The files this callback had saved when the fit ended (None before): the test pass
    #: that follows loads best.ckpt, and with it every callback's record as it was when
    #: best.ckpt was written, which may predate a later last.ckpt.
    files_of_fit: list[str] | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self.files_of_fit = _recorded_files(self)


class StepCheckpoint(RunCheckpoint):
    """Keep the newest checkpoint taken every ``every_n_train_steps`` optimizer steps.

    Files are ``<dirpath>/step-<step>.ckpt``; only the newest is kept, also across a kill and
    resume: after each save the other step checkpoints of this run in ``dirpath`` are deleted
    (Lightning itself would keep the file a run resumed from, and never knew the files a
    killed run left), and at the start of a fit all but the newest (the one resumed from, if
    it is one). The last batch of an epoch is skipped: the epoch-end checkpoint (after
    validation) covers it, and a checkpoint between the last batch and validation could not
    resume that epoch's validation.

    A file is one of this run's step checkpoints (:meth:`_step_files`) only if its name parses
    as ``filename`` with a step number, and no other checkpoint callback of the trainer
    names its files that way (``best.ckpt``, ``last.ckpt``); and if either ``dirpath`` lies
    in this run's folder (Hydra's output folder), or the file's own state says it was saved
    by this run: every checkpoint holds this callback's ``run_id``, which a resume from a
    checkpoint of the same ``dirpath`` carries on. A ``dirpath`` shared by several runs
    (``callbacks.step_checkpoint.dirpath=/scratch/ckpts`` in a sweep) thus keeps each run's
    newest file. With a ``filename`` that is nothing but fields (``{step}``), only files this
    callback wrote itself are deleted.

    Before saving, the losses a :class:`~mtl_clippy.callbacks.DivergenceMonitor` has kept but
    not read yet (it reads them every 16 steps on a GPU) are checked: if one of those steps
    diverged, the monitor raises and no checkpoint is written, so a step checkpoint never holds
    weights from after a divergence.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 100, **kwargs: Any) -> None:
        if int(every_n_train_steps) < 1:
            raise ValueError(
                f"every_n_train_steps must be a positive number of steps, got {every_n_train_steps}"
            )
        kwargs.setdefault("filename", "step-{step:07d}")
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=int(every_n_train_steps),
            save_top_k=1,
            monitor=None,
            save_last=False,
            **kwargs,
        )
        #: Which run wrote a checkpoint (see the class docstring): new for a new run.
        self.run_id = uuid.uuid4().hex
        self._warned_foreign = False

    @property
    def state_key(self) -> str:
        return "StepCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # A resume continues the run whose checkpoints are in this folder; one from a
        # checkpoint elsewhere (a fork of another run) is a run of its own.
        if state_dict.get("run_id") and state_dict.get("dirpath", self.dirpath) == self.dirpath:
            self.run_id = str(state_dict["run_id"])

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return
        if trainer.global_step % self._every_n_train_steps == 0:  # a step it may save at
            check_pending_losses(trainer)  # raises TrainingDiverged: nothing saved
        before = self.best_model_path
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.best_model_path and self.best_model_path != before:  # it saved one
            self._keep_only(trainer, self.best_model_path)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A killed run may have left two (killed between writing one and deleting the other).
        mine = self._step_files(trainer)
        resumed = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
        if len(mine) > 1:
            keep = resumed if resumed in mine else max(mine, key=_mtime)
            self._keep_only(trainer, keep, mine)

    def _step_files(self, trainer: Any) -> list[Path]:
        """This run's step checkpoints in ``dirpath`` (see the class docstring); on global
        rank 0 only (the one that deletes), elsewhere none."""
        if not self.dirpath or not getattr(trainer, "is_global_zero", True):
            return []
        ours = name_pattern(self.filename, self.auto_insert_metric_name, self.FILE_EXTENSION)
        if ours is None or "step" not in ours.groupindex:
            return []  # no step number in the name: every save replaces the same file
        try:
            paths = sorted(p for p in Path(self.dirpath).iterdir() if ours.match(p.name))
        except OSError:  # no folder (yet)
            return []
        theirs = self._other_callbacks_files(trainer)
        in_run_folder = _inside(self.dirpath, _run_folder())
        literal = bool(_FIELD.sub("", self.filename or "-") or self.auto_insert_metric_name)
        found = []
        for path in paths:
            if not is_regular_file(path) or path.name in theirs["names"]:
                continue
            if any(pattern.match(path.name) for pattern in theirs["patterns"]):
                continue
            state = None
            if not in_run_folder or not literal:
                state = _callback_state(path, self.state_key)
                if state is None or (not in_run_folder and state.get("run_id") != self.run_id):
                    self._warn_foreign(path)
                    continue
                if not literal and Path(str(state.get("best_model_path"))).name != path.name:
                    continue  # not one this callback wrote
            found.append(path.resolve())
        return found

    def _other_callbacks_files(self, trainer: Any) -> dict[str, Any]:
        """The names (``best.ckpt``, ``last.ckpt``, what they saved) and the name patterns of
        the trainer's other checkpoint callbacks that write into ``dirpath``: never pruned."""
        names: set[str] = set()
        patterns: list[re.Pattern[str]] = []
        for cb in getattr(trainer, "checkpoint_callbacks", None) or []:
            if cb is self or not isinstance(cb, ModelCheckpoint):
                continue
            if cb.dirpath and os.path.realpath(cb.dirpath) != os.path.realpath(self.dirpath):
                continue
            saved = [cb.best_model_path, cb.last_model_path, cb.kth_best_model_path,
                     *cb.best_k_models]  # fmt: skip
            names.update(Path(p).name for p in saved if p)
            for template in (cb.filename, cb.CHECKPOINT_NAME_LAST):
                pattern = name_pattern(template, cb.auto_insert_metric_name, cb.FILE_EXTENSION)
                if pattern is not None:
                    patterns.append(pattern)
        return {"names": names, "patterns": patterns}

    def _warn_foreign(self, path: Path) -> None:
        if not self._warned_foreign:
            self._warned_foreign = True
            log.warning(
                "keeping %s (and any like it): named like a step checkpoint, but not saved by "
                "this run (%s is shared, or the file is unreadable)",
                path,
                self.dirpath,
            )

    def _keep_only(
        self, trainer: pl.Trainer, keep: str | os.PathLike[str], mine: list[Path] | None = None
    ) -> None:
        keep = Path(keep).resolve()
        for path in self._step_files(trainer) if mine is None else mine:
            if path != keep:
                log.info("removing %s: %s is newer", path, keep.name)
                trainer.strategy.remove_checkpoint(path)  # rank 0 only


#: ``keep_checkpoints`` (configs/train.yaml): which checkpoints a finished run keeps.
KEEP_CHECKPOINTS = ("best_and_last", "best", "all")


def prune_finished_run(trainer: Any, keep: str, tested: ModelCheckpoint | None) -> list[Path]:
    """Delete the checkpoints a run that has completed or diverged no longer needs; returns
    them. Such a run is never resumed (``resume=true`` reports it finished and leaves it), so
    the step checkpoint, which only resuming reads, goes (``keep="best_and_last"``); with
    ``keep="best"`` every other checkpoint goes too, ``last.ckpt`` included, and only the
    file of ``tested``, the callback whose checkpoint was tested (``best.ckpt``; ``last.ckpt``
    without a best-checkpoint callback: ``mtl_clippy.train.tested_checkpoint``), stays;
    ``keep="all"`` deletes nothing. Only files the run's own checkpoint callbacks wrote are
    deleted (the step checkpoint's: :meth:`StepCheckpoint._step_files`), on global rank 0."""
    if keep not in KEEP_CHECKPOINTS:
        raise ValueError(
            f"keep_checkpoints: expected one of {', '.join(KEEP_CHECKPOINTS)}, got {keep!r}"
        )
    if keep == "all" or trainer is None or not getattr(trainer, "is_global_zero", True):
        return []
    kept = _files_of_fit(tested)[:1] if tested is not None else []
    kept_path = Path(kept[0]).resolve() if kept else None
    doomed: list[Path] = []
    for callback in getattr(trainer, "checkpoint_callbacks", None) or []:
        if isinstance(callback, StepCheckpoint):
            doomed.extend(callback._step_files(trainer))
        elif keep == "best" and isinstance(callback, ModelCheckpoint):
            doomed.extend(Path(p).resolve() for p in _files_of_fit(callback))
    removed = []
    for path in dict.fromkeys(doomed):  # once each, in order
        if path == kept_path or not is_regular_file(path):
            continue
        log.info("removing %s: the run has finished (keep_checkpoints=%s)", path, keep)
        trainer.strategy.remove_checkpoint(path)
        removed.append(path)
    return removed


def _recorded_files(callback: ModelCheckpoint) -> list[str]:
    """The files ``callback``'s record names now: its best first, then its last and k best."""
    saved = [callback.best_model_path, callback.last_model_path, callback.kth_best_model_path,
             *callback.best_k_models]  # fmt: skip
    return list(dict.fromkeys(str(p) for p in saved if p))


def _files_of_fit(callback: ModelCheckpoint) -> list[str]:
    """The files ``callback`` had saved when the fit ended, its best first (the present
    record for a fit that raised, e.g. diverged, and for Lightning's own class)."""
    files = getattr(callback, "files_of_fit", None)
    return list(files) if files is not None else _recorded_files(callback)


#: A field of a checkpoint name template: ``{step}``, ``{step:07d}``, ``{val/auc:.3f}``.
_FIELD = re.compile(r"\{([^{}:]+)(?::[^{}]*)?\}")
#: What Lightning writes for a number: ``12``, ``0.731``, ``-1e-05``, ``nan``, ``inf``.
_NUMBER = r"(?:[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf))"


def name_pattern(
    template: str | None, auto_insert_metric_name: bool, extension: str = ".ckpt"
) -> re.Pattern[str] | None:
    """A regular expression that matches exactly the file names ``ModelCheckpoint`` makes
    from ``template`` (``step-{step:07d}`` -> ``step-0000300.ckpt``; with
    ``auto_insert_metric_name``, ``{step}`` -> ``step=300``; ``-v<n>`` where a name was
    taken), with the step number as its group ``step``. None for no template."""
    if template is None:
        return None
    template = template or "{epoch}-{step}"  # Lightning's default
    parts, end, has_step = ["^"], 0, False
    for field in _FIELD.finditer(template):
        parts.append(re.escape(template[end : field.start()]))
        name = field[1]
        if auto_insert_metric_name:
            parts.append(re.escape(f"{name}{ModelCheckpoint.CHECKPOINT_EQUALS_CHAR}"))
        if name == "step" and not has_step:
            parts.append(r"(?P<step>\d+)")
            has_step = True
        else:
            parts.append(_NUMBER)
        end = field.end()
    parts.append(re.escape(template[end:]))
    parts.append(rf"(?:{re.escape(ModelCheckpoint.CHECKPOINT_JOIN_CHAR)}v\d+)?")
    parts.append(re.escape(extension) + "$")
    return re.compile("".join(parts))


def _run_folder() -> str | None:
    """This run's own folder (Hydra's output folder of this run or sweep job), if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    except Exception:
        return None


def _inside(path: str, folder: str | None) -> bool:
    if not folder:
        return False
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _callback_state(path: Path, key: str) -> dict[str, Any] | None:
    """The state of the callback ``key`` saved in the checkpoint ``path`` (loaded the safe way,
    tensors mapped, not read), or None for a file that cannot be read or has none."""
    try:
        state = (load_checkpoint(path).get("callbacks") or {}).get(key)
    except Exception:  # damaged, refused or gone: not provably this run's
        return None
    return state if isinstance(state, dict) else None


class ResumeState(pl.Callback):
    """Saves and restores the random states (Python, NumPy, torch CPU and CUDA) with every
    checkpoint, and after a resume stops at once if early stopping had already decided to.
    At the start of a fit (rank 0) it deletes the temporary files that checkpoint writers
    killed mid-write left in the checkpoint folders (:func:`remove_dead_checkpoint_temps`).

    It also keeps the newest validation metrics (``trainer.callback_metrics`` named
    ``val...``), which Lightning does not checkpoint. A resumed run that validates no more
    itself (it stopped inside its last, partial epoch under ``trainer.max_steps``, or during
    testing) would otherwise have none: early stopping would fail on a missing metric at
    every resume, and ``metrics.json`` would lose its ``val`` numbers. They are put back when
    training starts (after Lightning's reset of the metrics and its sanity check), and at
    the end of a fit that had nothing left to train, for the names not logged since. The
    same goes for the optimizer's record of the implementations its steps ran.
    """

    def __init__(self) -> None:
        self._trainer: Any = None
        self._metrics: dict[str, Any] = {}  # loaded, to restore
        self._paths: list[Any] = []  # loaded optimizer_paths, to restore

    @property
    def state_key(self) -> str:
        return "ResumeState"

    def state_dict(self) -> dict[str, Any]:
        # Plain types and tensors only, so checkpoints load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global state is what we keep)
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos),
                      int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
        }  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        state["metrics"] = self._validation_metrics()
        state["optimizer_paths"] = self._optimizer_paths()
        return state

    def _optimizer_paths(self) -> list[Any]:
        """Per optimizer, the record of which implementations its steps ran (ClippyAdagrad's
        ``implementation()``, the ``optimizer_path`` of metrics.json) as plain types; None
        for optimizers that keep none."""
        out: list[Any] = []
        for opt in getattr(self._trainer, "optimizers", None) or []:
            paths = getattr(opt, "_paths", None)
            if not isinstance(paths, dict):
                out.append(None)
                continue
            out.append(
                {
                    int(i): {
                        "dense": sorted(r["dense"]),
                        "sparse": bool(r["sparse"]),
                        "sparse_paths": sorted(r.get("sparse_paths", ())),
                        "fallback": r["fallback"],
                    }
                    for i, r in paths.items()
                }
            )
        return out

    def _validation_metrics(self) -> dict[str, Any]:
        """The trainer's current ``val...`` metrics as CPU tensors (as logged: the same dtype,
        so that the resumed run reports the same numbers)."""
        metrics = getattr(self._trainer, "callback_metrics", None) or {}
        return {
            str(k): v.detach().cpu().clone() if isinstance(v, torch.Tensor) else float(v)
            for k, v in metrics.items()
            if str(k).startswith("val")
        }

    def _restore_metrics(self, trainer: pl.Trainer) -> None:
        restored, self._metrics = self._metrics, {}
        current = trainer.callback_metrics
        for k, v in restored.items():
            if k not in current:
                current[k] = v
        paths, self._paths = self._paths, []
        for opt, saved in zip(trainer.optimizers, paths, strict=False):
            if not saved or not hasattr(opt, "_record"):
                continue
            for i, r in saved.items():  # the steps before the checkpoint ran these too
                rec = opt._record(int(i))
                rec["dense"] |= set(r["dense"])
                rec["sparse"] = rec["sparse"] or bool(r["sparse"])
                rec["sparse_paths"] |= set(r.get("sparse_paths", ()))
                rec["fallback"] = rec["fallback"] or r["fallback"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        self._metrics = dict(state_dict.get("metrics") or {})  # older checkpoints: none
        self._paths = list(state_dict.get("optimizer_paths") or [])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run killed while writing a checkpoint left its temporary file (AtomicCheckpointIO).
        if trainer.is_global_zero:
            folders = {cb.dirpath for cb in trainer.checkpoint_callbacks}  # type: ignore[attr-defined]
            for folder in sorted(f for f in folders if f):
                remove_dead_checkpoint_temps(folder)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_metrics(trainer)  # a resumed fit with nothing left to train

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_metrics(trainer)
        # The killed run had already decided to stop after the epoch it checkpointed.
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, EarlyStopping) and cb.wait_count >= cb.patience > 0:
                trainer.should_stop = True


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, flushed to disk, then renamed.

    On a full disk the temporary file is deleted, the previous checkpoints stay as they were,
    and :class:`~mtl_clippy.errors.DiskFull` names the checkpoint that could not be written.
    The temporary file is named ``.<name>.tmp<pid>@<host>`` and its writer holds an exclusive
    ``flock`` on it until it is renamed, so that a later run can tell whether its writer is
    gone (:func:`remove_dead_checkpoint_temps`).
    """

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Every checkpoint Lightning opens (``trainer.fit/test(ckpt_path=...)``) is loaded
        with ``weights_only=True``, whatever was asked: Lightning 2.6 passes None, which
        leaves it to torch's default, and the environment variable
        ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns that off. A refused file raises
        :class:`~mtl_clippy.resume.UnsafeCheckpoint` naming it."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            if refused_for_safety(path, exc):
                raise UnsafeCheckpoint(unsafe_checkpoint_message(path, exc)) from None
            raise

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = os.fspath(path)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{writer_tag()}")
        try:
            with contextlib.suppress(FileNotFoundError):  # left by a dead writer of this name
                os.remove(tmp)
            with open(tmp, "xb") as f:
                lock_for_writing(f.fileno())  # held until renamed: a cleaner leaves it alone
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
                os.replace(tmp, path)
        except BaseException as exc:
            # A full disk (or quota): torch's zip writer reports it as its own RuntimeError
            # ("unexpected pos ..."), raised while handling the OSError. Name the checkpoint
            # instead; asked before the temporary file goes, while it still holds the space.
            full = disk_full(exc, path=path, folder=folder, hint=RUN_FOLDER_HINT)
            if full is not None and full is not exc:
                raise full from exc
            raise
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


#: ``.<target>.tmp<pid>@<host>``: AtomicCheckpointIO's temporary file (``.<target>.tmp<pid>``
#: in names from before hosts were recorded).
_CKPT_TMP = re.compile(r"^\.(?P<target>.+)\.tmp(?P<writer>\d+(@[A-Za-z0-9_~-]+)?)$")


def remove_dead_checkpoint_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files in ``folder`` of checkpoint writers that are gone (killed
    during ``AtomicCheckpointIO.save_checkpoint``); returns them. A writer holds an exclusive
    ``flock`` on its temporary file while it writes, so a file whose lock can be taken has no
    writer any more (``mtl_clippy.atomic.remove_unused_temporary``, with its age guard on
    network file systems). A live writer's file is never touched, whatever its pid
    namespace or host; nor is anything but a regular file."""
    removed = []
    try:
        paths = sorted(p for p in Path(folder).iterdir() if _CKPT_TMP.match(p.name))
    except OSError:  # no folder yet
        return removed
    for path in paths:
        if remove_unused_temporary(path):
            log.info("removed %s, left by a checkpoint writer that did not finish", path)
            removed.append(path)
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")
