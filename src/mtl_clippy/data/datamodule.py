"""``AliExpressDataModule``: from files (or none) to batches, one gather per batch.

With no ``data_dir`` it generates the built-in dataset (``synthetic.py``) once into
``cache_dir/synthetic/<parameters>`` and reuses it; with ``data_dir`` it reads the user's
``train.csv`` / ``test.csv`` (cached as ``.npy`` under ``cache_dir/splits``).

* Validation is the last ``val_fraction`` of the train file's rows (the data is time-ordered);
  test is ``test.csv``.
* Vocabularies come from the training rows (train file minus validation): each field's ids
  seen at least ``min_count`` times (default 5) are numbered ``0..n-1`` in increasing id
  order and every other id maps to the field's out-of-vocabulary slot ``n``: rare training
  ids as well as ids unseen in training, so the OOV row is trained on the rare ids and an
  unseen validation or test id reads a learned vector, not its random initialisation.
  ``metadata.vocab_sizes[f] = n + 1``. The share of OOV cells per split (and field) is
  ``dm.oov_rate``, recorded in ``metrics.json``.
* Every cache (generated data, parse caches, encoded ids) is written once, by the first
  process that needs it, under a lock; the others wait and memory-map its copy (``cache.py``).
* A batch is one fancy-index gather from the arrays (memory-mapped where cached): the sampler
  yields whole index arrays (or slices) and the dataset returns whole batches, so there is no
  per-row ``__getitem__`` and no collate. Shuffling is per epoch from ``(seed, epoch)``;
  under distributed training each rank gets a disjoint, equal-sized shard.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtl_clippy.data.cache import remove_dead_leftovers
from mtl_clippy.data.errors import DataError
from mtl_clippy.data.reader import AliExpressSplit, read_split
from mtl_clippy.data.schema import CATEGORICAL_COLUMNS, DatasetMetadata
from mtl_clippy.data.synthetic import GeneratorConfig, dataset_meta, generate_dataset
from mtl_clippy.data.vocab import (
    DEFAULT_MIN_COUNT,
    Vocabulary,
    build_vocabularies,
    count_equal,
    encode_all,
    encoded_ids,
    oov_line,
    oov_rates,
)
from mtl_clippy.errors import ConfigError, DiskFull

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def default_cache_dir() -> str:
    """``$MTL_CLIPPY_CACHE``, else ``$XDG_CACHE_HOME/mtl_clippy``, else ``~/.cache/mtl_clippy``."""
    if os.environ.get("MTL_CLIPPY_CACHE"):
        return os.environ["MTL_CLIPPY_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mtl_clippy")


DEFAULT_CACHE_DIR = default_cache_dir()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


class BatchDataset(Dataset):
    """Rows ``[start, stop)`` of aligned arrays; ``dataset[indices]`` is a whole batch.

    ``indices`` is an int array or a slice relative to ``start``. One gather per array per
    batch; categorical indices are stored as int32 (half the memory) and widened per batch.
    """

    def __init__(
        self,
        categorical: np.ndarray,
        numerical: np.ndarray,
        labels: np.ndarray,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        self.categorical = categorical
        self.numerical = numerical
        self.labels = labels
        self.start = start
        self.stop = len(labels) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: np.ndarray | slice) -> Batch:
        if isinstance(index, slice):
            rows: np.ndarray | slice = slice(self.start + index.start, self.start + index.stop)
        else:
            rows = np.asarray(index) + self.start
        return (
            torch.from_numpy(self.categorical[rows].astype(np.int64)),
            torch.from_numpy(np.array(self.numerical[rows], dtype=np.float32)),
            torch.from_numpy(np.array(self.labels[rows], dtype=np.float32)),
        )


class EpochBatchSampler(Sampler[np.ndarray | slice]):
    """Yields whole batches of row indices: shuffled per epoch from ``(seed, epoch)``.

    Training (``shuffle=True``): each of ``world_size`` ranks gets ``n_rows // world_size``
    rows of the epoch's permutation, interleaved: rank ``r`` takes positions ``r, r + w,
    r + 2w, ...``. Batch ``k`` of all ranks together is then exactly batch ``k`` of a single
    process whose batch is ``world_size`` times larger: a DDP run and a one-process run with
    the same global batch see the same rows in the same steps. The few left-over rows are
    skipped (different ones each epoch). Within a batch the indices are sorted, which makes
    the gather from a memory-mapped array sequential without changing which rows form it.

    Evaluation (``shuffle=False``): contiguous slices, every row exactly once; rank ``r``
    takes rows ``[r n / w, (r + 1) n / w)``, so metrics gathered over the ranks are those of
    the whole split.

    It shards by itself, so the Trainer must leave it alone: ``use_distributed_sampler=False``
    (``configs/trainer/default.yaml``; the loaders refuse a replaced sampler, see
    :class:`BatchLoader`). Lightning calls ``set_epoch`` on it each epoch, as on any sampler
    that has one.
    """

    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.num_replicas = world_size
        self.drop_last = drop_last
        self.epoch = 0
        if shuffle:
            self.lo, self.shard_size = 0, n_rows // world_size
        else:
            self.lo = rank * n_rows // world_size
            self.shard_size = (rank + 1) * n_rows // world_size - self.lo
        self._skip: tuple[int, int] | None = None  # (epoch, batches) to skip after a resume

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next pass yields (called by Lightning each epoch)."""
        self.epoch = int(epoch)

    def skip_batches(self, epoch: int, batches: int) -> None:
        """Resume mid-epoch: the next pass over ``epoch`` starts after its first ``batches``."""
        self._skip = (int(epoch), int(batches))

    def __len__(self) -> int:
        if self.drop_last and self.shard_size >= self.batch_size:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray | slice]:
        lo = self.lo
        n_batches = len(self)
        first = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            first = min(self._skip[1], n_batches)
        self._skip = None
        if not self.shuffle:
            for b in range(first, n_batches):
                start = lo + b * self.batch_size
                yield slice(start, min(start + self.batch_size, lo + self.shard_size))
            return
        world = self.num_replicas
        rng = np.random.default_rng([self.seed, self.epoch])
        shard = rng.permutation(self.n_rows)[: self.n_rows // world * world][self.rank :: world]
        for b in range(first, n_batches):
            yield np.sort(shard[b * self.batch_size : (b + 1) * self.batch_size])


class BatchLoader(DataLoader):
    """A DataLoader of :class:`EpochBatchSampler` batches that checks its sampler is ours.

    Under DDP, a Trainer built with ``use_distributed_sampler=True`` (Lightning's default)
    rebuilds the loader around its own distributed sampler, which would shard the already
    sharded batches a second time and train on a fraction of the data without a word; this
    loader refuses to start then, naming the setting.

    It refuses in ``__len__`` as well as in ``__iter__``: Lightning asks a loader's length
    (when it counts the batches of an epoch) before it makes an iterator, and an error
    raised from that iterator is masked under DDP by Lightning's own teardown ("Please call
    iter(combined_loader) first"), while one raised from the length reaches ``fit()``.
    """

    def _check_sampler(self) -> None:
        if not isinstance(self.sampler, EpochBatchSampler):
            raise ConfigError(
                f"trainer.use_distributed_sampler: the data module's loaders shard the data "
                f"themselves, but the Trainer replaced their sampler with a "
                f"{type(self.sampler).__name__}; build it with use_distributed_sampler=False "
                "(configs/trainer/default.yaml sets it)"
            )

    def __len__(self) -> int:
        self._check_sampler()
        return super().__len__()

    def __iter__(self) -> Any:
        self._check_sampler()
        return super().__iter__()


class ResumableDataLoader(BatchLoader):
    """The training loader, resumable mid-epoch (Lightning's ``state_dict`` protocol).

    Its state is the epoch and the number of batches already trained on in it, read from the
    trainer when a checkpoint is taken; loading it makes the sampler skip those batches of
    that epoch. The order itself is a function of ``(seed, epoch)``, so nothing else is kept.
    """

    def __init__(self, *args: Any, position: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position = position  # () -> (epoch, batches done in it)

    def state_dict(self) -> dict[str, int]:
        epoch, done = self._position() if self._position is not None else (0, 0)
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        sampler = self.sampler
        if isinstance(sampler, EpochBatchSampler):
            sampler.skip_batches(state_dict["epoch"], state_dict["batches_done"])


class AliExpressDataModule(L.LightningDataModule):
    """AliExpress click / conversion data as ``(categorical, numerical, labels)`` batches.

    Args:
        data_dir: folder with the user's processed ``train.csv`` / ``test.csv``; None
            generates the built-in dataset (see ``mtl_clippy.data.synthetic``).
        cache_dir: where generated datasets and parsed ``.npy`` caches live (default
            ``$MTL_CLIPPY_CACHE`` or ``~/.cache/mtl_clippy``).
        train_rows / test_rows: sizes of the generated splits (default 300,000 / 150,000);
            with ``data_dir``, an optional cap on the rows used from each file (first rows).
        batch_size / eval_batch_size: rows per training / evaluation batch (eval defaults to
            the training size).
        val_fraction: share of the train file's last rows held out for validation.
        min_count: ids seen fewer times than this in the training rows map to their field's
            OOV slot (with ids unseen in training), so that slot is trained; 1 keeps every
            training id (the OOV row then never trains).
        seed: seeds the per-epoch shuffling.
        hard: generate the ``hard`` representation (same truth; see synthetic.py).
        num_workers / pin_memory: passed to the DataLoaders.
        data_seed: seed of the generated dataset, separate from ``seed`` so that runs with
            different training seeds see the same data.
        click_rate / conversion_rate: population rates of the generated data.
        progress: show progress while generating.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        cache_dir: str = DEFAULT_CACHE_DIR,
        train_rows: int | None = None,
        test_rows: int | None = None,
        batch_size: int = 2048,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        min_count: int = DEFAULT_MIN_COUNT,
        seed: int = 42,
        hard: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        data_seed: int = 0,
        click_rate: float = GeneratorConfig.click_rate,
        conversion_rate: float = GeneratorConfig.conversion_rate,
        progress: bool = True,
    ) -> None:
        super().__init__()
        for name, value, optional in (
            ("train_rows", train_rows, True),
            ("test_rows", test_rows, True),
            ("batch_size", batch_size, False),
            ("eval_batch_size", eval_batch_size, True),
        ):
            if (value is not None or not optional) and not _positive_int(value):
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"num_workers must be a whole number >= 0, got {num_workers!r}")
        if not isinstance(val_fraction, int | float) or isinstance(val_fraction, bool):
            raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not _positive_int(min_count):
            raise ValueError(f"min_count must be a whole number >= 1, got {min_count!r}")
        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.cache_dir = Path(cache_dir).expanduser()
        self.train_rows = train_rows
        self.test_rows = test_rows
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.min_count = int(min_count)
        self.seed = seed
        self.hard = hard
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.progress = progress
        self.generator_config: GeneratorConfig | None = None
        if self.data_dir is None:
            self.generator_config = GeneratorConfig(
                train_rows=train_rows or GeneratorConfig.train_rows,
                test_rows=test_rows or GeneratorConfig.test_rows,
                seed=data_seed,
                hard=hard,
                click_rate=click_rate,
                conversion_rate=conversion_rate,
            )
        elif hard:
            raise ValueError("hard=True only applies to generated data (data_dir=None)")
        self.metadata: DatasetMetadata | None = None
        self.vocabularies: tuple[Vocabulary, ...] = ()
        self.oov_counts: dict[str, list[int]] = {}
        self.oov_rate: dict[str, Any] = {}
        self.encoded_from_cache: bool | None = None  # None: encoded in memory (no parse cache)
        self._train: tuple[np.ndarray, ...] | None = None
        self._test: tuple[np.ndarray, ...] | None = None
        self._n_fit = 0

    # ------------------------------------------------------------------ locations

    @property
    def source_dir(self) -> Path:
        """The folder holding ``train.csv`` / ``test.csv`` (generated or the user's)."""
        if self.data_dir is not None:
            return self.data_dir
        assert self.generator_config is not None
        return self.cache_dir / "synthetic" / self.generator_config.key()

    def _read(self, name: str) -> AliExpressSplit:
        path = self.source_dir / f"{name}.csv"
        if not path.exists():  # (a folder of that name reaches the reader, which says so)
            present = None
            if self.source_dir.is_dir():
                present = ", ".join(sorted(p.name for p in self.source_dir.iterdir())[:8])
            holds = "" if present is None else f" (it holds: {present or 'nothing'})"
            raise DataError(
                path,
                "file not found" if present is not None else "folder not found",
                hint=(
                    f"{self.source_dir} must hold the processed AliExpress files train.csv and "
                    f"test.csv{holds}. "
                    "Download a country's zip from Tianchi (dataset 74690), then run "
                    "`python -m mtl_clippy.data.prepare --raw aliexpress_NL_datasets.zip "
                    "--country NL --out data/AliExpress_NL`; or leave data_dir unset to use "
                    "the built-in generated data"
                ),
            )
        cache_dir = self.cache_dir / "splits" if self.data_dir is not None else None
        return read_split(path, cache_dir=cache_dir)

    # ------------------------------------------------------------------ lightning hooks

    def prepare_data(self) -> None:
        """Generate the built-in dataset if missing, and build the parse caches (rank 0).

        Processes that do this together (parallel sweep jobs) generate the data once: the
        first under the folder's lock, the others wait and use its files."""
        if self.data_dir is None:  # what a generator killed mid-write left (any parameters)
            remove_dead_leftovers(self.source_dir)
        if self.data_dir is None and dataset_meta(self.source_dir) is None:
            assert self.generator_config is not None
            c = self.generator_config
            log.info("generating the built-in dataset into %s (once)", self.source_dir)
            try:
                generate_dataset(
                    self.source_dir, c.train_rows, c.test_rows, c.seed, hard=c.hard,
                    click_rate=c.click_rate, conversion_rate=c.conversion_rate,
                    progress=self.progress, replace=False,
                )  # fmt: skip
            except DataError as err:  # the folder cannot be written: say which key sets it
                raise DataError(
                    err.path,
                    err.problem,
                    hint="set data.cache_dir (by default paths.data_dir) to a writable folder",
                ) from None
            except DiskFull as err:  # its file system is full: the same, on another one
                raise DiskFull(
                    err.path,
                    err.errno or errno.ENOSPC,
                    hint="free some space, or set data.cache_dir (by default paths.data_dir) "
                    "to a folder on another file system",
                ) from None
        for name in ("train", "test"):
            self._read(name)

    def setup(self, stage: str | None = None) -> None:
        """Read both splits, split off validation, build vocabularies and metadata (once)."""
        if self.metadata is not None:
            return
        if self.data_dir is None and dataset_meta(self.source_dir) is None:
            self.prepare_data()  # used without a Trainer
        cap_train = self.train_rows if self.data_dir is not None else None
        cap_test = self.test_rows if self.data_dir is not None else None
        train = self._read("train").head(cap_train)
        test = self._read("test").head(cap_test)
        n = len(train)
        n_val = round(n * self.val_fraction)
        if self.val_fraction > 0:
            n_val = max(n_val, 1)
        if n - n_val < 1:
            raise self._too_few_to_train(train.source, n)
        self._n_fit = n - n_val

        self.vocabularies = build_vocabularies(train.categorical[: self._n_fit], self.min_count)
        empty = [
            c for c, v in zip(CATEGORICAL_COLUMNS, self.vocabularies, strict=True) if not v.oov
        ]
        if empty:
            log.warning(
                "%s: no training id is seen data.min_count=%d times, so the vocabulary is empty "
                "and every id maps to the OOV slot (the field carries no information); lower "
                "data.min_count",
                ", ".join(empty), self.min_count,
            )  # fmt: skip
        train_idx, test_idx = self._encoded(train, test)
        oov = np.array([v.oov for v in self.vocabularies])
        self.oov_counts = {
            "train": count_equal(train_idx[: self._n_fit], oov),
            "val": count_equal(train_idx[self._n_fit :], oov),
            "test": count_equal(test_idx, oov),
        }
        rows = {"train": self._n_fit, "val": n - self._n_fit, "test": len(test)}
        self.oov_rate = oov_rates(self.oov_counts, rows, self.min_count)
        if any(sum(counts) for counts in self.oov_counts.values()):
            log.info("%s", oov_line(self.oov_rate, self.min_count))
        if self.oov_rate["untrained"]:
            log.warning(
                "%s: ids unseen in training occur in validation or test, but no training id "
                "of the field is seen fewer than data.min_count=%d times, so the OOV row they "
                "read never trains; raise data.min_count",
                ", ".join(self.oov_rate["untrained"]), self.min_count,
            )  # fmt: skip
        self._train = (train_idx, train.numerical, train.labels)
        self._test = (test_idx, test.numerical, test.labels)
        self.metadata = DatasetMetadata(
            vocab_sizes=tuple(v.size for v in self.vocabularies), extra=self._extra(n, len(test))
        )

    def _too_few_to_train(self, source: Any, n: int) -> Exception:
        """Holding out ``val_fraction`` of ``n`` rows (at least one) leaves none to train on:
        name the value to change (``data.val_fraction``, or ``data.train_rows`` when that
        set ``n``) and the value that works."""
        from decimal import ROUND_FLOOR, Decimal

        fraction = self.val_fraction
        if n >= 2:  # the largest fraction that leaves a training row (rounded down)
            most = Decimal((n - 1) / n).quantize(Decimal(1).scaleb(-len(str(n))), ROUND_FLOOR)
            return ConfigError(
                f"data.val_fraction={fraction} holds out all {n} training rows for validation, "
                f"leaving none to train on; expected at most {most} (or 0: no validation)"
            )
        if self.train_rows == n:
            return ConfigError(
                f"data.train_rows={n}: too few to hold out data.val_fraction={fraction} for "
                "validation and train on the rest; expected at least 2, or "
                "data.val_fraction=0 (no validation)"
            )
        return DataError(
            source,
            f"{n} row is too few to hold out data.val_fraction={fraction} for validation and "
            "train on the rest; use more rows, or data.val_fraction=0 (no validation)",
        )

    def _encoded(
        self, train: AliExpressSplit, test: AliExpressSplit
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vocabulary indices (int32) of both splits, memory-mapped from a cache when the
        splits came from one: every DDP rank and loader worker then shares one copy in the
        page cache instead of holding its own (768 MB per process for the 12 M NL rows)."""
        root = self.cache_dir / "splits" if self.data_dir is not None else None
        train_idx, test_idx, self.encoded_from_cache = encoded_ids(
            train, test, self._n_fit, self.min_count, self._encode, root=root
        )
        return train_idx, test_idx

    def _encode(self, categorical: np.ndarray) -> np.ndarray:
        """int32 vocabulary indices of raw ids ``[N, 16]``."""
        return encode_all(categorical, self.vocabularies)

    def _extra(self, n_train_file: int, n_test: int) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "source": "synthetic" if self.data_dir is None else str(self.data_dir),
            "rows": {"train": self._n_fit, "val": n_train_file - self._n_fit, "test": n_test},
            "min_count": self.min_count,
            "oov": {k: int(sum(v)) for k, v in self.oov_counts.items()},
        }
        meta = dataset_meta(self.source_dir)
        if meta is not None:  # generated data (built-in or from the command line)
            capped = self.data_dir is not None and self.test_rows is not None
            if not capped:  # the Bayes figures hold for the whole test split only
                extra["bayes_auc"] = meta.get("bayes_auc")
                extra["bayes_logloss"] = meta.get("bayes_logloss")
            extra["generator"] = meta.get("config")
        return extra

    # ------------------------------------------------------------------ loaders

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(
        self, arrays: tuple[np.ndarray, ...] | None, start: int, stop: int | None, train: bool
    ) -> BatchLoader:
        if arrays is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        dataset = BatchDataset(*arrays, start=start, stop=stop)
        rank, world = self._world()
        sampler = EpochBatchSampler(
            len(dataset), self.batch_size if train else self.eval_batch_size,
            shuffle=train, seed=self.seed, rank=rank, world_size=world, drop_last=train,
        )  # fmt: skip
        # Its own generator: creating an iterator then draws from it, never from the global
        # torch generator (which dropout uses), so evaluation passes leave training's
        # random stream alone and a resumed run draws the same numbers.
        generator = torch.Generator().manual_seed(self.seed)
        kwargs: dict[str, Any] = {}
        cls: type[BatchLoader] = BatchLoader
        if train:
            cls, kwargs["position"] = ResumableDataLoader, self._train_position
        if self.num_workers > 0:  # workers leave SIGTERM & co. to the main process
            from mtl_clippy.preemption import WorkerInit

            kwargs["worker_init_fn"] = WorkerInit(rank)
        return cls(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=generator,
            **kwargs,
        )

    def _train_position(self) -> tuple[int, int]:
        """(epoch, training batches finished in it), read when a checkpoint is taken."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        loop = trainer.fit_loop
        return int(loop.epoch_progress.current.processed), int(
            loop.epoch_loop.batch_progress.current.ready
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train, 0, self._n_fit, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._train, self._n_fit, None, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test, 0, None, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._test, 0, None, train=False)
