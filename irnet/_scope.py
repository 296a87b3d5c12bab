"""How F is evaluated in one forward of an implicit block and in its adjoint solve.

Every evaluation of F that belongs to one block forward — the solver's iterations, the graph at
the solution, and the vector–Jacobian products of the adjoint solve in backward — must see the
same map, evaluated the same way:

* precision: the solve runs in float32 with autocast off under mixed precision
  (``torch.autocast``, Lightning's ``bf16-mixed`` / ``16-mixed``), and a half-precision model
  (``bf16-true`` / ``16-true``) is evaluated through float32 casts of its half parameters
  (differentiable casts, so gradients still reach them in their own dtype). On the accelerator
  path (:mod:`irnet.device_path`) TF32 is off too (:class:`FullFloat32`): cuBLAS matmuls and
  cuDNN convolutions that round float32 inputs to TF32's 10-bit mantissa (about 5e-4 relative)
  stall a solve far above its atol 1e-5 (docs/training.md, "Precision on GPUs"). Everywhere
  else the user's setting holds, and it is put back afterwards, also when the solve raises. On
  the CPU path nothing is read or switched.
* randomness: a fixed point exists only for a fixed map, and a dropout mask redrawn at every
  evaluation gives each solver iteration a different F. Following torchdeq's variational
  dropout, the layer holds one draw of randomness per forward: :class:`HeldRandomness` replays
  the random-number generator's state of F's first call before every later call, so every
  evaluation sees the same dropout masks.
* batch statistics: BatchNorm in training mode couples the samples of a batch and updates its
  running statistics at every evaluation, so F changes with every iterate; it is refused
  (:func:`check_batch_statistics`).

:class:`SolveScope` applies precision and held randomness with forward hooks on F while the
block's forward runs, and again around the block's adjoint node in backward (autograd node
hooks), so the backward code needs to know nothing of it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import torch
import torch.backends.cuda
import torch.backends.cudnn
import torch.backends.mkldnn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from irnet.device_path import on_accelerator_path

HALF = (torch.float16, torch.bfloat16)
_SEARCH_DEPTH = 4  # how far from the block's output to look for its adjoint node
_OWNER = "_irnet_solve_scope"  # attribute of F naming the scope whose hooks may act


# -- autocast --------------------------------------------------------------------------------------


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (torch ≥ 2.4 and older)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # pragma: no cover - torch < 2.4
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def solve_dtype(x: Tensor) -> torch.dtype:
    """The dtype a block solves in: float32 for a half-precision input, else the input's."""
    return torch.float32 if x.dtype in HALF else x.dtype


class _AutocastOff:
    """``torch.autocast(device, enabled=False)`` if autocast is on at entry, else nothing."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self._context: Optional[AbstractContextManager] = None

    def __enter__(self) -> None:
        if autocast_enabled(self.device_type):
            self._context = torch.autocast(self.device_type, enabled=False)
            self._context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(*exc)


# -- TF32 ------------------------------------------------------------------------------------------
# torch has two generations of switches: the legacy ones (set_float32_matmul_precision, which
# matmul.allow_tf32 also sets, and cudnn.allow_tf32) and, from torch 2.9, per-backend
# ``fp32_precision`` strings. Its legacy getters raise when the two disagree (so would
# torch.compile's guards), so both are switched together, and every value is put back as it was.
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _new_api_switches() -> tuple[list, list]:
    """The ``fp32_precision`` holders irnet sets to "ieee", and the one the legacy setter also
    writes."""
    b = torch.backends
    return [b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn], [b.mkldnn.matmul]


def _legacy(read: Callable[[], Any]) -> Any:
    """A legacy setting, or None where torch finds it mixed with disagreeing new-API values."""
    try:
        return read()
    except RuntimeError:
        return None


def _tf32_off() -> Optional[Callable[[], None]]:
    """Switch TF32 off for CUDA matmuls and cuDNN; return what puts the settings back (None: it
    was off)."""
    matmul = _legacy(torch.get_float32_matmul_precision)
    cudnn = _legacy(lambda: torch.backends.cudnn.allow_tf32)
    if matmul == "highest" and cudnn is False:
        return None  # torch's getters have checked that the new API agrees
    off, written = _new_api_switches() if _NEW_API else ([], [])
    saved = [(holder, holder.fp32_precision) for holder in off + written]
    if matmul is not None:
        torch.set_float32_matmul_precision("highest")
    if cudnn is not None:
        torch.backends.cudnn.allow_tf32 = False
    for holder in off:
        holder.fp32_precision = "ieee"  # explicit: a "none" left by the legacy setter inherits

    def restore() -> None:
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
        if cudnn is not None:
            torch.backends.cudnn.allow_tf32 = cudnn
        for holder, value in saved:
            if holder.fp32_precision != value:
                holder.fp32_precision = value

    return restore


class FullFloat32:
    """Within ``with``: float32 matmuls and convolutions on CUDA in full precision (TF32 off).

    The user's settings (``torch.set_float32_matmul_precision``,
    ``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``
    and, on torch ≥ 2.9, the ``fp32_precision`` settings) are put back on exit,
    also on an exception. Nested uses read the switched state and change nothing.
    """

    def __init__(self) -> None:
        self._restore: Optional[Callable[[], None]] = None

    def __enter__(self) -> "FullFloat32":
        self._restore = _tf32_off()
        return self

    def __exit__(self, *exc: Any) -> None:
        restore, self._restore = self._restore, None
        if restore is not None:
            restore()


class _SolveInFullFloat32:
    """A linear solver whose ``solve`` runs in :class:`FullFloat32`; all else is the solver's."""

    def __init__(self, solver: Any) -> None:
        self._solver = solver

    def solve(self, *args: Any, **kwargs: Any) -> Any:
        with FullFloat32():
            return self._solver.solve(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._solver, name)


