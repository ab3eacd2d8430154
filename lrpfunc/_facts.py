"""Static facts about recorded values, derived from the operations that made them, never from their values.

A rule may skip work that is exactly zero: z+, alpha-beta and gamma split their input into ``x^+`` and ``x^-``, and
after a ReLU ``x^-`` is zero. Reading the values (``x.min() >= 0``) would make the attribution depend on a tensor
value read into Python, which neither ``make_fx`` nor ``torch.compile`` can trace and which a cached plan could not
replay. The fact is known from the record instead: the output of a ReLU has no negative part, and so has a max pool,
a sum, a concatenation or a product of values without one.

:func:`nonnegative` answers for one operation, given which of its activation operands are known non-negative. It
errs on the side of "unknown": a constant operand (whose sign would have to be read) makes the result unknown.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Collection, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F

from . import ops as _ops
from ._record import unflatten_call

Tensor = torch.Tensor

__all__ = ["nonnegative"]


def _functions(names: str) -> set[Any]:
    found: set[Any] = set()
    for name in names.split():
        for owner in (torch, Tensor, F, torch.special):
            function = getattr(owner, name, None)
            if callable(function):
                found.add(function)
    return found


#: Operations whose result is non-negative whatever their input.
_ALWAYS = _functions(
    "relu relu_ relu6 sigmoid sigmoid_ softmax _softmax exp exp_ abs abs_ square softplus hardsigmoid norm vector_norm"
) | {Tensor.__abs__}

#: Operations that take a lower bound: non-negative when the bound is a number >= 0 (``clamp(min=0)``,
#: ``hardtanh(0, 6)``).
_LOWER_BOUND: dict[Any, tuple[int, str]] = {}
for _function in _functions("clamp clamp_ clip clip_ clamp_min clamp_min_"):
    _LOWER_BOUND[_function] = (1, "min")
for _function in _functions("hardtanh hardtanh_"):
    _LOWER_BOUND[_function] = (1, "min_val")

#: Classes whose result is non-negative when every floating-point operand is (each output element a selection, a
#: copy, a sum or a product of input elements).
_PRESERVING = (_ops.DataMovement, _ops.Selection, _ops.AvgPool, _ops.Reduction, _ops.Sum, _ops.Product)

#: Data movement and selection that may write a number of their own (a fill value, a padding value): unknown.
_FILLING = _functions(
    "where masked_fill masked_fill_ pad constant_pad_nd index_put index_put_ scatter scatter_ fill fill_ "
    "masked_scatter index_fill index_fill_"
) | {Tensor.__setitem__}


def nonnegative(
    func: Callable[..., Any],
    op_class: type | None,
    leaves: Sequence[Any],
    spec: Any,
    vids: Sequence[int | None],
    known: Collection[int],
) -> bool:
    """Whether the floating-point results of an operation are known to have no negative part.

    Args:
        func: The function as the model called it.
        op_class: Its operation class (:mod:`lrpfunc.ops`).
        leaves, spec: Its flattened arguments (:func:`lrpfunc._record.flatten_call`); the arguments are rebuilt only
            for bounds such as ``clamp``'s ``min``.
        vids: The value id of each leaf that is a recorded value (``None`` elsewhere).
        known: The value ids known to be non-negative.
    """
    if func in _ALWAYS:
        return True
    bound = _LOWER_BOUND.get(func)
    if bound is not None:
        args, kwargs = unflatten_call(spec, leaves)
        value = args[bound[0]] if len(args) > bound[0] else kwargs.get(bound[1])
        # cast: the stubs of numbers.Real do not compare it with an int
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and cast(float, value) >= 0
    if op_class is None or not issubclass(op_class, _PRESERVING) or func in _FILLING:
        return False
    floats = [p for p, t in enumerate(leaves) if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
    return bool(floats) and all(vids[p] in known for p in floats)
