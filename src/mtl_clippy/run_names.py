"""Folder names that say what a run is, safe on any file system and on Hydra's command line.

A single run's folder is ``<date>_<time>_<microseconds>_<model>-<optim>_<overrides>``, where
``<overrides>`` is what the command line changed besides the model and the optimizer, written
short, as ``<key>-<value>`` items joined by ``_``: ``optim.lr=0.2 seed=3`` gives
``lr-0.2_seed-3`` (a key by its last part, or whole where two overrides end alike:
``optim.lr-0.2_param_groups.embeddings.lr-0.4``; a list ``[64,32]`` is ``64+32``; a deletion
``~key`` is ``no-key``). TensorBoard lists runs by their folder (``tensorboard --logdir
outputs``), so its run list reads ``runs/2026-12-02_16-20-00_123456_sb-adam_lr-0.01_seed-3/
tensorboard``. Paths, resuming and Hydra's own keys are left out, as in a sweep job's folder
name (``hydra.job.config.override_dirname.exclude_keys``). The full overrides are in
``<run>/.hydra/overrides.yaml``, which is what ``resume=true`` compares.

Such a name holds only letters without accents, digits and ``. _ + @ % -``: characters that
Hydra's override parser and a shell read as plain text, so a path into the folder can be
pasted unquoted into ``ckpt_path=...`` or ``resume=...``. Every other run of characters
(``=``, ``,``, a slash, a space, a quote, a control or non-Latin character) becomes one
``_``. A sweep job's folder is Hydra's ``<n>_<override_dirname>`` (``3_model=sb,optim.lr=0.2``)
and keeps Hydra's ``= , ~ [ ]`` as well (:data:`JOB`). A name longer than ``max_bytes`` is
cut and ends with ``~``/``-`` and 8 hexadecimal digits of a hash of the whole text, so that
two long names that differ only at their end stay apart.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

#: The longest folder name made here, in bytes (file systems allow 255).
MAX_BYTES = 200
#: The characters a single run's folder name keeps (plain text to Hydra and a shell).
RUN = r"A-Za-z0-9._+@%\-"
#: A sweep job's: Hydra's own ``=`` and ``,`` of its override_dirname, ``~`` and lists too.
JOB = RUN + r"=,~\[\]"
#: Config groups whose choice is in the name already (``<model>-<optim>``).
IN_NAME = ("model", "optim")
#: Keys never shown: how a run starts, not what it computes (see mtl_clippy.resume).
NOT_SHOWN = ("resume", "ckpt_path")


def safe_name(text: object, max_bytes: int = MAX_BYTES, keep: str = RUN) -> str:
    """``text`` as one folder name of the characters ``keep`` (:data:`RUN` or :data:`JOB`;
    see the module docstring); never empty, never ``.`` or ``..``, never starting with ``.``
    (hidden) or ``-`` (read as an option by commands)."""
    text = str(text)
    plain = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in plain if not unicodedata.combining(c))
    name = re.sub(f"[^{keep}]+", "_", plain)
    if name[:1] in (".", "-"):
        name = "_" + name[1:]
    name = name or "_"
    if len(name.encode()) > max_bytes:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        mark = "~" if "~" in keep else "-"
        name = name[: max(1, max_bytes - 9)] + mark + digest  # ASCII: one byte a character
    return name


def safe_name_resolver(text: object) -> str:
    """``${mtl_clippy.safe_name:...}`` (configs/hydra/default.yaml): a sweep job's folder."""
    return safe_name(text, keep=JOB)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def overrides_label(overrides: Iterable[str], exclude_keys: Iterable[str] = ()) -> str:
    """The overrides of a run's folder name, in command-line order: ``key-value`` with the key
    by its last dotted part (whole where two shown keys share it), joined by ``_``; a list's
    items joined by ``+``; a deletion ``~key`` as ``no-key``. Left out: ``model`` and ``optim`` (in the name), ``exclude_keys``,
    ``resume``, ``ckpt_path`` and ``hydra.*``. Not made safe yet (:func:`safe_name`)."""
    excluded = set(exclude_keys) | set(IN_NAME) | set(NOT_SHOWN)
    shown = []
    for raw in overrides:
        override = str(raw)
        key = _key(override)
        if not key or key in excluded or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        shown.append((override, key))
    lasts = Counter(key.rsplit(".", 1)[-1] for _, key in shown)
    parts = []
    for override, key in shown:
        last = key.rsplit(".", 1)[-1]
        short = last if lasts[last] == 1 else key
        value = override.split("=", 1)[1] if "=" in override else None
        if value is not None:  # a list [64,32] as 64+32
            value = value.replace(", ", ",").replace(",", "+").strip("[]")
        if override.startswith("~"):
            parts.append(f"no-{short}" if value is None else f"no-{short}-{value}")
        else:
            parts.append(f"{short}-{value or ''}")
    return "_".join(parts)


def run_folder_name(stamp: str, name: str, overrides: Iterable[str],
                    exclude_keys: Iterable[str] = ()) -> str:  # fmt: skip
    """``<stamp>_<name>`` plus ``_<overrides>`` when there are any, as one safe folder name
    of at most :data:`MAX_BYTES` bytes (``name``: ``<model>-<optim>``)."""
    head = f"{stamp}_{safe_name(name)}"
    label = overrides_label(overrides, exclude_keys)
    if not label:
        return head
    return f"{head}_{safe_name(label, max(16, MAX_BYTES - len(head.encode()) - 1))}"


__all__ = [
    "JOB",
    "MAX_BYTES",
    "RUN",
    "overrides_label",
    "run_folder_name",
    "safe_name",
    "safe_name_resolver",
]
