"""One clear line for a mistyped command-line override, before Hydra's multi-line report.

``python train.py modle=ncf`` or ``optim.lrr=0.1`` or ``model=nfc`` makes Hydra print a
paragraph (and its config search path) from deep inside its composition. ``train.py`` calls
:func:`exit_on_bad_overrides` first: it composes the config the way Hydra will, with Hydra's
own argument parser, override parser and compose API, and on failure prints one line::

    error: override 'optim.lrr=0.1': optim has no key 'lrr' (did you mean lr?)
    error: model=nfc: no such option; choose from aitm, esmm, lr, mmoe, ncf, omoe, ple, sb, single_task (did you mean ncf?)

and exits with status 2; otherwise it returns and Hydra runs unchanged. It costs about 0.2 s
and imports neither torch nor Lightning.

It must never reject what Hydra would run, so it checks only what it models exactly and
otherwise stays out of the way: Hydra's own options (``hydra.*`` and ``hydra/...``
overrides) are left to Hydra; a sweep (``-m model=sb,ncf``) is composed with each override's
first value, and every value of a swept config group is checked against the group's options;
``--help``, ``--info``, ``--version``, shell completion, another config (``-cp``, ``-cn``,
``-cd``, ``hydra.searchpath``) and sweeps it cannot enumerate (``glob``, ``interval``) skip
the check; and any failure that is not a Hydra or OmegaConf composition error is ignored.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import sys
from collections.abc import Callable, Sequence
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


class _Skip(Exception):
    """The command line is one the check does not model: leave it to Hydra."""


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
        groups = set(loader.list_groups("")) - {"hydra"}
        try:
            cfg = compose(
                config_name, overrides=[o.composed for o in items], return_hydra_config=True
            )
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            return _explain(err, items, lambda keep: _compose_quietly(config_name, keep), groups)
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


def _folder_named_by_config(cfg: Any, key: str, config_dir: str | Path) -> bool:
    """Whether the composed ``hydra.run.dir`` (or ``hydra.sweep.dir``) is another than the
    default of ``configs/hydra/default.yaml``: an experiment or other config file named it
    (compared unresolved: the default holds a time stamp). True where either is unknown."""
    from omegaconf import DictConfig, OmegaConf

    def raw(node: Any, path: str) -> Any:  # without resolving it (no resolver runs)
        for part in path.split("."):
            if not isinstance(node, DictConfig):
                return None
            node = node._get_node(part, throw_on_missing_key=False)
        return None if node is None else node._value()

    try:
        default = raw(OmegaConf.load(Path(config_dir) / "hydra" / "default.yaml"), key[6:])
        composed = raw(cfg, key)
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


class _BadOverride(Exception):
    """An override that Hydra cannot parse; the message is the one line to show."""


def _parse_command_line(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(multirun, overrides) as Hydra's own argument parser reads ``argv``."""
    from hydra._internal.utils import get_args_parser

    # Hydra's parser prints and exits on --version or a bad option: that is Hydra's to do.
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args, unknown = get_args_parser().parse_known_args(list(argv))
    except SystemExit:
        raise _Skip from None
    if unknown or any(getattr(args, name, None) for name in _OTHER_MODES):
        raise _Skip
    return bool(args.multirun), list(args.overrides)


def _parse_overrides(overrides: list[str]) -> list[_Item]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    items = []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException as err:
            raise _BadOverride(
                f"override {text!r}: cannot parse it: {_parse_detail(err)}"
            ) from None
        key = override.key_or_group
        if key == "hydra.searchpath" or override.is_interval_sweep():
            raise _Skip  # another config search path, or a sweep of unknown values
        if override.value_type is not None and override.value_type.name == "GLOB_CHOICE_SWEEP":
            raise _Skip
        values: tuple[str, ...] = ()
        composed = text
        if override.is_discrete_sweep():
            values = tuple(override.sweep_string_iterator())
            if not values:
                raise _Skip
            composed = f"{override.get_key_element()}={values[0]}"
        simple = (
            override.value_type is not None and override.value_type.name == "SIMPLE_CHOICE_SWEEP"
        )
        items.append(_Item(text, composed, key, values, simple))
    return items


def _parse_detail(err: Exception) -> str:
    lines = [
        line.strip()
        for line in str(err).splitlines()
        if line.strip() and not line.startswith(("Error parsing override", "See https://"))
    ]
    return "; ".join(lines) + " (overrides are key=value; quote values with special characters)"


