"""Rules for products of activations, quotients and the softmax (AttnLRP and CP-LRP); exported by
:mod:`lrpfunc.rules`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._call import Call, RuleError
from ._stabilize import StabilizerLike, divider, is_zero

Tensor = torch.Tensor

__all__ = ["uniform", "gated", "quotient", "softmax"]


@dataclass(frozen=True)
class _Uniform:
    stabilizer: StabilizerLike
    needs_pullback = True

    def __repr__(self) -> str:
        return "uniform"

    @property
    def gradient_form(self) -> str | None:
        """Without stabilizer, ``"split"``: ``g_k = J_k^T g / n`` (``R_k = x_k * g_k`` for ``R = z * g``)."""
        return "split" if is_zero(self.stabilizer) else None

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        _one_output("uniform", call, grad_outputs)
        (output,), (grad,) = call.outputs, grad_outputs
        gradients = call.pullback((divider(self.stabilizer)(grad, output) / len(call.inputs),))
        return tuple(x * g for x, g in zip(call.inputs, gradients))


def uniform(stabilizer: StabilizerLike = 1e-6) -> _Uniform:
    """The uniform rule for products of activations (``a * b``, ``a @ b``, ``bmm``, ``einsum``, gates).

    Definition:
        Epsilon on the multilinear map with the relevance split equally among its ``n`` activation operands:
        ``R_k = x_k * (d z / d x_k)^T (R / (n * s(z)))``; for ``z = A @ B``: ``R_A = A * ((R / 2 s(z)) B^T)`` and
        ``R_B = B * (A^T (R / 2 s(z)))``. The relevances sum to ``sum(R * z / s(z))``: conserved up to the
        stabilizer. An operand used twice (``x * x``) counts twice.

    References:
        Achtibat et al. (2024), AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers, ICML.
    """
    return _Uniform(stabilizer)


_GATES = ("Softmax", "Elementwise")


@dataclass(frozen=True)
class _Gated:
    stabilizer: StabilizerLike
    needs_pullback = True

    def __repr__(self) -> str:
        return "gated"

    @property
    def gradient_form(self) -> str | None:
        return "modified" if is_zero(self.stabilizer) else None

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        _one_output("gated", call, grad_outputs)
        gates = _gates(call)
        (output,), (grad,) = call.outputs, grad_outputs
        gradients = call.pullback((divider(self.stabilizer)(grad, output) / (len(gates) - sum(gates)),))
        return tuple(None if gate else x * g for x, g, gate in zip(call.inputs, gradients, gates))

    def modified_gradient(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """Without stabilizer: ``g_k = J_k^T g / m`` for the ``m`` operands that are not gates, none for gates."""
        _one_output("gated", call, grad_outputs)
        gates = _gates(call)
        gradients = call.pullback((grad_outputs[0] / (len(gates) - sum(gates)),))
        return tuple(None if gate else g for g, gate in zip(gradients, gates))


def _gates(call: Call) -> list[bool]:
    """Which operands of a product are gates (made by a softmax or an element-wise nonlinearity); none if all are."""
    from . import ops

    gates = [source is not None and issubclass(source, (ops.Softmax, ops.Elementwise)) for source in call.input_sources]
    if len(gates) != len(call.inputs) or all(gates) or not any(gates):
        return [False] * len(call.inputs)
    return gates


def gated(stabilizer: StabilizerLike = 1e-6) -> _Gated:
    """A product with its gates held constant (CP-LRP): relevance flows only to the operands that are not gates.

    Definition:
        An operand produced by a softmax (attention weights) or by an element-wise nonlinearity (an activated gate,
        a squeeze-excitation scale), looking through data movement, is a gate: it is held constant and receives no
        relevance; the other ``m`` operands share it, ``R_k = x_k * (d z / d x_k)^T (R / (m * s(z)))``. For
        ``z = A @ V`` with attention weights ``A``: ``R_V = V * (A^T (R / s(z)))``, ``R_A = 0``. If every operand
        or none is a gate, this is :func:`uniform`. The top-k of a softmax and its renormalisation (a mixture of
        experts' routing weights) are gates too.

    References:
        Ali et al. (2022), XAI for Transformers: Better Explanations through Conservative Propagation, ICML.
    """
    return _Gated(stabilizer)


@dataclass(frozen=True)
class _Quotient:
    stabilizer: StabilizerLike
    needs_pullback = True

    def __repr__(self) -> str:
        return "quotient"

    @property
    def gradient_form(self) -> str | None:
        return "modified" if is_zero(self.stabilizer) else None

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        _quotient_call(call, grad_outputs)
        (output,), (grad,) = call.outputs, grad_outputs
        (numerator, _), (gradient, _) = call.inputs, call.pullback((divider(self.stabilizer)(grad, output),))
        return numerator * gradient, None

    def modified_gradient(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """Without stabilizer: ``g_a = J_a^T g`` for the numerator, nothing for the denominator."""
        _quotient_call(call, grad_outputs)
        return call.pullback(grad_outputs)[0], None


def _quotient_call(call: Call, grad_outputs: tuple[Tensor, ...]) -> None:
    if len(call.inputs) != 2 or len(grad_outputs) != 1:
        raise RuleError(
            f"rule quotient handles a division of two activations with one output; {call.describe()} has "
            f"{len(call.inputs)} input(s) and {len(grad_outputs)} output(s)"
        )


def quotient(stabilizer: StabilizerLike = 1e-6) -> _Quotient:
    """A division of activations ``z = a / b`` with the denominator held constant: all relevance to the numerator.

    Definition:
        Epsilon on ``z`` as a function of ``a`` alone: ``R_a = a * (d z / d a)^T (R / s(z))``, which is ``R`` where
        ``s(z) = z``; ``R_b = 0``. The denominator is treated as a statistic of the numerator, as
        :func:`normalization` holds a norm's divisor: weights renormalised by their sum (``w / w.sum()``, the routing
        weights of a mixture of experts) pass their relevance on unchanged.

    References:
        Achtibat et al. (2024), AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers, ICML
        (normalisations with their statistics held).
    """
    return _Quotient(stabilizer)


@dataclass(frozen=True)
class _Softmax:
    needs_pullback = True

    def __repr__(self) -> str:
        return "softmax"

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        _one_output("softmax", call, grad_outputs)
        if len(call.inputs) != 1:
            raise RuleError(
                f"rule softmax handles a softmax of one activation; {call.describe()} has {len(call.inputs)}"
            )
        (x,), (y,), (grad,) = call.inputs, call.outputs, grad_outputs
        # J^T (R / y) = R - y * sum(R): no division where y underflowed to zero (masked positions)
        (gradient,) = call.pullback((grad / torch.where(y == 0, torch.ones_like(y), y),))
        return (torch.where(torch.isfinite(x), x, torch.zeros_like(x)) * gradient,)

    #: The gradient form is the true pullback (see :mod:`lrpfunc._sweep`).
    gradient_form = "pullback"

    def modified_gradient(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``g_in = J^T g``: with ``R = s * g``, ``x * J^T (R / s) = x * J^T g`` (where ``s = 0``, ``J^T`` ignores
        it)."""
        _one_output("softmax", call, grad_outputs)
        return call.pullback(grad_outputs)


def softmax() -> _Softmax:
    """The softmax rule of AttnLRP.

    Definition:
        ``R_in = x * (R - s * sum(R))`` along the softmax dimension, with ``s`` the softmax output: epsilon-LRP of
        the softmax linearised at its input, without stabilizer (``s > 0``). Masked entries (``x = -inf``) get zero.

    References:
        Achtibat et al. (2024), AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers, ICML.
    """
    return _Softmax()


def _one_output(rule: str, call: Call, grad_outputs: tuple[Tensor, ...]) -> None:
    if len(call.outputs) != 1 or len(grad_outputs) != 1 or not call.inputs:
        raise RuleError(
            f"rule {rule} handles calls with activation inputs and one floating-point output; {call.describe()} has "
            f"{len(call.inputs)} input(s) and {len(call.outputs)} output(s)"
        )
