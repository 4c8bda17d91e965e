"""The CPU kernel of Clippy's sparse (row) step: C++, compiled on first use and cached.

``sparse_step()`` returns the operator, or None where it cannot be had: no C++ compiler or no
``ninja`` on the machine (and no build from earlier), a build that fails, a CPU build of torch
without the headers, or the environment variable ``MTL_CLIPPY_DISABLE_SPARSE_KERNEL=1``. The
optimizer then takes its eager sparse path (the same arithmetic, slower) and
``implementation()`` says why (``fallback``). The build takes about half a minute, once per
machine type and source version: torch's ``cpp_extension`` keeps it under
``$TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``), behind a file lock, so
parallel sweep jobs build it once. A digest written after each build guards against loading a
library that was cut short (it is built again); a machine without a compiler loads a build
made earlier on one with a compiler.

The build is specialised to the instruction set torch itself dispatches to on this CPU
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or none), and that is part of the
extension's name, so machines of different types that share a home directory (a cluster's
nodes) each build and load their own copy, never one compiled for another CPU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "sparse_clippy.cpp"

#: ``torch.backends.cpu.get_cpu_capability()`` -> the compiler flags and ATen's vector macro
_ISA_FLAGS: dict[str, list[str]] = {
    "AVX512": [
        "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512",
    ],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}  # fmt: skip
#: Contraction off: no multiply-add fused differently from the eager path's operations.
#: OpenMP: ATen's parallel_for is a header whose pragmas need it (without it the kernel runs
#: on one thread); the library it links is the libgomp.so.1 torch has already loaded. GCC on
#: Linux; elsewhere the kernel is built without it and runs on one thread.
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", *_OPENMP]

_DISABLE_VAR = "MTL_CLIPPY_DISABLE_SPARSE_KERNEL"
_state: dict[str, object] = {"tried": False, "op": None, "failure": None}


def sparse_step() -> Callable[..., torch.Tensor] | None:
    """The compiled operator (``torch.ops.mtl_clippy_sparse.sparse_step``), or None."""
    if os.environ.get(_DISABLE_VAR, "") not in ("", "0"):
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["op"] = _build()
        except Exception as exc:  # any failure to build or load means: take the eager path
            _state["failure"] = f"{type(exc).__name__}: {_first_line(exc)}"
            warnings.warn(
                "ClippyAdagrad: the C++ kernel of the sparse (embedding) step could not be "
                f"built here ({_state['failure']}); sparse gradients take the eager path, which "
                "gives the same numbers more slowly. optimizer.implementation() records this "
                "(metrics.json: optimizer_path).",
                RuntimeWarning,
                stacklevel=5,
            )
    return _state["op"]  # type: ignore[return-value]


def failure() -> str:
    """Why ``sparse_step()`` returned None (for the optimizer's record)."""
    if os.environ.get(_DISABLE_VAR, "") not in ("", "0"):
        return f"sparse kernel disabled by {_DISABLE_VAR}"
    return f"sparse kernel not built: {_state['failure']}"


def _registered() -> Callable[..., torch.Tensor] | None:
    """The operator, if a library of this process has registered it already (loading a second
    copy would abort the process: one registration per namespace)."""
    try:
        op = torch.ops.mtl_clippy_sparse.sparse_step
        op.default  # noqa: B018 (raises where the operator does not exist)
    except (AttributeError, RuntimeError):
        return None
    return op


def _build() -> Callable[..., torch.Tensor]:
    from torch.utils import cpp_extension

    known = _registered()
    if known is not None:
        return known

    isa = torch.backends.cpu.get_cpu_capability()
    flags = _FLAGS + _ISA_FLAGS.get(isa, [])
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:10]
    name = f"mtl_clippy_sparse_{isa.lower()}_{digest}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build_dir = Path(root) / name
    library = build_dir / f"{name}.so"
    stamp = build_dir / f"{name}.so.sha256"
    if library.exists() and not _intact(library, stamp):
        # A build cut short (a full disk, a killed job) looks up to date to ninja, and loading
        # a truncated library can kill the process: build it again.
        library.unlink()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        if library.exists():  # built before, on a node with a compiler: use it
            torch.ops.load_library(str(library))
            return torch.ops.mtl_clippy_sparse.sparse_step
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH; set CXX)")
    cpp_extension.verify_ninja_availability()  # raises RuntimeError naming ninja
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=_OPENMP,
        build_directory=str(build_dir), is_python_module=False, verbose=False,
    )  # fmt: skip
    if not _intact(library, stamp):
        _write_stamp(library, stamp)
    return torch.ops.mtl_clippy_sparse.sparse_step


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(library: Path, stamp: Path) -> bool:
    """Whether ``library`` is the file whose digest ``stamp`` recorded after its build."""
    try:
        return stamp.read_text().strip() == _digest(library)
    except OSError:
        return False


def _write_stamp(library: Path, stamp: Path) -> None:
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(_digest(library) + "\n")
        os.replace(tmp, stamp)
    except OSError:  # a read-only cache still works; the next process checks again
        tmp.unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"
