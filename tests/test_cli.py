"""The one-line check of command-line overrides (``mtl_clippy.cli``): what it reads from
Hydra, and that a typo of any real name gets a "did you mean" naming it.

The exact messages of the common mistakes, and the command lines that must pass, are in
``tests/test_bad_input.py``; these tests cover what is drawn at random and what is built on
Hydra's internals (pinned here so that a Hydra upgrade that changes them fails loudly).
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from mtl_clippy import cli
from mtl_clippy.cli import check_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

#: Each check composes the config two or three times (about 0.1 s each).
FEW = settings(max_examples=max(10, settings.default.max_examples // 4))


def _groups() -> dict[str, list[str]]:
    """Each config group of ``configs/`` (a folder) and its options (its YAML files)."""
    return {
        folder.name: sorted(p.stem for p in folder.glob("*.yaml"))
        for folder in sorted(CONFIGS.iterdir())
        if folder.is_dir() and folder.name != "hydra"
    }


GROUPS = _groups()


def _config() -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train"), resolve=False)


def _keys(tree: dict, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, names beside it) for every key below the top level of ``tree``."""
    found = []
    for name, value in tree.items():
        if prefix:
            found.append((f"{prefix}{name}", [str(k) for k in tree]))
        if isinstance(value, dict):
            found.extend(_keys(value, f"{prefix}{name}."))
    return found


CONFIG = _config()
TOP_LEVEL = set(CONFIG) | set(GROUPS)
NESTED_KEYS = [(key, siblings) for key, siblings in _keys(CONFIG) if len(key.split(".")[-1]) >= 3]


@st.composite
def one_edit(draw: st.DrawFn, word: str) -> str:
    """``word`` with one character replaced, deleted, inserted, or swapped with the next."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = draw(st.integers(0, len(word) - 1))
    kind = draw(st.sampled_from(["replace", "delete", "insert", "swap"]))
    c = draw(st.sampled_from(letters))
    if kind == "replace":
        edited = word[:i] + c + word[i + 1 :]
    elif kind == "delete":
        edited = word[:i] + word[i + 1 :]
    elif kind == "insert":
        edited = word[:i] + c + word[i:]
    else:
        edited = word[:i] + word[i + 1 : i + 2] + word[i] + word[i + 2 :]
    assume(edited != word and edited and edited[0].isalpha())
    return edited


def _suggested(message: str) -> list[str]:
    assert "(did you mean " in message, message
    return message.rsplit("(did you mean ", 1)[1].removesuffix("?)").split(" or ")


@FEW
@given(data=st.data())
def test_a_typo_of_a_config_group_suggests_it(data):
    group = data.draw(st.sampled_from(sorted(GROUPS)))
    typo = data.draw(one_edit(group))
    assume(typo not in TOP_LEVEL)
    message = check_overrides([f"{typo}=x"], CONFIGS)
    assert message.startswith(f"override '{typo}=x': no key or config group '{typo}'"), message
    assert group in _suggested(message)


@FEW
@given(data=st.data())
def test_a_typo_of_an_option_suggests_it(data):
    group = data.draw(st.sampled_from([g for g, options in GROUPS.items() if options]))
    option = data.draw(st.sampled_from([o for o in GROUPS[group] if len(o) >= 3]))
    typo = data.draw(one_edit(option))
    assume(typo not in GROUPS[group])
    message = check_overrides([f"{group}={typo}"], CONFIGS)
    assert message.startswith(f"{group}={typo}: no such option; choose from "), message
    assert option in _suggested(message)


@FEW
@given(data=st.data())
def test_a_typo_of_a_key_suggests_it(data):
    key, siblings = data.draw(st.sampled_from(NESTED_KEYS))
    parent, _, name = key.rpartition(".")
    typo = data.draw(one_edit(name))
    assume(typo not in siblings)
    message = check_overrides([f"{parent}.{typo}=1"], CONFIGS)
    assert message.startswith(f"override '{parent}.{typo}=1': {parent} has no key '{typo}'"), (
        message
    )
    assert name in _suggested(message)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # the first override Hydra cannot apply is named, wherever it stands on the line
        (["optim.lr=0.1", "data.batch_size=64", "+trainer.x=1", "trainer.x.y=2", "seed=3"],
         "override 'trainer.x.y=2': trainer.x is 1, not a node with keys"),
        (["optim.lrr=1", "+model=ncf"],  # config groups are composed before the keys
         "override '+model=ncf': model is already chosen (to change it, write model=ncf)"),
        (["~seed=3"], "override '~seed=3': seed is 42, not 3"),
        (["-m", "optim.lrr=0.1,0.2"], "override 'optim.lrr=0.1,0.2': optim has no key 'lrr' (did you mean lr?)"),
    ],
)  # fmt: skip
def test_the_failing_override_is_found_and_named(args, expected):
    assert check_overrides(args, CONFIGS) == expected


def test_an_option_that_a_config_file_chooses_names_the_file(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: nfc\n"
    )
    options = ", ".join(GROUPS["model"])
    assert check_overrides(["experiment=typo"], configs) == (
        f"experiment/typo: model=nfc: no such option; choose from {options} (did you mean ncf?)"
    )


def test_a_config_file_choice_names_the_file_composed_not_another_with_the_same_choice(tmp_path):
    """The file named is one this command line composes (found from Hydra's choices), not the
    first of ``configs/`` in sorted order; a nested group's choice names its file too."""
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    for name in ("a_draft", "mine"):  # a_draft sorts first but is not composed
        (configs / "experiment" / f"{name}.yaml").write_text(
            "# @package _global_\ndefaults:\n  - override /model: nfc\n"
        )
    (configs / "model" / "layers").mkdir()
    (configs / "model" / "layers" / "a.yaml").write_text("x: 1\n")
    sb = (configs / "model" / "sb.yaml").read_text().replace("defaults:", "#")
    (configs / "model" / "deep.yaml").write_text("defaults:\n  - layers: b\n  - _self_\n" + sb)
    message = check_overrides(["experiment=mine"], configs)
    assert message is not None and message.startswith("experiment/mine: model=nfc: no such option")
    assert check_overrides(["model=deep"], configs) == (
        "model/deep: model/layers=b: no such option; choose from a"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # a group whose default is `experiment: null` is still in the defaults list: Hydra
        # refuses +experiment=x ("Multiple values for experiment")
        (["+experiment=paper_comparison"],
         "override '+experiment=paper_comparison': experiment is already chosen "
         "(to change it, write experiment=paper_comparison)"),
        (["-m", "+experiment=lr_stability"],
         "override '+experiment=lr_stability': experiment is already chosen "
         "(to change it, write experiment=lr_stability)"),
        # a key with a slash that is no config group is a key Hydra cannot find
        (["model/foo=bar"], "override 'model/foo=bar': no key or config group 'model/foo' (did you mean model?)"),
        (["modle/x=1"], "override 'modle/x=1': no key or config group 'modle/x' (did you mean model?)"),
        # a list's item can be set by index, but only inside the list
        (["model.bottom_dims.5=3"],
         "override 'model.bottom_dims.5=3': model.bottom_dims has 2 items: index 5 is outside the list"),
        (["model.bottom_dims.1.x=3"], "override 'model.bottom_dims.1.x=3': model.bottom_dims.1 is 256, not a node with keys"),
        (["~"], "override '~': nothing named to delete (write ~key or ~group)"),
        (["=1"], "override '=1': no key before '=' (overrides are key=value)"),
        (["+model@foo=ncf", "+model@foo=sb"],
         "override '+model@foo=sb': model@foo is already chosen (to change it, write model@foo=sb)"),
    ],
)  # fmt: skip
def test_more_mistakes_get_their_own_line(args, expected):
    assert check_overrides(args, CONFIGS) == expected


