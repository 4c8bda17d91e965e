"""Every documented configuration value, checked once before anything is built.

Without this table a bad value surfaces wherever it is first used: as a traceback from
torch or Lightning (``seed=1.5``, ``optim.lr=abc``), as Hydra's multi-line report from a
callback's constructor (``callbacks.step_checkpoint.every_n_train_steps=0``), mid-fit
(``trainer.check_val_every_n_epoch=0``), or not at all: a run that "completes" doing
something nobody asked for (``trainer.max_epochs=0`` tests an untrained model, a negative
``task_weights`` entry trains to *maximise* that task's loss). ``check_config`` looks at
every value against ``RULES`` (key -> what is allowed) and raises one ``ConfigError`` naming
the first bad key and what it may be, before any data is read or model built.

Some keys are checked where they are used, because the code there already says it in one
line naming the key (ClippyAdagrad's thresholds, ``model.norm``, the scheduler's length and
interval, Lightning's accelerator and devices); their rows say where (``Rule.where``), so
the table still lists every documented key and the tests can hold that code to the rule. A
key that no rule names (an addition such as ``+optim.foo=1``) is left to the code that takes
it; a callback's constructor that rejects it is reported in one line too
(``build.instantiate_callbacks``).

Before any rule, every value must resolve: an interpolation of a key or an environment
variable that does not exist (``optim.lr=${nope}``) is named in one line (``unresolvable``)
instead of OmegaConf's traceback from wherever the value is first read.

The second half handles runs without validation rows (``data.val_fraction=0`` or
``trainer.limit_val_batches=0``): early stopping and best-checkpoint selection on a ``val/``
metric have nothing to watch there, so the first is switched off and the second keeps the
last epoch (``without_validation``); the same holds for a validation split that lacks a
class of a task (its AUC is NaN every epoch). Some values are only wrong for the data they
meet (a fraction of batches that rounds to none, a validation split of one row): they are
checked once the data is set up (``check_data``, ``check_batches``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from mtl_clippy.data.schema import TASKS
from mtl_clippy.errors import ConfigError
from mtl_clippy.models.layers import NORMS
from mtl_clippy.models.param_groups import group_options_problem, param_groups_problem

#: The largest seed: Lightning's ``seed_everything`` (NumPy's legacy generator) takes
#: 0 .. 2**32 - 1 and picks a random seed, with a warning, for anything else.
MAX_SEED = 2**32 - 1

#: The most CPU threads a run may ask for: far above any machine's cores (more threads than
#: cores only slow torch down), and small enough for torch's C int.
MAX_THREADS = 1024
#: The widest layer (embedding, hidden, expert) and the most experts a model may have: a
#: million units is beyond any model of this project, and keeps every size in torch's range.
MAX_WIDTH = 2**20
MAX_EXPERTS = 1024

#: What ``best.monitor`` in metrics.json says when no metric chose the best checkpoint.
NO_VALIDATION = "last epoch (no validation rows)"
#: What ``early_stopping`` in metrics.json says when it was switched off for that reason.
NO_EARLY_STOPPING = "off (no validation rows)"


class Rule(NamedTuple):
    """What one key may hold: ``allowed`` in words (the error message's) and ``ok``, the
    test of a value. With ``where`` set, the code named there checks the key in its own
    words and ``check_config`` leaves it alone."""

    allowed: str
    ok: Callable[[Any], bool]
    where: str = ""
    #: The message; the data module's keys keep the words it has always used.
    words: str = "{key}: expected {allowed}, got {value!r}"


# ----------------------------------------------------------------------------- value tests
# Hydra parses ``1``, ``1.5``, ``true`` and ``abc`` on the command line as int, float, bool
# and str. A bool is never taken for a number (True is an int in Python), and a whole
# number must be an int: ``max_epochs=2.0`` would reach Lightning as a float.


def _is_whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # not NaN


def _is_finite(v: Any) -> bool:
    return _is_number(v) and (isinstance(v, int) or math.isfinite(v))


def _in(v: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (v <= low if low_open else v < low):
        return False
    return high is None or (v < high if high_open else v <= high)


def _range_text(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _or(text: str, null: bool, also: str = "") -> str:
    """``text``, then the other values allowed (``also``: in words), then null."""
    return ", or ".join([text, *([also] if also else []), *(["null"] if null else [])])


def whole(
    low: int | None = None,
    high: int | None = None,
    *,
    also: int | None = None,
    note: str = "",
    null: bool = False,
) -> Rule:
    """A whole number in [low, high]; or ``also`` (``note`` says what it means), or null."""
    other = f"{also} {note}".strip() if also is not None else ""
    allowed = _or("a whole number" + _range_text(low, high, False, False), null, other)

    def ok(v: Any) -> bool:
        if v is None:
            return null
        return _is_whole(v) and (v == also or _in(v, low, high, False, False))

    return Rule(allowed, ok)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    null: bool = False,
) -> Rule:
    """A number (int or float, never NaN; infinite only with ``finite=False``) in the range."""
    kind = "a finite number" if finite else "a number"
    text = _or(kind + _range_text(low, high, low_open, high_open), null)
    return Rule(
        text,
        lambda v: (
            (v is None and null)
            or (
                _is_number(v)
                and (_is_finite(v) or not finite)
                and _in(v, low, high, low_open, high_open)
            )
        ),
    )


def flag(*, also: str | None = None, null: bool = False) -> Rule:
    """true or false (or the word ``also``, or null)."""
    return Rule(
        _or("true or false", null, repr(also) if also else ""),
        lambda v: isinstance(v, bool) or (v is None and null) or (also is not None and v == also),
    )


def one_of(*choices: Any, null: bool = False) -> Rule:
    """One of ``choices`` (compared as given: ``'min'`` is not ``'MIN'``)."""
    names = [repr(c) for c in choices]
    text = " or ".join(names) if len(names) < 3 else f"one of {', '.join(names)}"
    return Rule(
        _or(text, null),
        lambda v: (v is None and null) or (not isinstance(v, bool) and v in choices),
    )


def text(*, null: bool = False) -> Rule:
    """A string (a path, a file name)."""
    return Rule(
        _or("a text (a path or a name)", null), lambda v: isinstance(v, str) or (v is None and null)
    )


def sizes() -> Rule:
    """A list of layer widths: whole numbers >= 1 (an empty list: no layer), at most
    ``MAX_WIDTH`` each."""
    return Rule(
        f"a list of whole numbers >= 1 and <= {MAX_WIDTH} (layer widths)",
        lambda v: isinstance(v, list) and all(_is_whole(x) and 1 <= x <= MAX_WIDTH for x in v),
    )


def batches(*, zero: bool) -> Rule:
    """Lightning's ``limit_*_batches``: a whole number of batches, or a fraction of them."""
    low = 0 if zero else 1
    text_ = (
        f"a whole number of batches >= {low}, a fraction in "
        f"{'[' if zero else '('}0, 1] of them, or null (all)"
    )
    return Rule(
        text_,
        lambda v: (
            v is None
            or (_is_whole(v) and v >= low)
            or (isinstance(v, float) and _in(v, 0.0, 1.0, not zero, False))
        ),
    )


def checked_by(where: str, rule: Rule, allowed: str | None = None) -> Rule:
    """A key that ``where`` (the code that takes it) already checks, in one line naming it:
    ``rule`` says what it allows (for the documentation and the tests), not applied here."""
    return Rule(allowed or rule.allowed, rule.ok, where)


def _task_weights_ok(v: Any) -> bool:
    if v is None:
        return True
    return (
        isinstance(v, list)
        and len(v) == len(TASKS)
        and all(_is_finite(w) and w >= 0 for w in v)
        and sum(v) > 0
    )


def _is_text(v: Any) -> bool:
    return isinstance(v, str)


def _devices_ok(v: Any) -> bool:
    if v == "auto" or (_is_whole(v) and (v >= 1 or v == -1)):
        return True
    return isinstance(v, list) and bool(v) and all(_is_whole(d) and d >= 0 for d in v)


def _resume_ok(v: Any) -> bool:
    return isinstance(v, bool) or v is None or isinstance(v, str)


# ----------------------------------------------------------------------------- the table

_SEED = whole(0, MAX_SEED)
_METRIC = Rule("a metric of the run", lambda v: isinstance(v, str) and v in metric_names())
_MODES = one_of("min", "max")


def _data(rule: Rule, allowed: str) -> Rule:
    """A data module key, checked here in the module's own words (which tests and users
    know: ``data.batch_size must be a positive whole number, got 0``); the module checks
    it too, for users of the Python API."""
    return rule._replace(allowed=allowed, words="{key} must be {allowed}, got {value!r}")


_CLIPPY = "ClippyAdagrad (mtl_clippy.optim)"
_LIGHTNING = "Lightning's Trainer"
_MODULE = "the module (MultiTaskModule)"
_WATCHED = "the monitor check below (_watched_metric)"
_ROLES = "the role check below (_param_groups)"
#: Lightning's precisions (its transformer-engine ones need a package this project does not
#: install) and this project's "auto" (runtime.resolve_precision).
_PRECISIONS = ("auto", "16-mixed", "bf16-mixed", "32-true", "64-true", "16-true", "bf16-true",
               "16", "32", "64", "bf16", 16, 32, 64)  # fmt: skip

RULES: dict[str, Rule] = {
    # top level (configs/train.yaml)
    "seed": _SEED,
    "threads": whole(1, MAX_THREADS, null=True),
    "task_weights": Rule(
        f"null (equal weights) or a list of {len(TASKS)} finite numbers >= 0, one per task "
        f"({', '.join(TASKS)}), not all 0",
        _task_weights_ok,
    ),
    "test": flag(),
    "resume": Rule("true, false or a run folder", _resume_ok),
    "ckpt_path": text(null=True),
    "slurm_requeue": flag(),  # also checked by mtl_clippy.preemption, in the same words
    # which checkpoints a completed (or diverged) run keeps (mtl_clippy.callbacks.checkpointing)
    "keep_checkpoints": one_of("best_and_last", "best", "all"),
    # data (configs/data/*.yaml)
    "data.data_dir": text(null=True),
    "data.cache_dir": text(null=True),
    "data.train_rows": _data(whole(1, null=True), "a positive whole number"),
    "data.test_rows": _data(whole(1, null=True), "a positive whole number"),
    "data.hard": flag(),
    "data.batch_size": _data(whole(1), "a positive whole number"),
    "data.eval_batch_size": _data(whole(1, null=True), "a positive whole number"),
    "data.val_fraction": _data(number(0, 1, high_open=True), "a number in [0, 1)"),
    "data.min_count": _data(whole(1), "a whole number >= 1"),
    "data.seed": _SEED,
    "data.data_seed": whole(0),
    "data.num_workers": _data(whole(0), "a whole number >= 0"),
    # model (configs/model/*.yaml)
    "model.embed_dim": whole(1, MAX_WIDTH),
    "model.bottom_dims": sizes(),
    "model.tower_dims": sizes(),
    "model.expert_dims": sizes(),
    "model.mlp_dims": sizes(),
    "model.n_experts": whole(1, MAX_EXPERTS),
    "model.n_shared_experts": whole(1, MAX_EXPERTS),
    "model.n_task_experts": whole(1, MAX_EXPERTS),
    # MetaHeac (configs/model/metaheac.yaml)
    "model.n_critics": whole(1, MAX_EXPERTS),
    "model.inner_lr": number(0),
    "model.episodes": whole(1),
    "model.critic_output": one_of("mixture", "mean"),
    "model.dropout": number(0, 1, high_open=True),
    "model.sparse_embeddings": flag(),
    "model.norm": checked_by("the backbone (mtl_clippy.models.layers)", one_of(*NORMS)),
    # optim (configs/optim/*.yaml); torch's optimizers would say "Invalid learning rate"
    # without naming the key
    "optim.lr": number(0),
    # the accumulators are float32 tensors filled with it (and larger values stop learning)
    "optim.initial_accumulator_value": number(0, 1e30),
    "optim.variable_relative_threshold": checked_by(_CLIPPY, number(0, finite=False)),
    "optim.accumulator_relative_threshold": checked_by(_CLIPPY, number(0, finite=False)),
    "optim.absolute_threshold": checked_by(_CLIPPY, number(0, finite=False)),
    "optim.epsilon": checked_by(_CLIPPY, number(0, finite=False)),
    "optim.clip_accumulator_update": flag(),
    "optim.use_standard_accumulator_update": flag(),
    "optim.weight_decay": number(0),
    "optim.eps": number(0),
    # torch's fused implementation (configs/optim/adam.yaml); null: torch's default
    "optim.fused": flag(null=True),
    # LAMB (configs/optim/lamb.yaml, pytorch-optimizer's Lamb)
    "optim.weight_decouple": flag(),
    "optim.adam_debias": flag(),
    "optim.pre_norm": flag(),
    # param_groups (configs/param_groups/*.yaml): options per parameter role of the backbone
    "param_groups": checked_by(
        _ROLES,
        Rule(
            "null or a mapping of parameter roles to options of the optimizer",
            lambda v: param_groups_problem(v) is None,
        ),
    ),
    "optim.betas": Rule(
        "a list of 2 numbers in [0, 1)",
        lambda v: (
            isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)
        ),
    ),
    # scheduler (configs/scheduler/*.yaml)
    "scheduler.interval": checked_by(
        "mtl_clippy.build.scheduler_settings", one_of("step", "epoch")
    ),
    "scheduler.monitor": checked_by(_MODULE, _METRIC),
    "scheduler.T_max": checked_by(_MODULE, whole(1, null=True)),
    "scheduler.total_steps": checked_by(_MODULE, whole(1, null=True)),
    "scheduler.eta_min": number(0),
    "scheduler.warmup_fraction": number(0, 1, high_open=True),
    "scheduler.min_lr_ratio": number(0, 1),
    "scheduler.mode": _MODES,
    "scheduler.factor": number(0, 1, low_open=True, high_open=True),
    "scheduler.patience": whole(0),
    # any sign: with threshold_mode=abs a negative threshold counts every epoch as better
    "scheduler.threshold": number(),
    "scheduler.threshold_mode": one_of("rel", "abs"),
    "scheduler.cooldown": whole(0),
    "scheduler.min_lr": number(0),
    # trainer (configs/trainer/*.yaml)
    "trainer.default_root_dir": text(),
    "trainer.accelerator": checked_by(
        _LIGHTNING, one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu")
    ),
    "trainer.devices": checked_by(
        _LIGHTNING,
        Rule("a whole number >= 1, -1 (all), a list of device indices, or 'auto'", _devices_ok),
    ),
    "trainer.strategy": checked_by(
        _LIGHTNING, Rule("a Lightning strategy name (auto, ddp, ...)", _is_text)
    ),
    "trainer.max_epochs": whole(1, also=-1, note="(no limit)", null=True),
    "trainer.min_epochs": whole(0, null=True),
    "trainer.max_steps": whole(1, also=-1, note="(no limit)"),
    "trainer.min_steps": whole(0, null=True),
    "trainer.precision": Rule(
        "one of " + ", ".join(str(p) for p in _PRECISIONS[:7]) + " (or 16, 32, 64, bf16)",
        lambda v: (isinstance(v, str) or _is_whole(v)) and v in _PRECISIONS,
    ),
    "trainer.log_every_n_steps": whole(1),
    "trainer.check_val_every_n_epoch": whole(1, null=True),
    "trainer.fast_dev_run": Rule(
        "true, false or a whole number of batches >= 0",
        lambda v: isinstance(v, bool) or (_is_whole(v) and v >= 0),
    ),
    "trainer.limit_train_batches": batches(zero=False),
    "trainer.limit_val_batches": batches(zero=True),
    "trainer.limit_test_batches": batches(zero=False)._replace(
        allowed=batches(zero=False).allowed + " (to skip the test, set test=false)"
    ),
    "trainer.deterministic": flag(also="warn", null=True),
    "trainer.gradient_clip_val": number(0, null=True),
    # null: Lightning's default, norm
    "trainer.gradient_clip_algorithm": one_of("norm", "value", null=True),
    "trainer.enable_model_summary": flag(),
    # the data module's samplers shard by rank themselves; Lightning's would shard again
    "trainer.use_distributed_sampler": Rule(
        "false (the data module's samplers shard every split by rank themselves)",
        lambda v: v is False,
    ),
    "trainer.num_nodes": whole(1),
    "trainer.sync_batchnorm": flag(),
    "trainer.accumulate_grad_batches": whole(1),
    # not in the shipped configs (``+trainer.val_check_interval=...``); 0 divides by zero
    "trainer.val_check_interval": Rule(
        "a whole number of training batches >= 1, a fraction in (0, 1] of an epoch, or null",
        lambda v: (
            v is None
            or (_is_whole(v) and v >= 1)
            or (isinstance(v, float) and _in(v, 0.0, 1.0, True, False))
        ),
    ),
    # callbacks (configs/callbacks/default.yaml)
    "callbacks.model_checkpoint.dirpath": text(),
    # null: Lightning's own name, <epoch>-<step>.ckpt
    "callbacks.model_checkpoint.filename": text(null=True),
    "callbacks.model_checkpoint.monitor": checked_by(
        _WATCHED,
        _METRIC._replace(ok=lambda v: v is None or _METRIC.ok(v)),
        "a metric of the run, or null (keep the last epoch)",
    ),
    "callbacks.model_checkpoint.mode": _MODES,
    "callbacks.model_checkpoint.save_top_k": whole(-1),
    "callbacks.model_checkpoint.save_last": flag(also="link", null=True),
    "callbacks.model_checkpoint.auto_insert_metric_name": flag(),
    "callbacks.last_checkpoint.dirpath": text(),
    "callbacks.last_checkpoint.filename": text(),
    "callbacks.last_checkpoint.monitor": Rule(
        "null (it keeps the newest epoch; best.ckpt follows a metric)", lambda v: v is None
    ),
    "callbacks.last_checkpoint.save_top_k": one_of(1),
    "callbacks.last_checkpoint.enable_version_counter": flag(),
    "callbacks.last_checkpoint.auto_insert_metric_name": flag(),
    "callbacks.step_checkpoint.dirpath": text(),
    "callbacks.step_checkpoint.every_n_train_steps": whole(1),
    "callbacks.early_stopping.monitor": checked_by(_WATCHED, _METRIC),
    "callbacks.early_stopping.mode": _MODES,
    "callbacks.early_stopping.patience": whole(0),
    "callbacks.early_stopping.check_finite": flag(),
    "callbacks.progress_bar.refresh_rate": whole(0),
    "callbacks.lr_monitor.logging_interval": one_of("step", "epoch", null=True),
    "callbacks.divergence_monitor.warmup_steps": whole(0),
    "callbacks.divergence_monitor.spike_factor": number(1, low_open=True, finite=False),
    # removed with the rule that used it (a spike is now a rise that comes back)
    "callbacks.divergence_monitor.small_spike_factor": Rule(
        "removed: a spike is now a loss above spike_factor x the running median that comes "
        "back within persist_steps; delete the key",
        lambda v: False,
        words="{key}: {allowed} (got {value!r})",
    ),
    "callbacks.divergence_monitor.window": whole(1),
    "callbacks.divergence_monitor.persist_steps": whole(1),
    "callbacks.divergence_monitor.max_recorded_spikes": whole(0),
    "callbacks.divergence_monitor.track_logits": flag(),
    "callbacks.divergence_monitor.check_every_n_steps": whole(1, null=True),
    "callbacks.divergence_monitor.max_loss": number(0, low_open=True, finite=False, null=True),
    "callbacks.optimizer_telemetry.log_every_n_steps": whole(1),
    # grad_clip=agc (configs/grad_clip/agc.yaml)
    "callbacks.agc.clipping": number(0, low_open=True),
    "callbacks.agc.eps": number(0, low_open=True),
    "callbacks.agc.skip_heads": flag(),
}


