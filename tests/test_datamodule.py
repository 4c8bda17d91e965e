"""AliExpressDataModule: generated or user data, OOV mapping, batches, sharded shuffling."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from data_fixtures import SAMPLE_DIR
from mtl_clippy.data import (
    AliExpressDataModule,
    DataError,
    DatasetMetadata,
    EpochBatchSampler,
    Vocabulary,
    read_split,
)
from mtl_clippy.data import datamodule as dm_module
from mtl_clippy.data import synthetic as syn
from mtl_clippy.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = {"train_rows": 6000, "test_rows": 3000, "batch_size": 256, "progress": False}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def generated(cache_dir):
    dm = AliExpressDataModule(cache_dir=str(cache_dir), **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_generated_batches_follow_the_contract(generated):
    md = generated.metadata
    assert isinstance(md, DatasetMetadata) and md.n_fields == 16 and md.n_numerical == 63
    assert md.extra["source"] == "synthetic"
    assert set(md.extra["bayes_auc"]) == {"click", "conversion"}
    assert md.extra["rows"] == {"train": 5400, "val": 600, "test": 3000}
    sizes = torch.tensor(md.vocab_sizes)
    for loader in (generated.train_dataloader(), generated.val_dataloader()):
        categorical, numerical, labels = next(iter(loader))
        assert categorical.dtype == torch.int64 and categorical.shape == (256, 16)
        assert numerical.dtype == torch.float32 and numerical.shape == (256, 63)
        assert labels.dtype == torch.float32 and labels.shape == (256, 2)
        assert (categorical >= 0).all() and (categorical < sizes).all()
    seen = sum(len(b[2]) for b in generated.test_dataloader())
    assert seen == 3000


def test_generated_once_and_reused(generated, cache_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(dm_module, "generate_dataset", boom)
    again = AliExpressDataModule(cache_dir=str(cache_dir), **SMALL)
    again.prepare_data()
    again.setup()
    assert again.metadata.vocab_sizes == generated.metadata.vocab_sizes
    assert again.source_dir == generated.source_dir
    other = AliExpressDataModule(cache_dir=str(cache_dir), **{**SMALL, "train_rows": 5000})
    assert other.source_dir != generated.source_dir  # keyed by the parameters
    hard = AliExpressDataModule(cache_dir=str(cache_dir), hard=True, **SMALL)
    assert hard.source_dir.name.endswith("_hard_v1") and hard.generator_config.hard
    with pytest.raises(ValueError, match="hard"):
        AliExpressDataModule(data_dir=str(cache_dir), hard=True)


def test_validation_is_the_tail_of_the_train_file(generated):
    train = read_split(generated.source_dir / "train.csv")
    val_labels = torch.cat([b[2] for b in generated.val_dataloader()]).numpy()
    np.testing.assert_array_equal(val_labels, train.labels[5400:])
    val_numerical = torch.cat([b[1] for b in generated.val_dataloader()]).numpy()
    np.testing.assert_array_equal(val_numerical, train.numerical[5400:])


def test_vocabularies_come_from_training_rows_and_unseen_ids_go_to_oov(generated):
    """Ids seen at least min_count (default 5) times in the training rows are kept; any other,
    rare in training or unseen, maps to the OOV slot."""
    train = read_split(generated.source_dir / "train.csv")
    test = read_split(generated.source_dir / "test.csv")
    fit = train.categorical[:5400]
    f = 11  # the largest field: many ids are unseen in 5400 rows
    ids, counts = np.unique(fit[:, f], return_counts=True)
    seen = ids[counts >= generated.min_count]
    assert (counts < generated.min_count).any()  # some training ids go to the OOV slot too
    assert generated.metadata.vocab_sizes[f] == len(seen) + 1
    expected_oov = (~np.isin(test.categorical[:, f], seen)).sum()
    assert expected_oov > 0
    assert generated.oov_counts["test"][f] == expected_oov
    test_idx = torch.cat([b[0] for b in generated.test_dataloader()]).numpy()
    oov_slot = len(seen)
    np.testing.assert_array_equal(
        test_idx[:, f] == oov_slot, ~np.isin(test.categorical[:, f], seen)
    )
    known = np.isin(test.categorical[:, f], seen)
    np.testing.assert_array_equal(seen[test_idx[known, f]], test.categorical[known, f])


@pytest.mark.parametrize("offset", [0, 1 << 40])  # lookup table, then sorted search
def test_vocabulary_encoding(offset):
    vocab = Vocabulary.from_column(np.array([5, 2, 9, 2, 5]) + offset)
    assert vocab.size == 4
    codes = vocab.encode(np.array([2, 5, 9, 3, 0, 10, 1000]) + offset)
    np.testing.assert_array_equal(codes, [0, 1, 2, 3, 3, 3, 3])


def test_user_data_dir_with_caps_and_oov(tmp_path):
    data = tmp_path / "AliExpress_US"
    data.mkdir()
    (data / "train.csv").write_bytes((SAMPLE_DIR / "train.csv").read_bytes())
    lines = (SAMPLE_DIR / "test.csv").read_text().splitlines()
    cells = lines[1].split(",")
    cells[7] = "987654"  # categorical_7: an id never seen in training
    lines[1] = ",".join(cells)
    (data / "test.csv").write_text("\n".join(lines) + "\n")
    dm = AliExpressDataModule(
        data_dir=str(data), cache_dir=str(tmp_path / "cache"), train_rows=80, batch_size=16
    )
    dm.setup()
    assert dm.metadata.extra["source"] == str(data)
    assert "bayes_auc" not in dm.metadata.extra
    assert dm.metadata.extra["rows"] == {"train": 72, "val": 8, "test": 20}
    categorical, _, _ = next(iter(dm.test_dataloader()))
    assert categorical[0, 6] == dm.metadata.vocab_sizes[6] - 1  # the OOV slot
    assert dm.oov_counts["test"][6] >= 1
    assert (tmp_path / "cache" / "splits").is_dir()  # the user's folder stays clean
    assert sorted(p.name for p in data.iterdir()) == ["test.csv", "train.csv"]


def test_missing_user_files_raise_data_error(tmp_path):
    dm = AliExpressDataModule(data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"train\.csv"):
        dm.setup()


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return [np.asarray(b) for b in sampler]


def test_sampler_shuffles_reproducibly_per_epoch():
    make = lambda: EpochBatchSampler(1000, 64, shuffle=True, seed=3)  # noqa: E731
    a0, b0, a1 = _epoch(make(), 0), _epoch(make(), 0), _epoch(make(), 1)
    assert all(np.array_equal(x, y) for x, y in zip(a0, b0, strict=True))
    assert not np.array_equal(np.concatenate(a0), np.concatenate(a1))
    rows = np.concatenate(a0)
    assert len(np.unique(rows)) == len(rows) == 1000  # every row once, last partial batch kept
    assert len(make()) == 16
    assert all((np.diff(b) > 0).all() for b in a0)  # sorted within a batch
    other_seed = EpochBatchSampler(1000, 64, shuffle=True, seed=4)
    assert not np.array_equal(np.concatenate(_epoch(other_seed, 0)), rows)


@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_get_disjoint_equal_shards(shuffle):
    world = 3
    shards = []
    for rank in range(world):
        sampler = EpochBatchSampler(1001, 50, shuffle=shuffle, seed=0, rank=rank, world_size=world)
        batches = list(sampler)
        rows = np.concatenate(
            [np.arange(b.start, b.stop) if isinstance(b, slice) else b for b in batches]
        )
        assert len(batches) == len(sampler)
        shards.append(rows)
    if shuffle:  # training: equal shards, the 1001 % 3 left-over rows skipped
        assert {len(s) for s in shards} == {1001 // world}
        assert len(np.unique(np.concatenate(shards))) == 3 * (1001 // world)
    else:  # evaluation: every row exactly once
        assert sorted(len(s) for s in shards) == [333, 334, 334]
        assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(1001))


def test_ranks_together_take_the_global_batch_of_one_process():
    """Batch k of 2 ranks with batch 32 = batch k of 1 process with batch 64, each epoch."""
    single = EpochBatchSampler(1000, 64, shuffle=True, seed=5, drop_last=True)
    ranks = [
        EpochBatchSampler(1000, 32, shuffle=True, seed=5, rank=r, world_size=2, drop_last=True)
        for r in range(2)
    ]
    for epoch in range(2):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        per_rank = [list(r) for r in ranks]
        expected = list(single)
        assert len(expected) == len(per_rank[0]) == len(per_rank[1])
        for k, batch in enumerate(expected):
            together = np.sort(np.concatenate([per_rank[0][k], per_rank[1][k]]))
            assert np.array_equal(together, batch)


def test_one_gather_per_batch(generated, monkeypatch):
    calls = []
    original = dm_module.BatchDataset.__getitem__

    def counting(self, index):
        calls.append(index)
        return original(self, index)

    monkeypatch.setattr(dm_module.BatchDataset, "__getitem__", counting)
    loader = generated.train_dataloader()
    n = sum(1 for _ in loader)
    assert n == len(calls) == 5400 // 256  # drop_last in training
    assert all(isinstance(c, np.ndarray) and len(c) == 256 for c in calls)


def test_distributed_loaders_shard_through_the_trainer(generated, monkeypatch):
    monkeypatch.setattr(AliExpressDataModule, "_world", lambda self: (1, 2))
    sampler = generated.train_dataloader().sampler
    assert isinstance(sampler, EpochBatchSampler) and sampler.num_replicas == 2
    assert sampler.rank == 1 and sampler.shard_size == 5400 // 2


def test_a_loader_whose_sampler_the_trainer_replaced_refuses_to_start(generated):
    """Under DDP, Trainer(use_distributed_sampler=True) rebuilds a loader around its own
    distributed sampler, which would shard our already sharded batches again: refused."""
    dataset = dm_module.BatchDataset(*generated._train)
    foreign = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=0)
    loader = dm_module.BatchLoader(dataset, sampler=foreign, batch_size=None)
    with pytest.raises(ConfigError, match="use_distributed_sampler=False"):
        iter(loader)
    assert isinstance(generated.train_dataloader(), dm_module.BatchLoader)
    assert isinstance(generated.val_dataloader(), dm_module.BatchLoader)


def test_a_loader_whose_sampler_the_trainer_replaced_refuses_to_be_counted(generated):
    """Lightning counts a loader's batches before it iterates it; refusing there already
    keeps the error from being masked by Lightning's DDP teardown (see the test below)."""
    dataset = dm_module.BatchDataset(*generated._train)
    foreign = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=0)
    loader = dm_module.BatchLoader(dataset, sampler=foreign, batch_size=None)
    with pytest.raises(ConfigError, match="use_distributed_sampler=False"):
        len(loader)
    ours = generated.train_dataloader()
    assert len(ours) == len(ours.sampler)


