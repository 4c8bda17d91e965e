"""The base of every backbone: the shared arguments, the input layer, the towers, the roles.

A backbone maps ``(categorical [B, F], numerical [B, N])`` to logits ``[B, n_tasks]``. Every
one of ours reads the same input layer (:class:`~mtl_clippy.models.layers.FeatureEmbedding`)
and ends in one tower MLP per task; only what lies between differs. :class:`Backbone` owns
the common part, so that a new backbone is one small class: it builds its middle in
``__init__`` (after ``super().__init__``), calls :meth:`Backbone.add_towers` and implements
:meth:`Backbone.tower_inputs`.

It also declares the **role** of each parameter, from the module it lives in (never from its
name), for the optimizer telemetry and the optimizer's parameter groups (``param_groups``):

* ``embeddings``: the ``nn.Embedding`` tables of the input layer (sparse gradients with
  ``sparse_embeddings: true``);
* ``numerical``: the ``Linear`` projections of the numerical features, the dense part of the
  input layer (logistic regression: its linear term and bias);
* ``bottom``: what the tasks share or mix between the input layer and the towers: a shared
  bottom MLP, the experts of MMoE/OMoE/PLE, NCF's MLP branch, AITM's bottoms and transfer
  layers (experts are ``bottom``: hard and soft sharing are the same place in the network);
* ``gates``: the softmax gates of the mixture-of-experts backbones (MetaHeac's task
  embeddings too: they only feed its gates);
* ``towers``: the per-task networks that end in one logit (ESMM's and SingleTask's too: the
  ``tower_dims`` part of each task's MLP; MetaHeac's critics, shared by the tasks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models.layers import MLP, FeatureEmbedding, as_metadata, check_norm

#: Every role a parameter can have, in the order groups are listed.
ROLES: tuple[str, ...] = ("embeddings", "numerical", "bottom", "gates", "towers")

RoleParameters = dict[str, list[tuple[str, nn.Parameter]]]


class Backbone(nn.Module):
    """A multitask backbone over the shared input layer, with a tower per task.

    Keyword arguments shared by every deep backbone (the ``model.*`` keys of its config):

    Args:
        metadata: the data's :class:`DatasetMetadata` (or its dict form): field sizes, tasks.
        embed_dim: width of each field vector of the input layer.
        tower_dims: hidden widths of each task tower (which then ends in ``-> 1``).
        dropout: dropout after every hidden layer.
        sparse_embeddings: sparse gradients for the embedding table.
        norm: the normalisation of every hidden MLP block: ``"batch"`` (BatchNorm, as
            published), ``"layer"`` (LayerNorm) or ``"none"``.

    ``self.embedding`` is the input layer (built first, so that a seed gives the same weights
    as before the base existed); a subclass with ``shared_input = False`` builds its own with
    :meth:`new_input` and declares it with :meth:`declare_input`. The default forward is
    ``tower_logits(tower_inputs(embedding(categorical, numerical)))``.
    """

    #: Whether the base builds ``self.embedding`` (SingleTask and LogisticRegression do not).
    shared_input: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give the subclass its whole signature: its own arguments, then the shared keyword
        arguments its ``**options`` passes to the base (``inspect.signature``, ``help``)."""
        super().__init_subclass__(**kwargs)
        own = inspect.signature(cls.__init__)
        # without self, nor a *positional that only names the class in its TypeError (MMoE)
        params = [p for p in list(own.parameters.values())[1:] if p.kind is not p.VAR_POSITIONAL]
        if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
            names = {p.name for p in params}
            shared = inspect.signature(Backbone.__init__).parameters.values()
            params = params[:-1] + [
                p for p in shared if p.kind is p.KEYWORD_ONLY and p.name not in names
            ]
        cls.__signature__ = own.replace(parameters=params)

    def __init__(
        self,
        metadata: DatasetMetadata | Mapping[str, Any],
        *,
        embed_dim: int = 128,
        tower_dims: Sequence[int] = (128, 64),
        dropout: float = 0.2,
        sparse_embeddings: bool = False,
        norm: str = "batch",
        **unexpected: Any,
    ) -> None:
        if unexpected:  # the message Python gives, naming the backbone rather than the base
            raise TypeError(
                f"{type(self).__name__}.__init__() got an unexpected keyword argument "
                f"{next(iter(unexpected))!r}"
            )
        super().__init__()
        self.metadata = as_metadata(metadata)
        self.n_tasks = self.metadata.n_tasks
        self.embed_dim = embed_dim
        self.tower_dims = tuple(tower_dims)
        self.dropout = dropout
        self.sparse_embeddings = sparse_embeddings
        self.norm = check_norm(norm)
        self._roles: list[tuple[nn.Module, str]] = []
        if self.shared_input:
            self.embedding = self.declare_input(self.new_input())

    # -- building ------------------------------------------------------------------------------

    def numerical_groups(self) -> Sequence[Sequence[int]] | None:
        """The column groups of the numerical features, one field vector each (``None``: one
        group of all columns). NCF splits them into its user and item sides."""
        return None

    def new_input(self, embed_dim: int | None = None) -> FeatureEmbedding:
        """A new input layer with this backbone's settings (``embed_dim`` overrides the width)."""
        return FeatureEmbedding(
            self.metadata,
            self.embed_dim if embed_dim is None else embed_dim,
            sparse=self.sparse_embeddings,
            numerical_groups=self.numerical_groups(),
        )

    def new_mlp(
        self, input_dim: int, hidden_dims: Sequence[int], output_dim: int | None = None
    ) -> MLP:
        """An MLP with this backbone's dropout and norm."""
        return MLP(input_dim, hidden_dims, self.dropout, output_dim=output_dim, norm=self.norm)

    def add_towers(self, input_dim: int) -> nn.ModuleList:
        """Build ``self.towers``: per task, ``MLP(input_dim, tower_dims) -> 1`` (role towers)."""
        self.towers = self.declare(
            "towers",
            nn.ModuleList(
                self.new_mlp(input_dim, self.tower_dims, output_dim=1) for _ in range(self.n_tasks)
            ),
        )
        return self.towers

    # -- roles ---------------------------------------------------------------------------------

    def declare(self, role: str, *modules: nn.Module) -> Any:
        """Give ``role`` to every parameter inside ``modules`` (the innermost declaration wins);
        returns the first module, so that ``self.x = self.declare(role, Module(...))``."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        self._roles.extend((m, role) for m in modules)
        return modules[0] if modules else None

    def declare_input(self, layer: FeatureEmbedding) -> FeatureEmbedding:
        """Declare an input layer: its table is ``embeddings``, its projections ``numerical``."""
        self.declare("embeddings", layer.table)
        if len(layer.numerical):
            self.declare("numerical", layer.numerical)
        return layer

    def declare_split(self, mlp: MLP, n_bottom: int) -> MLP:
        """Declare an MLP whose first ``n_bottom`` hidden blocks are ``bottom`` and whose other
        blocks and head are ``towers`` (one network per task: ESMM, SingleTask)."""
        bottom, tower = mlp.split(n_bottom)
        if bottom:
            self.declare("bottom", *bottom)
        if tower:
            self.declare("towers", *tower)
        return mlp

    def parameter_roles(self) -> RoleParameters:
        """Role -> ``[(name, parameter), ...]`` (names as in ``named_parameters()``), in
        :data:`ROLES` order, roles without parameters left out. Every parameter is in exactly
        one role; one in no declared module is a ``ValueError`` naming it.

        The declarations of the backbones nested inside this one count too (a backbone that
        wraps a ``SharedBottom`` need not declare its modules again); a module declared both
        here and by a nested backbone takes this backbone's role (the outer one decides)."""
        declared: dict[int, str] = {}
        for m in reversed(list(self.modules())):  # nested backbones first, this one last
            if isinstance(m, Backbone):
                declared.update({id(module): role for module, role in m._roles})
        role_at: dict[str, str | None] = {}
        found: dict[str, list[tuple[str, nn.Parameter]]] = {r: [] for r in ROLES}
        seen: set[int] = set()
        for path, module in self.named_modules():  # parents before their children
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            role = declared.get(id(module), role_at.get(parent) if path else None)
            role_at[path] = role
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                name = f"{path}.{pname}" if path else pname
                if role is None:
                    raise ValueError(
                        f"{type(self).__name__}: parameter {name!r} has no role; declare its "
                        f"module with Backbone.declare(role, module), role one of {', '.join(ROLES)}"
                    )
                found[role].append((name, p))
        return {r: found[r] for r in ROLES if found[r]}

    # -- forward -------------------------------------------------------------------------------

    def tower_inputs(self, fields: Tensor) -> Tensor | Sequence[Tensor]:
        """What the towers read, from the input layer's field vectors ``[B, n_fields, D]``:
        one tensor for every tower, or one per task."""
        raise NotImplementedError(f"{type(self).__name__} must implement tower_inputs")

    def tower_logits(self, inputs: Tensor | Iterable[Tensor]) -> Tensor:
        """Each task's tower on its input (or all on one), concatenated: ``[B, n_tasks]``."""
        if isinstance(inputs, Tensor):
            inputs = [inputs] * len(self.towers)
        return torch.cat([t(h) for t, h in zip(self.towers, inputs, strict=True)], dim=1)

    def forward(self, categorical: Tensor, numerical: Tensor) -> Tensor:
        """Return per-task logits ``[batch, n_tasks]``."""
        return self.tower_logits(self.tower_inputs(self.embedding(categorical, numerical)))

    def training_outputs(
        self,
        categorical: Tensor,
        numerical: Tensor,
        labels: Tensor,
        loss: Callable[[Tensor, Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """What the training step's loss is taken on: ``(logits, labels)``. The forward on the
        whole batch here; a backbone that trains differently from how it predicts (MetaHeac's
        meta-learning step) overrides it, and may call ``loss(logits, labels)``, the module's
        training loss (a scalar), on parts of the batch."""
        return self(categorical, numerical), labels


def backbone_of(module: Any) -> Backbone | None:
    """The first :class:`Backbone` inside ``module`` (itself included), or ``None``: the
    first of :func:`outermost_backbones`. Code that needs every parameter's role uses
    :func:`module_parameter_roles`, which covers all of them."""
    found = outermost_backbones(module)
    return found[0] if found else None


def outermost_backbones(module: Any) -> list[Backbone]:
    """Every :class:`Backbone` inside ``module`` (itself included) that is not inside another
    one, in module order: the backbones whose :meth:`~Backbone.parameter_roles` together
    cover every parameter that has a role (an ensemble of two backbones has two)."""
    found: list[Backbone] = []
    seen: set[int] = set()

    def walk(m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        if isinstance(m, Backbone):
            found.append(m)  # its own parameter_roles covers the backbones inside it
            return
        for child in m.children():
            walk(child)

    if isinstance(module, nn.Module):
        walk(module)
    return found


def module_parameter_roles(module: Any) -> RoleParameters | None:
    """The roles of ``module``'s parameters: the :meth:`~Backbone.parameter_roles` of every
    backbone of :func:`outermost_backbones` together, names as in
    ``module.named_parameters()``, in :data:`ROLES` order; ``None`` when it holds no backbone.
    A parameter outside every backbone (a module of your own next to it) has no role here.

    The one place that maps parameters to roles for the optimizer's groups
    (``param_groups``) and the optimizer telemetry, so that both always agree. ``ValueError``
    (naming the parameter) for a backbone that leaves a module undeclared."""
    backbones = outermost_backbones(module)
    if not backbones:
        return None
    path_of = {id(m): path for path, m in module.named_modules()}
    found: dict[str, list[tuple[str, nn.Parameter]]] = {r: [] for r in ROLES}
    seen: set[int] = set()
    for backbone in backbones:
        prefix = path_of.get(id(backbone), "")
        for role, named in backbone.parameter_roles().items():
            for name, p in named:
                if id(p) not in seen:  # shared between two backbones: the first one's role
                    seen.add(id(p))
                    found[role].append((f"{prefix}.{name}" if prefix else name, p))
    return {r: found[r] for r in ROLES if found[r]}
