"""AliExpress data: schema, reader, preparation, generator and the LightningDataModule.

Everything but the schema and the error type is imported on first use: the command-line
tools (``python -m mtl_clippy.data.synthetic`` / ``.prepare``) then start fast (no Lightning,
no torch) and run without runpy's warning about a module imported twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mtl_clippy.data.errors import DataError
from mtl_clippy.data.schema import DatasetMetadata

if TYPE_CHECKING:
    from mtl_clippy.data.datamodule import AliExpressDataModule, BatchDataset, EpochBatchSampler
    from mtl_clippy.data.prepare import prepare_raw
    from mtl_clippy.data.reader import AliExpressSplit, read_split
    from mtl_clippy.data.synthetic import GeneratorConfig, generate_dataset
    from mtl_clippy.data.vocab import Vocabulary

_LAZY = {
    "AliExpressDataModule": "datamodule",
    "BatchDataset": "datamodule",
    "EpochBatchSampler": "datamodule",
    "Vocabulary": "vocab",
    "prepare_raw": "prepare",
    "AliExpressSplit": "reader",
    "read_split": "reader",
    "GeneratorConfig": "synthetic",
    "generate_dataset": "synthetic",
}

__all__ = [
    "AliExpressDataModule",
    "AliExpressSplit",
    "BatchDataset",
    "DataError",
    "DatasetMetadata",
    "EpochBatchSampler",
    "GeneratorConfig",
    "Vocabulary",
    "generate_dataset",
    "prepare_raw",
    "read_split",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"mtl_clippy.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
