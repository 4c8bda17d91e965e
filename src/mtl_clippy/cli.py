"""One clear line for a mistyped command-line override, before Hydra's multi-line report.

``python train.py modle=ncf`` or ``optim.lrr=0.1`` or ``model=nfc`` makes Hydra print a
paragraph (and its config search path) from deep inside its composition. ``train.py`` calls
:func:`exit_on_bad_overrides` first: it composes the config the way Hydra will (Hydra's
public override parser and compose API) and, where that fails, prints one line::

    error: override 'optim.lrr=0.1': optim has no key 'lrr' (did you mean lr?)
    error: model=nfc: no such option; choose from aitm, esmm, lr, mmoe, ncf, omoe, ple, sb, single_task (did you mean ncf?)

and exits with status 2; otherwise it returns and Hydra runs unchanged. It costs about 0.2 s
and imports neither torch nor Lightning.

The line is worked out from the configs, not from Hydra's wording: Hydra's exception types
say what kind of failure it is (a missing config file carries the group's options), and a
search with the compose API finds the first override Hydra cannot apply after the ones before
it; that override, and the config it met, say what is wrong.

It must never reject what Hydra would run, so it checks only what it models exactly and
otherwise stays out of the way: Hydra's own options (``hydra.*`` and ``hydra/...``
overrides) are left to Hydra; a sweep (``-m model=sb,ncf``) is composed with each override's
first value, and every value of a swept config group is checked against the group's options;
``--help``, ``--info``, ``--version``, shell completion, another config (``-cp``, ``-cn``,
``-cd``, ``hydra.searchpath``) and sweeps it cannot enumerate (``glob``, ``interval``) skip
the check; and any failure that is not a Hydra or OmegaConf composition error is ignored.

Why before Hydra and not inside it: the check must end the process before Lightning is
imported (seconds) and before Hydra makes a run or sweep folder, and ``train.py`` imports
Lightning to register the resolvers that Hydra's own start (``hydra.run.dir``) resolves, in
every process a launcher starts. The price is one more composition per start (about 0.2 s).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Command-line options after which the check stands aside (Hydra does something else).
_OTHER_MODES = (
    "help",
    "hydra_help",
    "info",
    "shell_completion",
    "experimental_rerun",
    "config_path",
    "config_name",
    "config_dir",
)


@dataclass(frozen=True)
class _Item:
    """One command-line override: as typed, and as composed (a sweep's first value)."""

    typed: str
    composed: str
    key: str  # key or config group, without prefix or package
    values: tuple[str, ...]  # a sweep's values; () when not a sweep
    simple_list: bool = False  # a sweep written a,b (not choice(a,b) or range(...))
    kind: str = "CHANGE"  # Hydra's OverrideType: CHANGE (a=1), ADD (+a=1), FORCE_ADD, DEL (~a)
    package: str | None = None  # group@package


class _Skip(Exception):
    """The command line is one the check does not model: leave it to Hydra."""


class _BadOverride(Exception):
    """An override that Hydra cannot parse; the message is the one line to show."""


def exit_on_bad_overrides(
    argv: Sequence[str], config_dir: str | Path, config_name: str = "train"
) -> None:
    """Print ``error: <one line>`` and exit with status 2 if ``argv`` holds a bad override."""
    try:
        message = check_overrides(argv, config_dir, config_name)
    except Exception:  # the check's own failure must never stop a run: Hydra decides
        return
    if message is not None:
        # What the user typed may hold control characters: escaped, the message stays one line.
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        print(f"error: {shown}", file=sys.stderr)
        sys.exit(2)


def check_overrides(
    argv: Sequence[str], config_dir: str | Path, config_name: str = "train"
) -> str | None:
    """The one-line description of the first bad override in Hydra's command line ``argv``
    (without the program name), or None when Hydra can compose it (or when the check does
    not apply: see the module's docstring)."""
    try:
        multirun, overrides = _parse_command_line(argv)
        items = _parse_overrides(overrides)
    except _Skip:
        return None
    except _BadOverride as bad:
        return str(bad)
    plugin_sweeper = _plugin_optuna_sweeper(items)
    if plugin_sweeper is not None:
        return plugin_sweeper
    modes = {o.typed.partition("=")[2].strip() for o in items if o.key == "hydra.mode"}
    multirun = multirun or "MULTIRUN" in modes
    hydra_keys = {o.key for o in items if _is_hydra_key(o.key)}
    items = [o for o in items if not _is_hydra_key(o.key)]

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = _all_groups(loader)
        try:
            cfg = compose(
                config_name, overrides=[o.composed for o in items], return_hydra_config=True
            )
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            return _explain(err, items, groups, config_name, Path(config_dir))
        multirun = multirun or str(cfg.hydra.get("mode")).endswith("MULTIRUN")
        for o in items:
            if not o.values:
                continue
            if not multirun:
                return _sweep_without_multirun(o)
            if o.key in groups:  # every value of a swept config group must be an option
                options = loader.get_group_options(o.key)
                for value in o.values:
                    if value not in options:
                        return _no_such_option(o.key, value, options)
    folder_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if folder_key not in hydra_keys and not _folder_named_by_config(cfg, folder_key, config_dir):
        return _separate_processes_without_run_dir(cfg, multirun)
    return None


def _all_groups(loader: Any) -> set[str]:
    """Every config group Hydra knows (``model``, and nested ones such as ``model/layers``),
    from its config loader; Hydra's own (``hydra/...``) left out."""
    found: set[str] = set()
    parents = [""]
    while parents:
        parent = parents.pop()
        for name in loader.list_groups(parent):
            group = f"{parent}/{name}" if parent else name
            if group != "hydra" and group not in found:
                found.add(group)
                parents.append(group)
    return found


def _folder_named_by_config(cfg: Any, key: str, config_dir: str | Path) -> bool:
    """Whether the composed ``hydra.run.dir`` (or ``hydra.sweep.dir``) is another than the
    default of ``configs/hydra/default.yaml``: an experiment or other config file named it
    (compared unresolved: the default holds a time stamp). True where either is unknown."""
    from omegaconf import OmegaConf

    def raw(node: Any) -> Any:  # without resolving it (no resolver runs)
        parent, _, last = key.removeprefix("hydra.").rpartition(".")
        return OmegaConf.to_container(OmegaConf.select(node, parent), resolve=False).get(last)

    try:
        default = raw(OmegaConf.load(Path(config_dir) / "hydra" / "default.yaml"))
        composed = raw(cfg.hydra)
    except Exception:
        return True
    return default is None or composed is None or str(composed) != str(default)


#: Environment variables of launchers that start each process as a command of its own
#: (SLURM's srun, torchrun, LSF, MPI); only where one is set is Lightning imported to decide.
_LAUNCHER_PREFIXES = ("SLURM_", "LSB_", "OMPI_", "PMI_")
_LAUNCHER_VARS = ("WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def _separate_processes_without_run_dir(cfg: Any, multirun: bool) -> str | None:
    """Several ``python train.py`` started separately (srun, torchrun, one per node) would
    each name a new run (or sweep) folder by its own start time: they must be given one."""
    import os

    resuming = cfg.get("ckpt_path") or cfg.get("resume") not in (None, False, "false", "False", "")
    if resuming and not multirun:
        return None  # the folder of the run they continue, the same for all (resume.py)
    num_nodes = cfg.trainer.get("num_nodes", 1)
    several_nodes = isinstance(num_nodes, int) and num_nodes > 1
    if not several_nodes and not any(
        k.startswith(_LAUNCHER_PREFIXES) or k in _LAUNCHER_VARS for k in os.environ
    ):
        return None
    from mtl_clippy import launch

    if not launch.started_separately(num_nodes):
        return None
    return launch.separate_run_dir_message("hydra.sweep.dir" if multirun else "hydra.run.dir")


# ----------------------------------------------------------------------------- parsing


def _hydra_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """``argv`` read by Hydra's own argument parser: (its options, what it does not know).

    The one private Hydra API of this module, on purpose: Hydra has no public way to read a
    command line as ``@hydra.main`` will (``-m``, ``--cfg job``, ``--info defaults``, ``-cd``),
    and a copy of its options would drift from the Hydra installed. The names read from the
    result (``multirun``, ``overrides`` and those of ``_OTHER_MODES``) are pinned by
    ``tests/test_cli.py::test_hydra_reads_the_command_line_as_the_check_assumes``.
    """
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_known_args(list(argv))


def _parse_command_line(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(multirun, overrides) as Hydra reads ``argv``."""
    # Hydra's parser prints and exits on --version or a bad option: that is Hydra's to do.
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args, unknown = _hydra_arguments(argv)
    except SystemExit:
        raise _Skip from None
    if unknown or any(getattr(args, name, None) for name in _OTHER_MODES):
        raise _Skip
    return bool(args.multirun), list(args.overrides)


def _parse_overrides(overrides: list[str]) -> list[_Item]:
    """Each override as Hydra's public override parser reads it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    items = []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException as err:
            # The grammar's own words (e.g. "missing EQUAL at '<EOF>'") are the exception
            # Hydra's parser was handling; its message wraps them in lines for a terminal.
            context = str(err.__context__ or "")
            detail = "; ".join(line.strip() for line in context.splitlines() if line.strip())
            detail = detail or err.override
            raise _BadOverride(
                f"override {text!r}: cannot parse it: {detail} "
                "(overrides are key=value; quote values with special characters)"
            ) from None
        key = override.key_or_group
        if (
            key == "hydra.searchpath"
            or override.is_interval_sweep()
            or override.value_type is ValueType.GLOB_CHOICE_SWEEP
        ):
            raise _Skip  # another config search path, or a sweep of unknown values
        values: tuple[str, ...] = ()
        composed = text
        if override.is_discrete_sweep():
            values = tuple(override.sweep_string_iterator())
            if not values:
                raise _Skip
            composed = f"{override.get_key_element()}={values[0]}"
        simple = override.value_type is ValueType.SIMPLE_CHOICE_SWEEP
        items.append(
            _Item(text, composed, key, values, simple, override.type.name, override.package)
        )
    return items


PLUGIN_OPTUNA = (
    "hydra/sweeper=optuna is the Optuna plugin's own config: no search space and direction "
    "minimize, so its trials are identical runs and the lowest AUC would win; use "
    "hydra/sweeper=tune (configs/hydra/sweeper/tune.yaml), or give both "
    "hydra.sweeper.direction and hydra.sweeper.params"
)


def _plugin_optuna_sweeper(items: list[_Item]) -> str | None:
    """``hydra/sweeper=optuna`` typed without a direction and a search space: one line
    pointing to ``hydra/sweeper=tune`` (the plugin would run it silently)."""
    typed = {o.key: o.typed.partition("=")[2].strip() for o in items}
    if typed.get("hydra/sweeper") != "optuna":
        return None
    has_params = any(k.startswith("hydra.sweeper.params") for k in typed)
    if "hydra.sweeper.direction" in typed and has_params:
        return None
    return PLUGIN_OPTUNA


def _is_hydra_key(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


# ----------------------------------------------------------------------------- diagnosis


def _explain(
    err: BaseException, items: list[_Item], groups: set[str], config_name: str, config_dir: Path
) -> str:
    """One line for Hydra's composition error ``err`` about ``items`` (within an initialised
    Hydra): what is wrong with the first override that Hydra cannot apply."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        message = _no_such_option(group, choice, list(err.options))
        if not any(o.key == group for o in items):  # chosen by a config file
            where = _chosen_in(config_name, config_dir, items, group, choice, err.options)
            message = f"{where}: {message}" if where else message
        return message

    # Hydra applies the config group choices first, then the other overrides in order; a
    # list of them that fails still fails with more after it: the first failing is bisected.
    in_order = [o for o in items if _is_group(o, groups)]
    in_order += [o for o in items if not _is_group(o, groups)]
    good, bad, met = 0, len(in_order), _compose_or_none(config_name, [])
    if met is None:
        return _one_line(err)  # the config fails without any override
    while bad - good > 1:
        middle = (good + bad) // 2
        cfg = _compose_or_none(config_name, [o.composed for o in in_order[:middle]])
        if cfg is None:
            bad = middle
        else:
            good, met = middle, cfg
    return _what_is_wrong(in_order[bad - 1], met, groups) or _one_line(err)


def _is_group(item: _Item, groups: set[str]) -> bool:
    return item.key in groups


def _compose_or_none(config_name: str, overrides: list[str]) -> Any:
    """The config of ``overrides`` (with Hydra's part), or None where Hydra cannot compose it."""
    from hydra import compose

    try:
        return compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception:
        return None


def _lookup(tree: Any, key: str) -> Any:
    """The value at the dotted ``key`` of the plain ``tree``, or None where there is none."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _what_is_wrong(item: _Item, cfg: Any, groups: set[str]) -> str | None:
    """Why Hydra cannot apply ``item`` to ``cfg`` (the config of the overrides before it),
    or None where it is nothing this module models."""
    from omegaconf import OmegaConf

    said = f"override {item.typed!r}: "
    tree = OmegaConf.to_container(cfg, resolve=False)
    choices = tree.pop("hydra", {}).get("runtime", {}).get("choices", {})
    if _is_group(item, groups):
        # Hydra refuses +group=x where the defaults list has the group, even as `group: null`
        # (its choice is then None); a group put at a package is chosen as group@package.
        name = f"{item.key}@{item.package}" if item.package else item.key
        if item.kind == "ADD" and name in choices:
            fix = item.typed.lstrip("+")
            return said + f"{name} is already chosen (to change it, write {fix})"
        return None
    if item.package is not None:
        return None
    if not item.key:  # "~" or "=1"
        if item.kind == "DEL":
            return said + "nothing named to delete (write ~key or ~group)"
        return said + "no key before '=' (overrides are key=value)"
    found = _has_key(tree, item.key)
    if item.kind == "CHANGE":
        return said + _no_such_key(item.key, tree, groups, item)
    if item.kind == "ADD" and found:
        return said + f"{item.key} already exists (to change it, write {item.typed[1:]})"
    if item.kind == "DEL" and not found:
        return said + f"there is no {item.key} to delete"
    if item.kind == "DEL" and "=" in item.typed:
        actual = _lookup(tree, item.key)
        return said + f"{item.key} is {actual}, not {item.typed.partition('=')[2]}"
    return None


def _has_key(tree: Any, key: str) -> bool:
    parent, _, last = key.rpartition(".")
    node = _lookup(tree, parent) if parent else tree
    return isinstance(node, dict) and last in node


def _chosen_in(
    config_name: str,
    config_dir: Path,
    items: list[_Item],
    group: str,
    choice: str,
    options: Sequence[str],
) -> str | None:
    """The config file (as Hydra names it, e.g. ``experiment/x``) whose defaults list
    chooses the missing ``choice`` for ``group``, among the files this command line composes;
    None where it cannot be told.

    Hydra's error names the config the choice was applied in (for an ``override /group``,
    the primary config), not the file that made it. The files composed are read from the
    config with the group's first valid option put on the command line: its
    ``hydra.runtime.choices`` (what was chosen for each group) name them, and the one whose
    defaults list has ``group: choice`` (an absolute ``/group`` or one relative to the
    file's own group) is the one.
    """
    from omegaconf import OmegaConf

    if not options:
        return None
    cfg = _compose_or_none(config_name, [o.composed for o in items] + [f"{group}={options[0]}"])
    if cfg is None:
        return None
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    files = [config_name] + [
        f"{g}/{c}" for g, c in choices.items() if c is not None and not _is_hydra_key(g)
    ]
    for name in files:
        path = config_dir / f"{name}.yaml"
        try:
            defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []
        except Exception:
            continue
        own_group = name.rpartition("/")[0]
        for entry in defaults:
            for key, value in entry.items() if isinstance(entry, dict) else ():
                words = key.split()  # "override /model@pkg", "optional layers"
                chosen = words[-1].partition("@")[0] if words else ""
                if chosen.startswith("/"):
                    chosen = chosen[1:]
                elif own_group:
                    chosen = f"{own_group}/{chosen}"
                if chosen == group and str(value) == choice:
                    return name
    return None


# ----------------------------------------------------------------------------- messages


def _sweep_without_multirun(item: _Item) -> str:
    if item.simple_list:
        key, _, value = item.typed.partition("=")
        return (
            f"override {item.typed!r}: several values: add -m to sweep over them, or write "
            f"{key}=[{value}] for a list, or quote the value for a string"
        )
    return f"override {item.typed!r}: a sweep needs -m (--multirun)"


def _no_such_option(group: str, choice: str, options: list[str]) -> str:
    return f"{group}={choice}: no such option; choose from {', '.join(options)}" + _did_you_mean(
        choice, options
    )


def _no_such_key(key: str, tree: dict[str, Any], groups: set[str], item: _Item) -> str:
    """Why ``key`` is not in ``tree``: the first missing (or non-mapping) step of its path."""
    add = f" (to add it, write +{item.typed})"
    parts = key.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if isinstance(node, list) and part.isdigit():  # Hydra sets a list's item by index
            if int(part) >= len(node):
                return f"{where} has {len(node)} items: index {part} is outside the list"
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            return f"{where} is {node!r}, not a node with keys"
        if part not in node:
            candidates = [str(k) for k in node]
            if depth == 0:  # the top-level config groups (a nested one is named with "/")
                candidates = sorted({*candidates, *(g for g in groups if "/" not in g)})
                hint = _did_you_mean(part, candidates) or add
                return f"no key or config group {part!r}{hint}"
            return f"{where} has no key {part!r}" + (_did_you_mean(part, candidates) or add)
        node = node[part]
    return f"cannot override {key!r}{add}"


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _one_line(err: BaseException) -> str:
    """Hydra's message in one line, up to its first blank line (where Hydra lists options or
    its config search path)."""
    while not str(err).strip() and err.__cause__ is not None:
        err = err.__cause__
    head = str(err).strip().split("\n\n")[0]
    return "; ".join(line.strip().rstrip(".") for line in head.splitlines() if line.strip()) or (
        type(err).__name__
    )