# -- dropout and batch statistics in F -------------------------------------------------------------


def is_active_dropout(m: nn.Module) -> bool:
    """Whether ``m`` is a dropout module (any ``nn.Dropout*``) that is training with ``p > 0``."""
    return isinstance(m, _DropoutNd) and m.training and m.p > 0


def has_active_dropout(F: nn.Module) -> bool:
    """Whether F holds an active dropout module (see :func:`is_active_dropout`)."""
    return any(is_active_dropout(m) for m in F.modules())


def refuse_batch_statistics(m: nn.Module, name: str = "") -> None:
    """Raise ``ValueError`` if ``m`` (called ``F.<name>``) is a BatchNorm using batch statistics."""
    if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats):
        where = f"F.{name}" if name else "F"
        raise ValueError(
            f"{where} is a {type(m).__name__} that normalises with batch statistics "
            f"(training={m.training}, track_running_stats={m.track_running_stats}): they couple "
            "the samples and change at every solver iteration, so the implicit layer has no "
            "fixed point. Use a per-sample normalisation (GroupNorm, LayerNorm, InstanceNorm), "
            "or put it in eval mode with running statistics"
        )


def check_batch_statistics(F: nn.Module) -> None:
    """Refuse BatchNorm modules in F that would normalise with batch statistics.

    A BatchNorm in eval mode with running statistics is a fixed per-sample
    affine map and is accepted. GroupNorm, LayerNorm and InstanceNorm act on
    each sample alone and are always accepted.

    Raises:
        ValueError: a BatchNorm in F is in training mode, or has
            ``track_running_stats=False`` (batch statistics in every mode).
    """
    for name, m in F.named_modules():
        refuse_batch_statistics(m, name)


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return getattr(torch, device.type).get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        getattr(torch, device.type).set_rng_state(state)


