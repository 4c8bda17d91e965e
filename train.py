"""Train and test one multitask ranking model, or a sweep of them.

    python train.py                                   # shared-bottom + Clippy on built-in data
    python train.py model=ncf optim=clippy            # any model x optimizer is an override
    python train.py -m model=sb,ncf,lr optim=clippy,adam,adagrad   # a sweep + results table
    tensorboard --logdir outputs

See README.md for the configuration groups and options (`python train.py --help` lists them).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

if __name__ == "__main__":
    # A mistyped override (modle=ncf, optim.lrr=0.1, model=nfc) gets one line and status 2,
    # in a fraction of a second: before the imports below (Lightning takes seconds) and
    # instead of Hydra's multi-line report. Anything else goes on to Hydra unchanged.
    from mtl_clippy.cli import exit_on_bad_overrides

    exit_on_bad_overrides(sys.argv[1:], Path(__file__).resolve().parent / "configs", "train")

    # SIGTERM / Ctrl-C while Lightning is imported and Hydra starts: the run stops on it
    # as soon as it can record the stop (metrics.json "interrupted"), instead of dying.
    from mtl_clippy import early_signals

    early_signals.install()

    # Python's warnings go to the run's train.log too, as they print (mtl_clippy.run_log).
    from mtl_clippy.run_log import log_warnings_to_file

    log_warnings_to_file()

# Also registers the config resolvers that configs/hydra uses, before Hydra resolves them.
from mtl_clippy import preemption
from mtl_clippy.train import main as run


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # The signal handlers (SIGTERM, Ctrl-C: stop with a checkpoint) for the whole task: a
    # signal before the run can record it stops it once it can, one after its result is
    # written changes nothing (mtl_clippy.preemption.guard).
    with preemption.guard():
        return run(cfg)


if __name__ == "__main__":
    # A full disk while Hydra itself writes (.hydra/config.yaml, a sweep's multirun.yaml): one
    # line naming the file and status 2, as for every full disk, not Hydra's tracebacks.
    from mtl_clippy.full_disk_cli import full_disk_exits

    with full_disk_exits():
        main()
