"""Clippy AdaGrad: AdaGrad with adaptive, per-tensor update clipping (Tang et al., KDD 2023).

The semantics follow the reference implementation, ``ClippyAdagrad`` of TensorFlow
Recommenders, option for option (see the class docstring). Three interchangeable
implementations of one step are provided; they compute the same numbers:

* ``_single_tensor_clippy``: one parameter at a time, eager, with scratch buffers reused
  across tensors and steps (no large temporary per step);
* ``_multi_tensor_clippy``: the same sequence of operations on lists of tensors with
  ``torch._foreach_*`` kernels (one launch per operation for all parameters of a device and
  dtype; best on GPUs, where launches dominate);
* ``_fused_clippy``: the per-tensor math written once and compiled by ``torch.compile`` into a
  reduction kernel and an update kernel per tensor (two passes over memory: the physical
  minimum for an update that needs a reduction first). Fastest on CPUs with a C++ compiler.

Sparse (embedding) gradients take their own path that touches only the rows in the gradient.
None of the paths synchronises the host with the device: the clipping factor of each tensor is
left in ``state[p]["clipping_factor"]`` as a 0-dim tensor on the parameter's device.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ClippyAdagrad", "clippy_step"]

log = logging.getLogger(__name__)

# dtypes the compiled (fused) path handles. bfloat16 is computed by inductor in float32 and
# rounded at the end, which is more accurate but not "all arithmetic in the parameter's dtype";
# bfloat16 therefore uses the eager multi-tensor path, exactly like the reference.
_FUSED_DTYPES = (torch.float32, torch.float64)


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

    Args:
        params: parameters or param groups (each group may set its own ``lr`` and options).
        lr: learning rate :math:`\eta` (> 0 typically; >= 0 allowed). It sits *inside* the
            clipped quantity, so the bound limits the actual step. TFRS notes that ``lr=1.0``
            gives the paper's exact form; this project's ``optim=clippy`` uses 0.1.
        initial_accumulator_value: starting value of :math:`A`. Larger values shrink the first
            steps (AdaGrad's usual warm-up knob). Default 0.1 as in the reference.
        variable_relative_threshold: :math:`\lambda_{rel}`, the bound relative to :math:`|w|`.
            The paper's main knob: 0.1 (reference default) to 0.5 (this project's study).
            Larger values clip less.
        accumulator_relative_threshold: :math:`\lambda_{acc}`, an extra bound proportional to
            :math:`p`, i.e. allowing larger moves for rarely-updated coordinates. 0 disables it
            (reference default).
        absolute_threshold: :math:`\lambda_{abs}`, the bound for elements whose value is near
            zero (freshly initialised biases or embeddings would otherwise never move).
            Reference default 1e-7; this project's study uses 1e-2.
        epsilon: added to :math:`A` *inside* the square root, for numerical safety.
        clip_accumulator_update: add :math:`(\sigma g)^2` instead of :math:`g^2` to the
            accumulator, so that clipped steps do not also shrink future learning rates.
        use_standard_accumulator_update: add :math:`g^2` to the accumulator *before* computing
            the step (the paper's Algorithm 1 form) instead of after. Cannot be combined with
            ``clip_accumulator_update``.
        weight_decay: decoupled weight decay, :math:`w \leftarrow w(1 - \eta\,\mathrm{wd})`
            applied to the whole tensor before the step. Default 0.
        foreach: use the multi-tensor ``torch._foreach_*`` implementation (``None``: decide
            automatically, see ``fused``).
        fused: use the ``torch.compile``-fused implementation. ``None`` (default, with
            ``foreach=None``) picks it for float32/float64 dense parameters when
            ``torch.compile`` works on the parameters' device (a C++ compiler on CPU, Triton on
            CUDA) and the first compilation succeeds; otherwise the multi-tensor path is used on
            CUDA and the single-tensor path on CPU (the faster eager choice on each, as measured
            in ``benchmarks/bench_optimizer.py``). ``foreach=False`` asks for the single-tensor
            path.
            The first fused step compiles (tens of seconds on a small CPU, cached on disk for
            later runs). Set the environment variable ``MTL_CLIPPY_DISABLE_FUSED=1`` to rule it
            out globally. ``fused=True`` with ``foreach=True`` is an error.

    After every step, ``optimizer.state[p]["clipping_factor"]`` holds :math:`\sigma` of that
    tensor (0-dim, on the parameter's device; read it without forcing a sync by logging it
    lazily), ``optimizer.state[p]["sum"]`` the accumulator and ``optimizer.state[p]["step"]``
    the number of steps taken.

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
        if isinstance(lr, Tensor):
            raise ValueError("ClippyAdagrad: lr must be a Python float, not a tensor")
        checks = {
            "lr": lr,
            "initial_accumulator_value": initial_accumulator_value,
            "variable_relative_threshold": variable_relative_threshold,
            "accumulator_relative_threshold": accumulator_relative_threshold,
            "absolute_threshold": absolute_threshold,
            "epsilon": epsilon,
            "weight_decay": weight_decay,
        }
        for name, value in checks.items():
            _check_non_negative(name, value)
        if clip_accumulator_update and use_standard_accumulator_update:
            raise ValueError(
                "ClippyAdagrad: clip_accumulator_update=True and "
                "use_standard_accumulator_update=True cannot be combined: the standard update "
                "adds g^2 to the accumulator before the clipping factor is known. Choose one."
            )
        if fused and foreach:
            raise ValueError("ClippyAdagrad: fused=True and foreach=True are exclusive; choose one")
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
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._validate_group(group)
            for p in group["params"]:
                self._init_state(p, group)
        # Scratch memory reused across tensors and steps, keyed by (device, dtype).
        # Not part of the optimizer's state (nothing in it survives a step).
        self._workspace: dict[tuple, Tensor] = {}

    # ------------------------------------------------------------------ setup and state

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        for name in (
            "lr",
            "initial_accumulator_value",
            "variable_relative_threshold",
            "accumulator_relative_threshold",
            "absolute_threshold",
            "epsilon",
            "weight_decay",
        ):
            _check_non_negative(name, group[name])
        if group["clip_accumulator_update"] and group["use_standard_accumulator_update"]:
            raise ValueError(
                "ClippyAdagrad: a param group sets both clip_accumulator_update and "
                "use_standard_accumulator_update; they are mutually exclusive"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        if hasattr(self, "_workspace"):
            for p in group["params"]:
                self._init_state(p, group)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["sum"] = torch.full_like(
                p, group["initial_accumulator_value"], memory_format=torch.preserve_format
            )
            state["clipping_factor"] = torch.ones((), dtype=p.dtype, device=p.device)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._workspace = {}
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    def _scratch(self, device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
        """Three contiguous rows of ``numel`` elements, grown on demand and then kept."""
        key = (device, dtype)
        buf = self._workspace.get(key)
        if buf is None or buf.shape[1] < numel:
            buf = torch.empty((3, numel), device=device, dtype=dtype)
            self._workspace[key] = buf
        return buf

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step. Returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            dense: list[tuple[Tensor, Tensor, dict[str, Any]]] = []
            steps: list[Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:  # parameter added after construction or loaded later
                    self._init_state(p, group)
                steps.append(state["step"])
                if p.grad.is_sparse:
                    _sparse_clippy(p, p.grad, state, group, self)
                elif p.numel() == 0:
                    state["clipping_factor"] = torch.ones((), dtype=p.dtype, device=p.device)
                else:
                    dense.append((p, p.grad, state))
            if steps:
                torch._foreach_add_(steps, 1.0)
            if dense:
                self._dense_step(dense, group)
        return loss

    def _dense_step(self, items: list[tuple[Tensor, Tensor, dict[str, Any]]], group: dict) -> None:
        if any(torch.is_complex(p) for p, _, _ in items):
            raise ValueError("ClippyAdagrad does not support complex parameters")
        by_key: dict[tuple[torch.device, torch.dtype], list] = {}
        for item in items:
            by_key.setdefault((item[0].device, item[0].dtype), []).append(item)
        hp = _hyper(group)
        lr = float(group["lr"])
        for (device, dtype), bucket in by_key.items():
            params = [p for p, _, _ in bucket]
            grads = [g for _, g, _ in bucket]
            accs = [s["sum"] for _, _, s in bucket]
            path = self._choose_path(group, device, dtype)
            if path == "fused":
                sigmas = _fused_clippy(params, grads, accs, lr, hp, self)
                if sigmas is None:  # compilation failed: fall back for good (already warned)
                    group["fused"] = False
                    path = _eager_default(device)
            if path == "foreach":
                sigmas = _multi_tensor_clippy(params, grads, accs, lr, hp)
            elif path == "single":
                scratch = self._scratch(device, dtype, max(p.numel() for p in params))
                sigmas = _single_tensor_clippy(params, grads, accs, lr, hp, scratch)
            for (_, _, state), sigma in zip(bucket, sigmas, strict=True):
                state["clipping_factor"] = sigma

    @staticmethod
    def _choose_path(group: dict, device: torch.device, dtype: torch.dtype) -> str:
        fused, foreach = group.get("fused"), group.get("foreach")
        if fused:
            if dtype not in _FUSED_DTYPES:
                return "foreach"
            return "fused"
        if foreach:
            return "foreach"
        if foreach is False:  # explicitly no multi-tensor kernels: the per-tensor loop
            return "single"
        if fused is None and dtype in _FUSED_DTYPES and _fused_available(device):
            return "fused"
        return _eager_default(device)


# ---------------------------------------------------------------------- helpers


def _check_non_negative(name: str, value: Any) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"ClippyAdagrad: {name} must be a number, got {value!r}") from None
    if not v >= 0.0:  # also rejects NaN
        raise ValueError(f"ClippyAdagrad: {name} must be >= 0, got {value!r}")


def _hyper(group: dict[str, Any]) -> tuple:
    return (
        float(group["epsilon"]),
        float(group["variable_relative_threshold"]),
        float(group["accumulator_relative_threshold"]),
        float(group["absolute_threshold"]),
        float(group["weight_decay"]),
        bool(group["clip_accumulator_update"]),
        bool(group["use_standard_accumulator_update"]),
    )


def _eager_default(device: torch.device) -> str:
    return "foreach" if device.type == "cuda" else "single"


_FUSED_STATUS: dict[str, bool] = {}


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


# ---------------------------------------------------------------------- dense: per tensor


def _delta_and_sigma(
    w: Tensor, g: Tensor, acc: Tensor, lr: float, hp: tuple, pb: Tensor, db: Tensor, bb: Tensor
) -> Tensor:
    """The heart of one step, in place in three scratch tensors shaped like ``w``.

    Leaves the unclipped update ``delta = lr * g / sqrt(acc + eps)`` in ``db`` and returns the
    clipping factor sigma (0-dim, no sync); ``pb`` and ``bb`` are clobbered. ``acc`` must
    already include this step's ``g^2`` when the standard accumulator update is used.
    """
    eps, rel, acc_rel, abs_t = hp[:4]
    torch.add(acc, eps, out=pb).rsqrt_()  # p = 1 / sqrt(acc + eps)
    torch.mul(g, lr, out=db).mul_(pb)  # delta = lr * g * p
    torch.abs(w, out=bb).mul_(rel).add_(abs_t)  # bound = rel*|w| + abs
    if acc_rel != 0.0:
        bb.add_(pb, alpha=acc_rel)  # ... + acc_rel * p
    torch.abs(db, out=pb)
    bb.div_(pb).nan_to_num_(nan=1.0)  # s = bound/|delta|; 0/0 (no move, no bound) -> 1
    return torch.amin(bb).clamp_(max=1.0)


def _single_tensor_clippy(
    params: list[Tensor],
    grads: list[Tensor],
    accs: list[Tensor],
    lr: float,
    hp: tuple,
    scratch: Tensor,
) -> list[Tensor]:
    """Eager step, one tensor at a time, using three reusable scratch rows (no allocations
    proportional to the parameters)."""
    wd, clip_acc, standard = hp[4:]
    sigmas = []
    for w, g, acc in zip(params, grads, accs, strict=True):
        n = w.numel()
        pb, db, bb = (
            scratch[i, :n].view_as(w) if w.is_contiguous() else torch.empty_like(w)
            for i in range(3)
        )
        if wd != 0.0:
            w.add_(w, alpha=-(wd * lr))
        if standard:
            acc.addcmul_(g, g)
        sigma = _delta_and_sigma(w, g, acc, lr, hp, pb, db, bb)
        if clip_acc:
            torch.mul(g, sigma, out=pb)
            acc.addcmul_(pb, pb)
        elif not standard:
            acc.addcmul_(g, g)
        w.addcmul_(db, sigma, value=-1.0)
        sigmas.append(sigma)
    return sigmas


# ---------------------------------------------------------------------- dense: multi-tensor


def _multi_tensor_clippy(
    params: list[Tensor], grads: list[Tensor], accs: list[Tensor], lr: float, hp: tuple
) -> list[Tensor]:
    """The same operations as ``_single_tensor_clippy``, on lists, with ``_foreach`` kernels."""
    eps, rel, acc_rel, abs_t, wd, clip_acc, standard = hp
    if wd != 0.0:
        torch._foreach_add_(params, params, alpha=-(wd * lr))
    if standard:
        torch._foreach_addcmul_(accs, grads, grads)
    pb = torch._foreach_add(accs, eps)
    torch._foreach_rsqrt_(pb)
    db = torch._foreach_mul(grads, lr)
    torch._foreach_mul_(db, pb)
    bb = torch._foreach_abs(params)
    torch._foreach_mul_(bb, rel)
    torch._foreach_add_(bb, abs_t)
    if acc_rel != 0.0:
        torch._foreach_add_(bb, pb, alpha=acc_rel)
    torch._foreach_copy_(pb, db)
    torch._foreach_abs_(pb)
    torch._foreach_div_(bb, pb)
    for b in bb:
        b.nan_to_num_(nan=1.0)
    # min over each tensor = -max(-s); one kernel for the whole list
    torch._foreach_neg_(bb)
    sigmas = torch._foreach_max(bb)
    torch._foreach_neg_(sigmas)
    torch._foreach_clamp_max_(sigmas, 1.0)
    if clip_acc:
        sg = torch._foreach_mul(grads, sigmas)
        torch._foreach_addcmul_(accs, sg, sg)
    elif not standard:
        torch._foreach_addcmul_(accs, grads, grads)
    torch._foreach_mul_(db, sigmas)
    torch._foreach_sub_(params, db)
    return list(sigmas)


# ---------------------------------------------------------------------- dense: compiled


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
    """Plain per-tensor math; ``torch.compile`` turns it into two fused kernels per tensor.

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
        s = bound / torch.abs(delta)
        s = torch.where(s != s, 1.0, s)  # 0/0 -> 1, as nan_to_num, but vectorisable
        sigma = torch.clamp(torch.amin(s), max=1.0)
        if clip_acc:
            sg = g * sigma
            acc.add_(sg * sg)
        elif not standard:
            acc.add_(g * g)
        w.sub_(delta * sigma)
        sigmas.append(sigma)
    return sigmas


