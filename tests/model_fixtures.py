"""Helpers for the model tests: a tiny planted-signal dataset, small backbone configs, AUC.

Kept independent of ``mtl_clippy.data`` (written concurrently) on purpose: the model tests
need only the batch layout ``(categorical int64 [B, 16], numerical float32 [B, 63],
labels float32 [B, 2])`` and a :class:`DatasetMetadata`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mtl_clippy.data.schema import DatasetMetadata

N_FIELDS = 16
N_NUMERICAL = 63

#: Small widths of every backbone, so that a test fit takes about a second.
SMALL_BACKBONES: dict[str, dict[str, Any]] = {
    "SharedBottom": {"embed_dim": 8, "bottom_dims": [32, 16], "tower_dims": [16], "dropout": 0.1},
    "NCF": {"embed_dim": 8, "mlp_dims": [32, 16], "tower_dims": [16], "dropout": 0.1},
    "LogisticRegression": {},
    "MMoE": {"embed_dim": 8, "n_experts": 4, "expert_dims": [16], "tower_dims": [16]},
    "OMoE": {"embed_dim": 8, "n_experts": 4, "expert_dims": [16], "tower_dims": [16]},
    "PLE": {
        "embed_dim": 8,
        "expert_dims": [16, 16],
        "n_shared_experts": 2,
        "n_task_experts": 2,
        "tower_dims": [16],
    },
    "SingleTask": {"embed_dim": 8, "bottom_dims": [32, 16], "tower_dims": [16], "dropout": 0.1},
    "AITM": {"embed_dim": 8, "bottom_dims": [32, 16], "tower_dims": [16], "dropout": 0.1},
    "ESMM": {"embed_dim": 8, "bottom_dims": [32, 16], "tower_dims": [16], "dropout": 0.1},
    "MetaHeac": {
        "embed_dim": 8,
        "n_experts": 4,
        "expert_dims": [16],
        "n_critics": 3,
        "tower_dims": [16],
    },
}
BACKBONES = tuple(SMALL_BACKBONES)


def backbone_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Hydra-style config of a small backbone."""
    return {"_target_": f"mtl_clippy.models.{name}", **SMALL_BACKBONES[name], **overrides}


@dataclass
class PlantedData:
    """Train / validation tensors with labels drawn from a known logistic model."""

    metadata: DatasetMetadata
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    def loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        tensors = self.train if split == "train" else self.val
        gen = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=gen
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_planted(n_train: int = 3000, n_val: int = 1500, seed: int = 0) -> PlantedData:
    """Planted-signal data in the AliExpress batch layout.

    click ~ Bernoulli(sigmoid(w0[c0] + w10[c10] + 3 x0 - 3 x30)), purchase likewise on
    (c3, c12, x5); conversion = click AND purchase (the CTCVR label). Other columns are noise.
    Every field's last row is its OOV slot and is used by a few rows.
    """
    rng = np.random.default_rng(seed)
    vocab = rng.integers(6, 14, size=N_FIELDS)  # rows per field, OOV slot included
    n = n_train + n_val
    cat = (rng.random((n, N_FIELDS)) * vocab).astype(np.int64)  # uniform in [0, vocab)
    num = rng.random((n, N_NUMERICAL)).astype(np.float32)
    w0, w10, w3, w12 = (rng.normal(0.0, 1.5, size=vocab[f]) for f in (0, 10, 3, 12))
    click_logit = w0[cat[:, 0]] + w10[cat[:, 10]] + 3.0 * (num[:, 0] - num[:, 30]) - 0.5
    buy_logit = w3[cat[:, 3]] + w12[cat[:, 12]] + 3.0 * (num[:, 5] - 0.5)
    click = rng.random(n) < _sigmoid(click_logit)
    conversion = click & (rng.random(n) < _sigmoid(buy_logit))
    labels = np.stack([click, conversion], axis=1).astype(np.float32)
    tensors = (torch.from_numpy(cat), torch.from_numpy(num), torch.from_numpy(labels))
    train = tuple(t[:n_train] for t in tensors)
    val = tuple(t[n_train:] for t in tensors)
    meta = DatasetMetadata(vocab_sizes=tuple(int(v) for v in vocab))
    return PlantedData(meta, train, val)  # type: ignore[arg-type]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted as one half."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def clippy_class() -> type[torch.optim.Optimizer]:
    """``mtl_clippy.optim.ClippyAdagrad``; skips the test while the optimizer does not import."""
    try:
        from mtl_clippy.optim import ClippyAdagrad
    except ImportError as err:  # pragma: no cover - only while optim/ is being written
        pytest.skip(f"mtl_clippy.optim.ClippyAdagrad is not importable yet: {err}")
    return ClippyAdagrad


def clippy_partial() -> functools.partial:
    """ClippyAdagrad with the settings of our clippy config."""
    return functools.partial(
        clippy_class(), lr=0.1, variable_relative_threshold=0.5, absolute_threshold=1e-2
    )


def adam_partial() -> functools.partial:
    return functools.partial(torch.optim.Adam, lr=1e-2)


def adagrad_partial() -> functools.partial:
    return functools.partial(torch.optim.Adagrad, lr=0.1)
