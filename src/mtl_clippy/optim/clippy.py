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
  reduction loop and an update loop per tensor (two passes over memory: the physical minimum
  for an update that needs a reduction first), specialised to the tensors' shapes; each
  signature (shapes, dtype, options) has its own compiled code, compiled once per process.
  Fastest on CPUs with a C++ compiler. Only a compilation failure makes it give way to an
  eager path (with one warning); ``ClippyAdagrad.implementation()`` records what ran.

Sparse (embedding) gradients take their own path that touches only the rows in the gradient.
None of the paths synchronises the host with the device: the clipping factor of each tensor is
left in ``state[p]["clipping_factor"]`` as a 0-dim tensor on the parameter's device.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import types
import warnings
from collections import OrderedDict
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
            CUDA); otherwise the multi-tensor path is used on CUDA and the single-tensor path
            on CPU (the faster eager choice on each, as measured in
            ``benchmarks/bench_optimizer.py``). ``foreach=False`` asks for the single-tensor
            path. If compiling fails (a compiler error, not an error of the step), the tensors
            concerned take that eager path, with one ``RuntimeWarning`` per process.
            The first fused steps of a process compile a few kernels, whatever the model
            (tens of seconds on a small CPU, cached on disk for later runs). Set the environment
            variable ``MTL_CLIPPY_DISABLE_FUSED=1`` to rule it out globally. ``fused=True`` with
            ``foreach=True`` is an error.

    After every step, ``optimizer.state[p]["clipping_factor"]`` holds :math:`\sigma` of that
    tensor (0-dim, on the parameter's device; read it without forcing a sync by logging it
    lazily), ``optimizer.state[p]["sum"]`` the accumulator and ``optimizer.state[p]["step"]``
    the number of steps taken. ``optimizer.implementation()`` says which implementations the
    steps ran and whether the compiled one ever fell back (``metrics.json``: ``optimizer_path``).

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
        self._workspace: dict[tuple, Any] = {}
        # What each param group's steps ran (see implementation()); not part of the state.
        self._paths: dict[int, dict[str, Any]] = {}

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
        self._paths = {}
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

        for group_index, group in enumerate(self.param_groups):
            record = self._record(group_index)
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
                    record["sparse"] = True
                elif p.numel() == 0:
                    state["clipping_factor"] = torch.ones((), dtype=p.dtype, device=p.device)
                else:
                    dense.append((p, p.grad, state))
            if steps:
                torch._foreach_add_(steps, 1.0)
            if dense:
                self._dense_step(dense, group, record)
        return loss

    def _dense_step(
        self, items: list[tuple[Tensor, Tensor, dict[str, Any]]], group: dict, record: dict
    ) -> None:
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
                done, failure = _fused_clippy(params, grads, accs, lr, hp, self)
                left = [i for i, sigma in enumerate(done) if sigma is None]
                if len(left) < len(done):
                    record["dense"].add("fused")
                if left:  # a kernel could not be compiled here (warned once per process)
                    record["fallback"] = record["fallback"] or failure
                    path = _eager_default(device)
                    sub = (
                        [params[i] for i in left],
                        [grads[i] for i in left],
                        [accs[i] for i in left],
                    )
                    rest = self._eager_step(path, device, dtype, *sub, lr, hp)
                    for i, sigma in zip(left, rest, strict=True):
                        done[i] = sigma
                    record["dense"].add(path)
                sigmas = done
            else:
                sigmas = self._eager_step(path, device, dtype, params, grads, accs, lr, hp)
                record["dense"].add(path)
            for (_, _, state), sigma in zip(bucket, sigmas, strict=True):
                state["clipping_factor"] = sigma

    def _eager_step(self, path, device, dtype, params, grads, accs, lr, hp) -> list[Tensor]:
        if path == "foreach":
            return _multi_tensor_clippy(params, grads, accs, lr, hp)
        scratch = self._scratch(device, dtype, max(p.numel() for p in params))
        return _single_tensor_clippy(params, grads, accs, lr, hp, scratch)

    def _record(self, group_index: int) -> dict[str, Any]:
        return self._paths.setdefault(
            group_index, {"dense": set(), "sparse": False, "fallback": None}
        )

    def implementation(self) -> dict[str, Any]:
        """Which implementations this optimizer's steps actually ran, for the record.

        ``{"dense": [...], "sparse": bool, "fallback": None | str, "groups": [...]}``: the dense
        paths used (``"fused"``, ``"foreach"``, ``"single"``), whether the sparse (row) path
        ran, and the reason the compiled path had to give way to an eager one (None if it never
        did); ``groups`` has the same three entries for each param group. Empty before the
        first step.
        """
        groups = []
        for i in range(len(self.param_groups)):
            rec = self._paths.get(i, {"dense": set(), "sparse": False, "fallback": None})
            groups.append(
                {
                    "dense": sorted(rec["dense"]),
                    "sparse": rec["sparse"],
                    "fallback": rec["fallback"],
                }
            )
        return {
            "dense": sorted({p for g in groups for p in g["dense"]}),
            "sparse": any(g["sparse"] for g in groups),
            "fallback": next((g["fallback"] for g in groups if g["fallback"]), None),
            "groups": groups,
        }

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

