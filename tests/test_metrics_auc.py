"""The AUC is the Mann-Whitney AUC of the model's scores, whatever the batches look like.

torchmetrics' binary AUROC applies a sigmoid to a batch only when some value of that batch lies
outside [0, 1], so feeding it logits ranks "all inside [0, 1]" batches on another scale than
the others; feeding it float32 probabilities ties every logit above ~17. Every test here
compares with ``rank_auc``, an independent plain-Python rank-sum AUC (midranks for ties).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import hypothesis.strategies as st
import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import given
from omegaconf import OmegaConf

from app_helpers import TINY
from mtl_clippy.models import MultiTaskModule
from mtl_clippy.models.module import rank_scores, split_metrics

ROOT = Path(__file__).resolve().parents[1]


def rank_auc(scores: list[float], labels: list[int]) -> float:
    """Mann-Whitney AUC: (rank sum of the positives - n+(n+ + 1)/2) / (n+ n-), where tied
    scores share the mean of their ranks. Plain Python, no NumPy, SciPy or torchmetrics."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ranks i+1 .. j+1 (1-based) share their mean
            ranks[order[k]] = (i + j + 2) / 2
        i = j + 1
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_reference_auc_on_known_cases():
    assert rank_auc([0.1, 0.2, 0.3], [0, 0, 1]) == 1.0
    assert rank_auc([0.3, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert rank_auc([0.5, 0.5], [0, 1]) == 0.5
    assert rank_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # the textbook example


def _task_auc(batches: list[tuple[list[float], list[int]]], dtype=torch.float32) -> float:
    m = split_metrics(["t"], "test/")  # one task: logits and labels as [B, 1] columns
    for logits, labels in batches:
        y = torch.tensor(labels, dtype=torch.float32)
        m.update(torch.tensor(logits, dtype=dtype)[:, None], y[:, None])
    return float(m.compute()["test/auc_t"])


# ----------------------------------------------------------------------------- hand-made cases


def test_a_batch_of_logits_inside_zero_one_is_ranked_with_the_others():
    # the case: [0.9] labelled 0, then [1.5, -3] labelled 1, 0; the truth is 1.0
    batches = [([0.9], [0]), ([1.5, -3.0], [1, 0])]
    assert rank_auc([0.9, 1.5, -3.0], [0, 1, 0]) == 1.0
    assert _task_auc(batches) == pytest.approx(1.0, abs=1e-7)
    # and the other way round: all-inside batch holds the positive, 0.2 < 0.5 ranks it last
    batches = [([0.2], [1]), ([0.5, 3.0], [0, 0])]
    assert _task_auc(batches) == pytest.approx(0.0, abs=1e-7)


def test_large_logits_are_not_tied_by_a_saturating_sigmoid():
    # float32 sigmoid is exactly 1.0 for both of 20 and 30, float64 sigmoid for 40 and 50
    assert torch.sigmoid(torch.tensor([20.0, 30.0])).tolist() == [1.0, 1.0]
    assert torch.sigmoid(torch.tensor([40.0, 50.0], dtype=torch.float64)).tolist() == [1.0, 1.0]
    for hi in (30.0, 50.0, 3e38, math.inf):
        assert _task_auc([([20.0, hi, -1.0], [0, 1, 0])]) == pytest.approx(1.0, abs=1e-7)
    assert _task_auc([([-1e30, -1e20, -math.inf], [0, 1, 0])]) == pytest.approx(1.0, abs=1e-7)


def test_rank_scores_keep_the_order_of_every_float32_and_stay_inside_zero_one():
    x = torch.tensor(
        [-math.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 0.5, 1.0, 17.0, 17.000002, 3e38]
        + [math.inf]
    )
    codes = rank_scores(x)
    assert codes.dtype == torch.float64
    assert bool((codes > 0).all()) and bool((codes < 1).all())
    diffs = (codes[1:] - codes[:-1]).tolist()
    assert diffs[4] == 0  # -0.0 == +0.0
    assert all(d > 0 for i, d in enumerate(diffs) if i != 4)


def test_float64_logits_that_differ_only_in_float64_are_ranked_apart():
    auc = _task_auc([([0.1, 0.1 + 1e-12], [0, 1])], torch.float64)
    assert auc == 1.0


def test_a_nan_logit_makes_the_auc_nan_with_a_warning():
    with pytest.warns(UserWarning, match="logits are NaN"):
        auc = _task_auc([([0.1, math.nan], [0, 1]), ([2.0, -2.0], [1, 0])])
    assert math.isnan(auc)


# ----------------------------------------------------------------------------- property


_wide = st.floats(min_value=-1e6, max_value=1e6, width=32)
_inside = st.floats(min_value=0.0, max_value=1.0, width=32)
_big = st.floats(min_value=15.0, max_value=60.0, width=32)  # where sigmoid saturates
_few = st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0])  # ties


