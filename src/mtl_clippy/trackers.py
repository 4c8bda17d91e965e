"""MLflow and Weights & Biases as ``logger=mlflow`` / ``logger=wandb``: Lightning's loggers,
set up to write local files only, and a one-line error naming the pip extra to install when
the tracker's package is missing.

- ``logger=mlflow``: ``lightning.pytorch.loggers.MLFlowLogger`` on ``MLFLOW_TRACKING_URI``
  when set, else on MLflow's file store, one store for all runs (``outputs/mlruns`` by
  default), no tracking server. The run's id is kept in ``<run folder>/mlflow_run_id.txt``
  and ``resume=true`` logs into that MLflow run again. MLflow 3 keeps that
  store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``: this
  logger sets that variable for its own process (unless the user set it). A database store
  works too: ``logger.mlflow.tracking_uri=sqlite:///outputs/mlflow.db`` (needs SQLAlchemy
  and alembic, which the ``optuna`` extra brings).
- ``logger=wandb``: ``lightning.pytorch.loggers.WandbLogger`` in offline mode
  (``WANDB_MODE=offline`` unless the user set another mode): the run is written under
  ``<run folder>/wandb/offline-run-*``, nothing is sent; ``wandb sync <that folder>`` uploads
  it later, from a machine that can reach the server. W&B's own lines are off
  (``WANDB_SILENT=true`` unless the user set it); one line at the end says where the run is
  and how to sync it.

Both get what TensorBoard gets (``mtl_clippy.loggers.log_results``): the metrics of every
logging step, the run's resolved config as parameters, and the test results of a completed
run as ``final/<metric>``. Each names its run after the run folder, so that a run in the
tracker's list is found in ``outputs/`` by its name.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger as _LightningMLFlowLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

from mtl_clippy.errors import ConfigError

log = logging.getLogger(__name__)

#: The file in a run folder that keeps its MLflow run id, so that ``resume=true`` logs into
#: the same MLflow run.
MLFLOW_RUN_ID_FILE = "mlflow_run_id.txt"

#: logger target (the class name) -> (config choice, the module it needs, the pip extra)
NEEDS: dict[str, tuple[str, str, str]] = {
    "MLFlowLogger": ("mlflow", "mlflow", "mlflow"),
    "WandbLogger": ("wandb", "wandb", "wandb"),
}


def missing_package_message(target: str) -> str | None:
    """The one line for a logger whose package is not installed (None: it is, or the
    logger needs none)."""
    need = NEEDS.get(str(target).rsplit(".", 1)[-1])
    if need is None:
        return None
    choice, module, extra = need
    if _installed(module):
        return None
    return (
        f"logger={choice} needs the {module} package, which is not installed: "
        f"pip install -e '.[{extra}]' (from the repository folder)"
    )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def check_installed(target: str) -> None:
    """Raise :class:`ConfigError` (one line, status 2) when the logger ``target`` needs a
    package that is not installed."""
    message = missing_package_message(target)
    if message is not None:
        raise ConfigError(message)


class MLFlowLogger(_LightningMLFlowLogger):
    """Lightning's MLflow logger on a local store: ``run_dir`` (the run folder) names the
    run (``run_name``, unless given) and is kept as the run's tag ``run_dir``. The run's id
    is kept in ``<run_dir>/mlflow_run_id.txt``; a resumed run (``resume``: the run's
    ``resume`` setting) logs into that MLflow run again, if the store still has it."""

    def __init__(self, run_dir: str | None = None, resume: Any = False, **kwargs: Any) -> None:
        check_installed("MLFlowLogger")
        uri = str(kwargs.get("tracking_uri") or "")
        if uri.startswith("file:") or (uri and "://" not in uri):
            # MLflow 3 refuses its file store without this opt-in (it is in maintenance mode)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            Path(uri.removeprefix("file:")).mkdir(parents=True, exist_ok=True)
        self._run_id_file = Path(run_dir) / MLFLOW_RUN_ID_FILE if run_dir is not None else None
        if run_dir is not None:
            kwargs.setdefault("run_name", Path(run_dir).name)
            kwargs["tags"] = {"run_dir": str(run_dir), **(kwargs.get("tags") or {})}
            if _truthy(resume) and kwargs.get("run_id") is None:
                kwargs["run_id"] = _stored_run_id(self._run_id_file, kwargs.get("tracking_uri"))
        super().__init__(**kwargs)
        self._params: dict[str, str] = {}  # what this run has logged: MLflow never changes one

    @property
    def experiment(self) -> Any:
        """Lightning's (the MLflow client, the run started on first use); the run's id is
        then written to the run folder. MLFLOW_TRACKING_URI is left as it was."""
        before = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            client = super().experiment
        finally:
            # mlflow.set_tracking_uri (Lightning calls it) sets MLFLOW_TRACKING_URI, which
            # logger.mlflow.tracking_uri reads: the user's value (or none) is kept
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before
        path = self._run_id_file
        if path is not None and self._run_id is not None and rank_zero_only.rank == 0:
            try:
                if not path.is_file() or path.read_text().strip() != self._run_id:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"{self._run_id}\n")
            except OSError:  # the id is a convenience for resume=true, not the run's result
                pass
        return client

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace) -> None:
        """Lightning's, except that a parameter logged before is not logged again: MLflow
        refuses to change a parameter's value, and the model's hyperparameters (logged when
        fitting starts) share names with the run's config (logged at the end) whose values
        differ (``task_weights``: null in the config, ``[1.0, 1.0]`` in the model). Such a
        value of the config is logged as ``config/<name>``."""
        flat = _flatten(params)
        new: dict[str, Any] = {}
        for key, value in flat.items():
            text = str(value)[:250]  # as Lightning stores it
            if key in self._params and self._params[key] != text:
                key = f"config/{key}"
            if self._params.get(key) == text:
                continue
            self._params[key] = text
            new[key] = value
        if new:
            super().log_hyperparams(new)

    @property
    def log_dir(self) -> str | None:
        """The run's folder in a file store (``<store>/<experiment id>/<run id>``); None for
        a database store."""
        if self.save_dir is None:
            return None
        return os.path.join(self.save_dir, str(self.experiment_id), str(self.run_id))


def _truthy(value: Any) -> bool:
    return value not in (None, False, "", "false", "False", "null", 0)


def _stored_run_id(path: Path | None, tracking_uri: Any) -> str | None:
    """The MLflow run id kept in the run folder, if the store still has that run."""
    if path is None or not path.is_file():
        return None
    run_id = path.read_text().strip()
    if not run_id:
        return None
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except Exception:  # another store, or the run deleted: a new MLflow run
        log.warning("the MLflow run %s of %s is not in the store: a new run", run_id, path)
        return None
    log.info("resuming MLflow run %s (%s)", run_id, path)
    return run_id


def _flatten(params: Mapping[str, Any] | Namespace, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of ``a/b/c`` keys (Lightning's own naming for MLflow)."""
    if isinstance(params, Namespace):
        params = vars(params)
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping | Namespace):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger, offline unless ``WANDB_MODE`` says otherwise: the run's files
    go to ``<save_dir>/wandb/`` and nothing is sent. ``save_dir`` (the run folder) names the
    run (``name``, unless given)."""

    def __init__(self, **kwargs: Any) -> None:
        check_installed("WandbLogger")
        os.environ.setdefault("WANDB_MODE", "offline")
        # W&B's own ~35 lines a run (its summary, sparklines, sync hints) off unless the
        # user set WANDB_SILENT; close() says in one line where the run is.
        os.environ.setdefault("WANDB_SILENT", "true")
        offline = os.environ["WANDB_MODE"] in ("offline", "dryrun", "disabled")
        kwargs.setdefault("offline", offline)
        save_dir = kwargs.get("save_dir")
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            kwargs.setdefault("name", Path(save_dir).name)
        import wandb

        if wandb.run is not None:
            # an earlier run of this process (a sweep's job that did not complete):
            # Lightning would log this run into it
            wandb.run.finish()
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning passes anonymous=None, which W&B warns has no effect
            self._wandb_init.pop("anonymous", None)

    @property
    def log_dir(self) -> str | None:
        """The run's own folder (``<save_dir>/wandb/offline-run-<time>-<id>``) once it has
        started, else ``save_dir``."""
        if self._experiment is not None and getattr(self._experiment, "dir", None):
            return os.path.dirname(self._experiment.dir)  # .dir is its files/ folder
        return self.save_dir

    @rank_zero_only
    def close(self) -> None:
        """End the W&B run (its offline files complete): at the end of a completed run
        (``mtl_clippy.loggers.log_results``). Lightning's ``finalize``, called after fitting
        and again after testing, leaves it open; a run that stops early is ended by the next
        W&B logger of the process (a sweep's next job) or when the process exits."""
        if self._experiment is not None:
            folder = self.log_dir
            offline = getattr(self._experiment.settings, "_offline", False)
            self._experiment.finish()
            if offline and folder:
                log.info("W&B offline run: %s (upload it with: wandb sync %s)", folder, folder)


__all__ = ["MLFlowLogger", "WandbLogger", "check_installed", "missing_package_message"]
