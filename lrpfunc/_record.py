"""The record of one forward pass: operations, module calls and the values that flow between them.

A *value* is one tensor produced or consumed during the forward pass, named by an integer id. Values are
either *activations* (they depend on the input ``x`` and carry a cotangent in the backward sweep) or
*static* (parameters, buffers and what is computed from them alone).

An :class:`OpNode` is one recorded torch operation. Its arguments are kept as a flat list of leaves in
which every recorded tensor is replaced by a :class:`Ref`, so the operation can be replayed with other
inputs or other parameters (which is how rules evaluate modified forward passes). Operations with at
least one activation input also hold their true pullback from :func:`torch.func.vjp`, computed once
during the forward pass.

A :class:`Span` is one call of a module: the operations it ran, the values it consumed and produced,
and the value ids of its own parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optree
import torch

__all__ = ["Ref", "OpNode", "Span", "Record", "LazyParams"]


class LazyParams(Mapping[str, torch.Tensor]):
    """Parameters computed on first access (merged parameters are only needed by rules that read them)."""

    def __init__(self, names: tuple[str, ...], compute: Callable[[], dict[str, torch.Tensor]]) -> None:
        self._names = names
        self._compute: Callable[[], dict[str, torch.Tensor]] | None = compute
        self._values: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._compute is not None:
            self._values, self._compute = self._compute(), None
        return self._values[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


@dataclass(frozen=True, slots=True)
class Ref:
    """Placeholder for a recorded tensor inside the argument leaves of an :class:`OpNode`."""

    vid: int


@dataclass(eq=False, slots=True)
class OpNode:
    """One recorded torch operation.

    Attributes:
        func: The function the model called.
        fn: The out-of-place function that was run (in-place operations are recorded out of place).
        name: A short name of the operation, e.g. ``"add"`` or ``"conv2d"``.
        leaves: Flattened ``(args, kwargs)``; recorded tensors are :class:`Ref`.
        spec: The optree spec to unflatten ``leaves``.
        inputs: Ids of the activation values the operation consumed (in order of first appearance).
        outputs: Ids of the floating-point tensor values it produced.
        output_leaves: Output leaves with floating-point tensors replaced by :class:`Ref`.
        pullback: The true vector-Jacobian product from outputs to ``inputs``; ``None`` for static ops.
        spans: Ids of the module calls enclosing this operation, outermost first.
        label: A type a canonizer attached to the operation (e.g. :class:`lrpfunc.types.Sum`).
    """

    func: Callable[..., Any]
    fn: Callable[..., Any]
    name: str
    leaves: list[Any]
    spec: Any
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    output_leaves: list[Any]
    pullback: Callable[..., tuple[torch.Tensor, ...]] | None
    spans: tuple[int, ...]
    label: type | None = None

    def replay(self, env: Mapping[int, torch.Tensor], tensors: Mapping[int, torch.Tensor]) -> Any:
        """Run the operation again, taking each referenced value from ``env`` or else from ``tensors``."""
        leaves = [
            (env[leaf.vid] if leaf.vid in env else tensors[leaf.vid]) if type(leaf) is Ref else leaf
            for leaf in self.leaves
        ]
        args, kwargs = optree.tree_unflatten(self.spec, leaves)
        return self.fn(*args, **kwargs)

    def bind_outputs(self, result: Any, env: dict[int, torch.Tensor]) -> None:
        """Store the tensors of a replayed ``result`` in ``env`` under the value ids they were recorded as."""
        leaves = optree.tree_leaves(result, none_is_leaf=True)
        for leaf, ref in zip(leaves, self.output_leaves, strict=True):
            if type(ref) is Ref:
                env[ref.vid] = leaf


@dataclass(eq=False, slots=True)
class Span:
    """One call of a module.

    Attributes:
        sid: The span's id (its position in :attr:`Record.spans`).
        name: Qualified name of the module in the model (``""`` for the model itself).
        module: The module that was called.
        call_index: How many earlier calls the same module had in this forward pass.
        params: Local parameter names (as ``module.named_parameters()``) to value ids.
        nodes: Ids of the operations run during the call, in order, nested calls included.
        inputs: Activation values consumed by the call and produced before it.
        outputs: Floating-point activation values the call returned.
        forward: Replaces the replay of ``nodes`` (set by canonizers that merge calls).
        parent: Id of the enclosing call.
        removed: Set by canonizers that fold this call into another one; it is no call site then.
    """

    sid: int
    name: str
    module: torch.nn.Module
    call_index: int
    params: dict[str, int]
    nodes: list[int] = field(default_factory=list)
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    forward: Callable[[tuple[torch.Tensor, ...], Mapping[str, torch.Tensor]], tuple[torch.Tensor, ...]] | None = None
    parent: int | None = None
    removed: bool = False


@dataclass(eq=False, slots=True)
class Record:
    """Everything recorded during one forward pass.

    Attributes:
        nodes: The operations, in execution order.
        spans: The module calls, in the order they started.
        tensors: Every recorded value id to its tensor.
        activations: Ids of the values that depend on the input.
        param_names: Value id of each parameter or buffer to its qualified name.
        input_ids: Value ids of the input leaves.
        output_ids: Value id of each output leaf (``None`` for a leaf that is no recorded tensor).
        output: The model's output as returned to the caller.
        params_override: Effective parameters of spans rewritten by canonizers, by span id.
    """

    nodes: list[OpNode]
    spans: list[Span]
    tensors: dict[int, torch.Tensor]
    activations: set[int]
    param_names: dict[int, str]
    input_ids: list[int]
    output: Any
    output_ids: list[int | None]
    params_override: dict[int, Mapping[str, torch.Tensor]] = field(default_factory=dict)

    def consumers(self) -> dict[int, list[int]]:
        """Value id to the ids of the operations that take it as an activation input."""
        users: dict[int, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for vid in node.inputs:
                users.setdefault(vid, []).append(index)
        return users