def test_hydra_accepts_what_the_check_lets_through_for_null_groups_and_list_indices():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        compose("train", overrides=["experiment=paper_comparison"])
        compose("train", overrides=["model.bottom_dims.0=3"])
        with pytest.raises(Exception, match="Multiple values for experiment"):
            compose("train", overrides=["+experiment=paper_comparison"])
    assert check_overrides(["experiment=paper_comparison"], CONFIGS) is None
    assert check_overrides(["model.bottom_dims.0=3"], CONFIGS) is None


@pytest.mark.parametrize(
    "args", [["optim.lr=unknownfn(1)"], ["-m", "model=chioce(sb,ncf)"], ["optim.lr=foo("]]
)
def test_a_parse_error_is_one_line(args):
    message = check_overrides(args, CONFIGS)
    assert message is not None and "cannot parse it" in message
    assert "\n" not in message and "\\n" not in message
    if "unknownfn" in args[0] or "chioce" in args[0]:
        assert "Unknown function" in message and "; Available: bool,choice" in message


def test_what_the_check_does_not_model_is_hydras_message_in_one_line():
    message = check_overrides(["model@elsewhere=ncf"], CONFIGS)  # a package override
    assert message is not None and "model@elsewhere" in message and "\n" not in message


def test_hydra_reads_the_command_line_as_the_check_assumes():
    """Pins the one private Hydra API of ``cli`` (``hydra._internal.utils.get_args_parser``,
    in ``cli._hydra_arguments``): the attributes the check reads, and what they hold."""
    args, unknown = cli._hydra_arguments(["-m", "--cfg", "job", "a=1", "+b.c=2"])
    assert args.multirun is True and args.overrides == ["a=1", "+b.c=2"] and unknown == []
    args, _ = cli._hydra_arguments(["a=1"])
    assert args.multirun is False and args.overrides == ["a=1"]
    assert not any(getattr(args, name) for name in cli._OTHER_MODES)
    for argv, name in [
        (["--help"], "help"),
        (["--hydra-help"], "hydra_help"),
        (["--info", "defaults"], "info"),
        (["--shell-completion"], "shell_completion"),
        (["--experimental-rerun", "config.pickle"], "experimental_rerun"),
        (["-cp", "elsewhere"], "config_path"),
        (["-cn", "other"], "config_name"),
        (["-cd", "/elsewhere"], "config_dir"),
    ]:
        args, _ = cli._hydra_arguments(argv)
        assert getattr(args, name), (argv, name)
        assert args.overrides == [], argv  # an option's value is not an override
    assert cli._hydra_arguments(["--no-such-option"])[1] == ["--no-such-option"]
    with pytest.raises(SystemExit):
        cli._hydra_arguments(["--version"])


def test_no_private_hydra_api_outside_its_one_function():
    source = inspect.getsource(cli)
    assert source.count("hydra._internal") == source.count("hydra._internal.utils import") == 1
    assert "hydra._internal" in inspect.getsource(cli._hydra_arguments)
    assert "import re\n" not in source  # no patterns over Hydra's messages
