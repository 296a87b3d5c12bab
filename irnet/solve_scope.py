"""How F is evaluated during one forward of an implicit block and in its adjoint solve.

Two things must hold for every evaluation of F that belongs to one block
forward — the solver's iterations, the graph at the solution, and the
vector–Jacobian products of the adjoint solve in backward:

* precision: the solve runs in float32 with autocast off under mixed precision
  (``torch.autocast``, Lightning's ``bf16-mixed`` / ``16-mixed``), and a
  half-precision model (``bf16-true`` / ``16-true``) is evaluated through
  float32 casts of its half parameters (differentiable casts, so gradients still
  reach them in their own dtype);
* randomness: one draw of dropout masks (:class:`~irnet.held_dropout.HeldRandomness`).

:class:`SolveScope` applies both with forward hooks on F while the block's
forward runs, and again around the block's adjoint node in backward (autograd
node hooks), so the backward code needs to know nothing of it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from irnet.held_dropout import HeldRandomness, is_active_dropout, refuse_batch_statistics

HALF = (torch.float16, torch.bfloat16)
_SEARCH_DEPTH = 4  # how far from the block's output to look for its adjoint node
_OWNER = "_irnet_solve_scope"  # attribute of F naming the scope whose hooks may act


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
            (:func:`~irnet.held_dropout.refuse_batch_statistics`).
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

    @property
    def hooks_needed(self) -> bool:
        """Whether F's evaluations need anything beyond autocast off (casts or held masks)."""
        return bool(self._casts) or self.randomness is not None

    # -- the block's forward ------------------------------------------------------
    def __enter__(self) -> "SolveScope":
        self._autocast_off.__enter__()
        self._attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._detach()
        self._autocast_off.__exit__(*exc)

    # -- backward -------------------------------------------------------------------
    def hold_for_backward(self, y: Tensor, x: Tensor) -> None:
        """Apply this scope again while autograd runs the adjoint node(s) of ``y``.

        Looks a few steps back from ``y`` for nodes of irnet's autograd
        functions (the implicit adjoint), stopping at the block's input ``x``,
        and wraps each node's backward with pre and post hooks.
        """
        if not (self.hooks_needed or self.autocast) or y.grad_fn is None:
            return
        backward_autocast = _AutocastOff(self.device_type)

        def before(grad_outputs):
            backward_autocast.__enter__()
            self._attach()

        def after(grad_inputs, grad_outputs):
            self._detach()
            backward_autocast.__exit__(None, None, None)

        for node in _irnet_nodes(y, stop=x.grad_fn):
            node.register_prehook(before)
            node.register_hook(after)

    # -- hooks on F ---------------------------------------------------------------
    # F records the scope that owns it; a hook whose scope no longer owns F (left
    # behind when a backward raised between the node hooks) removes itself.
    def _attach(self) -> None:
        if not isinstance(self.F, nn.Module):
            return
        self.F.__dict__[_OWNER] = self if self.hooks_needed else None
        if not self.hooks_needed or self._hooks:
            return
        F = self.F
        self._hooks = [F.register_forward_pre_hook(self._before_call),
                       F.register_forward_hook(self._after_call, always_call=True)]

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


__all__ = ["HALF", "SolveScope", "autocast_enabled", "solve_dtype"]
