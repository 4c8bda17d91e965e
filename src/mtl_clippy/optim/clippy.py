"""Clippy AdaGrad: AdaGrad with adaptive, per-tensor update clipping (Tang et al., KDD 2023).

Laid out as ``torch.optim.adagrad``: the class :class:`ClippyAdagrad` owns the param groups and
the per-parameter state (created on a parameter's first step) and hands lists of tensors to one
functional entry, :func:`clippy_adagrad`, which chooses an implementation for each group of
tensors of one device and dtype:

* ``_single_tensor_clippy_adagrad``: one tensor at a time, eager, in scratch buffers reused
  across tensors and steps (no temporary as large as a parameter per step);
* ``_multi_tensor_clippy_adagrad``: the same operations on lists with ``torch._foreach_*``
  kernels (one launch per operation for all tensors; best on GPUs, where launches dominate);
* ``_fused_clippy_adagrad``: the per-tensor math compiled by ``torch.compile`` into a reduction
  loop and an update loop per tensor (two passes over memory, the minimum for an update that
  needs a reduction first), specialised to the tensors' shapes. Fastest on CPUs with a C++
  compiler. Only a compilation failure makes it give way to an eager path (with a warning);
  ``ClippyAdagrad.implementation()`` records what ran;
* ``_sparse_clippy_adagrad``: row-sparse (embedding) gradients, touching only their rows:
  a C++ kernel on the CPU (``_sparse_kernel``, compiled on first use), Triton kernels on CUDA
  (``_sparse_triton``), and torch operations elsewhere or where those cannot be built, all
  with the dense step's arithmetic.

Every path obtains the clipping factor from one helper, :func:`_clipping_factor`, whose
docstring states the contract. None of them synchronises the host with the device, except
the sparse path on a GPU, whose ``torch.unique`` of the ids waits for it once per step (as
``coalesce`` does in torch's own sparse Adagrad).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from mtl_clippy.optim import _sparse_kernel

__all__ = ["ClippyAdagrad", "ClippyWorkspace", "clippy_adagrad", "clippy_step"]

# dtypes the compiled (fused) path handles. bfloat16 is computed by inductor in float32 and
# rounded at the end, which is more accurate but not "all arithmetic in the parameter's dtype";
# bfloat16 therefore uses the eager multi-tensor path, exactly like the reference.
_FUSED_DTYPES = (torch.float32, torch.float64)

# The options of one param group that are numbers, all validated as >= 0.
_NON_NEGATIVE = (
    "lr",
    "initial_accumulator_value",
    "variable_relative_threshold",
    "accumulator_relative_threshold",
    "absolute_threshold",
    "epsilon",
    "weight_decay",
)


class ClippyAdagrad(Optimizer):
    r"""AdaGrad with Clippy's adaptive update clipping (Tang et al., KDD 2023).

    Clippy was developed at Google for YouTube's multitask ranking models, whose training
    occasionally diverged (the loss jumps and never recovers). It scales each tensor's AdaGrad
    update down, as a whole, whenever any element of the update would move by more than a
    bound made of an absolute part and a part relative to the element's current value. The
    update's direction is kept; only its length shrinks. This reproduces ``ClippyAdagrad`` of
    TensorFlow Recommenders (``tensorflow_recommenders.experimental.optimizers``) exactly.

    For one parameter tensor :math:`w` with gradient :math:`g`, accumulator :math:`A` and the
    param group's current learning rate :math:`\eta` (after any scheduler):

    .. math::

        w &\leftarrow w - \eta\,\mathrm{wd}\; w
            \qquad\text{(only if weight\_decay > 0; decoupled, whole tensor)} \\
        A &\leftarrow A + g^2 \qquad\text{(only if use\_standard\_accumulator\_update)} \\
        p &= 1 / \sqrt{A + \epsilon} \\
        \delta &= \eta\, g\, p \\
        b &= \lambda_{abs} + \lambda_{rel}\,|w| + \lambda_{acc}\, p \\
        \sigma &= \min\Bigl(1,\; \min_{i:\,\delta_i \ne 0} b_i / |\delta_i|\Bigr)
            \qquad\text{(one scalar per tensor; 1 if } \delta = 0\text{)} \\
        A &\leftarrow A + (\sigma g)^2 \text{ if clip\_accumulator\_update, else } A + g^2
            \qquad\text{(unless use\_standard\_accumulator\_update)} \\
        w &\leftarrow w - \sigma\,\delta

    :math:`\sigma` is the largest scale in :math:`[0, 1]` such that no element moves by more
    than its bound. By default :math:`p` is computed from the accumulator *before* this step's
    gradient is added (the reference's "delayed" update). All arithmetic is in the parameter's
    dtype. If some :math:`b_i = 0` while :math:`\delta_i \ne 0`, :math:`\sigma = 0` (no NaN).

    Sparse gradients (``nn.Embedding(..., sparse=True)``, ``nn.EmbeddingBag(..., sparse=True)``)
    are coalesced (duplicate rows summed) and only the touched rows of the parameter and the
    accumulator change; :math:`\sigma` is the minimum over the touched rows. This equals the
    dense computation with a gradient that is zero on the other rows, at the cost of the
    touched rows only (weight decay, if any, still applies to the whole tensor, as in the
    dense case).

    Every option below is also a param group key: each group may set its own (for example
    infinite thresholds for the embeddings, or another ``lr``).

    Args:
        params: parameters, or param groups (dicts with ``"params"`` and any options below).
        lr: learning rate :math:`\eta`; default 1e-3, range >= 0 (a Python number, not a
            tensor). It sits *inside* the clipped quantity, so the bound limits the actual
            step. TFRS notes that ``lr=1.0`` gives the paper's exact form; this project's
            ``optim=clippy`` uses 0.1.
        initial_accumulator_value: starting value of :math:`A`; default 0.1, range >= 0.
            Larger values shrink the first steps (AdaGrad's usual warm-up knob).
        variable_relative_threshold: :math:`\lambda_{rel}`, the bound relative to :math:`|w|`;
            default 0.1, range >= 0 (``inf`` switches clipping off). The paper's main knob:
            0.1 (reference default) to 0.5 (this project's study). Larger values clip less.
        accumulator_relative_threshold: :math:`\lambda_{acc}`, an extra bound proportional to
            :math:`p`, i.e. allowing larger moves for rarely-updated coordinates; default 0
            (off, as in the reference), range >= 0.
        absolute_threshold: :math:`\lambda_{abs}`, the bound for elements whose value is near
            zero (freshly initialised biases or embeddings would otherwise never move);
            default 1e-7 (the reference's), range >= 0; this project's study uses 1e-2.
        epsilon: added to :math:`A` *inside* the square root, for numerical safety; default
            1e-7, range >= 0.
        clip_accumulator_update: add :math:`(\sigma g)^2` instead of :math:`g^2` to the
            accumulator, so that clipped steps do not also shrink future learning rates;
            default False.
        use_standard_accumulator_update: add :math:`g^2` to the accumulator *before* computing
            the step (the paper's Algorithm 1 form) instead of after; default False. Cannot be
            combined with ``clip_accumulator_update``.
        weight_decay: decoupled weight decay, :math:`w \leftarrow w(1 - \eta\,\mathrm{wd})`
            applied to the whole tensor before the step; default 0, range >= 0.
        foreach: use the multi-tensor ``torch._foreach_*`` implementation; default None
            (decide automatically, see ``fused``); ``False`` asks for the single-tensor path.
        fused: use the ``torch.compile``-fused implementation; default None. ``None`` (with
            ``foreach=None``) picks it for float32/float64 dense parameters when
            ``torch.compile`` works on the parameters' device (a C++ compiler on CPU, Triton on
            CUDA); otherwise the multi-tensor path is used on CUDA and the single-tensor path
            on CPU (the faster eager choice on each, as measured in
            ``benchmarks/bench_optimizer.py``). If compiling fails (a compiler error, not an
            error of the step), the tensors concerned take that eager path, with a
            ``RuntimeWarning``. The first fused steps of an optimizer compile its kernels
            (tens of seconds on a small CPU the first time, then seconds: inductor caches them
            on disk). Set the environment variable ``MTL_CLIPPY_DISABLE_FUSED=1`` to rule it
            out globally. ``fused=True`` with ``foreach=True`` is an error.

    State is created on a parameter's first step, not in the constructor: ``state_dict()``
    before any step has an empty ``state``, and a parameter that never has a gradient never
    gets state. It is all tensors, so that ``state_dict()`` / ``load_state_dict()`` round-trip and
    loading moves it to the parameters' device: ``state[p]["sum"]`` is the accumulator,
    ``state[p]["step"]`` the number of steps taken (float32 on the CPU, as torch's Adagrad)
    and ``state[p]["clipping_factor"]`` the last step's :math:`\sigma` (0-dim, on the
    parameter's device; read it without forcing a sync by logging it lazily).
    ``optimizer.implementation()`` says which implementations the steps ran and whether the
    compiled one ever fell back (``metrics.json``: ``optimizer_path``).

    Each optimizer compiles its own fused steps (one per param group and set of tensor
    shapes; nothing is shared between optimizers): a new optimizer costs about 0.5-0.8 s of
    compiling at its first steps once inductor's disk cache is warm, for example per job of a
    sweep run in one process.

    Reference: J. Tang, Y. Drori, D. Chang, M. Sathiamoorthy, J. Gilmer, L. Wei, X. Yi, L. Hong,
    E. H. Chi. "Improving Training Stability for Multitask Ranking Models in Recommender
    Systems". KDD 2023. arXiv:2302.09178.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        initial_accumulator_value: float = 0.1,
        variable_relative_threshold: float = 0.1,
        accumulator_relative_threshold: float = 0.0,
        absolute_threshold: float = 1e-7,
        epsilon: float = 1e-7,
        clip_accumulator_update: bool = False,
        use_standard_accumulator_update: bool = False,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            initial_accumulator_value=initial_accumulator_value,
            variable_relative_threshold=variable_relative_threshold,
            accumulator_relative_threshold=accumulator_relative_threshold,
            absolute_threshold=absolute_threshold,
            epsilon=epsilon,
            clip_accumulator_update=clip_accumulator_update,
            use_standard_accumulator_update=use_standard_accumulator_update,
            weight_decay=weight_decay,
            foreach=foreach,
            fused=fused,
        )
        _check_options(defaults)
        if clip_accumulator_update and use_standard_accumulator_update:
            raise ValueError(
                "ClippyAdagrad: clip_accumulator_update=True and "
                "use_standard_accumulator_update=True cannot be combined: the standard update "
                "adds g^2 to the accumulator before the clipping factor is known. Choose one."
            )
        self._init_memory()
        super().__init__(params, defaults)  # add_param_group validates every group

    def _init_memory(self) -> None:
        # Not state (nothing in them belongs to a step): per param group, the memory its steps
        # reuse (scratch buffers, compiled code) and the record of what its steps ran.
        self._workspaces: dict[int, ClippyWorkspace] = {}
        self._paths: dict[int, dict[str, Any]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_memory()
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the group with the defaults it inherits before torch appends it.
        group = {**self.defaults, **param_group}
        _check_options(group)
        if group["clip_accumulator_update"] and group["use_standard_accumulator_update"]:
            raise ValueError(
                "ClippyAdagrad: a param group sets both clip_accumulator_update and "
                "use_standard_accumulator_update; they are mutually exclusive"
            )
        super().add_param_group(param_group)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        accs: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        """Collect the group's parameters that have a gradient, creating their state on their
        first step."""
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["sum"] = torch.full_like(
                    p, group["initial_accumulator_value"], memory_format=torch.preserve_format
                )
                state["clipping_factor"] = torch.ones((), dtype=p.dtype, device=p.device)
            params.append(p)
            grads.append(p.grad)
            accs.append(state["sum"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step. Returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for index, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            accs: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, accs, steps)
            if not params:
                continue
            sigmas = clippy_adagrad(
                params,
                grads,
                accs,
                steps,
                lr=group["lr"],
                epsilon=group["epsilon"],
                variable_relative_threshold=group["variable_relative_threshold"],
                accumulator_relative_threshold=group["accumulator_relative_threshold"],
                absolute_threshold=group["absolute_threshold"],
                weight_decay=group["weight_decay"],
                clip_accumulator_update=group["clip_accumulator_update"],
                use_standard_accumulator_update=group["use_standard_accumulator_update"],
                foreach=group["foreach"],
                fused=group["fused"],
                workspace=self._workspace(index),
                record=self._record(index),
            )
            for p, sigma in zip(params, sigmas, strict=True):
                self.state[p]["clipping_factor"] = sigma
        return loss

    def _record(self, group_index: int) -> dict[str, Any]:
        """The mutable record of what one param group's steps ran (see ``implementation()``);
        the checkpoint callback saves and restores it."""
        record = self._paths.get(group_index)
        if record is None:  # built once per group, not on every step
            record = self._paths[group_index] = _new_record()
        return record

    def _workspace(self, group_index: int) -> ClippyWorkspace:
        """One param group's scratch buffers and compiled steps, made on its first step."""
        workspace = self._workspaces.get(group_index)
        if workspace is None:
            workspace = self._workspaces[group_index] = ClippyWorkspace()
        return workspace

    def implementation(self) -> dict[str, Any]:
        """Which implementations this optimizer's steps actually ran, for the record.

        ``{"dense": [...], "sparse": bool, "sparse_paths": [...], "fallback": None | str,
        "groups": [...]}``: the dense paths used (``"fused"``, ``"foreach"``, ``"single"``),
        whether the sparse (row) path ran and how (``"kernel"``: the C++ kernel; ``"eager"``:
        torch operations), and the reason a compiled path (the dense step's or the sparse
        kernel) had to give way to an eager one (None if it never did); ``groups`` has the same
        entries for each param group. Empty before the first step.
        """
        groups = []
        for i in range(len(self.param_groups)):
            rec = self._paths.get(i, _new_record())
            groups.append(
                {
                    "dense": sorted(rec["dense"]),
                    "sparse": rec["sparse"],
                    "sparse_paths": sorted(rec.get("sparse_paths", ())),
                    "fallback": rec["fallback"],
                }
            )
        return {
            "dense": sorted({p for g in groups for p in g["dense"]}),
            "sparse": any(g["sparse"] for g in groups),
            "sparse_paths": sorted({p for g in groups for p in g["sparse_paths"]}),
            "fallback": next((g["fallback"] for g in groups if g["fallback"]), None),
            "groups": groups,
        }


def _check_options(options: dict[str, Any]) -> None:
    """Validate the numeric options and the path flags of the constructor or of a group."""
    if isinstance(options["lr"], Tensor):
        raise ValueError("ClippyAdagrad: lr must be a Python float, not a tensor")
    for name in _NON_NEGATIVE:
        value = options[name]
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"ClippyAdagrad: {name} must be a number, got {value!r}") from None
        if not v >= 0.0:  # also rejects NaN
            raise ValueError(f"ClippyAdagrad: {name} must be >= 0, got {value!r}")
    if options.get("fused") and options.get("foreach"):
        raise ValueError("ClippyAdagrad: fused=True and foreach=True are exclusive; choose one")


def _new_record() -> dict[str, Any]:
    return {"dense": set(), "sparse": False, "sparse_paths": set(), "fallback": None}


# ---------------------------------------------------------------------- the functional entry


class _Hyper(NamedTuple):
    """The options of one step, as plain Python numbers (hashable: keys the compiled path's
    tensor of scalars)."""

    eps: float
    rel: float
    acc_rel: float
    abs_t: float
    wd: float
    clip_acc: bool
    standard: bool


class ClippyWorkspace:
    """Memory that one caller of :func:`clippy_adagrad` reuses from step to step; not state.

    ``ClippyAdagrad`` keeps one per param group; a caller of the functional entry that wants
    the compiled path should keep one too and pass it at every step, so that the code compiled
    at the first step is reused. It holds the scratch buffers of the eager paths (grown on
    demand and kept, so a step allocates nothing as large as a parameter), the compiled steps
    of the fused path, the signatures that failed to compile (and why), and the small device
    tensor of hyperparameters the compiled code reads.

    There is one compiled step per *signature*: device, dtype, thread count, option flags and
    every tensor's shape and strides (:func:`_signature`), each ``torch.compile`` of a copy of
    the step's code of its own. torch.compile keeps its compiled variants per code object and
    gives up past ``torch._dynamo.config.recompile_limit`` of them (8), so a single shared code
    object would fail as soon as the set of tensors with a gradient varies from step to step
    (a task absent from a batch, a frozen layer); with one code object per signature each
    compiles once. At most ``MAX_COMPILED`` signatures are compiled per workspace; beyond
    that, a new signature takes the eager path (with the fallback warning) while the known ones
    keep their compiled steps (signatures that failed to compile count towards the bound too).
    Everything lives and dies with the workspace, however many
    optimizers a process creates (a sweep runs its jobs in one process).

    A workspace is not thread-safe: its buffers are reused by every call, so two threads
    stepping at once need a workspace each (as two optimizers have).
    """

    #: The most signatures one workspace compiles (as many as the earlier process-wide cache).
    MAX_COMPILED = 64

    def __init__(self) -> None:
        self.buffers: dict[tuple, Tensor] = {}
        self.compiled: dict[tuple, Callable[..., list[Tensor]]] = {}
        self.compile_failures: dict[tuple, str] = {}
        #: why the sparse step's Triton kernels could not run here (then: the eager path)
        self.triton_failure: str | None = None

    def row_slots(self, rows: int) -> Tensor:
        """The sparse kernel's row -> slot map: int32, at least ``rows`` long, all -1 between
        steps (the kernel restores it). One for all the group's tables, grown on demand."""
        slots = self.buffers.get(("row_slots",))
        if slots is None or slots.numel() < rows:
            slots = self.buffers[("row_slots",)] = torch.full((rows,), -1, dtype=torch.int32)
        return slots

    def sparse_sums(self, like: Tensor, nnz: int, width: int) -> Tensor:
        """The sparse kernel's scratch for ``nnz`` ids of ``width`` values: the summed
        gradients of rows hit more than once, then every touched row's update: together at
        most the gradient's values (k rows hit twice or more take at least 2k ids). Sized
        with a quarter's headroom, and made afresh when four times too large, so that it
        follows the batches' size and never that of a table one unusual step touched whole."""
        need = nnz * width
        key = ("sparse_sums", like.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < need or buf.numel() > 4 * need + 2**16:
            buf = self.buffers[key] = torch.empty(need + need // 4, dtype=like.dtype)
        return buf

    def scratch(self, kind: str, rows: int, numel: int, like: Tensor) -> Tensor:
        """``rows`` contiguous rows of at least ``numel`` elements of ``like``'s device and
        dtype, grown on demand and then kept."""
        key = (kind, like.device, like.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.shape[1] < numel:
            buf = torch.empty((rows, numel), device=like.device, dtype=like.dtype)
            self.buffers[key] = buf
        return buf


def clippy_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    accs: list[Tensor],
    state_steps: list[Tensor] | None = None,
    *,
    lr: float,
    epsilon: float = 1e-7,
    variable_relative_threshold: float = 0.1,
    accumulator_relative_threshold: float = 0.0,
    absolute_threshold: float = 1e-7,
    weight_decay: float = 0.0,
    clip_accumulator_update: bool = False,
    use_standard_accumulator_update: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    workspace: ClippyWorkspace | None = None,
    record: dict[str, Any] | None = None,
) -> list[Tensor]:
    """Functional Clippy AdaGrad: one step of every tensor, in place. See :class:`ClippyAdagrad`.

    ``params``, ``grads`` (dense or row-sparse COO) and ``accs`` (the accumulators) are lists of
    the same length; ``state_steps`` (optional) are step counters incremented by one. The
    options mean what the class's do; ``foreach`` and ``fused`` choose the implementation of
    each group of dense tensors of one device and dtype, as the class documents. Returns each
    tensor's clipping factor (0-dim, on its device; no host sync).

    ``workspace``: memory reused across calls (scratch buffers, compiled code); pass the same
    :class:`ClippyWorkspace` at every step. Without one, ``fused=None`` means the eager path
    (the per-tensor loop on CPU, the multi-tensor one on CUDA): nothing is compiled.
    ``fused=True`` without a workspace compiles its step afresh on every call (seconds each);
    a caller that wants the compiled path must keep a workspace and pass it.
    ``record``: if given, a dict ``{"dense": set, "sparse": bool, "fallback": str | None}``
    (``"sparse_paths": set`` is added where missing)
    updated with the paths that ran (as ``ClippyAdagrad.implementation()`` reports them).
    """
    if clip_accumulator_update and use_standard_accumulator_update:
        raise ValueError(
            "ClippyAdagrad: clip_accumulator_update=True and use_standard_accumulator_update=True "
            "cannot be combined"
        )
    if fused and foreach:
        raise ValueError("ClippyAdagrad: fused=True and foreach=True are exclusive; choose one")
    if workspace is None:
        # Compiled code would be lost after this call: only an explicit fused=True compiles.
        if fused is None:
            fused = False
        workspace = ClippyWorkspace()
    if record is None:
        record = _new_record()
    lr = float(lr)
    hp = _Hyper(
        float(epsilon),
        float(variable_relative_threshold),
        float(accumulator_relative_threshold),
        float(absolute_threshold),
        float(weight_decay),
        bool(clip_accumulator_update),
        bool(use_standard_accumulator_update),
    )
    # Every sparse gradient's shape and (on the CPU) row indices are checked before anything
    # is written, so that a refused step leaves the whole group as it was.
    for w, g in zip(params, grads, strict=True):
        if g.is_sparse:
            _check_sparse(w, g)
    if state_steps:
        torch._foreach_add_(state_steps, 1.0)

    sigmas: list[Tensor | None] = [None] * len(params)
    dense: list[int] = []
    for i, (w, g) in enumerate(zip(params, grads, strict=True)):
        if g.is_sparse:
            record["sparse"] = True
            sigmas[i] = _sparse_clippy_adagrad(
                w, g, accs[i], lr=lr, hp=hp, workspace=workspace, record=record
            )
        elif w.numel() == 0:
            sigmas[i] = torch.ones((), dtype=w.dtype, device=w.device)
        else:
            dense.append(i)
    if dense:
        if any(torch.is_complex(params[i]) for i in dense):
            raise ValueError("ClippyAdagrad does not support complex parameters")
        lists = [[params[i] for i in dense], [grads[i] for i in dense], [accs[i] for i in dense]]
        for (ps, gs, as_), where in _group_by_device_and_dtype(lists):
            out = _dense_clippy_adagrad(
                ps, gs, as_, lr=lr, hp=hp, foreach=foreach, fused=fused,
                workspace=workspace, record=record,
            )  # fmt: skip
            for j, sigma in zip(where, out, strict=True):
                sigmas[dense[j]] = sigma
    return sigmas  # type: ignore[return-value]  # every entry is set above


def clippy_step(
    params: list[Tensor], grads: list[Tensor], accs: list[Tensor], **options: Any
) -> list[Tensor]:
    """Deprecated: use :func:`clippy_adagrad`. The earlier functional form, kept so that old
    callers run unchanged: one step of each tensor on the per-tensor eager path, in place;
    returns each tensor's clipping factor. Takes :func:`clippy_adagrad`'s keyword options
    (``lr`` and the thresholds) other than ``foreach`` and ``fused``: it equals
    ``clippy_adagrad(params, grads, accs, **options, foreach=False, fused=False)``."""
    warnings.warn(
        "mtl_clippy.optim.clippy_step is deprecated; use mtl_clippy.optim.clippy_adagrad "
        "(the same arguments; foreach=False, fused=False give the same path)",
        DeprecationWarning,
        stacklevel=2,
    )
    for flag in ("foreach", "fused", "workspace", "state_steps"):
        if flag in options:
            raise TypeError(f"clippy_step() got an unexpected keyword argument {flag!r}")
    return clippy_adagrad(params, grads, accs, **options, foreach=False, fused=False)


def _group_by_device_and_dtype(
    tensorlists: list[list[Tensor]],
) -> list[tuple[list[list[Tensor]], list[int]]]:
    """Split parallel lists of tensors into groups of one device and dtype (those of the first
    list), each with the positions of its tensors in the input, in input order.

    The one use of torch's own helper, the private static method
    ``torch.optim.Optimizer._group_tensors_by_device_and_dtype`` (what torch's own optimizers
    group with; one C++ pass). ``tests/test_clippy.py::test_grouping_by_device_and_dtype``
    pins the behaviour relied on here: keys ``(device, dtype)`` (``(None, None)`` while
    torch.compile traces), values ``(lists, indices)`` with the tensors in input order.
    """
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensorlists, with_indices=True)
    return [(lists, list(indices)) for lists, indices in grouped.values()]  # type: ignore[misc]


def _dense_clippy_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    accs: list[Tensor],
    *,
    lr: float,
    hp: _Hyper,
    foreach: bool | None,
    fused: bool | None,
    workspace: ClippyWorkspace,
    record: dict[str, Any],
) -> list[Tensor]:
    """One step of dense tensors of one device and dtype, on the path ``_choose_path`` picks."""
    device, dtype = params[0].device, params[0].dtype
    path = _choose_path(foreach, fused, device, dtype)
    if path == "fused":
        sigmas, failure = _fused_clippy_adagrad(
            params, grads, accs, lr=lr, hp=hp, workspace=workspace
        )
        if sigmas is not None:
            record["dense"].add("fused")
            return sigmas
        record["fallback"] = record["fallback"] or failure  # nothing ran: take an eager path
        path = _eager_default(device)
    record["dense"].add(path)
    if path == "foreach":
        return _multi_tensor_clippy_adagrad(params, grads, accs, lr=lr, hp=hp)
    scratch = workspace.scratch("dense", 3, max(p.numel() for p in params), params[0])
    return _single_tensor_clippy_adagrad(params, grads, accs, lr=lr, hp=hp, scratch=scratch)


def _choose_path(
    foreach: bool | None, fused: bool | None, device: torch.device, dtype: torch.dtype
) -> str:
    """``"fused"``, ``"foreach"`` or ``"single"`` for dense tensors of one device and dtype."""
    if fused:
        return "fused" if dtype in _FUSED_DTYPES else "foreach"
    if foreach:
        return "foreach"
    if foreach is False:  # explicitly no multi-tensor kernels: the per-tensor loop
        return "single"
    if fused is None and dtype in _FUSED_DTYPES and _fused_available(device):
        return "fused"
    return _eager_default(device)


def _eager_default(device: torch.device) -> str:
    return "foreach" if device.type == "cuda" else "single"


_FUSED_STATUS: dict[str, bool] = {}  # device type -> a compiler for it exists (no compilation)


def _fused_available(device: torch.device) -> bool:
    """Whether the compiled path may be tried on this device type (no compilation here)."""
    if os.environ.get("MTL_CLIPPY_DISABLE_FUSED", "") not in ("", "0"):
        return False
    known = _FUSED_STATUS.get(device.type)
    if known is not None:
        return known
    ok = hasattr(torch, "compile")
    if device.type == "cpu":
        ok = ok and any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            ok = False
    else:
        ok = False
    _FUSED_STATUS[device.type] = ok
    return ok


# ---------------------------------------------------------------------- the clipping contract


def _clipping_factor(bound: Tensor, abs_delta: Tensor) -> Tensor:
    """Clippy's clipping factor of one tensor, from each element's bound and ``|delta|``.

    The contract: sigma is the largest scale in [0, 1] such that no element moves past its
    bound, ``sigma * |delta_i| <= bound_i`` for every i; that is
    ``sigma = min(1, min_i s_i)`` with ``s_i = bound_i / |delta_i|``, and ``s_i = 1`` where the
    update is 0 (an element that does not move constrains nothing, even with a zero bound:
    0/0 counts as 1). A zero bound under a nonzero update gives sigma = 0, never NaN; an
    infinite bound never clips; an empty tensor gives 1. One scalar for the whole tensor: the
    update's direction is kept.

    Returns a 0-dim tensor on the inputs' device (no host sync). ``bound`` is overwritten with
    the ratios ``s_i``, so that the eager paths allocate nothing; inside ``torch.compile`` the
    in-place operations fuse like any others.
    """
    if bound.numel() == 0:
        return torch.ones((), dtype=bound.dtype, device=bound.device)
    ratio = bound.div_(abs_delta)  # 0/0 (no move, no bound) is NaN: counts as 1
    if torch.compiler.is_compiling():
        # The same replacement in the form inductor vectorises (its nan_to_num loop is ~25%
        # slower on CPU); in eager code nan_to_num_ is the one pass without a temporary.
        ratio = torch.where(ratio != ratio, 1.0, ratio)
    else:
        ratio.nan_to_num_(nan=1.0)
    return torch.amin(ratio).clamp_(max=1.0)


# ---------------------------------------------------------------------- per tensor


def _delta_and_sigma(
    w: Tensor, g: Tensor, acc: Tensor, lr: float, hp: _Hyper, pb: Tensor, db: Tensor, bb: Tensor
) -> Tensor:
    """The heart of one eager step, in place in three scratch tensors shaped like ``w``.

    Leaves the unclipped update ``delta = lr * g / sqrt(acc + eps)`` in ``db`` and returns the
    clipping factor sigma (0-dim, no sync); ``pb`` and ``bb`` are clobbered. ``acc`` must
    already include this step's ``g^2`` when the standard accumulator update is used.
    """
    torch.add(acc, hp.eps, out=pb).rsqrt_()  # p = 1 / sqrt(acc + eps)
    torch.mul(g, lr, out=db).mul_(pb)  # delta = lr * g * p
    torch.abs(w, out=bb).mul_(hp.rel).add_(hp.abs_t)  # bound = rel*|w| + abs
    if hp.acc_rel != 0.0:
        bb.add_(pb, alpha=hp.acc_rel)  # ... + acc_rel * p
    torch.abs(db, out=pb)
    return _clipping_factor(bb, pb)


def _single_tensor_clippy_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    accs: list[Tensor],
    *,
    lr: float,
    hp: _Hyper,
    scratch: Tensor,
) -> list[Tensor]:
    """Eager step, one tensor at a time, in three rows of ``scratch`` (at least as long as the
    largest tensor): no allocation proportional to the parameters."""
    sigmas = []
    for w, g, acc in zip(params, grads, accs, strict=True):
        n = w.numel()
        pb, db, bb = (
            scratch[i, :n].view_as(w) if w.is_contiguous() else torch.empty_like(w)
            for i in range(3)
        )
        if hp.wd != 0.0:
            w.add_(w, alpha=-(hp.wd * lr))
        if hp.standard:
            acc.addcmul_(g, g)
        sigma = _delta_and_sigma(w, g, acc, lr, hp, pb, db, bb)
        if hp.clip_acc:
            torch.mul(g, sigma, out=pb)
            acc.addcmul_(pb, pb)
        elif not hp.standard:
            acc.addcmul_(g, g)
        w.addcmul_(db, sigma, value=-1.0)
        sigmas.append(sigma)
    return sigmas


# ---------------------------------------------------------------------- multi-tensor

# Two ``torch._foreach_*`` kernels arrived after the oldest torch this package supports
# (``_foreach_copy_`` in 2.1, ``_foreach_rsqrt_`` in 2.5/2.6). Where one is missing, a loop of the
# per-tensor op does the same arithmetic (the foreach kernels' CPU fallback is that loop); the
# lookup happens at call time, so a test can remove them.


def _foreach_rsqrt_(tensors: list[Tensor]) -> None:
    fn = getattr(torch, "_foreach_rsqrt_", None)
    if fn is not None:
        fn(tensors)
    else:
        for t in tensors:
            t.rsqrt_()


def _foreach_copy_(dst: list[Tensor], src: list[Tensor]) -> None:
    fn = getattr(torch, "_foreach_copy_", None)
    if fn is not None:
        fn(dst, src)
    else:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def _multi_tensor_clippy_adagrad(
    params: list[Tensor], grads: list[Tensor], accs: list[Tensor], *, lr: float, hp: _Hyper
) -> list[Tensor]:
    """The operations of ``_single_tensor_clippy_adagrad`` on lists, with ``_foreach`` kernels
    (the clipping factor of each tensor from ``_clipping_factor``)."""
    if hp.wd != 0.0:
        torch._foreach_add_(params, params, alpha=-(hp.wd * lr))
    if hp.standard:
        torch._foreach_addcmul_(accs, grads, grads)
    pb = torch._foreach_add(accs, hp.eps)
    _foreach_rsqrt_(pb)  # p
    db = torch._foreach_mul(grads, lr)
    torch._foreach_mul_(db, pb)  # delta
    bb = torch._foreach_abs(params)
    torch._foreach_mul_(bb, hp.rel)
    torch._foreach_add_(bb, hp.abs_t)
    if hp.acc_rel != 0.0:
        torch._foreach_add_(bb, pb, alpha=hp.acc_rel)  # bound
    _foreach_copy_(pb, db)
    torch._foreach_abs_(pb)  # |delta|
    sigmas = [_clipping_factor(b, d) for b, d in zip(bb, pb, strict=True)]
    if hp.clip_acc:
        sg = torch._foreach_mul(grads, sigmas)
        torch._foreach_addcmul_(accs, sg, sg)
    elif not hp.standard:
        torch._foreach_addcmul_(accs, grads, grads)
    torch._foreach_mul_(db, sigmas)
    torch._foreach_sub_(params, db)
    return sigmas


# ---------------------------------------------------------------------- compiled


def _clippy_math(
    params: list[Tensor],
    grads: list[Tensor],
    accs: list[Tensor],
    scalars: Tensor,
    has_acc_rel: bool,
    has_wd: bool,
    clip_acc: bool,
    standard: bool,
) -> list[Tensor]:
    """Plain per-tensor math; ``torch.compile`` turns it into two fused loops per tensor
    (a reduction for sigma, then the update), specialised to the tensors' shapes.

    ``scalars`` holds ``[lr, eps, rel, acc_rel, abs, wd]`` as a tensor, so that a scheduler or a
    new param group changes numbers, not the compiled code; only the flags specialise it.
    """
    lr, eps, rel, acc_rel, abs_t, wd = scalars.unbind()
    sigmas = []
    for w, g, acc in zip(params, grads, accs, strict=True):
        if has_wd:
            w.sub_(w * (wd * lr))
        if standard:
            acc.add_(g * g)
        p = torch.rsqrt(acc + eps)
        delta = g * lr * p
        bound = torch.abs(w) * rel + abs_t
        if has_acc_rel:
            bound = bound + p * acc_rel
        sigma = _clipping_factor(bound, torch.abs(delta))
        if clip_acc:
            sg = g * sigma
            acc.add_(sg * sg)
        elif not standard:
            acc.add_(g * g)
        w.sub_(delta * sigma)
        sigmas.append(sigma)
    return sigmas


def _signature(
    params: list[Tensor], grads: list[Tensor], accs: list[Tensor], flags: tuple[bool, ...]
) -> tuple:
    """What the compiled step is specialised to: device, dtype, thread count, the option
    flags and each tensor's shape, strides and ``requires_grad``. Two calls with the same
    signature run the same compiled code; any difference compiles a new copy."""
    first = params[0]
    tensors = tuple(
        (tuple(w.shape), w.stride(), g.stride(), a.stride(), w.requires_grad)
        for w, g, a in zip(params, grads, accs, strict=True)
    )
    return (first.device, first.dtype, torch.get_num_threads(), flags, tensors)


def _compile_step() -> Callable[..., list[Tensor]]:
    """``torch.compile`` of a fresh copy of ``_clippy_math``'s code, with a compile cache of its
    own: ``ClippyWorkspace`` keeps one per signature, so each compiles once and never nears
    the recompile limit. Shapes are static: the fully specialised kernels are the fastest
    inductor generates here."""
    code = _clippy_math.__code__
    raw = types.FunctionType(code.replace(), _clippy_math.__globals__, code.co_name)
    return torch.compile(raw, fullgraph=True, dynamic=False)


def _fused_clippy_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    accs: list[Tensor],
    *,
    lr: float,
    hp: _Hyper,
    workspace: ClippyWorkspace,
) -> tuple[list[Tensor] | None, str | None]:
    """Run the compiled step on dense tensors of one device and dtype.

    Returns the clipping factors and None or, when this signature could not be compiled here
    (or the workspace already holds ``MAX_COMPILED`` signatures), None (nothing has been done
    to the tensors; the caller runs an eager path) and the reason.
    """
    device, dtype = params[0].device, params[0].dtype
    flags = (hp.acc_rel != 0.0, hp.wd != 0.0, hp.clip_acc, hp.standard)
    key = _signature(params, grads, accs, flags)
    if key in workspace.compile_failures:
        return None, workspace.compile_failures[key]
    step = workspace.compiled.get(key)
    if step is None:
        if len(workspace.compiled) + len(workspace.compile_failures) >= workspace.MAX_COMPILED:
            # Not recorded per signature (that would grow without bound): checked each time.
            failure = (
                f"more than {workspace.MAX_COMPILED} different sets of tensor shapes in one "
                "param group"
            )
            _warn_fallback(str(device), str(dtype).removeprefix("torch."), failure)
            return None, failure
        step = workspace.compiled[key] = _compile_step()
    # One small device tensor per (device, dtype, hyperparameters), rebuilt only when they
    # change; lr is refreshed with fill_ (a kernel launch, no sync).
    skey = ("scalars", device, dtype, hp)
    scalars = workspace.buffers.get(skey)
    if scalars is None:
        values = [lr, hp.eps, hp.rel, hp.acc_rel, hp.abs_t, hp.wd]
        scalars = workspace.buffers[skey] = torch.tensor(values, device=device, dtype=dtype)
    scalars[0].fill_(lr)
    try:
        return list(step(params, grads, accs, scalars, *flags)), None
    except _compile_errors() as exc:  # compilation failed; nothing ran
        failure = f"{type(exc).__name__}: {_first_line(exc)}"
        workspace.compile_failures[key] = failure
        del workspace.compiled[key]
        _warn_fallback(str(device), str(dtype).removeprefix("torch."), failure)
        return None, failure


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this could not be compiled here", not "the step is wrong".

    A failure of dynamo to trace (``Unsupported``), of the backend (inductor, the C++ compiler,
    Triton) or a recompile limit. Errors raised by the math itself while tracing (dynamo's
    ``TorchRuntimeError``) or while running are bugs and propagate.
    """
    names = {
        "torch._dynamo.exc": (
            "BackendCompilerFailed",
            "Unsupported",
            "InternalTorchDynamoError",
            "RecompileError",
            "FailOnRecompileLimitHit",
            "CacheLimitExceeded",
        ),
        "torch._inductor.exc": ("InductorError", "CppCompileError", "InvalidCxxCompiler"),
    }
    found: list[type[BaseException]] = []
    for module_name, attrs in names.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found += [getattr(module, a) for a in attrs if isinstance(getattr(module, a, None), type)]
    return tuple(found)


def _first_line(exc: BaseException) -> str:
    """The first line of the message, and of the backend's own error where there is one."""
    text = str(exc).strip()
    line = text.splitlines()[0][:200] if text else "(no message)"
    inner = getattr(exc, "inner_exception", None)
    if isinstance(inner, BaseException):
        line = f"{line} {type(inner).__name__}: {_first_line(inner)}"
    return line


def _warn_fallback(device: str, dtype: str, reason: str) -> None:
    # The same text from the same line: Python's default filter shows it once per process.
    warnings.warn(
        f"ClippyAdagrad: the compiled (fused) step could not be compiled for {dtype} tensors "
        f"on {device}: {reason}. Those tensors use the eager implementation: the same numbers, "
        "more slowly. optimizer.implementation() records the fallback (metrics.json: "
        "optimizer_path).",
        RuntimeWarning,
        stacklevel=6,
    )


# ---------------------------------------------------------------------- sparse


def _sparse_clippy_adagrad(
    p: Tensor,
    grad: Tensor,
    acc: Tensor,
    *,
    lr: float,
    hp: _Hyper,
    workspace: ClippyWorkspace,
    record: dict[str, Any],
) -> Tensor:
    """One step of a parameter with a row-sparse COO gradient; returns sigma.

    On the CPU, for float32 and float64 contiguous tables, the fused C++ kernel
    (``_sparse_kernel``): one pass over the ids, then two parallel passes over the touched rows
    (sum duplicates and reduce sigma; update), nothing allocated in proportion to the table.
    Elsewhere, or where the kernel cannot be built, the eager path below: the same numbers.
    """
    if hp.wd != 0.0:  # decoupled decay applies to the whole tensor, as in the dense case
        p.add_(p, alpha=-(hp.wd * lr))
    paths = record.setdefault("sparse_paths", set())
    if _kernel_applies(p, acc, grad):
        op = _sparse_kernel.sparse_step()
        if op is not None:
            if torch.is_grad_enabled() and (p.requires_grad or acc.requires_grad):
                raise RuntimeError(  # what torch's in-place operations say in this case
                    "ClippyAdagrad: a leaf Variable that requires grad is being used in an "
                    "in-place operation (step the optimizer under torch.no_grad())"
                )
            ids, vals = grad._indices()[0], grad._values()
            nnz = ids.numel()
            if nnz == 0 or p.numel() == 0:
                return torch.ones((), dtype=p.dtype, device=p.device)
            width = p.numel() // p.shape[0]
            sigma = op(
                p, acc, ids.contiguous(), vals.contiguous().view(nnz, width),
                workspace.row_slots(p.shape[0]), workspace.sparse_sums(p, nnz, width),
                lr, hp.eps, hp.rel, hp.acc_rel, hp.abs_t, hp.clip_acc, hp.standard,
            )  # fmt: skip
            # The kernel writes through raw pointers: tell autograd, as an in-place op would.
            torch.autograd.graph.increment_version([p, acc])
            paths.add("kernel")
            return sigma
        record["fallback"] = record["fallback"] or _sparse_kernel.failure()
    elif _triton_applies(p, acc, grad) and workspace.triton_failure is None:
        sigma = _sparse_triton_step(p, grad, acc, lr=lr, hp=hp, workspace=workspace)
        if sigma is not None:
            paths.add("triton")
            return sigma
        record["fallback"] = record["fallback"] or workspace.triton_failure
    if grad._nnz() > 0:  # as for the kernels: a step that touches no row records nothing
        paths.add("eager")
    return _sparse_eager(p, grad, acc, lr=lr, hp=hp, workspace=workspace)


def _triton_applies(p: Tensor, acc: Tensor, grad: Tensor) -> bool:
    """Whether the Triton kernels handle this tensor: CUDA, float32/float64, contiguous, and
    Triton installed (``MTL_CLIPPY_DISABLE_SPARSE_KERNEL=1`` turns them off too)."""
    if os.environ.get("MTL_CLIPPY_DISABLE_SPARSE_KERNEL", "") not in ("", "0"):
        return False
    return _kernel_layout(p, acc, grad, "cuda") and _has_triton()


_TRITON: list[bool] = []  # found once per process


def _has_triton() -> bool:
    if not _TRITON:
        _TRITON.append(importlib.util.find_spec("triton") is not None)
    return _TRITON[0]


def _sparse_triton_step(
    p: Tensor, grad: Tensor, acc: Tensor, *, lr: float, hp: _Hyper, workspace: ClippyWorkspace
) -> Tensor | None:
    """The rows summed by torch (``_summed_rows``), then ``_sparse_triton``'s two kernels.

    Returns None, with the reason in ``workspace.triton_failure`` and nothing written, when
    the kernels cannot be compiled here (the caller takes the eager path from then on).
    """
    try:
        from mtl_clippy.optim import _sparse_triton
    except Exception as exc:  # a broken Triton install: the eager path
        workspace.triton_failure = f"sparse Triton kernels unavailable: {_first_line(exc)}"
        return None
    summed = _summed_rows(p, grad, workspace)
    if summed is None:
        return torch.ones((), dtype=p.dtype, device=p.device)
    rows, buf, shape = summed
    n = rows.numel() * math.prod(shape[1:])
    # A row outside the table fails on the device (no wait for the host here); the kernels
    # also mask such rows, so that nothing outside the table is ever touched.
    torch._assert_async(rows[0] >= 0, "ClippyAdagrad: a sparse gradient row index is negative")
    torch._assert_async(
        rows[-1] < p.shape[0],
        "ClippyAdagrad: a sparse gradient row index is outside the parameter's rows",
    )
    # The hyperparameters as a device tensor, rebuilt only when they change (lr: fill_).
    key = ("sparse_hyper", p.device, p.dtype, hp)
    hyper = workspace.buffers.get(key)
    if hyper is None:
        values = [lr, hp.eps, hp.rel, hp.acc_rel, hp.abs_t, 1.0]
        hyper = workspace.buffers[key] = torch.tensor(values, dtype=p.dtype, device=p.device)
    hyper[0].fill_(lr)
    try:
        return _sparse_triton.sparse_step(
            p, acc, rows, buf[2, :n], buf[3, :n], hyper,
            has_acc_rel=hp.acc_rel != 0.0, clip_acc=hp.clip_acc, standard=hp.standard,
        )  # fmt: skip
    except _sparse_triton.compile_errors() as exc:  # raised before any kernel ran
        workspace.triton_failure = f"sparse Triton kernels failed to compile: {_first_line(exc)}"
        warnings.warn(
            f"ClippyAdagrad: the sparse step's Triton kernels could not be compiled on "
            f"{p.device} ({workspace.triton_failure}); sparse gradients there take the eager "
            "path: the same arithmetic, more slowly. optimizer.implementation() records the "
            "fallback (metrics.json: optimizer_path).",
            RuntimeWarning,
            stacklevel=5,
        )
        return None


def _check_sparse(p: Tensor, grad: Tensor) -> None:
    """Refuse a sparse gradient that is not row-sparse or, on the CPU, that names a row
    outside the parameter (a hand-built one: nn.Embedding's are always in range). On a GPU
    the row check would wait for the device; there the kernels check on the device."""
    if grad.sparse_dim() != 1:
        raise ValueError(
            "ClippyAdagrad: sparse gradients must be row-sparse (COO with one sparse dimension, "
            f"as nn.Embedding(sparse=True) produces); got {grad.sparse_dim()} sparse dimensions"
        )
    ids = grad._indices()[0]
    if p.device.type != "cpu" or ids.numel() == 0:
        return
    rows = p.shape[0] if p.dim() else 0
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= rows:
        bad = lo if lo < 0 else hi
        raise RuntimeError(
            f"ClippyAdagrad: sparse gradient row index {bad} is outside the parameter's {rows} rows"
        )


def _kernel_applies(p: Tensor, acc: Tensor, grad: Tensor) -> bool:
    """Whether the C++ kernel handles this tensor: CPU, float32/float64, contiguous."""
    return _kernel_layout(p, acc, grad, "cpu")


def _kernel_layout(p: Tensor, acc: Tensor, grad: Tensor, device_type: str) -> bool:
    """What both sparse kernels need: a float32/float64 table on ``device_type``, contiguous,
    with its accumulator and gradient of the same dtype."""
    return (
        p.device.type == device_type
        and p.dtype in (torch.float32, torch.float64)
        and grad.dtype == p.dtype
        and acc.dtype == p.dtype
        and p.dim() >= 1
        and p.is_contiguous()
        and acc.is_contiguous()
    )


def _summed_rows(
    p: Tensor, grad: Tensor, workspace: ClippyWorkspace
) -> tuple[Tensor, Tensor, tuple[int, ...]] | None:
    """The distinct rows of a row-sparse gradient (sorted) and their summed values.

    Returns ``(rows, buf, shape)``: ``buf`` holds six reusable rows of at least
    ``len(rows) * width`` elements, the summed gradient in ``buf[2]`` (shaped ``shape``, the
    touched rows' shape), the others free for the caller; None when nothing is touched.
    Duplicates are summed with ``torch.unique`` + ``index_add_`` (cheaper than ``coalesce``).
    The row count is data-dependent, so on a GPU ``torch.unique`` waits for the device once,
    as ``coalesce`` does in torch's own sparse Adagrad.
    """
    row_shape = tuple(p.shape[1:])
    width = math.prod(row_shape)
    if grad.is_coalesced():
        rows, vals = grad.indices()[0], grad.values()
    else:
        idx, vals = grad._indices()[0], grad._values()
        rows, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    n_rows = rows.numel()
    if n_rows == 0 or width == 0:
        return None
    n = n_rows * width
    shape = (n_rows, *row_shape)
    # Reusable buffers (rows of one allocation): the eager path's gathered w, acc, summed g and
    # 3 scratch; the Triton path's summed g and updates.
    buf = workspace.scratch("sparse", 6, n, p)
    g_rows = buf[2, :n].view(shape)
    if grad.is_coalesced():  # rows and values already paired, rows distinct
        g_rows.copy_(vals.reshape(shape))
    elif n_rows != idx.numel():  # duplicates: sum them into their (sorted) rows
        g_rows.zero_().index_add_(0, inverse, vals)
    else:  # distinct but in any order: each value goes to its row's slot, not in id order
        g_rows.index_copy_(0, inverse, vals.reshape(shape))
    return rows, buf, shape


def _sparse_eager(
    p: Tensor, grad: Tensor, acc: Tensor, *, lr: float, hp: _Hyper, workspace: ClippyWorkspace
) -> Tensor:
    """Update only the rows present in a row-sparse COO gradient, with torch operations;
    returns sigma.

    Duplicate rows are summed (``_summed_rows``), the touched rows of the parameter and the
    accumulator are gathered into reusable buffers, stepped with the per-tensor dense path's
    operations (``addcmul_``: the same roundings, so the same numbers as the dense step and
    the kernels), and copied back with ``index_copy_``.
    """
    summed = _summed_rows(p, grad, workspace)
    if summed is None:
        return torch.ones((), dtype=p.dtype, device=p.device)
    rows, buf, shape = summed
    n = rows.numel() * math.prod(shape[1:])
    w_rows, a_rows, g_rows, pb, db, bb = (buf[i, :n].view(shape) for i in range(6))
    torch.index_select(p, 0, rows, out=w_rows)
    torch.index_select(acc, 0, rows, out=a_rows)
    # The operations of _single_tensor_clippy_adagrad, on the touched rows.
    if hp.standard:
        a_rows.addcmul_(g_rows, g_rows)
    sigma = _delta_and_sigma(w_rows, g_rows, a_rows, lr, hp, pb, db, bb)
    if hp.clip_acc:
        torch.mul(g_rows, sigma, out=pb)
        a_rows.addcmul_(pb, pb)
    elif not hp.standard:
        a_rows.addcmul_(g_rows, g_rows)
    acc.index_copy_(0, rows, a_rows)
    w_rows.addcmul_(db, sigma, value=-1.0)
    p.index_copy_(0, rows, w_rows)
    return sigma