@st.composite
def _epochs(draw):
    """Rows drawn in runs (inside [0, 1], wide, large, tied values), split into batches at
    random boundaries; both classes present."""
    scores: list[float] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from([_inside, _wide, _big, _few]))
        scores += draw(st.lists(kind, min_size=1, max_size=12))
    if len(scores) == 1:
        scores.append(draw(_wide))
    n = len(scores)
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    pos, neg = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 2))
    labels[pos], labels[neg + (neg >= pos)] = 1, 0
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1)))
    bounds = [0, *cuts, n]
    batches = [(scores[a:b], labels[a:b]) for a, b in itertools.pairwise(bounds)]
    return scores, labels, batches


@given(epoch=_epochs(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_auc_equals_the_rank_auc_of_the_logits_however_the_epoch_is_batched(epoch, dtype):
    scores, labels, batches = epoch
    # the reference ranks the logits as the model holds them (rounded to dtype)
    held = torch.tensor(scores).to(dtype).float().tolist()
    expected = rank_auc(held, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16 overflows to inf on the widest draws
        got = _task_auc(batches, dtype)
    assert got == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- end to end


# about 10 s: a training run, a test pass and a predict pass (in the default suite: it is the
# end-to-end check of the AUC against predict_step's probabilities)
def test_test_auc_in_metrics_json_equals_the_rank_auc_of_predict_probabilities(tmp_path):
    """Run the app (trainer.precision=auto: bfloat16 autocast where the CPU has it), then
    predict the test split with the best checkpoint under the run's precision and thread count
    and rank the probabilities independently. Eval batches of 256: the test AUC is accumulated
    over six batches."""
    from mtl_clippy.train import build, train

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                *TINY,
                "data.eval_batch_size=256",
                "trainer.max_epochs=1",
                "trainer.accelerator=cpu",
                "logger=none",
                "callbacks.progress_bar=null",
                "callbacks.lr_monitor=null",
            ],
        )
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path / "data"), force_add=True)
    summary = train(cfg)
    assert summary["status"] == "completed", summary.get("error")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["best"]["checkpoint"]

    datamodule, _ = build(cfg)
    module = MultiTaskModule.load_from_checkpoint(tmp_path / "run" / m["best"]["checkpoint"])
    threads = torch.get_num_threads()
    torch.set_num_threads(int(m["threads"]))
    try:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            precision=m["precision"],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        probs = torch.cat(trainer.predict(module, datamodule=datamodule))
    finally:
        torch.set_num_threads(threads)
    labels = torch.cat([batch[2] for batch in datamodule.test_dataloader()])
    assert probs.dtype == torch.float32 and probs.shape == labels.shape
    for i, task in enumerate(module.tasks):
        expected = rank_auc(probs[:, i].tolist(), labels[:, i].long().tolist())
        assert m["test"][f"auc_{task}"] == pytest.approx(expected, abs=1e-6), task
