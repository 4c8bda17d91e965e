"""Hydra plugin of mtl-clippy: its Optuna sweeper (``hydra/sweeper=tune``).

Hydra instantiates sweepers only from the ``hydra_plugins`` package; the class is defined
here for that reason, and its code lives in :mod:`mtl_clippy.tune`. Importing this module
(Hydra scans the package at every start) does not import Optuna.
"""

from mtl_clippy import tune as _tune


class OptunaSweeper(_tune.OptunaSweeper):
    """:class:`mtl_clippy.tune.OptunaSweeper`, where Hydra looks for sweepers."""


__all__ = ["OptunaSweeper"]
