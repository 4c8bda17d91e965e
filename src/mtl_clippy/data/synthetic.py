"""Built-in AliExpress-format data from a documented generative model with known truth.

``generate_dataset(out, train_rows=..., test_rows=..., seed=...)`` (or ``python -m
mtl_clippy.data.synthetic --out DIR ...``) writes ``train.csv`` and ``test.csv`` in the
processed layout (or, with ``raw=True``, the raw Tianchi layout, to exercise
``mtl_clippy.data.prepare``), the true click and conversion probabilities of every row
(``truth_train.npy`` / ``truth_test.npy``, float64 [N, 2]) and a ``meta.json`` with the
Bayes-optimal test AUC and log loss per task, so that any model's result can be read against
the best achievable.

The model (see ``docs/data.md`` for the full description):

* Rows are impressions grouped into searches (``1 + Poisson(9)`` rows each, time-ordered);
  user fields and user numericals are constant within a search.
* 16 categorical fields (9 user, 7 item) with Zipf-like frequencies, cardinalities from 3 to
  5000. Each value has a latent vector (dimension 6) and a bias; a search's user vector ``u``
  and an impression's item vector ``v`` are the sums over their fields. Two fields carry no
  signal (``NOISE_FIELDS``).
* 63 numerical features in [0, 1]: some are noisy sigmoids of ``u`` or ``v`` (informative,
  partly redundant with the ids), some act directly on the logits, the rest are sparse noise
  or constant zero (as in the real data).
* ``logit P(click) = a + 0.75 (b_user + b_item + 1.6 u.v + sum_j c_j (x_j - 1/3))``;
  ``logit P(purchase | click) = g + 0.75 (0.5 (b_user + b_item) + 1.6 u.(M v) - 1.2 (x_price
  - 2/7))`` with ``M`` near the identity, so both tasks share latent factors. ``conversion = click AND
  purchase``. The intercepts ``a`` and ``g`` are solved so that the population click and
  conversion rates equal ``click_rate`` / ``conversion_rate`` (on a fixed calibration sample,
  so the model does not depend on the requested sizes).

``hard=True`` changes only the representation, never the labels or the truth: some numerical
columns become raw heavy-tailed counts, two (signal-free) fields get one extremely frequent id,
and from 70 % of the train rows on (and in the whole test split) some features are rescaled.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from mtl_clippy.data import cache as cache_mod
from mtl_clippy.data.errors import DataError
from mtl_clippy.data.schema import (
    COLUMNS,
    ID_COLUMN,
    RAW_ITEM_CATEGORICAL,
    RAW_ITEM_COLUMNS,
    RAW_ITEM_NUMERICAL,
    RAW_USER_CATEGORICAL,
    RAW_USER_COLUMNS,
    RAW_USER_NUMERICAL,
    TASKS,
)
from mtl_clippy.errors import DiskFull, disk_full

log = logging.getLogger(__name__)

#: Bump whenever the generative model changes, so cached datasets are regenerated.
GENERATOR_VERSION = 1

N_USER_FIELDS, N_ITEM_FIELDS = 9, 7
N_USER_NUM, N_ITEM_NUM = 23, 40
CARDINALITIES: tuple[int, ...] = (10, 4, 8, 3, 40, 12, 300, 20, 2000, 30, 1000, 5000, 100, 15, 200, 3)  # fmt: skip
ZIPF_EXPONENTS: tuple[float, ...] = (
    1.1, 1.3, 1.0, 1.5, 1.1, 1.2, 1.05, 1.2, 1.0, 1.1, 1.05, 1.0, 1.1, 1.3, 1.1, 1.5,
)  # fmt: skip
#: Fields whose values have no effect on the labels (these get the hot ids with ``hard``).
NOISE_FIELDS: tuple[int, ...] = (5, 14)
LATENT_DIM = 6
ROWS_PER_SEARCH_MEAN = 10
CALIBRATION_ROWS = 100_000
SHIFT_START = 0.7  # fraction of the train rows after which ``hard`` rescales features

# Numerical columns (indices into the 63), by role.
USER_LATENT_NUM = tuple(range(0, 6))  # noisy sigmoids of the user vector
USER_DIRECT_NUM = tuple(range(6, 10))  # act directly on the click logit
ITEM_LATENT_NUM = tuple(range(23, 31))  # noisy sigmoids of the item vector
ITEM_DIRECT_NUM = tuple(range(31, 37))  # act directly on the click logit
PRICE_NUM = 37  # lowers the purchase probability
ZERO_NUM = (20, 21, 22, 58, 59, 60)  # constant zero, as some real columns are
COUNT_NUM = (6, 7, 31, 32, 33, 37)  # raw heavy-tailed counts under ``hard``
SHIFTED_NUM = (0, 1, 2, 23, 24, 25, 34, 35)  # rescaled late in the data under ``hard``
SHIFT_FACTOR = 3.0
EMBEDDING_STD = 0.2  # per field and latent dimension
LOGIT_SCALE = 0.75  # sets how predictable the labels are (Bayes click AUC about 0.78)
HOT_ID_SHARE = 0.97


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that determines a generated dataset (and keys its cache folder)."""

    train_rows: int = 300_000
    test_rows: int = 150_000
    seed: int = 0
    hard: bool = False
    click_rate: float = 0.025
    conversion_rate: float = 0.003

    def __post_init__(self) -> None:
        if self.train_rows < 1 or self.test_rows < 1:
            raise ValueError("train_rows and test_rows must be positive")
        if not 0 < self.conversion_rate < self.click_rate < 1:
            raise ValueError("need 0 < conversion_rate < click_rate < 1")

    def key(self) -> str:
        """A folder name that identifies this configuration and the generator version."""
        name = f"train{self.train_rows}_test{self.test_rows}_seed{self.seed}"
        name += "_hard" if self.hard else ""
        if (self.click_rate, self.conversion_rate) != (0.025, 0.003):
            name += f"_ctr{self.click_rate:g}_cvr{self.conversion_rate:g}"
        return f"{name}_v{GENERATOR_VERSION}"


