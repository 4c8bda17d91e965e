"""Train and test one multitask ranking model, or a sweep of them.

    python train.py                                   # shared-bottom + Clippy on built-in data
    python train.py model=ncf optim=clippy            # any model x optimizer is an override
    python train.py -m model=sb,ncf,lr optim=clippy,adam,adagrad   # a sweep + results table
    tensorboard --logdir outputs

See README.md for the configuration groups and options (`python train.py --help` lists them).
"""

import hydra
from omegaconf import DictConfig

from mtl_clippy.train import main as run


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
