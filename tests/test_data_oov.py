"""Out-of-vocabulary ids (issue 11, bug 6): rare training ids share the OOV row, so it trains.

Training ids seen fewer than ``data.min_count`` times map to their field's OOV slot together
with every id unseen in training; the OOV row then receives gradients, and an unseen
validation or test id reads a learned vector. The OOV share of each split is recorded in
``metrics.json``. Every expectation here is computed independently: a ``collections.Counter``
and a dict for the mapping, pandas for the files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from mtl_clippy.data import AliExpressDataModule, Vocabulary
from mtl_clippy.data.schema import CATEGORICAL_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train_rows": 3000, "test_rows": 1500, "batch_size": 256, "progress": False}
N_FIT = 2700  # 3000 train-file rows minus the 10 % validation tail


def reference_mapping(train_ids: list[int], min_count: int) -> dict[int, int]:
    """Ids seen at least ``min_count`` times, numbered in increasing id order."""
    counts = Counter(train_ids)
    kept = sorted(i for i, c in counts.items() if c >= min_count)
    return {i: k for k, i in enumerate(kept)}


def reference_encode(mapping: dict[int, int], ids: list[int]) -> list[int]:
    oov = len(mapping)
    return [mapping.get(i, oov) for i in ids]


def _raw(dm: AliExpressDataModule, name: str) -> np.ndarray:
    """Raw ids of a generated file, read with pandas (not our reader)."""
    frame = pd.read_csv(dm.source_dir / f"{name}.csv", usecols=list(CATEGORICAL_COLUMNS))
    return frame[list(CATEGORICAL_COLUMNS)].to_numpy(np.int64)


def _indices(loader) -> np.ndarray:
    return torch.cat([batch[0] for batch in loader]).numpy()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def dm(cache_dir):
    data = AliExpressDataModule(cache_dir=str(cache_dir), min_count=2, **SMALL)
    data.setup()
    return data


# ----------------------------------------------------------------------------- the mapping

ID_VALUES = st.one_of(
    st.integers(0, 40),  # small ids: lookup table
    st.integers(0, 40).map(lambda i: (1 << 40) + i),  # huge ids: sorted search
    st.integers(0, 1 << 62),
)


@given(
    train=st.lists(ID_VALUES, min_size=0, max_size=60),
    query=st.lists(ID_VALUES, min_size=0, max_size=60),
    min_count=st.integers(1, 4),
    huge=st.booleans(),
)
def test_encoding_equals_a_dict_reference(train, query, min_count, huge):
    """Random id columns and min_count: indices equal a Counter + dict reference mapping."""
    if not huge:  # one case in two: every id small, the lookup-table path
        train = [i % 41 for i in train]
        query = [i % 41 for i in query]
    vocab = Vocabulary.from_column(np.array(train, dtype=np.int64), min_count)
    mapping = reference_mapping(train, min_count)
    assert vocab.size == len(mapping) + 1 and vocab.oov == len(mapping)
    codes = vocab.encode(np.array(query, dtype=np.int64))
    assert codes.dtype == np.int32
    assert codes.tolist() == reference_encode(mapping, query)
    # a training id seen fewer than min_count times reads the OOV slot, like an unseen one
    rare = [i for i, c in Counter(train).items() if c < min_count]
    assert vocab.encode(np.array(rare, dtype=np.int64)).tolist() == [vocab.oov] * len(rare)


def test_default_min_count_is_five_and_documented():
    assert AliExpressDataModule(cache_dir="/nonexistent").min_count == 5
    for name in ("synthetic", "aliexpress"):
        assert OmegaConf.load(ROOT / "configs" / "data" / f"{name}.yaml").min_count == 5
    assert "data.min_count" in (ROOT / "docs" / "data.md").read_text()
    assert "data.min_count" in (ROOT / "docs" / "errors.md").read_text()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_min_count_must_be_a_whole_number_of_at_least_one(bad):
    with pytest.raises(ValueError, match=r"^min_count must be a whole number >= 1, got "):
        AliExpressDataModule(cache_dir="/nonexistent", min_count=bad)


def test_a_bad_min_count_is_one_config_error_naming_data_min_count(tmp_path):
    from mtl_clippy.errors import ConfigError
    from mtl_clippy.train import build

    cfg = _compose(tmp_path, ["data.min_count=0"])
    with pytest.raises(ConfigError) as info:
        build(cfg)
    assert str(info.value) == "data.min_count must be a whole number >= 1, got 0"


# ----------------------------------------------------------------------------- the data module


def test_rare_training_ids_and_unseen_ids_map_to_oov(dm):
    """min_count=2: ids seen once in the training rows read the OOV slot, as do validation
    and test ids never seen (or seen once) in training; every index equals the reference."""
    train_file, test = _raw(dm, "train"), _raw(dm, "test")
    fit, val = train_file[:N_FIT], train_file[N_FIT:]
    got = {
        "train": dm.train_dataloader().dataset[slice(0, N_FIT)][0].numpy(),
        "val": _indices(dm.val_dataloader()),
        "test": _indices(dm.test_dataloader()),
    }
    singles = unseen_val = unseen_test = 0
    for f in range(len(CATEGORICAL_COLUMNS)):
        mapping = reference_mapping(fit[:, f].tolist(), 2)
        oov = len(mapping)
        assert dm.metadata.vocab_sizes[f] == oov + 1
        for split, raw in (("train", fit), ("val", val), ("test", test)):
            assert got[split][:, f].tolist() == reference_encode(mapping, raw[:, f].tolist())
        counts = Counter(fit[:, f].tolist())
        once = [i for i, c in counts.items() if c == 1]
        singles += len(once)
        rows_once = np.isin(fit[:, f], once)
        assert (got["train"][rows_once, f] == oov).all()
        unseen_val += int((got["val"][~np.isin(val[:, f], fit[:, f]), f] == oov).sum())
        unseen_test += int((got["test"][~np.isin(test[:, f], fit[:, f]), f] == oov).sum())
        assert (~np.isin(test[:, f], fit[:, f])).sum() <= (got["test"][:, f] == oov).sum()
    assert singles > 0 and unseen_val > 0 and unseen_test > 0  # the cases were exercised


def test_min_count_is_part_of_the_encoded_ids_cache_key(dm, cache_dir):
    """A different min_count gives other indices, never the cached ones of another setting."""
    fit = _raw(dm, "train")[:N_FIT]
    for min_count in (1, 5, 2):
        other = AliExpressDataModule(cache_dir=str(cache_dir), min_count=min_count, **SMALL)
        other.setup()
        assert other.encoded_from_cache is (min_count == 2)
        for f in (8, 11):
            mapping = reference_mapping(fit[:, f].tolist(), min_count)
            assert other.metadata.vocab_sizes[f] == len(mapping) + 1
            assert np.asarray(other._train[0][:N_FIT, f]).tolist() == reference_encode(
                mapping, fit[:, f].tolist()
            )


def _oov_rows(module, metadata) -> tuple[torch.Tensor, torch.nn.Embedding]:
    """The table row of each field's OOV slot (its last index), and the table."""
    embedding = module.backbone.embedding
    return embedding.offsets + torch.tensor(metadata.vocab_sizes) - 1, embedding.table