@dataclass(frozen=True)
class _Model:
    """The drawn parameters of the generative model (fixed by the seed alone)."""

    cdfs: tuple[np.ndarray, ...]
    embeddings: tuple[np.ndarray, ...]  # per field [K, LATENT_DIM]
    biases: tuple[np.ndarray, ...]  # per field [K]
    user_w: np.ndarray  # [LATENT_DIM, len(USER_LATENT_NUM)]
    item_w: np.ndarray  # [LATENT_DIM, len(ITEM_LATENT_NUM)]
    direct_c: np.ndarray  # click weights of USER_DIRECT_NUM + ITEM_DIRECT_NUM
    purchase_m: np.ndarray  # [LATENT_DIM, LATENT_DIM]
    click_intercept: float = 0.0
    purchase_intercept: float = 0.0


@dataclass
class _Split:
    """One generated split in the shape of both layouts."""

    search_id: np.ndarray  # per search
    rows_search: np.ndarray  # per row: index of its search
    user_cat: np.ndarray  # [S, 9] int64
    user_num: np.ndarray  # [S, 23] float32
    item_cat: np.ndarray  # [N, 7] int64
    item_num: np.ndarray  # [N, 40] float32
    click_logit: np.ndarray  # [N] float64, without the intercept
    purchase_logit: np.ndarray  # [N] float64, without the intercept
    p_click: np.ndarray  # [N] float64
    p_purchase: np.ndarray  # [N] float64
    click: np.ndarray  # [N] int8
    conversion: np.ndarray  # [N] int8


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _draw_model(seed: int) -> _Model:
    rng = np.random.default_rng([seed, 0])
    cdfs, embeddings, biases = [], [], []
    for f, (k, s) in enumerate(zip(CARDINALITIES, ZIPF_EXPONENTS, strict=True)):
        weights = 1.0 / np.arange(1, k + 1) ** s
        cdfs.append(np.cumsum(weights) / weights.sum())
        scale = 0.0 if f in NOISE_FIELDS else EMBEDDING_STD
        embeddings.append(rng.normal(0.0, scale, size=(k, LATENT_DIM)))
        biases.append(rng.normal(0.0, 0.25 if scale else 0.0, size=k))
    m = np.eye(LATENT_DIM) + rng.normal(0.0, 0.4, size=(LATENT_DIM, LATENT_DIM))
    return _Model(
        cdfs=tuple(cdfs),
        embeddings=tuple(embeddings),
        biases=tuple(biases),
        user_w=rng.normal(0.0, 1.0, size=(LATENT_DIM, len(USER_LATENT_NUM))),
        item_w=rng.normal(0.0, 1.0, size=(LATENT_DIM, len(ITEM_LATENT_NUM))),
        direct_c=rng.choice([-1.0, 1.0], size=10) * rng.uniform(0.4, 1.0, size=10),
        purchase_m=m,
    )