_COMPILED: dict[str, Callable] = {}


def _fused_clippy(
    params: list[Tensor],
    grads: list[Tensor],
    accs: list[Tensor],
    lr: float,
    hp: tuple,
    opt: ClippyAdagrad,
) -> list[Tensor] | None:
    """Run the compiled step. Returns None (after one warning) if compilation fails."""
    device, dtype = params[0].device, params[0].dtype
    fn = _COMPILED.get("fn")
    if fn is None:
        fn = torch.compile(_clippy_math, fullgraph=True, dynamic=False)
        _COMPILED["fn"] = fn
    eps, rel, acc_rel, abs_t, wd, clip_acc, standard = hp
    # One small device tensor per (group, device, dtype) with the scalar hyperparameters,
    # rebuilt only when they change; lr is refreshed with fill_ (a kernel launch, no sync).
    key = ("scalars", device, dtype, hp)
    scalars = opt._workspace.get(key)  # type: ignore[call-overload]
    if scalars is None:
        scalars = torch.tensor([lr, eps, rel, acc_rel, abs_t, wd], device=device, dtype=dtype)
        opt._workspace[key] = scalars  # type: ignore[index]
    scalars[0].fill_(lr)
    try:
        return fn(params, grads, accs, scalars, acc_rel != 0.0, wd != 0.0, clip_acc, standard)
    except Exception as exc:  # inductor/compiler problems on an unusual machine
        recompile_limit = "RecompileLimit" in type(exc).__name__
        if not recompile_limit and _FUSED_STATUS.get(device.type) is not False:
            _FUSED_STATUS[device.type] = False
        warnings.warn(
            f"ClippyAdagrad: the compiled (fused) step is not available here "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}); using the "
            "eager implementation for this param group, which gives the same numbers more "
            "slowly.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


