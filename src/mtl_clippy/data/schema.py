"""The AliExpress processed layout: column names, the user/item split of fields, metadata.

The processed files (``train.csv`` / ``test.csv``) have a header line and 82 columns::

    search_id, categorical_1 .. categorical_16, numerical_1 .. numerical_63, click, conversion

``categorical_1..9`` are user-side fields (raw ``user_2..user_8, user_32, user_33``) and
``categorical_10..16`` item-side fields (raw ``item_19, item_34, item_35, item_36, item_40,
item_41, item_42``). ``numerical_1..23`` are user-side (raw ``user_9..user_31``) and
``numerical_24..63`` item-side (the other raw item columns). ``search_id`` is not a feature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

N_CATEGORICAL = 16
N_NUMERICAL = 63
TASKS: tuple[str, ...] = ("click", "conversion")

ID_COLUMN = "search_id"
CATEGORICAL_COLUMNS: tuple[str, ...] = tuple(
    f"categorical_{i}" for i in range(1, N_CATEGORICAL + 1)
)
NUMERICAL_COLUMNS: tuple[str, ...] = tuple(f"numerical_{i}" for i in range(1, N_NUMERICAL + 1))
LABEL_COLUMNS: tuple[str, ...] = TASKS
COLUMNS: tuple[str, ...] = (ID_COLUMN, *CATEGORICAL_COLUMNS, *NUMERICAL_COLUMNS, *LABEL_COLUMNS)

# Indices (0-based) into the categorical block.
USER_CATEGORICAL: tuple[int, ...] = tuple(range(0, 9))
ITEM_CATEGORICAL: tuple[int, ...] = tuple(range(9, 16))
# Indices (0-based) into the numerical block.
USER_NUMERICAL: tuple[int, ...] = tuple(range(0, 23))
ITEM_NUMERICAL: tuple[int, ...] = tuple(range(23, 63))

# Raw Tianchi column names of each processed column (for documentation and preparation).
RAW_USER_CATEGORICAL: tuple[str, ...] = (
    "user_2", "user_3", "user_4", "user_5", "user_6", "user_7", "user_8", "user_32", "user_33",
)  # fmt: skip
RAW_ITEM_CATEGORICAL: tuple[str, ...] = (
    "item_19", "item_34", "item_35", "item_36", "item_40", "item_41", "item_42",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetMetadata:
    """What a model needs to know about the data, and what a checkpoint stores to rebuild it.

    ``vocab_sizes[f]`` counts the embedding rows of categorical field ``f``, *including* its
    out-of-vocabulary slot (the last row of the field). ``user_fields`` / ``item_fields`` index
    the categorical fields of each side; ``user_numerical`` / ``item_numerical`` the numerical
    columns of each side.
    """

    vocab_sizes: tuple[int, ...]
    n_numerical: int = N_NUMERICAL
    tasks: tuple[str, ...] = TASKS
    user_fields: tuple[int, ...] = USER_CATEGORICAL
    item_fields: tuple[int, ...] = ITEM_CATEGORICAL
    user_numerical: tuple[int, ...] = USER_NUMERICAL
    item_numerical: tuple[int, ...] = ITEM_NUMERICAL
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_fields(self) -> int:
        return len(self.vocab_sizes)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (lists, ints, strings), safe to store in a checkpoint or YAML."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetMetadata:
        kw = dict(d)
        for k in (
            "vocab_sizes",
            "tasks",
            "user_fields",
            "item_fields",
            "user_numerical",
            "item_numerical",
        ):
            if k in kw:
                kw[k] = tuple(kw[k])
        kw["extra"] = dict(kw.get("extra") or {})
        return cls(**kw)


# Raw Tianchi layout (no header line): the user file has the search id then user_2..user_33;
# the item file has the search id, item_2..item_48, then the label (0 / 1 click / 2 purchase).
RAW_USER_COLUMNS: tuple[str, ...] = ("search_id", *(f"user_{i}" for i in range(2, 34)))
RAW_ITEM_COLUMNS: tuple[str, ...] = ("search_id", *(f"item_{i}" for i in range(2, 49)), "label")
RAW_USER_NUMERICAL: tuple[str, ...] = tuple(f"user_{i}" for i in range(9, 32))
RAW_ITEM_NUMERICAL: tuple[str, ...] = tuple(
    f"item_{i}" for i in range(2, 49) if f"item_{i}" not in RAW_ITEM_CATEGORICAL
)
