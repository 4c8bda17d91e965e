"""Optimizer parameter groups from the backbone's parameter roles (the ``param_groups`` key).

``param_groups`` maps a role (:data:`~mtl_clippy.models.backbones.base.ROLES`) to optimizer
options for that role's parameters, e.g. ``{"embeddings": {"lr": 0.01}}``; every parameter
of a role without an entry stays in one default group, with the optimizer config's options.
So ``configs/param_groups/clip_dense_only.yaml`` (infinite Clippy thresholds for
``embeddings``) clips only the dense parameters, with one config key. A role the backbone
does not have (``gates`` of SharedBottom) is skipped, so one choice fits every backbone.

With no entries the optimizer gets ``module.parameters()`` as one group, exactly as without
this option. The groups are built in a fixed order (the default group, then the roles in
:data:`ROLES` order), each named by its role (``name``, which Lightning's learning-rate
monitor uses in its tags), so a checkpoint's optimizer state loads back into the same groups.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from mtl_clippy.models.backbones.base import ROLES, RoleParameters, backbone_of

#: The config key (top level of configs/train.yaml, group configs/param_groups/).
KEY = "param_groups"
#: The name of the group of every parameter whose role has no entry.
DEFAULT_GROUP = "default"


def param_groups_problem(
    spec: Any, options: Collection[str] | None = None, optimizer: str = "the optimizer"
) -> str | None:
    """The one-line message for the first bad entry of a ``param_groups`` value, or None.

    ``spec`` must be null or a mapping of roles to mappings of options; with ``options``
    (the option names of the optimizer called ``optimizer``), each option must be one of them.
    The message names the key (``param_groups.embedding: 'embedding' is not a parameter
    role; choose from ...``).
    """
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        return (
            f"{KEY}: expected null or a mapping of roles ({', '.join(ROLES)}) to optimizer "
            f"options, got {spec!r}"
        )
    for role, overrides in spec.items():
        key = f"{KEY}.{role}"
        if role not in ROLES:
            return f"{key}: {role!r} is not a parameter role; choose from {', '.join(ROLES)}"
        if not isinstance(overrides, Mapping):
            return (
                f"{key}: expected a mapping of optimizer options (e.g. lr: 0.01), got {overrides!r}"
            )
        for option in overrides:
            if options is not None and option not in options:
                return (
                    f"{key}.{option}: {option!r} is not an option of {optimizer}; choose from "
                    f"{', '.join(sorted(options))}"
                )
    return None


def build_param_groups(
    module: nn.Module, roles: RoleParameters, spec: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The optimizer's groups over every trainable-or-not parameter of ``module``: one per role
    of ``spec`` that ``roles`` (the backbone's :meth:`Backbone.parameter_roles`) holds, with
    its options, and one default group of all the others (left out when empty)."""
    grouped = {role: [p for _, p in roles.get(role, [])] for role in ROLES if role in spec}
    taken = {id(p) for params in grouped.values() for p in params}
    rest = [p for p in module.parameters() if id(p) not in taken]
    groups = [{"params": rest, "name": DEFAULT_GROUP}] if rest else []
    for role, params in grouped.items():
        if params:
            groups.append({"params": params, "name": role, **dict(spec[role])})
    return groups


def param_groups_config(value: Any) -> dict[str, dict[str, Any]] | None:
    """``value`` (a config node or a mapping) as plain dicts for the hyper-parameters; None
    when it has no entries. ``ValueError`` naming the key for a bad role or shape."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    message = param_groups_problem(value)
    if message:
        raise ValueError(message)
    if not value:
        return None
    return {str(role): dict(options) for role, options in value.items()}


def optimizer_with_groups(
    factory: Callable[[Any], torch.optim.Optimizer],
    module: nn.Module,
    spec: Mapping[str, Mapping[str, Any]] | None,
) -> torch.optim.Optimizer:
    """``factory`` (``params -> Optimizer``) called with ``module``'s parameters: in groups by
    the roles of its :class:`Backbone` when ``spec`` has entries, else as one group.
    ``ValueError`` naming the key for an option the optimizer does not have, or a backbone
    that declares no roles."""
    if not spec:
        return factory(module.parameters())
    backbone = backbone_of(module)
    if backbone is None:
        raise ValueError(
            f"{KEY}: the backbone declares no parameter roles (it is not a "
            "mtl_clippy.models.Backbone); set param_groups=none"
        )
    optimizer = factory(build_param_groups(module, backbone.parameter_roles(), spec))
    message = param_groups_problem(spec, optimizer.defaults, type(optimizer).__name__)
    if message:
        raise ValueError(message)
    return optimizer
