"""The private ``torch._functorch`` APIs the engine uses, in one place.

:func:`torch.func.vjp` opens one grad nesting level, wraps its primals at that level, runs the function and
later calls :func:`torch.autograd.grad` on the wrapped tensors after the level is closed; the result is an
ordinary differentiable function of the caller's tensors. The level tape (:mod:`lrpfunc._tape`) does the same
once for a whole forward pass instead of once per operation, which needs the building blocks that
``torch.func.vjp`` uses internally. They live here and nowhere else; ``tests/test_tapes.py`` pins
their behaviour, and when they are missing (:data:`AVAILABLE` is false) the engine falls back to the public
per-operation :func:`torch.func.vjp`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = [
    "AVAILABLE",
    "UNAVAILABLE_REASON",
    "transforms_active",
    "values_only",
    "open_level",
    "close_level",
    "wrap",
    "unwrap",
    "make_differentiable",
    "level_of",
    "popped_level",
]

try:
    from torch._C._functorch import (
        _grad_decrement_nesting,
        _grad_increment_nesting,
        _unwrap_for_grad,
        _wrap_for_grad,
        maybe_get_level,
        pop_dynamic_layer_stack,
        push_dynamic_layer_stack,
        set_inplace_requires_grad_allowed,
    )

    _are_transforms_active = torch._C._are_functorch_transforms_active
    AVAILABLE = True
    #: Why :data:`AVAILABLE` is false (empty while it is true).
    UNAVAILABLE_REASON = ""
except (ImportError, AttributeError) as missing:  # exercised only on a torch without these APIs
    AVAILABLE = False
    UNAVAILABLE_REASON = f"a private API is missing: {missing}"


def _works() -> bool:
    """Whether the building blocks behave as the level tape needs: a tensor wrapped at a fresh level, made
    differentiable and squared, unwraps to the caller's tensor inside the level and gives a plain ``2 x`` by
    :func:`torch.autograd.grad` after the level is closed. A torch whose private APIs changed behaviour fails this
    once, at import, and the engine takes the public path."""
    x = torch.tensor([1.5, -2.0])
    try:
        level = _grad_increment_nesting()
        try:
            with torch.enable_grad():
                inner = _wrap_for_grad(x, level)
                set_inplace_requires_grad_allowed(True)
                try:
                    inner.requires_grad_()
                finally:
                    set_inplace_requires_grad_allowed(False)
                square = (inner * inner).sum()
                unwraps = _unwrap_for_grad(inner, level) is x
        finally:
            _grad_decrement_nesting()
        (grad,) = torch.autograd.grad(square, inner)
        return unwraps and maybe_get_level(grad) < 0 and torch.equal(grad, 2 * x)
    except Exception:  # noqa: BLE001 - any failure means the private path cannot be trusted
        return False


if AVAILABLE and not _works():
    AVAILABLE = False
    UNAVAILABLE_REASON = "the private APIs do not behave as the level tape needs (wrap, differentiate, unwrap, grad)"


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``...) is active in this thread.

    Without the private API this answers ``True``: the caller must then assume its result will be transformed.
    """
    return _are_transforms_active() if AVAILABLE else True


def values_only() -> bool:
    """Whether nothing can differentiate what is computed now: grad mode is off and no ``torch.func`` transform is
    active (forward-mode transforms ignore grad mode). Rules may then skip terms whose value is exactly zero."""
    return not torch.is_grad_enabled() and not transforms_active()


def open_level() -> int:
    """Open a new grad nesting level (what :func:`torch.func.vjp` does on entry) and return it."""
    return _grad_increment_nesting()


def close_level() -> None:
    """Close the innermost grad nesting level; its wrapped tensors stay usable by :func:`torch.autograd.grad`."""
    _grad_decrement_nesting()


def wrap(tensor: torch.Tensor, level: int) -> torch.Tensor:
    """``tensor`` (of the caller's level) wrapped at ``level``: a fresh tensor with no history there."""
    return _wrap_for_grad(tensor, level)


def unwrap(tensor: torch.Tensor, level: int) -> torch.Tensor:
    """The caller-level tensor inside a tensor wrapped at ``level`` (``tensor`` itself if it is not)."""
    return _unwrap_for_grad(tensor, level)


def level_of(tensor: torch.Tensor) -> int | None:
    """The functorch level ``tensor`` is wrapped at, or ``None`` (torch answers -1 for a tensor that is not wrapped)."""
    if not AVAILABLE:
        return None
    level = maybe_get_level(tensor)
    return None if level < 0 else level


def make_differentiable(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a tensor wrapped at the current level as requiring grad there (``requires_grad_`` is refused inside
    a transform unless this switch is set, as ``torch.func.vjp`` sets it for its primals)."""
    set_inplace_requires_grad_allowed(True)
    try:
        return tensor.requires_grad_()
    finally:
        set_inplace_requires_grad_allowed(False)


@contextmanager
def popped_level() -> Iterator[None]:
    """Run at the caller's level while a level is open: ops inside see only the outer transforms."""
    saved = pop_dynamic_layer_stack()
    try:
        yield
    finally:
        push_dynamic_layer_stack(saved)
