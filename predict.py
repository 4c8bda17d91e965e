"""Write the per-row probabilities of every task for a CSV, from a trained checkpoint.

    python predict.py ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt \
        input=data/AliExpress_NL/test.csv output=predictions.parquet     # or .csv

One output row per input row, in order: search_id, click_probability,
conversion_probability. See docs/running.md#evaluating-and-predicting-from-a-checkpoint.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

if __name__ == "__main__":
    # A bad command line: one line and status 2, before the slow imports below and before
    # Hydra writes anything.
    from mtl_clippy.evaluate import before_hydra

    before_hydra(sys.argv[1:], Path(__file__).resolve().parent / "configs", "predict")

# Torch and Lightning are imported once the checks of the command line have passed, and
# before Hydra sets up logging, as train.py imports them: Lightning then prints each of its
# lines once, with its own handler (imported later, each would print twice: through the
# "lightning" logger's handler and again through Hydra's).
import lightning.pytorch  # noqa: F401

# Registers the config resolvers (paths, the folder's name) before Hydra resolves them.
from mtl_clippy import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    evaluate.main(cfg, "predict")


if __name__ == "__main__":
    from mtl_clippy.full_disk_cli import full_disk_exits

    with full_disk_exits():
        main()