class HeldRandomness:
    """Give every evaluation of F within one block forward the random draws of its first.

    Call :meth:`enter` before and :meth:`exit` after each evaluation. The first
    evaluation draws from the default generator of ``device`` as usual and
    leaves it advanced (as a single call of F would); every later one starts
    from the same generator state, so draws of the same shape (a dropout mask
    for the same batch) repeat, and restores the generator afterwards.

    Args:
        device: the device F computes on (its default generator is held).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start: Optional[Tensor] = None
        self._restore: list[Optional[Tensor]] = []

    def enter(self) -> None:
        """Before an evaluation of F."""
        if self._start is None:
            self._start = _rng_state(self.device)
            self._restore.append(None)
        else:
            self._restore.append(_rng_state(self.device))
            _set_rng_state(self.device, self._start)

    def exit(self) -> None:
        """After an evaluation of F (also when it raised)."""
        state = self._restore.pop() if self._restore else None
        if state is not None:
            _set_rng_state(self.device, state)


# -- the scope of one block's solve ----------------------------------------------------------------


def _inspect(F: nn.Module, dtype: torch.dtype) -> tuple[bool, list]:
    """One pass over F: refuse batch statistics; find active dropout and half tensors.

    Returns:
        Whether F has an active dropout module, and ``(module, name,
        is_parameter, tensor)`` for each half-precision parameter or buffer
        whose dtype differs from ``dtype``.
    """
    dropout, half = False, []
    for name, m in F.named_modules():
        refuse_batch_statistics(m, name)
        dropout = dropout or is_active_dropout(m)
        for is_param, tensors in ((True, m._parameters), (False, m._buffers)):
            for key, t in tensors.items():
                if t is not None and t.dtype in HALF and t.dtype != dtype:
                    half.append((m, key, is_param, t))
    return dropout, half


def _cast(half: list, dtype: torch.dtype) -> list[tuple[nn.Module, str, bool, Tensor]]:
    """Casts of the half tensors to ``dtype`` (differentiable where grad mode is on).

    Gradients of a float32 evaluation then reach the half parameters. Under
    inference mode the casts are made outside it, so solvers that leave
    inference mode can use them in a graph.
    """
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            return [(m, n, p, t.detach().to(dtype)) for m, n, p, t in half]
    return [(m, n, p, t.to(dtype)) for m, n, p, t in half]


class SolveScope:
    """Precision and held randomness for the evaluations of F in one block forward.

    Use as a context around the block's solve, then call
    :meth:`hold_for_backward` on the result so the adjoint solve in backward
    evaluates F the same way.

    Args:
        F: the residual function (an ``nn.Module`` or a plain callable; a plain
            callable gets only autocast off, having no parameters or dropout
            modules to see).
        x: the block's input.

    Raises:
        ValueError: F holds a BatchNorm that would use batch statistics
            (:func:`refuse_batch_statistics`).
    """

    def __init__(self, F: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self.F = F
        self.device_type = x.device.type
        self.dtype = solve_dtype(x)
        self.autocast = autocast_enabled(self.device_type)
        held, half = _inspect(F, self.dtype) if isinstance(F, nn.Module) else (False, [])
        self._casts = _cast(half, self.dtype) if half else []
        self.randomness = HeldRandomness(x.device) if held else None
        self._hooks: list = []
        self._saved: list[list[Tensor]] = []
        self._autocast_off = _AutocastOff(self.device_type)
        # TF32 matters only on a GPU; the CPU path reads nothing here.
        self._full_float32 = FullFloat32() if on_accelerator_path(x) else None

    @property
    def hooks_needed(self) -> bool:
        """Whether F's evaluations need anything beyond autocast off (casts or held masks)."""
        return bool(self._casts) or self.randomness is not None

    # -- the block's forward -----------------------------------------------------------------------
    def __enter__(self) -> "SolveScope":
        self._autocast_off.__enter__()
        if self._full_float32 is not None:
            self._full_float32.__enter__()
        self._attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._detach()
        if self._full_float32 is not None:
            self._full_float32.__exit__(*exc)
        self._autocast_off.__exit__(*exc)

    # -- backward ----------------------------------------------------------------------------------
    def hold_for_backward(self, y: Tensor, x: Tensor) -> None:
        """Apply this scope again while autograd runs the adjoint node(s) of ``y``.

        Looks a few steps back from ``y`` for nodes of irnet's autograd
        functions (the implicit adjoint), stopping at the block's input ``x``,
        and wraps each node's backward with pre and post hooks. On the
        accelerator path each node's linear solve also runs in full float32:
        its solver is wrapped on the node, so that a solve that raises still
        puts the user's TF32 settings back (a post hook would not run).
        """
        hooks = self.hooks_needed or self.autocast
        if not (hooks or self._full_float32 is not None) or y.grad_fn is None:
            return
        nodes = _irnet_nodes(y, stop=x.grad_fn)
        if self._full_float32 is not None:
            for node in nodes:
                solver = getattr(node, "linear_solver", None)
                if solver is not None and not isinstance(solver, _SolveInFullFloat32):
                    node.linear_solver = _SolveInFullFloat32(solver)
        if not hooks:
            return
        backward_autocast = _AutocastOff(self.device_type)

        def before(grad_outputs):
            backward_autocast.__enter__()
            self._attach()

        def after(grad_inputs, grad_outputs):
            self._detach()
            backward_autocast.__exit__(None, None, None)

        for node in nodes:
            node.register_prehook(before)
            node.register_hook(after)

    # -- hooks on F --------------------------------------------------------------------------------
    # F records the scope that owns it; a hook whose scope no longer owns F (left
    # behind when a backward raised between the node hooks) removes itself.
    def _attach(self) -> None:
        if not isinstance(self.F, nn.Module):
            return
        self.F.__dict__[_OWNER] = self if self.hooks_needed else None
        if not self.hooks_needed or self._hooks:
            return
        F = self.F
        self._hooks = [
            F.register_forward_pre_hook(self._before_call),
            F.register_forward_hook(self._after_call, always_call=True),
        ]

    def _detach(self) -> None:
        hooks, self._hooks = self._hooks, []
        for handle in hooks:
            handle.remove()
        if isinstance(self.F, nn.Module) and self.F.__dict__.get(_OWNER) is self:
            self.F.__dict__[_OWNER] = None

    def _owns(self, module: nn.Module) -> bool:
        if module.__dict__.get(_OWNER) is self:
            return True
        self._detach()
        return False

    def _before_call(self, module: nn.Module, args: tuple) -> None:
        if not self._owns(module):
            return
        originals = []
        for owner, name, is_param, cast in self._casts:
            table = owner._parameters if is_param else owner._buffers
            originals.append(table[name])
            table[name] = cast
        self._saved.append(originals)
        if self.randomness is not None:
            self.randomness.enter()

    def _after_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._owns(module):
            return
        if self.randomness is not None:
            self.randomness.exit()
        originals = self._saved.pop() if self._saved else []
        for (owner, name, is_param, _), original in zip(self._casts, originals):
            (owner._parameters if is_param else owner._buffers)[name] = original


def _irnet_nodes(y: Tensor, stop: Optional[Any]) -> list:
    """Autograd nodes of irnet's own functions within a few steps of ``y``, not past ``stop``."""
    found, frontier, seen = [], [y.grad_fn], []
    for _ in range(_SEARCH_DEPTH):
        following = []
        for node in frontier:
            if node is None or node is stop or any(node is s for s in seen):
                continue
            seen.append(node)
            cls = getattr(node, "_forward_cls", None)
            if cls is not None and cls.__module__.startswith("irnet."):
                found.append(node)
                continue
            following.extend(n for n, _ in node.next_functions)
        frontier = following
    return found