# ---------------------------------------------------------------------- sparse


def _sparse_clippy(
    p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], opt: ClippyAdagrad
) -> None:
    """Update only the rows present in a row-sparse COO gradient.

    Duplicate rows are summed (``torch.unique`` + ``index_add_``, cheaper than ``coalesce``),
    the touched rows of the parameter and the accumulator are gathered into reusable buffers,
    sigma is the minimum over those rows, and the parameter and accumulator *increments* are
    added back with ``index_add_`` (faster on CPU than ``index_copy_``, and the same numbers:
    ``w + (-(sigma * delta))`` is ``w - sigma * delta`` exactly). The row count is
    data-dependent, so on a GPU ``torch.unique`` waits for the device once, as ``coalesce``
    does in torch's own sparse Adagrad.
    """
    eps, rel, acc_rel, abs_t, wd, clip_acc, standard = _hyper(group)
    lr = float(group["lr"])
    acc = state["sum"]
    if wd != 0.0:  # decoupled decay applies to the whole tensor, as in the dense case
        p.add_(p, alpha=-(wd * lr))
    if grad.sparse_dim() != 1:
        raise ValueError(
            "ClippyAdagrad: sparse gradients must be row-sparse (COO with one sparse dimension, "
            f"as nn.Embedding(sparse=True) produces); got {grad.sparse_dim()} sparse dimensions"
        )
    row_shape = tuple(p.shape[1:])
    width = math.prod(row_shape)
    if grad.is_coalesced():
        rows, vals = grad.indices()[0], grad.values()
        n_rows = rows.numel()
    else:
        idx, vals = grad._indices()[0], grad._values()
        rows, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        n_rows = rows.numel()
    if n_rows == 0 or width == 0:
        state["clipping_factor"] = torch.ones((), dtype=p.dtype, device=p.device)
        return
    n = n_rows * width
    # Reusable buffers (rows of one allocation): gathered w, acc, summed g, 3 scratch.
    key = ("sparse", p.device, p.dtype)
    buf = opt._workspace.get(key)
    if buf is None or buf.shape[1] < n:
        buf = torch.empty((6, n), device=p.device, dtype=p.dtype)
        opt._workspace[key] = buf
    shape = (n_rows, *row_shape)
    w_rows, a_rows, g_rows, pb, db, bb = (buf[i, :n].view(shape) for i in range(6))
    if not grad.is_coalesced() and n_rows != idx.numel():
        g_rows.zero_().index_add_(0, inverse, vals)
    else:
        g_rows.copy_(vals.reshape(shape))
    torch.index_select(p, 0, rows, out=w_rows)
    torch.index_select(acc, 0, rows, out=a_rows)
    # The same operations as _single_tensor_clippy, on the touched rows.
    if standard:
        a_rows.addcmul_(g_rows, g_rows)
    sigma = _delta_and_sigma(w_rows, g_rows, a_rows, lr, (eps, rel, acc_rel, abs_t), pb, db, bb)
    if clip_acc:
        torch.mul(g_rows, sigma, out=pb)
        pb.mul_(pb)  # (sigma * g)^2
    else:
        torch.mul(g_rows, g_rows, out=pb)  # g^2 (added before the step if standard)
    acc.index_add_(0, rows, pb)
    db.mul_(sigma).neg_()  # -(sigma * delta)
    p.index_add_(0, rows, db)
    state["clipping_factor"] = sigma