# Three ``torch._foreach_*`` kernels arrived after the oldest torch this package supports
# (``_foreach_copy_`` in 2.1, ``_foreach_max`` in 2.4, ``_foreach_rsqrt_`` in 2.5/2.6). Where one
# is missing, a loop of the per-tensor op does the same arithmetic (the foreach kernels' CPU
# fallback is that loop); the lookup happens at call time, so a test can remove them.


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


def _foreach_max(tensors: list[Tensor]) -> list[Tensor]:
    fn = getattr(torch, "_foreach_max", None)
    if fn is not None:
        return list(fn(tensors))
    return [torch.amax(t) for t in tensors]


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
    _foreach_rsqrt_(pb)
    db = torch._foreach_mul(grads, lr)
    torch._foreach_mul_(db, pb)
    bb = torch._foreach_abs(params)
    torch._foreach_mul_(bb, rel)
    torch._foreach_add_(bb, abs_t)
    if acc_rel != 0.0:
        torch._foreach_add_(bb, pb, alpha=acc_rel)
    _foreach_copy_(pb, db)
    torch._foreach_abs_(pb)
    torch._foreach_div_(bb, pb)
    for b in bb:
        b.nan_to_num_(nan=1.0)
    # min over each tensor = -max(-s); one kernel for the whole list
    torch._foreach_neg_(bb)
    sigmas = _foreach_max(bb)
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
        s = bound / torch.abs(delta)
        s = torch.where(s != s, 1.0, s)  # 0/0 (no move, no bound) -> 1, as nan_to_num
        sigma = torch.clamp(torch.amin(s), max=1.0)
        if clip_acc:
            sg = g * sigma
            acc.add_(sg * sg)
        elif not standard:
            acc.add_(g * g)
        w.sub_(delta * sigma)
        sigmas.append(sigma)
    return sigmas


# One compiled function per signature (device, dtype, thread count, the four option flags and
# every tensor's shape and strides), each with its own code object. torch.compile keeps its
# cache and counts recompilations per code object, so a process that runs many models or
# option sets (a sweep runs its jobs in one process) compiles each signature once and never
# reaches the recompile limit; the kernels stay fully specialised to their shapes (the fastest
# code inductor generates here). The cache is bounded: the least recently used signature is
# dropped beyond _MAX_KERNELS.
_KERNELS: OrderedDict[tuple, Callable] = OrderedDict()
_MAX_KERNELS = 64
# Failure reasons already warned about in this process (one warning per reason), and the
# signatures whose compilation failed (they take the eager path from then on).
_FUSED_FAILED: dict[tuple, str] = {}
_WARNED: set[str] = set()