# training_step is called by hand, without a Trainer, to read the gradients: its self.log
# has nowhere to log, which Lightning warns about; nothing else here is silenced.
@pytest.mark.filterwarnings(
    "ignore:You are trying to `self.log\\(\\)` but the `self.trainer` reference is not"
    ":UserWarning:lightning.pytorch.core.module"
)
@pytest.mark.parametrize("min_count, learns", [(2, True), (1, False)])
def test_the_oov_row_receives_gradients_in_training(dm, cache_dir, min_count, learns):
    """With min_count=2 a training epoch sends gradients to the OOV row of every field that
    has rare ids, and one optimizer step moves it; with min_count=1 (the old behaviour) the
    OOV rows never train."""
    from model_fixtures import adam_partial, backbone_config
    from mtl_clippy.models import MultiTaskModule

    data = AliExpressDataModule(cache_dir=str(cache_dir), min_count=min_count, **SMALL)
    data.setup()
    torch.manual_seed(0)
    module = MultiTaskModule(
        backbone=backbone_config("SharedBottom"), metadata=data.metadata, optimizer=adam_partial()
    )
    module.train()
    rows, table = _oov_rows(module, data.metadata)
    before = table.weight.detach()[rows].clone()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    optimizer.zero_grad()
    for i, batch in enumerate(data.train_dataloader()):
        module.training_step(batch, i).backward()
    grad_norm = table.weight.grad[rows].norm(dim=1)
    has_rare = torch.tensor([c > 0 for c in data.oov_counts["train"]])
    if learns:
        assert has_rare.any()
        assert (grad_norm[has_rare] > 0).all(), grad_norm
        optimizer.step()
        moved = (table.weight.detach()[rows] - before).norm(dim=1)
        assert (moved[has_rare] > 0).all()
    else:
        assert not has_rare.any() and (grad_norm == 0).all()


