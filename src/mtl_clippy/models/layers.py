"""Building blocks shared by the backbones: the AliExpress input layer and the MLP block.

All deep backbones read the same input layer as the published AliExpress models: one
embedding table over every categorical field (per-field offsets, out-of-vocabulary slots
included, Xavier-uniform init) and a ``Linear`` projection of the numerical features that
acts as one more "field". Keeping it in one place means every backbone sees identical
features, so differences in the results come from the multitask architecture alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata


def as_metadata(metadata: DatasetMetadata | Mapping[str, Any]) -> DatasetMetadata:
    """Return ``metadata`` as a :class:`DatasetMetadata`, accepting its plain-dict form.

    Checkpoints and Hydra configs carry the metadata as a dict; backbones accept both.
    """
    if isinstance(metadata, DatasetMetadata):
        return metadata
    if isinstance(metadata, Mapping):
        return DatasetMetadata.from_dict(dict(metadata))
    raise TypeError(
        f"metadata must be a DatasetMetadata or its dict form, got {type(metadata).__name__}"
    )


class FeatureEmbedding(nn.Module):
    """Embed the categorical fields and the numerical features as ``n_fields + groups`` vectors.

    One ``nn.Embedding`` holds the rows of every categorical field back to back; field ``f``'s
    index ``i`` (already in ``[0, vocab_sizes[f])``, OOV slot included) reads row
    ``offsets[f] + i``. Each numerical group (by default one group of all numerical features)
    goes through its own ``Linear(len(group) -> embed_dim)`` and becomes one more field.

    Args:
        metadata: the data's :class:`DatasetMetadata` (or its dict form).
        embed_dim: width of every field vector (128 in the published models).
        sparse: make the table produce sparse gradients (``nn.Embedding(sparse=True)``), which
            lets AdaGrad-style optimizers update only the rows a batch touched; the optimizer
            must then accept sparse gradients.
        numerical_groups: column indices of each numerical group; ``None`` means one group of
            all ``metadata.n_numerical`` columns. An empty tuple disables numerical fields.

    Output: ``[batch, n_fields + len(numerical_groups), embed_dim]``.
    """

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        embed_dim: int = 128,
        sparse: bool = False,
        numerical_groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        meta = as_metadata(metadata)
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        if any(v < 1 for v in meta.vocab_sizes):
            raise ValueError(f"every vocab size must be >= 1, got {list(meta.vocab_sizes)}")
        self.embed_dim = embed_dim
        self.sparse = sparse
        offsets = torch.zeros(meta.n_fields, dtype=torch.long)
        if meta.n_fields > 1:
            offsets[1:] = torch.cumsum(torch.tensor(meta.vocab_sizes[:-1]), 0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(sum(meta.vocab_sizes), embed_dim, sparse=sparse)
        nn.init.xavier_uniform_(self.table.weight)
        if numerical_groups is None:
            numerical_groups = [tuple(range(meta.n_numerical))] if meta.n_numerical else []
        self.numerical_groups = [tuple(int(i) for i in g) for g in numerical_groups]
        self._whole_numerical = self.numerical_groups == [tuple(range(meta.n_numerical))]
        for i, g in enumerate(self.numerical_groups):
            if not g:
                raise ValueError("a numerical group must hold at least one column")
            self.register_buffer(f"group_{i}", torch.tensor(g, dtype=torch.long), persistent=False)
        self.numerical = nn.ModuleList(nn.Linear(len(g), embed_dim) for g in self.numerical_groups)
        self.n_outputs = meta.n_fields + len(self.numerical_groups)

    @property
    def output_dim(self) -> int:
        """Width of the flattened output (``n_outputs * embed_dim``)."""
        return self.n_outputs * self.embed_dim

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return the field vectors ``[batch, n_outputs, embed_dim]``."""
        fields = [self.table(categorical + self.offsets)]
        for i, proj in enumerate(self.numerical):
            x = numerical if self._whole_numerical else numerical[:, getattr(self, f"group_{i}")]
            fields.append(proj(x).unsqueeze(1))
        return torch.cat(fields, dim=1) if len(fields) > 1 else fields[0]


#: The normalisation layer of every hidden block (the ``norm`` option of every deep backbone).
NORMS = ("batch", "layer", "none")


def check_norm(norm: str) -> str:
    """``norm`` if it is one of :data:`NORMS`; ``ValueError`` naming the option otherwise."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    return norm


class MLP(nn.Sequential):
    """Stack of ``Linear -> BatchNorm1d -> ReLU -> Dropout`` blocks, optionally a final ``Linear``.

    The block is the one of the published AliExpress models. ``output_dim`` adds a plain
    ``Linear`` head (a tower's ``-> 1``, never normalised); without it the output width is
    ``hidden_dims[-1]``. ``norm`` is the normalisation after each hidden ``Linear``:
    ``"batch"`` (``BatchNorm1d``, as published), ``"layer"`` (``LayerNorm``: per row, so it
    does not depend on the batch) or ``"none"``: heavy-tailed inputs then reach the loss
    unnormalised, the setting in which plain training blows up (the stability study's
    ``lr_stability_hard`` experiment).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        dropout: float = 0.2,
        output_dim: int | None = None,
        norm: str = "batch",
    ) -> None:
        check_norm(norm)
        layers: list[nn.Module] = []
        starts: list[int] = []
        width = input_dim
        for h in hidden_dims:
            starts.append(len(layers))
            block: list[nn.Module] = [nn.Linear(width, h)]
            if norm == "batch":
                block.append(nn.BatchNorm1d(h))
            elif norm == "layer":
                block.append(nn.LayerNorm(h))
            layers += [*block, nn.ReLU(), nn.Dropout(dropout)]
            width = h
        starts.append(len(layers))  # where the head, if any, begins
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        super().__init__(*layers)
        self.output_dim = width
        #: Index of each hidden block's first layer (its ``Linear``), then of the head.
        self.block_starts = tuple(starts)

    def split(self, n_blocks: int) -> tuple[list[nn.Module], list[nn.Module]]:
        """The layers of the first ``n_blocks`` hidden blocks, and all the layers after them
        (the other blocks and the head): where one MLP holds a bottom and a tower."""
        cut = self.block_starts[min(n_blocks, len(self.block_starts) - 1)]
        layers = list(self)
        return layers[:cut], layers[cut:]


def has_sparse_embeddings(module: nn.Module) -> bool:
    """Whether any ``nn.Embedding`` / ``nn.EmbeddingBag`` inside ``module`` has ``sparse=True``."""
    return any(isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse for m in module.modules())
