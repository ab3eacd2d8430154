"""What the engine needs to know about a rule, declared in one place and read once per rule.

A rule is any callable ``rule(call, grad_outputs)`` (:class:`Rule`). It may declare traits as attributes; the tracer
and the sweep never read those attributes themselves but ask :func:`traits_of`, which reads them once, fills in the
defaults and checks their values:

==================  =========================  ==============================================================
attribute           default                    meaning
==================  =========================  ==============================================================
``needs_pullback``  ``True``                   the rule may call ``call.pullback``: the call records its true
                                               pullback (else it runs without one, and ``call.pullback`` raises)
``replays``         ``True``                   the rule may call ``call.forward``: the call's operations are
                                               recorded to be replayed with modified inputs and parameters
``passes_through``  ``False``                  the rule returns its output relevance unchanged: the sweep moves
                                               the cotangent itself, without building a ``Call``
``gradient_form``   ``None``                   ``"pullback"``: the rule is ``R_in = x * J^T (R / z)`` with the
                                               call's own Jacobian and no stabilizer, so in gradient form it *is*
                                               the call's pullback (the call may stay on the tape);
                                               ``"split"``: the same with ``J^T`` divided by the number ``n``
                                               of the call's activation inputs (the uniform rule), so an
                                               operation may stay on the tape with its output's gradient
                                               divided by ``n``;
                                               ``"modified"``: the same with a modified ``J``, computed by the
                                               rule's ``modified_gradient(call, grad_outputs)``
``decompose``       ``None``                   ``decompose(func, args, kwargs)``: the operation is not a call of
                                               its own but runs as the operations it returns (fused attention)
``recomputes``      ``False``                  the rule runs the module again itself (from
                                               ``call.module_arguments``): the call keeps its arguments, and
                                               nothing computed inside it is held for the sweep
==================  =========================  ==============================================================
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ._call import Call, Propagated, RuleError

Tensor = torch.Tensor

__all__ = ["Rule", "RuleTraits", "traits_of", "GRADIENT_FORMS"]

#: The values ``gradient_form`` may take besides ``None``.
GRADIENT_FORMS = ("pullback", "split", "modified")


class Rule(Protocol):
    """A rule rewrites the vector-Jacobian product of one call.

    Called with the :class:`~lrpfunc.Call` and the cotangents of its outputs, it returns the cotangents of the
    call's inputs, either as a tuple (one per input) or as a :class:`~lrpfunc.Propagated` that also carries a
    relevance for each parameter. Its optional traits are listed in this module's docstring.
    """

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...], /) -> Sequence[Tensor | None] | Propagated: ...


@dataclass(frozen=True, slots=True)
class RuleTraits:
    """A rule's traits with their defaults filled in (see the module docstring)."""

    needs_pullback: bool = True
    replays: bool = True
    passes_through: bool = False
    gradient_form: str | None = None
    decompose: Callable[..., Any] | None = None
    recomputes: bool = False

    @property
    def transparent(self) -> bool:
        """In gradient form the rule is the call's own pullback: the call may stay on the tape."""
        return self.gradient_form == "pullback"

    @property
    def splits(self) -> bool:
        """In gradient form the rule is the call's own pullback divided by its number of activation inputs: an
        operation may stay on the tape, its output's gradient divided by that number."""
        return self.gradient_form == "split"

    @property
    def records(self) -> bool:
        """Whether the call's operations must be recorded (a rule that neither replays nor pulls back needs none)."""
        return self.needs_pullback or self.replays


_NONE = RuleTraits()
_lock = threading.Lock()
#: ``id(rule) -> (rule, traits)``; the rule is kept so that its id cannot be reused by another object.
_known: dict[int, tuple[Any, RuleTraits]] = {}


def traits_of(rule: Any) -> RuleTraits:
    """The traits of ``rule`` (read once per rule object; ``None`` has the defaults).

    Raises:
        RuleError: ``gradient_form`` is not ``None``, ``"pullback"``, ``"split"`` or ``"modified"``, a ``"modified"``
            rule has no ``modified_gradient``, or ``decompose`` is not callable.
    """
    if rule is None:
        return _NONE
    found = _known.get(id(rule))
    if found is not None and found[0] is rule:
        return found[1]
    traits = _read(rule)
    with _lock:
        if len(_known) > 4096:  # composites built in a loop: forget the oldest rules
            for key in list(_known)[:2048]:
                del _known[key]
        _known[id(rule)] = (rule, traits)
    return traits


def _read(rule: Any) -> RuleTraits:
    name = getattr(rule, "name", None) or getattr(rule, "__name__", None) or type(rule).__name__
    form = getattr(rule, "gradient_form", None)
    if form is not None and form not in GRADIENT_FORMS:
        raise RuleError(f"rule {name}: gradient_form must be None, 'pullback', 'split' or 'modified', got {form!r}")
    if form == "modified" and not callable(getattr(rule, "modified_gradient", None)):
        raise RuleError(f"rule {name}: gradient_form 'modified' needs a method modified_gradient(call, grad_outputs)")
    decompose = getattr(rule, "decompose", None)
    if decompose is not None and not callable(decompose):
        raise RuleError(f"rule {name}: decompose must be callable, got {type(decompose).__name__}")
    return RuleTraits(
        needs_pullback=bool(getattr(rule, "needs_pullback", True)),
        replays=bool(getattr(rule, "replays", True)),
        passes_through=bool(getattr(rule, "passes_through", False)),
        gradient_form=form,
        decompose=decompose,
        recomputes=bool(getattr(rule, "recomputes", False)),
    )
