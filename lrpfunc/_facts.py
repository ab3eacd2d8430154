"""Static facts about recorded values, derived from the operations that made them, never from their values.

A rule may skip work that is exactly zero: z+, alpha-beta and gamma split their input into ``x^+`` and ``x^-``, and
after a ReLU ``x^-`` is zero. Reading the values (``x.min() >= 0``) would make the attribution depend on a tensor
value read into Python, which neither ``make_fx`` nor ``torch.compile`` can trace and which a cached plan could not
replay. The fact is known from the record instead: the output of a ReLU has no negative part, and so has a max pool,
a sum, a concatenation or a product of values without one.

Leaving the term out keeps the value; it keeps the derivatives only where every derivative through ``x^-`` is zero.
That holds for a value that is *flat at zero*: non-negative, and every derivative through it zero wherever it is zero.
A ReLU's output is (its derivative at 0 is 0), and so are sums, products, pools and copies of such values; the output
of ``clamp(min=0)`` is not (torch gives its derivative at 0 as 1), nor a cast to a narrower type (a small positive
value rounds to zero while its derivative stays). :class:`Sign` names the three cases.

:func:`sign_of` answers for one operation, given the facts known about its activation operands. It errs on the side of
"unknown": a constant operand (whose sign would have to be read) or a negative weight (``a - b``, ``add(a, b,
alpha=-1)``) makes the result unknown.
"""

from __future__ import annotations

import enum
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F

from . import ops as _ops
from ._record import unflatten_call

Tensor = torch.Tensor

__all__ = ["Sign", "sign_of"]


class Sign(enum.IntEnum):
    """What is known about a value's sign; a larger member says more than a smaller one."""

    #: Nothing.
    UNKNOWN = 0
    #: No negative part.
    NONNEGATIVE = 1
    #: No negative part, and every derivative through the value is zero wherever the value is zero.
    FLAT_AT_ZERO = 2


def _functions(names: str) -> set[Any]:
    found: set[Any] = set()
    for name in names.split():
        for owner in (torch, Tensor, F, torch.special):
            function = getattr(owner, name, None)
            if callable(function):
                found.add(function)
    return found


#: Operations whose result is flat at zero whatever their input: zero only where their derivative is (a ReLU's at 0,
#: ``abs``'s sign at 0), or where it is computed from the zero result itself (``exp``, ``sigmoid``, ``softmax``).
_ALWAYS_FLAT = _functions(
    "relu relu_ relu6 sigmoid sigmoid_ softmax _softmax exp exp_ abs abs_ square hardsigmoid"
) | {Tensor.__abs__}

#: Operations whose result is non-negative whatever their input; no claim about derivatives at zero.
_ALWAYS = _functions("softplus norm vector_norm")

#: Operations that take a lower bound: non-negative when the bound is a number >= 0 (``clamp(min=0)``,
#: ``hardtanh(0, 6)``), and flat at zero where the derivative at the bound is zero (``hardtanh``'s; ``clamp``'s is 1).
_LOWER_BOUND: dict[Any, tuple[int, str, Sign]] = {}
for _function in _functions("clamp clamp_ clip clip_ clamp_min clamp_min_"):
    _LOWER_BOUND[_function] = (1, "min", Sign.NONNEGATIVE)
for _function in _functions("hardtanh hardtanh_"):
    _LOWER_BOUND[_function] = (1, "min_val", Sign.FLAT_AT_ZERO)

#: Subtractions: a difference of non-negative values may be negative.
_DIFFERENCES = _functions("sub sub_ subtract rsub") | {Tensor.__sub__, Tensor.__isub__, Tensor.__rsub__}

#: Weighted sums whose scalar weights (``alpha``, ``beta``) must be numbers >= 0 for the sign to carry over.
_WEIGHTED = _functions("add add_ index_add index_add_ addmm addmm_") | {
    Tensor.__add__, Tensor.__radd__, Tensor.__iadd__
}

#: Casts: they keep the sign, but a narrower type rounds a small positive value to zero, where its derivative stays.
_CASTS = _functions("to float double half bfloat16 type type_as")

#: Classes whose result is non-negative when every floating-point operand is (each output element a selection, a
#: copy, a sum or a product of input elements).
_PRESERVING = (_ops.DataMovement, _ops.Selection, _ops.AvgPool, _ops.Reduction, _ops.Sum, _ops.Product)

#: Data movement and selection that may write a number of their own (a fill value, a padding value): unknown.
_FILLING = _functions(
    "where masked_fill masked_fill_ pad constant_pad_nd index_put index_put_ scatter scatter_ fill fill_ "
    "masked_scatter index_fill index_fill_"
) | {Tensor.__setitem__}


def sign_of(
    func: Callable[..., Any],
    op_class: type | None,
    leaves: Sequence[Any],
    spec: Any,
    vids: Sequence[int | None],
    known: Mapping[int, Sign],
) -> Sign:
    """What is known about the sign of an operation's floating-point results.

    Args:
        func: The function as the model called it.
        op_class: Its operation class (:mod:`lrpfunc.ops`).
        leaves, spec: Its flattened arguments (:func:`lrpfunc._record.flatten_call`); the arguments are rebuilt only
            for bounds such as ``clamp``'s ``min`` and weights such as ``add``'s ``alpha``.
        vids: The value id of each leaf that is a recorded value (``None`` elsewhere).
        known: What is known of the recorded values (a value not in it: :attr:`Sign.UNKNOWN`).
    """
    if func in _ALWAYS_FLAT:
        return Sign.FLAT_AT_ZERO
    if func in _ALWAYS:
        return Sign.NONNEGATIVE
    bound = _LOWER_BOUND.get(func)
    if bound is not None:
        args, kwargs = unflatten_call(spec, leaves)
        value = args[bound[0]] if len(args) > bound[0] else kwargs.get(bound[1])
        return bound[2] if _nonnegative_number(value) else Sign.UNKNOWN
    if op_class is None or not issubclass(op_class, _PRESERVING) or func in _FILLING or func in _DIFFERENCES:
        return Sign.UNKNOWN
    floats = [p for p, t in enumerate(leaves) if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
    if not floats:
        return Sign.UNKNOWN
    operands = [vids[p] for p in floats]
    sign = min(Sign.UNKNOWN if vid is None else known.get(vid, Sign.UNKNOWN) for vid in operands)
    if sign and func in _WEIGHTED:  # the arguments are rebuilt only where the operands are known
        _, kwargs = unflatten_call(spec, leaves)
        if not all(_nonnegative_number(kwargs.get(name, 1)) for name in ("alpha", "beta")):
            return Sign.UNKNOWN
    return min(sign, Sign.NONNEGATIVE) if func in _CASTS else sign


def _nonnegative_number(value: object) -> bool:
    # cast: the stubs of numbers.Real do not compare it with an int
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and cast(float, value) >= 0