def _is_hydra_key(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _compose_quietly(config_name: str, overrides: list[str]) -> Any:
    """The config of ``overrides``, or None: for suggestions only."""
    from hydra import compose

    try:
        return compose(config_name, overrides=overrides)
    except Exception:
        return None


# ----------------------------------------------------------------------------- messages

_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")
_ALREADY_THERE = re.compile(r"Could not append to config\. An item is already at '([^']+)'")
_NOTHING_TO_DELETE = re.compile(r"Could not delete from config\. '([^']+)' does not exist")
_OTHER_VALUE = re.compile(r"The value of '([^']+)' is (.*) and not (.*)\.$", re.MULTILINE)
_MULTIPLE_VALUES = re.compile(r"Multiple values for ([^ .]+)\.")
_MISSING_IN = re.compile(r"^In '([^']+)':")


def _explain(
    err: BaseException,
    items: list[_Item],
    compose_with: Callable[[list[str]], Any],
    groups: set[str],
) -> str:
    """One line for Hydra's composition error ``err`` (several lines) about ``items``;
    ``compose_with(overrides)`` gives a config to look for close names in (or None)."""
    from hydra.errors import MissingConfigException

    text = str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        where = _MISSING_IN.search(text)
        from_cli = any(o.key == group for o in items)
        message = _no_such_option(group, choice, list(err.options))
        if where and not from_cli:  # chosen by a config file, e.g. an experiment
            message = f"{where.group(1)}: {message}"
        return message

    def about(key: str) -> _Item | None:
        return next((o for o in items if o.key == key), None)

    def said(item: _Item | None, message: str) -> str:
        return message if item is None else f"override {item.typed!r}: {message}"

    if match := _COULD_NOT_OVERRIDE.search(text):
        key = match.group(1)
        item = about(key)
        if "@" not in key:
            index = items.index(item) if item is not None else len(items)
            # The config the failing override met: every override before it, every group choice.
            keep = [o.composed for i, o in enumerate(items) if i < index or o.key in groups]
            return said(item, _no_such_key(key, compose_with(keep), groups, item))
    if match := _ALREADY_THERE.search(text):
        key = match.group(1)
        item = about(key)
        fix = f" (to change it, write {item.typed[1:]})" if item is not None else ""
        return said(item, f"{key} already exists{fix}")
    if match := _NOTHING_TO_DELETE.search(text):
        return said(about(match.group(1)), f"there is no {match.group(1)} to delete")
    if match := _OTHER_VALUE.search(text):
        key, actual, expected = match.groups()
        return said(about(key), f"{key} is {actual}, not {expected}")
    if match := _MULTIPLE_VALUES.search(text):
        group = match.group(1)
        item = next((o for o in items if o.key == group and o.typed.startswith("+")), None)
        fix = f" (to change it, write {item.typed.lstrip('+')})" if item is not None else ""
        return said(item, f"{group} is already chosen{fix}")
    return _one_line(err)


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


def _no_such_key(key: str, cfg: Any, groups: set[str], item: _Item | None) -> str:
    """Why ``key`` is not in ``cfg``: the first missing (or non-mapping) step of its path."""
    from omegaconf import DictConfig, OmegaConf

    add = f" (to add it, write +{item.typed})" if item is not None else ""
    parts = key.split(".")
    if cfg is None:
        return f"no key {key!r} in the config{add}"
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else {}
    node: Any = tree
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if not isinstance(node, dict):
            return f"{where} is {node!r}, not a node with keys"
        if part not in node:
            candidates = [str(k) for k in node]
            if depth == 0:
                candidates = sorted({*candidates, *groups})
                hint = _did_you_mean(part, candidates) or add
                return f"no key or config group {part!r}{hint}"
            return f"{where} has no key {part!r}" + (_did_you_mean(part, candidates) or add)
        node = node[part]
    return f"cannot override {key!r}{add}"


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _one_line(err: BaseException) -> str:
    """Hydra's message in one line, without its config search path."""
    while not str(err).strip() and err.__cause__ is not None:
        err = err.__cause__
    lines = []
    for line in str(err).splitlines():
        if line.startswith(("Config search path", "Search path")):
            break
        if line.strip():
            lines.append(line.strip().rstrip("."))
    return "; ".join(lines) or type(err).__name__