def _zipf(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(size)), len(cdf) - 1).astype(np.int64)


def _draw_split(model: _Model, rng: np.random.Generator, n_rows: int, first_search: int) -> _Split:
    """Draw features, true probabilities and labels of ``n_rows`` impressions."""
    sizes = 1 + rng.poisson(ROWS_PER_SEARCH_MEAN - 1, size=n_rows // (ROWS_PER_SEARCH_MEAN - 1) + 2)
    ends = np.cumsum(sizes)
    n_search = int(np.searchsorted(ends, n_rows)) + 1
    rows_search = np.repeat(np.arange(n_search), sizes[:n_search])[:n_rows]

    user_cat = np.stack([_zipf(rng, model.cdfs[f], n_search) for f in range(N_USER_FIELDS)], 1)
    item_cat = np.stack(
        [_zipf(rng, model.cdfs[N_USER_FIELDS + f], n_rows) for f in range(N_ITEM_FIELDS)], 1
    )
    u = sum(model.embeddings[f][user_cat[:, f]] for f in range(N_USER_FIELDS))
    v = sum(model.embeddings[N_USER_FIELDS + f][item_cat[:, f]] for f in range(N_ITEM_FIELDS))
    b_user = sum(model.biases[f][user_cat[:, f]] for f in range(N_USER_FIELDS))
    b_item = sum(model.biases[N_USER_FIELDS + f][item_cat[:, f]] for f in range(N_ITEM_FIELDS))

    # Numerical features: sparse noise by default, then the informative and zero columns.
    user_num = np.where(
        rng.random((n_search, N_USER_NUM)) < 0.6, 0.0, rng.random((n_search, N_USER_NUM))
    ).astype(np.float32)
    item_num = np.where(
        rng.random((n_rows, N_ITEM_NUM)) < 0.6, 0.0, rng.random((n_rows, N_ITEM_NUM))
    ).astype(np.float32)
    user_num[:, USER_LATENT_NUM] = _sigmoid(
        u @ model.user_w + rng.normal(0.0, 0.7, (n_search, len(USER_LATENT_NUM)))
    )
    item_latent = [c - N_USER_NUM for c in ITEM_LATENT_NUM]
    item_num[:, item_latent] = _sigmoid(
        v @ model.item_w + rng.normal(0.0, 0.7, (n_rows, len(item_latent)))
    )
    user_num[:, USER_DIRECT_NUM] = rng.random((n_search, len(USER_DIRECT_NUM))) ** 2
    item_direct = [c - N_USER_NUM for c in ITEM_DIRECT_NUM]
    item_num[:, item_direct] = rng.random((n_rows, len(item_direct))) ** 2
    item_num[:, PRICE_NUM - N_USER_NUM] = rng.beta(2.0, 5.0, n_rows)
    for c in ZERO_NUM:
        if c < N_USER_NUM:
            user_num[:, c] = 0.0
        else:
            item_num[:, c - N_USER_NUM] = 0.0

    direct = np.concatenate(
        [user_num[rows_search][:, USER_DIRECT_NUM], item_num[:, item_direct]], axis=1
    ).astype(np.float64)
    u_rows = u[rows_search]
    click_logit = (
        b_user[rows_search] + b_item + 1.6 * np.einsum("nd,nd->n", u_rows, v)
        + (direct - 1.0 / 3.0) @ model.direct_c
    )  # fmt: skip
    purchase_logit = (
        0.5 * (b_user[rows_search] + b_item)
        + 1.6 * np.einsum("nd,nd->n", u_rows, v @ model.purchase_m.T)
        - 1.2 * (item_num[:, PRICE_NUM - N_USER_NUM] - 2.0 / 7.0)
    )
    click_logit *= LOGIT_SCALE
    purchase_logit *= LOGIT_SCALE
    p_click = _sigmoid(click_logit + model.click_intercept)
    p_purchase = _sigmoid(purchase_logit + model.purchase_intercept)
    click = rng.random(n_rows) < p_click
    purchase = rng.random(n_rows) < p_purchase
    return _Split(
        search_id=np.arange(first_search, first_search + n_search, dtype=np.int64),
        rows_search=rows_search,
        user_cat=user_cat,
        user_num=user_num,
        item_cat=item_cat,
        item_num=item_num,
        click_logit=click_logit,
        purchase_logit=purchase_logit,
        p_click=p_click,
        p_purchase=p_purchase,
        click=click.astype(np.int8),
        conversion=(click & purchase).astype(np.int8),
    )


def _solve_intercept(logits: np.ndarray, target: float, other: np.ndarray | None = None) -> float:
    """Intercept ``a`` with ``mean(sigmoid(logits + a) * other) = target`` (bisection)."""
    weight = np.ones_like(logits) if other is None else other
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(np.mean(_sigmoid(logits + mid) * weight)) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=16)
def _intercepts(seed: int, click_rate: float, conversion_rate: float) -> tuple[float, float]:
    """Both intercepts, solved on a fixed calibration sample (independent of the sizes)."""
    model = _draw_model(seed)
    sample = _draw_split(model, np.random.default_rng([seed, 9]), CALIBRATION_ROWS, 0)
    a = _solve_intercept(sample.click_logit, click_rate)
    p_click = _sigmoid(sample.click_logit + a)
    g = _solve_intercept(sample.purchase_logit, conversion_rate, p_click)
    return a, g