def clippy_step(
    params: list[Tensor],
    grads: list[Tensor],
    accs: list[Tensor],
    *,
    lr: float,
    epsilon: float = 1e-7,
    variable_relative_threshold: float = 0.1,
    accumulator_relative_threshold: float = 0.0,
    absolute_threshold: float = 1e-7,
    weight_decay: float = 0.0,
    clip_accumulator_update: bool = False,
    use_standard_accumulator_update: bool = False,
) -> list[Tensor]:
    """Functional form of one dense Clippy step on lists of tensors (updated in place).

    Returns each tensor's clipping factor. Uses the per-tensor eager implementation; useful
    for tests and for embedding Clippy in custom training loops.
    """
    hp = (
        epsilon,
        variable_relative_threshold,
        accumulator_relative_threshold,
        absolute_threshold,
        weight_decay,
        clip_accumulator_update,
        use_standard_accumulator_update,
    )
    out = []
    for w, g, a in zip(params, grads, accs, strict=True):
        if w.numel() == 0:
            out.append(torch.ones((), dtype=w.dtype, device=w.device))
            continue
        scratch = torch.empty((3, w.numel()), dtype=w.dtype, device=w.device)
        out.extend(_single_tensor_clippy([w], [g], [a], lr, hp, scratch))
    return out
