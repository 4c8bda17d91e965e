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

import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from mtl_clippy.models.backbones.base import ROLES, RoleParameters, module_parameter_roles

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
    roles = module_parameter_roles(module)  # every backbone's, as the telemetry's
    if roles is None:
        raise ValueError(
            f"{KEY}: the backbone declares no parameter roles (it is not a "
            "mtl_clippy.models.Backbone); set param_groups=none"
        )
    try:
        optimizer = factory(build_param_groups(module, roles, spec))
    except (TypeError, ValueError):
        # a group the optimizer refuses: name the entry when it is one of them
        message = group_options_problem(factory, spec)
        if message:
            raise ValueError(message) from None
        raise
    name = type(optimizer).__name__
    message = param_groups_problem(spec, optimizer.defaults, name) or group_options_problem(
        factory, spec
    )
    if message:
        raise ValueError(message)
    return optimizer


def group_options_problem(
    factory: Callable[..., torch.optim.Optimizer], spec: Mapping[str, Mapping[str, Any]] | None
) -> str | None:
    """The one-line message for the first ``param_groups`` option value the optimizer would
    refuse, or None. torch validates an optimizer's constructor arguments, never a group's
    options (``lr_decay='abc'`` in a group fails at the first step, ``maximize='abc'`` does
    gradient ascent), so each role's options are checked by the optimizer's own constructor:
    ``factory`` (a ``functools.partial`` of the optimizer, as ``optim`` configs build) called
    on a one-element dummy parameter with the role's options as keyword arguments, one option
    at a time (the message names ``param_groups.<role>.<option>``), then all of the role's
    together (``param_groups.<role>``, e.g. Clippy's clip_accumulator_update with
    use_standard_accumulator_update). A value of another type than the optimizer's default
    (text for a number, anything but true/false for a flag) is refused too.

    Checks nothing when ``factory`` takes no keyword options, or the optimizer's own options
    already fail (the build reports those)."""
    if not spec or not isinstance(factory, functools.partial):
        return None

    def refusal(options: Mapping[str, Any]) -> str | None:
        try:
            factory([torch.zeros(1, requires_grad=True)], **options)
        except (TypeError, ValueError) as exc:
            return " ".join(str(exc).split()) or type(exc).__name__
        return None

    try:
        base = factory([torch.zeros(1, requires_grad=True)])
    except Exception:  # the optimizer's own options: the build reports them
        return None
    name = type(base).__name__
    for role, overrides in spec.items():
        key = f"{KEY}.{role}"
        for option, value in overrides.items():
            if option not in base.defaults:
                continue  # param_groups_problem names an unknown option
            default = base.defaults[option]
            if isinstance(default, bool) and not isinstance(value, bool):
                return (
                    f"{key}.{option}: expected true or false (an option of {name}), got {value!r}"
                )
            number = isinstance(default, int | float) and not isinstance(default, bool)
            if number and (isinstance(value, bool) or not isinstance(value, int | float)):
                return f"{key}.{option}: expected a number (an option of {name}), got {value!r}"
            refused = refusal({option: value})
            if refused:
                return f"{key}.{option}: {name} refuses {value!r}: {refused}"
        refused = refusal(overrides)
        if refused:
            return f"{key}: {name} refuses these options together: {refused}"
    return None
