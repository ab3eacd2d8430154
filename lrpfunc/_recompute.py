"""Recomputed calls: a module call (a transformer block) whose relevance is the attribution of the module itself, run
again from its kept arguments when the sweep reaches it. The forward pass then holds only the call's inputs and
outputs, never what is computed inside it, and the sweep holds one recomputed call's record at a time: the memory of
an attribution falls to about one block's, for about one more forward pass of each block (gradient checkpointing
for relevance)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._call import Call, Propagated, RuleError

Tensor = torch.Tensor

__all__ = ["recompute"]


class _Segment(nn.Module):
    """The module of one recomputed call as a model of the call's activation inputs, returning the call's outputs
    (its other arguments as recorded)."""

    def __init__(self, module: nn.Module, call: Call) -> None:
        super().__init__()
        self.module = module
        self.call = call

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        args, kwargs = self.call.module_arguments(inputs)
        return self.call.module_outputs(self.module(*args, **kwargs))


@dataclass(frozen=True)
class _Recompute:
    composite: Any
    canonizers: tuple[Any, ...] = ()
    replays = False
    needs_pullback = False
    recomputes = True

    def __repr__(self) -> str:
        return f"recompute({self.composite!r})"

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor | None, ...] | Propagated:
        from ._attribute import attribute, attribute_with_params  # the rule runs the engine again

        if call.module is None:
            raise RuleError(f"rule recompute runs a module again; {call.describe()} is an operation")
        segment = _Segment(call.module, call)
        params = {f"module.{name}": value for name, value in call.params.items()}
        inputs = tuple(call.inputs)
        if call.wants_param_relevance:
            _, relevance, param_relevance = attribute_with_params(segment, self.composite, self.canonizers)(
                params, inputs, tuple(grad_outputs)
            )
            return Propagated(tuple(relevance), {name.removeprefix("module."): value
                                                 for name, value in param_relevance.items()})
        _, relevance = attribute(segment, self.composite, self.canonizers)(params, inputs, tuple(grad_outputs))
        return tuple(relevance)


def recompute(composite: Any, canonizers: Sequence[Any] = ()) -> _Recompute:
    """Attribute the module call with ``composite`` by running the module again when the sweep reaches it.

    Definition:
        The relevance of the call's inputs is that of ``lrpfunc.attribute(module, composite, canonizers)`` seeded with
        the relevance of its outputs, the module run on the recorded inputs with its other arguments as recorded:
        what the same composite gives the sites inside the call in one pass over the whole model, where the rules
        inside the module do not depend on sites outside it (composites by class and operation, such as
        :func:`lrpfunc.composites.attnlrp`; a name map sees the names inside the module, ``"module.<name>"``). The
        forward pass keeps the call's arguments, inputs and outputs and nothing computed inside it.

    Use it on repeated blocks (:func:`lrpfunc.composites.recompute_layers`, :func:`lrpfunc.hf.recompute_layers`) to
    trade one more forward pass of each block for the memory of all but one of them. Derivatives through it are exact,
    as through any rule. The module must receive its activation inputs as arguments.
    """
    return _Recompute(composite, tuple(canonizers))
