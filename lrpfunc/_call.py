"""What a rule sees of one call: :class:`Call`, and what it gives back: :class:`Propagated`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

Tensor = torch.Tensor

__all__ = ["Call", "Propagated", "RuleError"]


class RuleError(RuntimeError):
    """A rule cannot handle the call it was given (wrong arity, missing parameters, bad result)."""


class Propagated(NamedTuple):
    """The result of a rule.

    Attributes:
        inputs: One cotangent (relevance) per activation input of the call, in the order of
            :attr:`Call.inputs`; ``None`` for an input that receives nothing.
        params: Relevance of each parameter, by the call's local parameter name (may be empty).
    """

    inputs: tuple[Tensor | None, ...]
    params: Mapping[str, Tensor] = {}


@dataclass(frozen=True, eq=False, slots=True)
class Call:
    """One call of a module (or one functional operation) during the recorded forward pass.

    A rule receives a ``Call`` and the cotangents of its outputs and returns the cotangents of its
    inputs. Everything here is an ordinary tensor of the current ``torch.func`` level, so whatever a rule
    computes from it is differentiated exactly by outer transforms.

    Attributes:
        name: Qualified name of the module (``"features.0"``) or, for an operation, of the module that
            ran it followed by the operation (``"layer1.0/add"``).
        module: The module called, or ``None`` for an operation that is not a module call.
        op: The name of the operation for operation calls, else ``None``.
        call_index: How many earlier calls the same module had in this forward pass.
        inputs: The activation tensors the call consumed.
        outputs: The floating-point tensors the call produced.
        params: The call's parameters by local name (``"weight"``, ``"bias"``); after a canonizer merged
            layers, the merged parameters (differentiable functions of the original ones).
        wants_param_relevance: Whether the caller asked for a relevance of each parameter.
        op_class: The operation class (:mod:`lrpfunc.ops`) of an operation call, or of the last operation of a
            module call.
        input_sources: For each input, the class of the operation that produced it, looking through data movement
            (``ops.Softmax`` for attention weights, ``ops.Elementwise`` for a gate); ``None`` for the model's inputs.
        nonnegative_inputs: For each input, whether it is known to have no negative part from the operations that
            made it (the output of a ReLU, a max pool of one, ...; :mod:`lrpfunc._facts`), never from its values.
        flat_at_zero_inputs: For each input, whether it is moreover known to be flat at zero: every derivative through
            it is zero wherever it is zero (a ReLU's output, whose derivative at 0 is 0; not ``clamp(min=0)``'s, whose
            derivative at 0 is 1). A term in its negative part is then zero with all its derivatives.
    """

    name: str
    module: torch.nn.Module | None
    op: str | None
    call_index: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    params: Mapping[str, Tensor]
    wants_param_relevance: bool
    _forward: Callable[..., tuple[Tensor, ...]] = field(repr=False)
    _pullback: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] = field(repr=False)
    op_class: type | None = None
    input_sources: tuple[type | None, ...] = ()
    _transpose: Callable[[Tensor, Mapping[str, Tensor]], Tensor] | None = field(default=None, repr=False)
    nonnegative_inputs: tuple[bool, ...] = ()
    _arguments: Any = field(default=None, repr=False)
    flat_at_zero_inputs: tuple[bool, ...] = ()

    def module_arguments(self, inputs: Sequence[Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """For a rule that runs the module again (its trait ``recomputes``): the call's ``(args, kwargs)`` with
        ``inputs`` in place of :attr:`inputs` (the other arguments as recorded, at the caller's level).

        Raises:
            RuleError: The rule does not declare ``recomputes = True`` (the arguments were not kept).
        """
        return self._kept("module_arguments").fill(inputs)

    def module_outputs(self, output: Any) -> tuple[Tensor, ...]:
        """For a rule that runs the module again: the tensors of ``output`` (what the module returned) that are the
        call's :attr:`outputs`, in their order."""
        return self._kept("module_outputs").select(output)

    def _kept(self, what: str) -> Any:
        if self._arguments is None:
            raise RuleError(
                f"call.{what} on {self.describe()}: the call's arguments were kept only for a module call whose rule "
                f"declares recomputes = True"
            )
        return self._arguments

    @property
    def linear(self) -> bool:
        """Whether the call is one linear operation (a dense layer or a convolution, also with a BatchNorm folded
        in) of its single input, with a closed-form transpose (:meth:`transpose`)."""
        return self._transpose is not None

    def transpose(self, grad: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """For a :attr:`linear` call: the pullback of ``forward(inputs, params)`` w.r.t. its input, in closed form
        (``grad @ W`` for a dense layer, the input gradient of a convolution), without recording anything.

        Raises:
            RuleError: The call is not one linear operation.
        """
        if self._transpose is None:
            raise RuleError(f"{self.describe()} is not one linear operation: it has no closed-form transpose")
        return self._transpose(grad, self.params if params is None else _overridden(self.params, params))

    def forward(
        self, inputs: Sequence[Tensor], params: Mapping[str, Tensor] | None = None, *, hold_statistics: bool = False
    ) -> tuple[Tensor, ...]:
        """Evaluate the call again on ``inputs`` with ``params`` (the call's own where not given).

        Args:
            inputs: One tensor per activation input.
            params: Parameters to use instead of the call's own, by local name.
            hold_statistics: Hold the statistics of normalisations at their recorded values (the divisor of a
                LayerNorm or RMSNorm, see :mod:`lrpfunc._normalization`): the replayed function is then affine in the
                inputs. Operations without such statistics replay as they are.

        Returns:
            The floating-point outputs, like :attr:`outputs`.
        """
        merged = dict(self.params) if params is None else _overridden(self.params, params)
        if hold_statistics:
            return self._forward(tuple(inputs), merged, True)
        return self._forward(tuple(inputs), merged)

    def pullback(self, grad_outputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The true vector-Jacobian product of the call at its recorded inputs (no forward recomputed)."""
        return self._pullback(tuple(grad_outputs))

    def describe(self) -> str:
        """A short description for error messages, e.g. ``Linear 'features.3'``."""
        kind = type(self.module).__name__ if self.module is not None else f"operation {self.op}"
        suffix = f" (call {self.call_index + 1})" if self.call_index else ""
        return f"{kind} '{self.name}'{suffix}"


def _overridden(params: Mapping[str, Tensor], changes: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{**params, **changes}`` without reading the parameters that ``changes`` replaces (merged parameters are
    computed when read)."""
    result = {name: params[name] for name in params if name not in changes}
    result.update(changes)
    return result
