"""Evaluate a trained checkpoint on a data split: the per-task table and a metrics.json.

    python eval.py ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt        # its test split
    python eval.py ckpt_path=outputs/runs/<run> split=val                    # its validation rows
    python eval.py ckpt_path=... data=aliexpress data.data_dir=data/AliExpress_ES  # other data

The model, its vocabularies and its precision are the run's (see docs/running.md#evaluating-
and-predicting-from-a-checkpoint); `python predict.py` writes per-row probabilities.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

if __name__ == "__main__":
    # A bad command line: one line and status 2, before the slow imports below and before
    # Hydra writes anything.
    from mtl_clippy.evaluate import before_hydra

    before_hydra(sys.argv[1:], Path(__file__).resolve().parent / "configs", "eval")

# Torch and Lightning are imported once the checks of the command line have passed, and
# before Hydra sets up logging, as train.py imports them: Lightning then prints each of its
# lines once, with its own handler (imported later, each would print twice: through the
# "lightning" logger's handler and again through Hydra's).
import lightning.pytorch  # noqa: F401

# Registers the config resolvers (paths, the folder's name) before Hydra resolves them.
from mtl_clippy import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate.main(cfg, "eval")


if __name__ == "__main__":
    from mtl_clippy.full_disk_cli import full_disk_exits

    with full_disk_exits():
        main()
