"""The Hydra callback that writes a sweep's table and report when its multirun ends.

Configured in ``configs/hydra/default.yaml`` (``hydra.callbacks.results_table``). It only
calls the report (``sweep.write_results``, ``study.build_report`` and, for a sweep of
``experiment=paper_baselines``, ``paper.build_paper_report``); nothing in the report
imports it, so the report's modules import in one direction and work without Hydra.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mtl_clippy.report.sweep import results_markdown, write_results

log = logging.getLogger(__name__)


class SweepResultsCallback(Callback):
    """Hydra callback: at the end of a multirun, tabulate its jobs and report failures."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        if not root.is_dir() or not _is_global_zero(config):
            return
        df = write_results(root)
        if len(df):
            # the reports (plots, tables) must never cost the sweep its table, nor each other
            try:
                from mtl_clippy.report.study import build_report

                print(f"report: {build_report(root)}")
            except Exception as exc:
                log.warning("could not build the report of %s: %s", root, exc)
            try:
                from mtl_clippy.report import paper

                if paper.is_paper_sweep(root):  # experiment=paper_baselines
                    done = paper.build_paper_report(root)
                    for line in done.problems:
                        log.warning("paper report: %s", line)
                    print(f"paper report: {done.path}")
            except Exception as exc:
                log.warning("could not build the paper report of %s: %s", root, exc)
        n = len(df)
        failed = int((df["status"] != "completed").sum()) if n else 0
        jobs = f"{n} job" + ("" if n == 1 else "s")
        print(f"\nsweep results ({jobs}, {failed} not completed): {root / 'results.md'}")
        if n:
            print(results_markdown(df))


def _is_global_zero(config: DictConfig) -> bool:
    """Whether this process is DDP rank 0 by Lightning's rule: of a sweep started as several
    processes (srun), only rank 0 writes the table."""
    from mtl_clippy import launch

    trainer = config.get("trainer") or {}
    return launch.is_global_zero(
        devices=trainer.get("devices"),
        num_nodes=trainer.get("num_nodes", 1),
        accelerator=trainer.get("accelerator", "auto"),  # as the runs' own rank (distributed)
    )