_DDP_WITH_LIGHTNINGS_SAMPLER = """
import sys
import lightning.pytorch as pl
sys.path.insert(0, sys.argv[2])
from mtl_clippy.data.datamodule import AliExpressDataModule
from mtl_clippy.errors import ConfigError
from mtl_clippy.models.module import MultiTaskModule
from model_fixtures import adam_partial, backbone_config
dm = AliExpressDataModule(cache_dir=sys.argv[1], train_rows=2000, test_rows=500,
                          batch_size=128, progress=False)
dm.prepare_data()
dm.setup("fit")
model = MultiTaskModule(backbone=backbone_config("SharedBottom"), metadata=dm.metadata,
                        optimizer=adam_partial())
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=True,
                     max_epochs=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False,
                     num_sanity_val_steps=0,  # the training loader is the first asked
                     default_root_dir=sys.argv[1])
try:
    trainer.fit(model, datamodule=dm)
except ConfigError as err:
    print(f"rank {trainer.global_rank}: ConfigError: {err}", flush=True)
except Exception as err:
    print(f"rank {trainer.global_rank}: {type(err).__name__}: {err}", flush=True)
else:
    print(f"rank {trainer.global_rank}: trained", flush=True)
"""


@pytest.mark.slow
def test_under_ddp_a_trainer_that_replaces_the_sampler_fails_with_the_config_error(tmp_path):
    """Real 2-process CPU DDP with a hand-built Trainer(use_distributed_sampler=True): fit()
    raises our ConfigError on every rank, not Lightning's teardown RuntimeError."""
    import subprocess
    import sys

    script = tmp_path / "ddp_sampler.py"
    script.write_text(_DDP_WITH_LIGHTNINGS_SAMPLER)
    tests_dir = str(Path(__file__).resolve().parent)
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path), tests_dir],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = sorted(line for line in res.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, res.stdout[-2000:] + res.stderr[-3000:]
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank {rank}: ConfigError: trainer.use_distributed_sampler"), line
        assert "use_distributed_sampler=False" in line


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml")))
def test_every_trainer_config_leaves_the_samplers_to_the_data_module(name):
    """The samplers shard by rank themselves: no trainer config lets Lightning shard again."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"trainer={name}"])
    assert cfg.trainer.use_distributed_sampler is False


class _TinyModel(L.LightningModule):
    def __init__(self, metadata: DatasetMetadata) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(sum(metadata.vocab_sizes), 2)
        offsets = np.r_[0, np.cumsum(metadata.vocab_sizes)[:-1]]
        self.register_buffer("offsets", torch.as_tensor(offsets))
        self.head = torch.nn.Linear(16 * 2 + 63, 2)
        self.epochs_seen: list[int] = []

    def forward(self, categorical, numerical):
        embedded = self.embedding(categorical + self.offsets).flatten(1)
        return self.head(torch.cat([embedded, numerical], 1))

    def training_step(self, batch, index):
        categorical, numerical, labels = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(
            self(categorical, numerical), labels
        )

    def on_train_epoch_start(self):
        self.epochs_seen.append(self.trainer.train_dataloader.sampler.epoch)

    def predict_step(self, batch, index):
        return self(batch[0], batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings(
    "ignore:You passed in a `val_dataloader` but have no `validation_step`:UserWarning"
)  # a bare module that only trains and predicts, to exercise the DataModule's loaders
def test_lightning_fit_and_predict(generated):
    model = _TinyModel(generated.metadata)
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=3, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=generated)
    assert model.epochs_seen == [0, 1]  # Lightning advances the sampler's epoch
    predictions = trainer.predict(model, datamodule=generated)
    assert sum(len(p) for p in predictions) == 3000


def test_default_sizes_hold_several_hundred_test_conversions():
    config = syn.GeneratorConfig()
    assert config.test_rows * config.conversion_rate >= 400
    dm = AliExpressDataModule(cache_dir="/nonexistent")
    assert dm.generator_config == config
    assert dm.batch_size == 2048 and dm.val_fraction == 0.1 and dm.seed == 42


def test_encoded_ids_are_cached_and_memory_mapped(generated, cache_dir):
    """A second data module (another DDP rank, a later run) maps the same encoded ids."""
    again = AliExpressDataModule(cache_dir=str(cache_dir), **SMALL)
    again.setup("fit")
    for first, second in zip(generated._train + generated._test, again._train + again._test):
        assert np.array_equal(np.asarray(first), np.asarray(second))
    encoded_train, encoded_test = again._train[0], again._test[0]
    assert isinstance(encoded_train, np.memmap) and isinstance(encoded_test, np.memmap)
    assert encoded_train.dtype == np.int32
    # what the cache holds is exactly the vocabulary encoding of the raw ids
    raw = again._read("train").categorical
    assert np.array_equal(np.asarray(encoded_train), again._encode(np.asarray(raw)))
    folders = list((again.source_dir / ".mtl_clippy_cache").glob("*encoded-*"))
    assert len(folders) == 1 and not folders[0].name.startswith(".")