def _calibrate(model: _Model, config: GeneratorConfig) -> _Model:
    """``model`` with the intercepts that give the configured population rates."""
    a, g = _intercepts(config.seed, config.click_rate, config.conversion_rate)
    return dataclasses.replace(model, click_intercept=a, purchase_intercept=g)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); NaN when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = np.asarray(scores)[order]
    # Average rank of each group of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(sorted_scores)]
    avg_rank = (starts + ends + 1) / 2.0  # ranks are 1-based
    ranks = np.repeat(avg_rank, ends - starts)
    pos_rank_sum = float(ranks[labels[order]].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _finite_or_none(x: float) -> float | None:
    return x if np.isfinite(x) else None


def log_loss(p: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (clipped away from 0 and 1)."""
    p = np.clip(p, 1e-15, 1 - 1e-15)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _harden(split: _Split, seed: int, salt: int, shift_from_row: int) -> None:
    """Apply the ``hard`` representation in place (labels and truth untouched)."""
    rng = np.random.default_rng([seed, 5, salt])
    for c in COUNT_NUM:
        user_side = c < N_USER_NUM
        block, col = (split.user_num, c) if user_side else (split.item_num, c - N_USER_NUM)
        block[:, col] = np.floor(np.expm1(block[:, col].astype(np.float64) * 13.0))
    for f in NOISE_FIELDS:
        if f < N_USER_FIELDS:
            hot = rng.random(len(split.user_cat)) < HOT_ID_SHARE
            split.user_cat[hot, f] = 0
        else:
            hot = rng.random(len(split.item_cat)) < HOT_ID_SHARE
            split.item_cat[hot, f - N_USER_FIELDS] = 0
    first_search = (
        int(split.rows_search[shift_from_row]) if shift_from_row < len(split.rows_search) else None
    )
    for c in SHIFTED_NUM:
        if c < N_USER_NUM:
            if first_search is not None:
                split.user_num[first_search:, c] *= SHIFT_FACTOR
        else:
            split.item_num[shift_from_row:, c - N_USER_NUM] *= SHIFT_FACTOR


# ----------------------------------------------------------------------------- writing


def _processed_table(split: _Split) -> pa.Table:
    rs = split.rows_search
    columns: list[pa.Array] = [pa.array(split.search_id[rs])]
    columns += [pa.array(split.user_cat[rs, f]) for f in range(N_USER_FIELDS)]
    columns += [pa.array(split.item_cat[:, f]) for f in range(N_ITEM_FIELDS)]
    user_num_rows = split.user_num[rs]
    columns += [pa.array(user_num_rows[:, j]) for j in range(N_USER_NUM)]
    columns += [pa.array(split.item_num[:, j]) for j in range(N_ITEM_NUM)]
    columns += [pa.array(split.click), pa.array(split.conversion)]
    return pa.Table.from_arrays(columns, names=list(COLUMNS))


def _raw_tables(split: _Split) -> tuple[pa.Table, pa.Table]:
    user_cols = {ID_COLUMN: split.search_id}
    for f, name in enumerate(RAW_USER_CATEGORICAL):
        user_cols[name] = split.user_cat[:, f]
    for j, name in enumerate(RAW_USER_NUMERICAL):
        user_cols[name] = split.user_num[:, j]
    user = pa.table({name: user_cols[name] for name in RAW_USER_COLUMNS})
    item_cols = {ID_COLUMN: split.search_id[split.rows_search]}
    for f, name in enumerate(RAW_ITEM_CATEGORICAL):
        item_cols[name] = split.item_cat[:, f]
    for j, name in enumerate(RAW_ITEM_NUMERICAL):
        item_cols[name] = split.item_num[:, j]
    item_cols["label"] = (split.click + split.conversion).astype(np.int8)
    item = pa.table({name: item_cols[name] for name in RAW_ITEM_COLUMNS})
    return user, item


def _write_csv(table: pa.Table, path: Path, header: bool) -> None:
    options = pacsv.WriteOptions(
        include_header=header, quoting_style="none", quoting_header="none", batch_size=8192
    )
    pacsv.write_csv(table, path, options)


def generate_dataset(
    out: str | os.PathLike[str],
    train_rows: int = GeneratorConfig.train_rows,
    test_rows: int = GeneratorConfig.test_rows,
    seed: int = GeneratorConfig.seed,
    hard: bool = False,
    raw: bool = False,
    country: str = "XX",
    click_rate: float = GeneratorConfig.click_rate,
    conversion_rate: float = GeneratorConfig.conversion_rate,
    progress: bool = False,
    replace: bool = True,
) -> dict:
    """Generate a dataset into ``out`` (created; files written to a temporary folder first).

    Writes ``train.csv`` / ``test.csv`` (processed layout), or with ``raw`` the four raw files
    ``{country}_{user,item}_{train,test}.csv``; plus ``truth_{train,test}.npy`` (true click
    and conversion probabilities per row, float64 [N, 2]) and ``meta.json``. Returns the
    content of ``meta.json`` (including ``bayes_auc`` and ``bayes_logloss`` per task on the
    test split).

    It runs under ``out``'s lock (``cache.exclusive``), so processes that generate into one
    folder together never break each other. ``replace=True`` (the command line) replaces an
    existing ``out``; ``replace=False`` (the data module) keeps a complete one and returns its
    ``meta.json``: the first process generates, the others wait for it and use its files.
    A process that has the old files open or memory-mapped keeps reading them.

    Raises :class:`DataError` naming the folder when it cannot be written (a read-only or
    full file system): nothing is returned unless ``out`` holds a complete dataset.
    """
    config = GeneratorConfig(train_rows, test_rows, seed, hard, click_rate, conversion_rate)
    out = Path(out)
    with cache_mod.exclusive(out) as held:
        if not replace:
            existing = dataset_meta(out)
            if existing is not None:
                return existing
        meta: dict = {"generator_version": GENERATOR_VERSION, "config": asdict(config)}
        fill = functools.partial(
            _write_dataset, meta=meta, config=config, raw=raw, country=country,
            progress=progress, out=out,
        )  # fmt: skip
        try:
            written = cache_mod.publish(
                out, fill, held=held, replace=replace or held, raise_errors=True
            )
        except OSError as err:
            raise _not_writable(out, err) from None
        if not written:
            existing = dataset_meta(out)  # a writer without the lock was first
            if existing is not None:
                return existing
            raise DataError(
                out,
                "cannot write the generated data: the folder holds something else",
                hint="remove it or choose another folder",
            )
    log.info("generated %s in %.1f s", out, meta["seconds"])
    return meta


def _not_writable(out: Path, err: OSError) -> DataError | DiskFull:
    """The error of a dataset folder that could not be written, naming the folder where
    writing failed (the deepest one that exists) and why; a full disk (pyarrow says so only
    in its message) is a :class:`~mtl_clippy.errors.DiskFull` naming the dataset folder."""
    full = disk_full(err, path=out)
    if full is not None:
        return full
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    reason = err.strerror or str(err)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        problem = f"cannot write the generated data: {existing} is not writable ({reason})"
    else:
        problem = f"cannot write the generated data into {existing} ({reason})"
    return DataError(out, problem, hint="choose a writable folder")


def dataset_meta(folder: str | os.PathLike[str]) -> dict | None:
    """The ``meta.json`` of a complete generated dataset in ``folder``, or None."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "layout" in meta else None


def _write_dataset(
    tmp: Path,
    *,
    meta: dict,
    config: GeneratorConfig,
    raw: bool,
    country: str,
    progress: bool,
    out: Path,
) -> None:
    """Draw the dataset of ``config`` and write its files into ``tmp``, completing ``meta``
    (``meta.json`` last)."""
    start = time.perf_counter()
    seed = config.seed
    bar = tqdm(total=4, desc=f"generating {out}", disable=not progress)
    try:
        model = _calibrate(_draw_model(seed), config)
        bar.update()
        rng_train, rng_test = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
        train = _draw_split(model, rng_train, config.train_rows, 0)
        test = _draw_split(model, rng_test, config.test_rows, len(train.search_id))
        if config.hard:
            _harden(train, seed, 1, int(SHIFT_START * config.train_rows))
            _harden(test, seed, 2, 0)
        bar.update()
        for name, split in (("train", train), ("test", test)):
            if raw:
                user, item = _raw_tables(split)
                _write_csv(user, tmp / f"{country}_user_{name}.csv", header=False)
                _write_csv(item, tmp / f"{country}_item_{name}.csv", header=False)
            else:
                _write_csv(_processed_table(split), tmp / f"{name}.csv", header=True)
            bar.update()
            p_conversion = split.p_click * split.p_purchase
            np.save(tmp / f"truth_{name}.npy", np.stack([split.p_click, p_conversion], 1))
            labels = (split.click, split.conversion)
            probs = (split.p_click, p_conversion)
            meta[f"{name}_rows"] = len(split.click)
            meta[f"{name}_rates"] = {
                t: float(np.mean(y)) for t, y in zip(TASKS, labels, strict=True)
            }
            meta[f"{name}_positives"] = {
                t: int(np.sum(y)) for t, y in zip(TASKS, labels, strict=True)
            }
            if name == "test":
                # None (not NaN, which is not JSON) when a task has no positives.
                meta["bayes_auc"] = {
                    t: _finite_or_none(auc(p, y))
                    for t, p, y in zip(TASKS, probs, labels, strict=True)
                }
                meta["bayes_logloss"] = {
                    t: log_loss(p, y) for t, p, y in zip(TASKS, probs, labels, strict=True)
                }
        meta["layout"] = "raw" if raw else "processed"
        meta["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m mtl_clippy.data.synthetic --out DIR [...]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    parser.add_argument("--train-rows", type=int, default=GeneratorConfig.train_rows)
    parser.add_argument("--test-rows", type=int, default=GeneratorConfig.test_rows)
    parser.add_argument("--seed", type=int, default=GeneratorConfig.seed)
    parser.add_argument("--hard", action="store_true", help="hard representation, same truth")
    parser.add_argument("--raw", action="store_true", help="write the raw Tianchi layout")
    parser.add_argument("--country", default="XX", help="country code of the raw file names")
    parser.add_argument("--click-rate", type=float, default=GeneratorConfig.click_rate)
    parser.add_argument("--conversion-rate", type=float, default=GeneratorConfig.conversion_rate)
    args = parser.parse_args(argv)
    try:
        meta = generate_dataset(
            args.out,
            args.train_rows,
            args.test_rows,
            args.seed,
            hard=args.hard,
            raw=args.raw,
            country=args.country,
            click_rate=args.click_rate,
            conversion_rate=args.conversion_rate,
        )
    except DataError as err:
        print(f"error: {err.path}: {err.problem} (choose another --out)", file=sys.stderr)
        sys.exit(2)
    except DiskFull as err:
        print(f"error: {err} (free some space, or choose another --out)", file=sys.stderr)
        sys.exit(2)
    print(
        json.dumps(
            {k: meta[k] for k in ("bayes_auc", "bayes_logloss", "test_positives", "seconds")}
        )
    )


if __name__ == "__main__":
    main()
