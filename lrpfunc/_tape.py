"""Where the true pullbacks of a recorded forward pass come from: three interchangeable tapes.

The tracer runs the model's forward pass on a *tape* and cuts it at the calls that rules handle: the outputs of
such a call are lifted to fresh leaves of the tape, so the operations between two ruled calls form one *piece*
of the tape's graph whose pullback is one :func:`torch.autograd.grad` call. Rules themselves compute at the
caller's level (:meth:`Tape.lower` gives them the caller's tensors), so outer ``torch.func`` transforms
differentiate the rules' arithmetic and the recorded forward exactly.

* :class:`AutogradTape`: plain autograd, for calls whose result nothing outside can differentiate (no
  ``torch.func`` transform active, no input requiring grad while grad mode is on). The fastest.
* :class:`LevelTape`: one ``torch.func`` grad nesting level for the whole forward pass, what
  :func:`torch.func.vjp` opens once per call; exact under every transform. Uses the private APIs of
  :mod:`lrpfunc._functorch`.
* :class:`VjpTape`: no shared graph; every operation runs under its own public :func:`torch.func.vjp`
  (the fallback when the private APIs are missing, and the finest granularity, which the conservation report
  uses). Every value is then a cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import _functorch

Tensor = torch.Tensor

__all__ = ["Tape", "AutogradTape", "LevelTape", "VjpTape", "choose_tape"]


class Tape:
    """The interface the tracer and the sweep use; see the module docstring."""

    #: Every rule-free operation is its own step with its own pullback (no pieces).
    per_op: bool = False
    #: Results must be differentiable by the caller (the sweep then builds graphs).
    exact: bool = True
    name: str = "tape"
    #: Whether :meth:`quiet` does anything (otherwise the tracer skips entering it).
    has_quiet: bool = False

    _grad: contextlib.AbstractContextManager[None] | None = None

    def begin(self) -> None:
        """Start recording (before the forward pass): grad mode on, whatever the caller's."""
        self._grad = torch.enable_grad()
        self._grad.__enter__()

    def end(self) -> None:
        """Stop recording (after the forward pass, before the sweep): the caller's grad mode again."""
        if self._grad is not None:
            self._grad.__exit__(None, None, None)
            self._grad = None

    def lift(self, tensor: Tensor) -> Tensor:
        """A fresh leaf of the tape with the value of ``tensor``: the start of a new piece."""
        return tensor

    def lower(self, tensor: Tensor) -> Tensor:
        """The caller-level tensor of a tape tensor (what rules compute with)."""
        return tensor

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        """A region that computes at the caller's level without recording on the tape (the tracer also hands the
        operations inside it lowered tensors)."""
        return contextlib.nullcontext()

    def pullback(self, outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor], *,
                 release: bool = False) -> list[Tensor | None]:
        """``(d outputs / d inputs)^T cotangents`` through the tape; ``None`` where an input is not reached.

        ``release``: this is the last pullback through this part of the graph, which may free what it saved (unless
        the pullback itself is differentiated: then the graph stays for the caller's transforms).
        """
        pairs = [(out, cot) for out, cot in zip(outputs, cotangents) if out.requires_grad]
        if not pairs or not inputs:
            return [None] * len(inputs)
        create_graph = self._create_graph()
        return list(
            torch.autograd.grad(
                [out for out, _ in pairs],
                list(inputs),
                [cot for _, cot in pairs],
                retain_graph=create_graph or not release,
                create_graph=create_graph,
                allow_unused=True,
            )
        )

    def _create_graph(self) -> bool:
        return torch.is_grad_enabled()


class AutogradTape(Tape):
    """Plain autograd; only for calls whose result is not differentiated from outside."""

    exact = False
    name = "autograd"

    def lift(self, tensor: Tensor) -> Tensor:
        return tensor.detach().requires_grad_()

    def lower(self, tensor: Tensor) -> Tensor:
        return tensor.detach() if tensor.requires_grad else tensor

    def _create_graph(self) -> bool:
        return False


class LevelTape(Tape):
    """One grad nesting level for the whole forward pass (exact under every ``torch.func`` transform)."""

    name = "level"
    has_quiet = True

    def __init__(self) -> None:
        self.level: int | None = None

    def begin(self) -> None:
        self.level = _functorch.open_level()
        super().begin()

    def end(self) -> None:
        super().end()
        if self.level is not None:
            _functorch.close_level()

    def lift(self, tensor: Tensor) -> Tensor:
        level = self.level
        assert level is not None
        return _functorch.make_differentiable(_functorch.wrap(_functorch.unwrap(tensor, level), level))

    def lower(self, tensor: Tensor) -> Tensor:
        return _functorch.unwrap(tensor, self.level)  # type: ignore[arg-type]

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        return _functorch.popped_level()


class VjpTape(Tape):
    """Every operation under its own :func:`torch.func.vjp` (public API only)."""

    per_op = True
    name = "vjp"

    def pullback(self, outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor], *,
                 release: bool = False) -> list[Tensor | None]:
        raise RuntimeError("VjpTape has no shared graph: every operation carries its own pullback")

    @staticmethod
    def run(fn: Callable[..., Any], primals: Sequence[Tensor]) -> tuple[Any, Callable[..., Any], Any]:
        """``torch.func.vjp(fn, *primals, has_aux=True)``."""
        return torch.func.vjp(fn, *primals, has_aux=True)  # type: ignore[return-value]  # annotated without has_aux too


_FORCED: list[str] = []


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Use the tape called ``name`` (``"autograd"``, ``"level"`` or ``"vjp"``) wherever it is allowed (tests)."""
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def choose_tape(tensors: Sequence[Any], *, per_op: bool = False) -> Tape:
    """The fastest tape that is exact for a call on ``tensors`` (the leaves of params, x and grad_output).

    The autograd tape needs that nothing outside can differentiate the result: no ``torch.func`` transform is
    active and, if grad mode is on, no given tensor requires grad.
    """
    outside = _functorch.transforms_active() or (
        torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
    )
    wanted = _FORCED[-1] if _FORCED else None
    if per_op or wanted == "vjp" or not _functorch.AVAILABLE:
        if not outside and not per_op and wanted != "vjp":
            return AutogradTape()
        return VjpTape()
    if wanted == "level" or outside:
        return LevelTape()
    return AutogradTape()