# ----------------------------------------------------------------------------- checking

_ABSENT = object()


def _plain(cfg: Any) -> Any:
    """``cfg`` as plain dicts and lists, resolved (None when some interpolation cannot be
    resolved here, e.g. ``${hydra:...}`` outside a Hydra run: then each key is read alone)."""
    if not isinstance(cfg, DictConfig | ListConfig):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:
        return None


def _value(cfg: Any, key: str) -> Any:
    """The plain value of ``key`` in ``cfg`` (a config or ``_plain`` of one): ``_ABSENT``
    when it has no such key, or its interpolation cannot be resolved here (the code that
    reads it reports that), or it is a mandatory ``???`` (left to whoever needs it)."""
    if not isinstance(cfg, DictConfig | ListConfig):
        node = cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return _ABSENT
            node = node[part]
        return _ABSENT if isinstance(node, str) and node == "???" else node
    try:
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        if isinstance(node, DictConfig | ListConfig):
            return OmegaConf.to_container(node, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run, ${oc.env:UNSET}, ???
        return _ABSENT
    return node


def _interpolated_leaves(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, raw text) of each value of ``node`` (a plain container, unresolved)
    that holds an interpolation; a list counts as its key's value (``task_weights``)."""
    found: list[tuple[str, str]] = []
    if isinstance(node, Mapping):
        for name, child in node.items():
            found += _interpolated_leaves(child, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(node, list):
        texts = [t for _, t in _interpolated_leaves(dict(enumerate(node)))]
        found += [(prefix, t) for t in texts[:1]]
    elif isinstance(node, str) and "${" in node:
        found.append((prefix, node))
    return found


def _outside_hydra(exc: Exception) -> bool:
    """Whether ``exc`` is only Hydra's ``${hydra:...}`` resolver missing its runtime config:
    the config is used outside a Hydra run (tests, the Python API), not wrong."""
    from hydra.core.hydra_config import HydraConfig

    text = str(exc)
    hydra = "interpolation type hydra" in text or "HydraConfig was not set" in text
    return hydra and not HydraConfig.initialized()


def _reason(exc: Exception) -> str:
    """OmegaConf's reason in one line: ``Interpolation key 'nope' not found``, without its
    ``full_key`` lines and its ``KeyError raised while resolving interpolation:`` prefix."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = first.split(" raised while resolving interpolation: ", 1)[-1]
    return first.strip().strip("\"'") if first[:1] in "\"'" else first.strip()


def unresolvable(cfg: Any) -> str | None:
    """The message for the first value of ``cfg`` whose interpolation cannot be resolved
    (``optim.lr=${nope}``, ``seed=${oc.env:UNSET}``), or None. A key that only fails
    because it refers to another unresolvable key (``data.seed: ${seed}``) gives way to that
    key, so the message names the value to fix. Hydra's own config is not looked at."""
    if not isinstance(cfg, DictConfig):
        return None
    raw = OmegaConf.to_container(cfg, resolve=False)
    failing: list[tuple[str, str, str]] = []
    for key, text_ in _interpolated_leaves({k: v for k, v in raw.items() if k != "hydra"}):
        try:
            node = OmegaConf.select(cfg, key, throw_on_missing=False)
            if isinstance(node, DictConfig | ListConfig):
                OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
        except Exception as exc:  # any resolver's failure: the key cannot be read
            if not _outside_hydra(exc):
                failing.append((key, text_, _reason(exc)))
    for key, text_, reason in failing:
        if not any("${" + other in text_ for other, _, _ in failing if other != key):
            return f"{key}: cannot resolve {text_} ({reason})"
    return None


def problem(key: str, value: Any) -> str | None:
    """The error message for ``key=value`` by its rule, or None when the value is allowed
    (or no rule names the key)."""
    rule = RULES.get(key)
    if rule is None or rule.ok(value):
        return None
    return rule.words.format(key=key, allowed=rule.allowed, value=value)


def metric_names() -> list[str]:
    """What the module logs, by name: what early stopping and checkpoints can watch."""
    names = ["train/loss", *(f"train/loss_{t}" for t in TASKS)]
    for kind in ("auc", "logloss", "calibration"):
        names += [f"val/{kind}_{t}" for t in TASKS]
    return [*names, "val/auc_mean", "val/auc_mean_best"]


def _better(metric: str) -> str | None:
    """max for AUCs, min for losses, None for a calibration (best at 1: no direction)."""
    kind = metric.rsplit("/", 1)[-1]
    return "max" if kind.startswith("auc") else "min" if "loss" in kind else None


def _watched_metric(cfg: Any, name: str, optional: bool) -> str | None:
    """A checkpoint's or early stopping's ``monitor`` and ``mode``: a metric the module
    logs, watched in its better direction (mode=min on an AUC would keep the worst epoch)."""
    monitor = _value(cfg, f"callbacks.{name}.monitor")
    if monitor is _ABSENT or (monitor is None and optional):
        return None
    key = f"callbacks.{name}.monitor"
    known = metric_names()
    if not isinstance(monitor, str) or monitor not in known:
        choices = ", ".join(known) + (", or null (keep the last epoch)" if optional else "")
        return f"{key}: {monitor!r} is not a metric of this run; choose from {choices}"
    better = _better(monitor)
    mode = _value(cfg, f"callbacks.{name}.mode")
    if better is None:
        return (
            f"{key}: {monitor} (predicted over observed positives, best at 1) has no better "
            "direction for mode max or min; watch an AUC or a log loss"
        )
    if mode in ("min", "max") and mode != better:
        return (
            f"callbacks.{name}.mode: {mode} is the wrong direction for {monitor} (better is "
            f"{'higher' if better == 'max' else 'lower'}); set mode={better}"
        )
    return None


def _endless_without_validation(cfg: Any) -> str | None:
    """A run without validation has its early stopping on a ``val/`` metric switched off
    (``without_validation``); with no epoch, step or time limit it would then never end."""
    if has_validation(cfg) or _value(cfg, "trainer.max_epochs") != -1:
        return None
    if _value(cfg, "trainer.max_steps") not in (-1, _ABSENT) or _value(
        cfg, "trainer.max_time"
    ) not in (None, _ABSENT):
        return None
    stopping = _value(cfg, "callbacks.early_stopping.monitor")
    if isinstance(stopping, str) and not stopping.startswith("val/"):
        return None  # early stopping on a train/ loss still ends it
    why = (
        "data.val_fraction=0" if _value(cfg, "data.val_fraction") == 0
        else "trainer.limit_val_batches=0"
    )  # fmt: skip
    return (
        f"trainer.max_epochs: -1 (no limit) never ends without validation ({why}: early "
        "stopping is off); expected a whole number of epochs >= 1, or a limit in "
        "trainer.max_steps or trainer.max_time"
    )


def _param_groups(cfg: Any) -> str | None:
    """``param_groups``: known roles, options of ``optim._target_`` (when it can be imported
    here), and each value by the rule of ``optim.<option>``: torch checks only an optimizer's
    own arguments, not those of a group."""
    import inspect

    import hydra.utils

    spec = _value(cfg, "param_groups")
    if spec is _ABSENT:
        return None
    target, options, name = _value(cfg, "optim._target_"), None, "the optimizer"
    try:
        cls = hydra.utils.get_object(str(target))
        params = inspect.signature(cls).parameters.values()
        options = [p.name for p in params if p.name != "params" and p.kind != p.VAR_KEYWORD]
        name = getattr(cls, "__name__", name)
    except Exception:  # no optimizer, or one that cannot be imported: the build reports it
        pass
    message = param_groups_problem(spec, options, name)
    if message or not spec:
        return message
    for role, overrides in spec.items():
        for option, value in overrides.items():
            rule = RULES.get(f"optim.{option}")
            if rule is not None and not rule.ok(value):
                key = f"param_groups.{role}.{option}"
                return rule.words.format(key=key, allowed=rule.allowed, value=value)
    # the options without a rule: the optimizer's own constructor, on a dummy parameter
    optim = _value(cfg, "optim")
    try:
        factory = hydra.utils.instantiate(optim, _partial_=True, _convert_="all")
    except Exception:  # the build reports an optimizer that cannot be made
        return None
    return group_options_problem(factory, spec)


def _episodes_beyond_the_batch(cfg: Any) -> str | None:
    """MetaHeac cuts each training batch into ``model.episodes`` pieces of at least 4 rows
    (a support and a query half of 2 or more) and uses fewer where they do not fit
    (``MetaHeac.meta_step``): more episodes than a batch of ``data.batch_size`` holds would
    be cut silently."""
    episodes, batch = _value(cfg, "model.episodes"), _value(cfg, "data.batch_size")
    if not (_is_whole(episodes) and _is_whole(batch)) or batch < 1:
        return None
    most = max(1, batch // 4)
    if episodes <= most:
        return None
    return (
        f"model.episodes: {episodes} episodes of at least 4 rows do not fit in a batch of "
        f"data.batch_size={batch} rows; expected at most {most}, or a larger data.batch_size"
    )


def _combinations(cfg: Any) -> str | None:
    """Rules between keys, once each key alone is valid."""
    groups = _param_groups(cfg)
    if groups:
        return groups
    max_epochs = _value(cfg, "trainer.max_epochs")
    min_epochs = _value(cfg, "trainer.min_epochs")
    if _is_whole(max_epochs) and max_epochs >= 1 and _is_whole(min_epochs):
        if min_epochs > max_epochs:
            return (
                f"trainer.min_epochs: expected at most trainer.max_epochs={max_epochs}, got "
                f"{min_epochs} (the run stops at max_epochs)"
            )
    every = _value(cfg, "trainer.check_val_every_n_epoch")
    if _is_whole(max_epochs) and max_epochs >= 1 and _is_whole(every) and every > max_epochs:
        return (
            f"trainer.check_val_every_n_epoch: expected at most trainer.max_epochs={max_epochs} "
            f"(no epoch would be validated), got {every}; for a run without validation set "
            "trainer.limit_val_batches=0"
        )
    endless = _endless_without_validation(cfg)
    if endless:
        return endless
    episodes = _episodes_beyond_the_batch(cfg)
    if episodes:
        return episodes
    scheduler = _value(cfg, "scheduler._target_")
    monitor = _value(cfg, "scheduler.monitor")
    monitor = "val/auc_mean" if monitor is _ABSENT else monitor  # the plateau's default
    limit = _value(cfg, "trainer.limit_val_batches")
    plateau = isinstance(scheduler, str) and scheduler.endswith("ReduceLROnPlateau")
    if plateau and limit == 0 and isinstance(monitor, str) and monitor.startswith("val/"):
        return (
            f"scheduler.monitor: {monitor} is computed by the validation loop, but "
            f"trainer.limit_val_batches={limit} runs none; watch a train/ loss with "
            "scheduler.interval=step, or use another scheduler"
        )
    for name, optional in (("model_checkpoint", True), ("early_stopping", False)):
        message = _watched_metric(cfg, name, optional)
        if message:
            return message
    return None


#: The config groups a ``method=<name>`` (configs/method/) sets.
_METHOD_GROUPS = ("optim", "grad_clip")


def method_problem(method: str, sets: Mapping[str, Any], choices: Mapping[str, Any]) -> str | None:
    """Why the run's config-group ``choices`` contradict ``method=<method>``, which sets the
    groups ``sets`` (``{"optim": "clippy", "grad_clip": "none"}``), or None. A later choice
    (``method=clippy optim=adam`` on the command line, or an experiment's own optimizer)
    replaces the method's silently: the run would train something else than its name says."""
    for group in _METHOD_GROUPS:
        wanted, got = sets.get(group, _ABSENT), choices.get(group, _ABSENT)
        if wanted is not _ABSENT and got != wanted:
            return (
                f"method={method}: it sets {group}={wanted}, but this run has {group}={got} "
                f"(from the command line or the experiment); drop {group}={got}, or drop "
                f"method= and choose optim= and grad_clip= yourself"
            )
    return None


def _method_sets(path: Any, method: str) -> dict[str, Any]:
    """The groups ``configs/method/<method>.yaml`` sets (its ``override /<group>: <choice>``
    defaults), read from the primary config folder ``path``; {} when it cannot be read."""
    from pathlib import Path

    try:
        defaults = OmegaConf.load(Path(path) / "method" / f"{method}.yaml").get("defaults") or []
    except Exception:
        return {}
    sets: dict[str, Any] = {}
    for entry in defaults:
        for key, value in entry.items() if isinstance(entry, Mapping) else ():
            group = str(key).removeprefix("override").strip().lstrip("/")
            if group in _METHOD_GROUPS:
                sets[group] = value
    return sets


def clipping_of(cfg: Any) -> str:
    """The gradient clipping a run's config really does, named as the ``grad_clip`` choices
    are: ``none``, ``norm`` (Lightning's ``trainer.gradient_clip_val`` with the ``norm``
    algorithm), ``value`` (the ``value`` algorithm), ``agc`` (a ``callbacks.agc`` entry, or
    any callbacks entry of AGC's class), or
    two joined by ``+``. A command line can set these keys without the group
    (``trainer.gradient_clip_val=1.0`` under ``grad_clip=none``)."""
    kinds = []
    clip = _value(cfg, "trainer.gradient_clip_val")
    if clip not in (_ABSENT, None, 0, 0.0, False):
        algorithm = _value(cfg, "trainer.gradient_clip_algorithm")
        kinds.append("value" if algorithm == "value" else "norm")
    callbacks = _value(cfg, "callbacks")
    entries = callbacks.items() if isinstance(callbacks, Mapping) else ()
    if any(
        isinstance(entry, Mapping)
        and ((name == "agc" and entry.get("_target_"))
             or str(entry.get("_target_", "")).endswith("AdaptiveGradientClipping"))
        for name, entry in entries
    ):  # fmt: skip
        kinds.append("agc")
    return "+".join(kinds) or "none"


_CLIP_KEYS = {
    "none": "trainer.gradient_clip_val=null and no callbacks.agc",
    "norm": "trainer.gradient_clip_val (a threshold > 0, algorithm norm)",
    "agc": "callbacks.agc",
}


def method_clipping_problem(method: str, sets: Mapping[str, Any], cfg: Any) -> str | None:
    """Why the clipping ``cfg`` really does (``clipping_of``) is not the one ``method=`` names
    (its ``grad_clip`` group), or None: ``method=adagrad trainer.gradient_clip_val=1.0``
    would train AdaGrad + GC under AdaGrad's name. Its thresholds may be tuned
    (``method=adagrad_gc trainer.gradient_clip_val=0.5``); its kind may not change."""
    wanted = sets.get("grad_clip", _ABSENT)
    if wanted is _ABSENT:
        return None
    got = clipping_of(cfg)
    if got == wanted:
        return None
    return (
        f"method={method}: it names grad_clip={wanted} ({_CLIP_KEYS.get(str(wanted), wanted)}), "
        f"but this run's settings clip by {got}; drop the clipping keys you set, or drop "
        f"method= and choose optim= and grad_clip= yourself"
    )


def _method_conflict(cfg: Any = None) -> str | None:
    """``method_problem`` (and, given the run's ``cfg``, ``method_clipping_problem``) of the
    running Hydra job (None outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        runtime = HydraConfig.get().runtime
        choices = dict(runtime.choices)
        method = choices.get("method")
        paths = [
            s.path for s in runtime.config_sources if s.provider == "main" and s.schema == "file"
        ]
    except Exception:
        return None
    if not isinstance(method, str) or not paths:
        return None
    sets = _method_sets(paths[0], method)
    message = method_problem(method, sets, choices)
    if message is None and cfg is not None:
        message = method_clipping_problem(method, sets, cfg)
    return message


def check_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise one ``ConfigError`` for the first value of ``cfg`` that its rule rejects (in
    the table's order), then for the first bad combination of values (a ``method=`` whose
    optimizer or clipping another choice replaced included)."""
    message = unresolvable(cfg)  # before anything reads a value
    if message:
        raise ConfigError(message)
    plain = _plain(cfg)
    view = plain if plain is not None else cfg  # plain dicts: read in microseconds
    for key, rule in RULES.items():
        if rule.where:  # checked by the code that takes it
            continue
        value = _value(view, key)
        if value is _ABSENT:
            continue
        message = problem(key, value)
        if message:
            raise ConfigError(message)
    message = _combinations(view) or _method_conflict(view)
    if message:
        raise ConfigError(message)


# ----------------------------------------------------------------------------- summary values


def whole_or_none(value: Any) -> int | None:
    """``value`` for metrics.json when it is a whole number, else None (a bad seed is the
    run's error, recorded as such; the summary must not fail on it)."""
    return value if _is_whole(value) else None


def number_or_none(value: Any) -> float | None:
    """``value`` as a float for metrics.json when it is a finite number, else None."""
    try:
        return float(value) if _is_finite(value) else None
    except OverflowError:  # a whole number beyond floats
        return None


# ----------------------------------------------------------------------------- no validation


def has_validation(cfg: Any) -> bool:
    """Whether the run validates: it holds out rows (``data.val_fraction`` > 0) and
    Lightning runs the validation loop on them (``trainer.limit_val_batches`` not 0)."""
    fraction = _value(cfg, "data.val_fraction")
    limit = _value(cfg, "trainer.limit_val_batches")
    return fraction != 0 and limit != 0


def without_validation(
    callbacks: list[Any], undefined: Mapping[str, str] | None = None
) -> tuple[list[Any], str | None]:
    """The callbacks of a run without validation, and what its early stopping became.

    Early stopping on a ``val/`` metric is dropped (Lightning would stop the run after its
    first epoch with a RuntimeError: the metric is never logged); a checkpoint that keeps
    the best epoch by a ``val/`` metric keeps the last epoch instead (no monitor: Lightning
    then saves after each training epoch, replacing the previous file), so ``best.ckpt``
    exists and the test runs on the final weights of training.

    With ``undefined`` (metric -> why, from ``check_data``) the run validates, but those
    metrics are NaN every epoch: only callbacks watching one of them change, the same way
    (a NaN score would keep whichever epoch came first). Each changed checkpoint callback
    gets ``last_epoch_because``, which ``best_monitor`` reports.
    """
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    kept: list[Any] = []
    stopping: str | None = None
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if undefined is None:
            affected, why = isinstance(monitor, str) and monitor.startswith("val/"), None
        else:
            affected, why = monitor in undefined, undefined.get(monitor)
        if isinstance(callback, EarlyStopping) and affected:
            stopping = NO_EARLY_STOPPING if why is None else f"off ({monitor} undefined: {why})"
            continue
        if isinstance(callback, ModelCheckpoint) and affected:
            callback.monitor = None
            callback.last_epoch_because = (  # type: ignore[attr-defined]
                NO_VALIDATION if why is None else f"last epoch ({monitor} undefined: {why})"
            )
        kept.append(callback)
    return kept, stopping


def best_monitor(checkpoint: Any, validation: bool) -> str | None:
    """What chose the best checkpoint, for metrics.json: its metric, or the last epoch and
    why (None without a checkpoint callback: the final weights are tested)."""
    if checkpoint is None:
        return None
    if getattr(checkpoint, "monitor", None):
        return str(checkpoint.monitor)
    because = getattr(checkpoint, "last_epoch_because", None)
    if because:
        return str(because)
    return "last epoch" if validation else NO_VALIDATION


# ----------------------------------------------------------------------------- data checks
# Some values are only wrong for the data they meet: a fraction of batches that rounds to
# none, a validation split too small for an AUC. They are checked once the data is set up
# (its rows are known), before training starts.


def _round(x: float, up: bool, digits: int = 2) -> float:
    """``x`` rounded up (or down) to ``digits`` significant digits: a value to suggest that
    still satisfies the bound it was computed from (1/3 -> 0.34, not 0.33)."""
    from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

    d = Decimal(repr(float(x)))
    step = Decimal(1).scaleb(d.adjusted() - digits + 1)
    return float(d.quantize(step, rounding=ROUND_CEILING if up else ROUND_FLOOR))


def _rows_key(datamodule: Any, rows: int) -> str:
    """What set the number of training-file rows: ``data.train_rows`` (generated data, or a
    cap on the file), or the file itself."""
    if getattr(datamodule, "train_rows", None) == rows:
        return f"data.train_rows={rows}"
    return f"the train file's {rows} rows"


def _labels(loader: Any) -> Any:
    """The labels ``[rows, tasks]`` of a loader of the data module (``BatchDataset``)."""
    dataset = getattr(loader, "dataset", None)
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return None
    return labels[getattr(dataset, "start", 0) : getattr(dataset, "stop", len(labels))]


#: Rows an AUC needs at the least: one positive and one negative.
MIN_VAL_ROWS = 2


def check_data(cfg: Any, datamodule: Any) -> dict[str, str]:
    """The validation split, once the data is set up: ``ConfigError`` for one that holds
    fewer than ``MIN_VAL_ROWS`` rows (``data.val_fraction=0.0001`` holds out 1 row: every
    AUC would be NaN); for a task with one class only in it (no positive conversion in a
    small split), a warning, and the metrics it leaves undefined, each with why
    (``{"val/auc_mean": "the validation split has no positive conversion"}``): best.ckpt
    and early stopping cannot follow them (``without_validation``)."""
    rows = ((getattr(datamodule.metadata, "extra", None) or {}).get("rows")) or {}
    n_val, n_fit = rows.get("val"), rows.get("train")
    fraction = _value(cfg, "data.val_fraction")
    if not has_validation(cfg) or not _is_whole(n_val) or not _is_whole(n_fit):
        return {}
    n = n_val + n_fit
    if n_val < MIN_VAL_ROWS:
        needed, most = _round(MIN_VAL_ROWS / n, up=True), _round((n - 1) / n, up=False)
        if needed > most or n < MIN_VAL_ROWS + 1:
            raise ConfigError(
                f"{_rows_key(datamodule, n)}: too few to hold out {MIN_VAL_ROWS} validation "
                f"rows (an AUC needs a positive and a negative) and train on the rest; expected "
                f"at least {MIN_VAL_ROWS + 1} rows, or data.val_fraction=0 (no validation)"
            )
        raise ConfigError(
            f"data.val_fraction={fraction} holds out {n_val} of the {n} training rows for "
            f"validation, too few for an AUC (it needs a positive and a negative); expected at "
            f"least {needed} here, or 0 (no validation)"
        )
    labels = _labels(datamodule.val_dataloader())
    tasks = list(getattr(datamodule.metadata, "tasks", TASKS))
    undefined: dict[str, str] = {}
    for i, task in enumerate(tasks):
        if labels is None or labels.shape[-1] <= i:
            break
        positives = int((labels[:, i] > 0.5).sum())
        if 0 < positives < len(labels):
            continue
        why = f"the validation split has no {'positive' if positives == 0 else 'negative'} {task}"
        undefined.update({f"val/auc_{task}": why, "val/auc_mean": why, "val/auc_mean_best": why})
        if rank_zero():
            import logging

            logging.getLogger("mtl_clippy").warning(
                "data.val_fraction=%s: %s (%d rows), so val/auc_%s and val/auc_mean are "
                "undefined (NaN) every epoch: a best.ckpt watching them keeps the last epoch "
                "and early stopping on them is off; raise data.val_fraction for a validation "
                "split with both classes",
                fraction, why, n_val, task,
            )  # fmt: skip
    return undefined


def rank_zero() -> bool:
    """Whether this process is Lightning's global rank 0 (the one that warns)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _batches_per_process(rows: int, batch_size: int, world_size: int, train: bool) -> int:
    """The loader's batches on the process with the fewest (``EpochBatchSampler``'s
    arithmetic: the training loader drops an incomplete last batch)."""
    from mtl_clippy.data.datamodule import EpochBatchSampler

    return min(
        len(EpochBatchSampler(rows, batch_size, shuffle=train, rank=r, world_size=world_size,
                              drop_last=train))
        for r in range(world_size)
    )  # fmt: skip


def check_batches(cfg: Any, datamodule: Any, world_size: int = 1) -> None:
    """``trainer.limit_*_batches`` fractions against the loaders' batches: Lightning keeps
    ``int(fraction x batches)`` and stops with an exception when that is 0 (0.5 of a
    single validation batch); ``trainer.val_check_interval`` as a number of batches must fit
    in an epoch. ``ConfigError`` naming the key and the smallest value that works."""
    rows = ((getattr(datamodule.metadata, "extra", None) or {}).get("rows")) or {}
    batch = getattr(datamodule, "batch_size", None)
    eval_batch = getattr(datamodule, "eval_batch_size", None) or batch
    if not _is_whole(batch) or not rows:
        return
    loaders = [("train", "training", "data.batch_size", batch, True)]
    if has_validation(cfg):
        loaders.append(("val", "validation", "data.eval_batch_size", eval_batch, False))
    if _value(cfg, "test") is not False:
        loaders.append(("test", "test", "data.eval_batch_size", eval_batch, False))
    per_process = f" per process of {world_size}" if world_size > 1 else ""
    train_batches = None
    for split, name, size_key, size, train in loaders:
        n = rows.get(split)
        if not _is_whole(n) or n < 1:
            continue
        length = _batches_per_process(n, size, world_size, train)
        key = f"trainer.limit_{split}_batches"
        limit = _value(cfg, key)
        kept = length
        if isinstance(limit, float) and 0 < limit <= 1:
            kept = int(length * limit)
            if kept == 0:
                plural = "batch" if length == 1 else "batches"
                raise ConfigError(
                    f"{key}: {limit} of the {length} {name} {plural}{per_process} ({n} rows, "
                    f"{size_key}={size}) is no batch; expected at least "
                    f"{_round(1 / length, up=True)} (one batch), a whole number of batches "
                    ">= 1, or null (all)"
                )
        elif _is_whole(limit):
            kept = min(length, limit)
        if train:
            train_batches = kept
    interval = _value(cfg, "trainer.val_check_interval")
    every = _value(cfg, "trainer.check_val_every_n_epoch")
    if _is_whole(interval) and train_batches is not None and every is not None:
        if interval > train_batches and has_validation(cfg):
            raise ConfigError(
                f"trainer.val_check_interval: expected at most the {train_batches} training "
                f"batches of an epoch{per_process}, or a fraction in (0, 1] of it, got "
                f"{interval}"
            )
