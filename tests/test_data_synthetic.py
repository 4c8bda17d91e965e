"""The generator: deterministic, documented truth, ``hard`` changes representation only."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mtl_clippy.data import generate_dataset, read_split
from mtl_clippy.data import synthetic as syn

ROWS = {"train_rows": 8000, "test_rows": 4000}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "plain"
    meta = generate_dataset(out, seed=7, **ROWS)
    return out, meta


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "hard"
    meta = generate_dataset(out, seed=7, hard=True, **ROWS)
    return out, meta


def _read(folder, name):
    return read_split(folder / f"{name}.csv", cache=False)


def test_deterministic_for_a_seed(plain, tmp_path):
    out, _ = plain
    again = tmp_path / "again"
    generate_dataset(again, seed=7, **ROWS)
    for name in ("train.csv", "test.csv", "truth_train.npy", "truth_test.npy"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    generate_dataset(other, seed=8, **ROWS)
    assert (out / "train.csv").read_bytes() != (other / "train.csv").read_bytes()


def test_layout_sizes_and_ranges(plain):
    out, meta = plain
    train, test = _read(out, "train"), _read(out, "test")
    assert len(train) == ROWS["train_rows"] and len(test) == ROWS["test_rows"]
    assert meta["train_rows"] == ROWS["train_rows"]
    assert train.numerical.min() >= 0 and train.numerical.max() <= 1
    cardinalities = np.array(syn.CARDINALITIES)
    assert (train.categorical.max(0) < cardinalities).all()
    # Zipf-like: the most frequent id of the largest field is far above uniform frequency.
    top_share = np.bincount(train.categorical[:, 11]).max() / len(train)
    assert top_share > 20 / cardinalities[11]
    # Some constant-zero columns, as in the real data.
    assert (train.numerical[:, list(syn.ZERO_NUM)] == 0).all()


def test_user_side_is_constant_within_a_search(plain):
    out, _ = plain
    frame = pd.read_csv(out / "train.csv")
    user_columns = [f"categorical_{i}" for i in range(1, 10)] + [
        f"numerical_{i}" for i in range(1, 24)
    ]
    assert (frame.groupby("search_id")[user_columns].nunique() == 1).all().all()
    assert frame["search_id"].is_monotonic_increasing


def test_rates_and_bayes_metrics_match_the_truth_files(plain):
    out, meta = plain
    test = _read(out, "test")
    truth = np.load(out / "truth_test.npy")
    assert truth.shape == (ROWS["test_rows"], 2)
    assert (truth[:, 1] <= truth[:, 0]).all()  # conversion implies click
    for t, task in enumerate(("click", "conversion")):
        assert meta["bayes_auc"][task] == pytest.approx(syn.auc(truth[:, t], test.labels[:, t]))
        assert meta["bayes_logloss"][task] == pytest.approx(
            syn.log_loss(truth[:, t], test.labels[:, t])
        )
    # Population rates hit the targets; the realised ones agree within sampling noise.
    assert truth[:, 0].mean() == pytest.approx(0.025, rel=0.15)
    assert truth[:, 1].mean() == pytest.approx(0.003, rel=0.3)
    assert 0.7 < meta["bayes_auc"]["click"] < 0.9
    assert 0.8 < meta["bayes_auc"]["conversion"] < 0.97
    assert json.loads((out / "meta.json").read_text())["bayes_auc"] == meta["bayes_auc"]


def test_click_needs_the_user_item_interaction():
    """The truth has a user x item term carrying a large share of the click logit."""
    model = syn._calibrate(syn._draw_model(7), syn.GeneratorConfig(seed=7, **ROWS))
    split = syn._draw_split(model, np.random.default_rng([7, 1]), ROWS["train_rows"], 0)
    u = sum(
        model.embeddings[f][split.user_cat[split.rows_search, f]] for f in range(syn.N_USER_FIELDS)
    )
    v = sum(
        model.embeddings[syn.N_USER_FIELDS + f][split.item_cat[:, f]]
        for f in range(syn.N_ITEM_FIELDS)
    )
    interaction = np.einsum("nd,nd->n", u, v)
    share = np.var(syn.LOGIT_SCALE * 1.6 * interaction) / np.var(split.click_logit)
    assert 0.2 < share < 0.8


def test_hard_changes_representation_not_truth(plain, hard):
    (p_out, p_meta), (h_out, h_meta) = plain, hard
    for name in ("truth_train.npy", "truth_test.npy"):
        np.testing.assert_array_equal(np.load(p_out / name), np.load(h_out / name))
    assert p_meta["bayes_auc"] == h_meta["bayes_auc"]
    for split in ("train", "test"):
        a, b = _read(p_out, split), _read(h_out, split)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert not np.array_equal(a.numerical, b.numerical)
    plain_train, hard_train = _read(p_out, "train"), _read(h_out, "train")
    # Heavy-tailed raw counts instead of [0, 1] values.
    counts = hard_train.numerical[:, list(syn.COUNT_NUM)]
    assert counts.max() > 1000 and (counts == np.floor(counts)).all()
    # Extremely frequent ids in the signal-free fields.
    for f in syn.NOISE_FIELDS:
        assert (hard_train.categorical[:, f] == 0).mean() > 0.95
        assert (plain_train.categorical[:, f] == 0).mean() < 0.6
    # A shift late in the train file: rescaled features, identical early.
    cut = int(syn.SHIFT_START * ROWS["train_rows"])
    col = syn.SHIFTED_NUM[3]  # an item-side column
    np.testing.assert_array_equal(hard_train.numerical[:cut, col], plain_train.numerical[:cut, col])
    np.testing.assert_allclose(
        hard_train.numerical[cut:, col], syn.SHIFT_FACTOR * plain_train.numerical[cut:, col]
    )


def test_auc_against_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert syn.auc(scores, labels) == pytest.approx(brute)
    assert np.isnan(syn.auc(scores, np.zeros(300)))


def test_settable_rates_and_bad_config(tmp_path):
    meta = generate_dataset(
        tmp_path / "r",
        train_rows=2000,
        test_rows=2000,
        seed=1,
        click_rate=0.1,
        conversion_rate=0.02,
    )
    truth = np.load(tmp_path / "r" / "truth_test.npy")
    assert truth[:, 0].mean() == pytest.approx(0.1, rel=0.15)
    assert truth[:, 1].mean() == pytest.approx(0.02, rel=0.3)
    assert meta["config"]["click_rate"] == 0.1
    with pytest.raises(ValueError, match="conversion_rate"):
        syn.GeneratorConfig(click_rate=0.01, conversion_rate=0.05)


def test_command_line(tmp_path, capsys):
    syn.main(["--out", str(tmp_path / "cli"), "--train-rows", "500", "--test-rows", "300"])
    assert "bayes_auc" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "cli").iterdir()} == {
        "train.csv", "test.csv", "truth_train.npy", "truth_test.npy", "meta.json",
    }  # fmt: skip
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