# ----------------------------------------------------------------------------- metrics.json


def _compose(tmp_path: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "data.train_rows=3000",
                "data.test_rows=1500",
                "data.batch_size=256",
                "trainer.fast_dev_run=true",
                "trainer.accelerator=cpu",
                "logger=none",
                "callbacks=none",
                *overrides,
            ],
        )
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path / "data"), force_add=True)
    return cfg


@pytest.mark.parametrize("min_count", [3])
def test_oov_rates_in_metrics_json_match_a_numpy_count(tmp_path, min_count):
    """``oov_rate`` in metrics.json: per split the share of categorical cells that are OOV,
    and per field, equal to a count with np.unique on the files read by pandas."""
    from mtl_clippy.train import train

    summary = train(_compose(tmp_path, [f"data.min_count={min_count}"]))
    assert summary["status"] == "completed", summary.get("error")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    (folder,) = (tmp_path / "data" / "synthetic").iterdir()
    read = {n: pd.read_csv(folder / f"{n}.csv", usecols=list(CATEGORICAL_COLUMNS)) for n in ("train", "test")}  # fmt: skip
    frames = {"train": read["train"][:N_FIT], "val": read["train"][N_FIT:], "test": read["test"]}
    oov = {s: np.zeros((len(f), len(CATEGORICAL_COLUMNS)), bool) for s, f in frames.items()}
    for f, column in enumerate(CATEGORICAL_COLUMNS):
        ids, counts = np.unique(frames["train"][column].to_numpy(), return_counts=True)
        kept = ids[counts >= min_count]
        for split, frame in frames.items():
            oov[split][:, f] = ~np.isin(frame[column].to_numpy(), kept)
    rates = m["oov_rate"]
    assert set(rates) == {"train", "val", "test", "per_field", "min_count", "untrained"}
    assert rates["min_count"] == min_count
    for split, mask in oov.items():
        assert rates[split] == pytest.approx(mask.mean(), rel=1e-12)
        expected = dict(zip(CATEGORICAL_COLUMNS, mask.mean(0).tolist(), strict=True))
        assert rates["per_field"][split] == pytest.approx(expected, rel=1e-12)
    assert 0 < rates["train"] < rates["val"] and 0 < rates["test"]
    # fields whose OOV row no training cell reads, though validation or test cells do
    untrained = [
        c
        for f, c in enumerate(CATEGORICAL_COLUMNS)
        if not oov["train"][:, f].any() and (oov["val"][:, f].any() or oov["test"][:, f].any())
    ]
    assert rates["untrained"] == untrained


def test_fields_whose_oov_row_never_trains_are_named(dm, caplog):
    """min_count=1: no training id is OOV, so every field with unseen validation or test ids
    reads an untrained row; the run says which (log and metrics.json)."""
    fit, val, test = _raw(dm, "train")[:N_FIT], _raw(dm, "train")[N_FIT:], _raw(dm, "test")
    expected = [
        c
        for f, c in enumerate(CATEGORICAL_COLUMNS)
        if (~np.isin(val[:, f], fit[:, f])).any() or (~np.isin(test[:, f], fit[:, f])).any()
    ]
    assert expected
    with caplog.at_level("WARNING"):
        one = AliExpressDataModule(cache_dir=str(dm.cache_dir), min_count=1, **SMALL)
        one.setup()
    assert one.oov_rate["untrained"] == expected and one.oov_rate["train"] == 0
    assert any("data.min_count=1" in r.getMessage() for r in caplog.records)
    assert len(dm.oov_rate["untrained"]) < len(expected)  # min_count=2 trains some of them