def _signature(
    params: list[Tensor], grads: list[Tensor], accs: list[Tensor], flags: tuple
) -> tuple:
    first = params[0]
    tensors = tuple(
        (tuple(w.shape), w.stride(), g.stride(), a.stride(), w.requires_grad)
        for w, g, a in zip(params, grads, accs, strict=True)
    )
    return (str(first.device), str(first.dtype), torch.get_num_threads(), flags, tensors)


def _kernel(key: tuple) -> Callable:
    fn = _KERNELS.get(key)
    if fn is not None:
        _KERNELS.move_to_end(key)
        return fn
    code = _clippy_math.__code__.replace(co_name=f"_clippy_math_{len(_KERNELS)}")
    raw = types.FunctionType(code, _clippy_math.__globals__, code.co_name)
    fn = torch.compile(raw, fullgraph=True, dynamic=False)
    _KERNELS[key] = fn
    while len(_KERNELS) > _MAX_KERNELS:
        _KERNELS.popitem(last=False)
    return fn


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


def _fused_clippy(
    params: list[Tensor],
    grads: list[Tensor],
    accs: list[Tensor],
    lr: float,
    hp: tuple,
    opt: ClippyAdagrad,
) -> tuple[list[Tensor | None], str | None]:
    """Run the compiled step on the tensors of one (device, dtype) bucket.

    Returns the clipping factors and None, or, when this signature could not be compiled here,
    ``[None] * len(params)`` (nothing has been done to the tensors; the caller runs an eager
    path) and the reason.
    """
    device, dtype = params[0].device, params[0].dtype
    eps, rel, acc_rel, abs_t, wd, clip_acc, standard = hp
    flags = (acc_rel != 0.0, wd != 0.0, clip_acc, standard)
    key = _signature(params, grads, accs, flags)
    if key in _FUSED_FAILED:
        return [None] * len(params), _FUSED_FAILED[key]
    # One small device tensor per (device, dtype, hyperparameters), rebuilt only when they
    # change; lr is refreshed with fill_ (a kernel launch, no sync).
    skey = ("scalars", device, dtype, hp)
    scalars = opt._workspace.get(skey)  # type: ignore[call-overload]
    if scalars is None:
        scalars = torch.tensor([lr, eps, rel, acc_rel, abs_t, wd], device=device, dtype=dtype)
        opt._workspace[skey] = scalars  # type: ignore[index]
    scalars[0].fill_(lr)
    try:
        return list(_kernel(key)(params, grads, accs, scalars, *flags)), None
    except _compile_errors() as exc:  # compilation failed; nothing ran
        failure = f"{type(exc).__name__}: {_first_line(exc)}"
        _FUSED_FAILED[key] = failure
        _KERNELS.pop(key, None)
        _warn_fallback(str(device), str(dtype).removeprefix("torch."), failure)
        return [None] * len(params), failure


def _first_line(exc: BaseException) -> str:
    """The first line of the message, and of the backend's own error where there is one."""
    text = str(exc).strip()
    line = text.splitlines()[0][:200] if text else "(no message)"
    inner = getattr(exc, "inner_exception", None)
    if isinstance(inner, BaseException):
        line = f"{line} {type(inner).__name__}: {_first_line(inner)}"
    return line


def _warn_fallback(device: str, dtype: str, reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(
        f"ClippyAdagrad: the compiled (fused) step could not be compiled for {dtype} tensors "
        f"on {device}: {reason}. Those tensors use the eager implementation: the same numbers, "
        "more slowly. optimizer.implementation() records the fallback (metrics.json: "
        "optimizer_path).",
        RuntimeWarning,
        stacklevel=5,
    )


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
    if grad.is_coalesced():  # rows and values already paired, rows distinct
        g_rows.copy_(vals.reshape(shape))
    elif n_rows != idx.numel():  # duplicates: sum them into their (sorted) rows
        g_rows.zero_().index_add_(0, inverse, vals)
    else:  # distinct but in any order: each value goes to its row's slot, not in id order
        g_rows.index_copy_(0, inverse, vals.reshape(shape))
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
