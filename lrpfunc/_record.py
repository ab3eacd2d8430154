"""The record of one forward pass: recorded operations (:class:`Node`), the steps the sweep visits (ruled calls,
observations, splits, per-operation steps) and the :class:`Trace` that holds them with the recorded values."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import optree
import torch

from . import ops as _ops
from ._composite import CallSite
from ._tape import Tape
from ._traits import RuleTraits

if TYPE_CHECKING:
    from ._facts import Sign

Tensor = torch.Tensor


def find_piece(parent: dict[int, int], piece: int) -> int:
    """The root of ``piece`` in the union-find forest ``parent`` of the tape's pieces (halving the path)."""
    while parent[piece] != piece:
        parent[piece] = parent[parent[piece]]
        piece = parent[piece]
    return piece


def tensor_leaves(tree: Any) -> list[Tensor]:
    return [leaf for leaf in optree.tree_leaves(tree, none_is_leaf=True) if isinstance(leaf, Tensor)]


class FastSpec:
    """Spec of ``(args, kwargs)`` whose values are all leaves (the common case), without optree."""

    __slots__ = ("count", "keys")

    def __init__(self, count: int, keys: tuple[str, ...]) -> None:
        self.count = count
        self.keys = keys


_CONTAINERS = (list, tuple, dict)


def flatten_call(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[list[Any], Any]:
    """Leaves of ``(args, kwargs)`` and a spec to rebuild them."""
    for value in args:
        if isinstance(value, _CONTAINERS):
            return optree.tree_flatten(
                (tuple(args), dict(kwargs)),  # type: ignore[arg-type]  # optree's PyTree is a class to a type checker
                none_is_leaf=True,
            )
    for value in kwargs.values():
        if isinstance(value, _CONTAINERS):
            return optree.tree_flatten(
                (tuple(args), dict(kwargs)),  # type: ignore[arg-type]  # optree's PyTree is a class to a type checker
                none_is_leaf=True,
            )
    return [*args, *kwargs.values()], FastSpec(len(args), tuple(kwargs))


def unflatten_call(spec: Any, leaves: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inverse of :func:`flatten_call`."""
    if type(spec) is FastSpec:
        count = spec.count
        return tuple(leaves[:count]), dict(zip(spec.keys, leaves[count:]))
    return cast("tuple[tuple[Any, ...], dict[str, Any]]", optree.tree_unflatten(spec, list(leaves)))


class Ref:
    """Placeholder for a recorded value inside the argument leaves of a :class:`Node`."""

    __slots__ = ("vid",)

    def __init__(self, vid: int) -> None:
        self.vid = vid

    def __eq__(self, other: object) -> bool:
        return type(other) is Ref and other.vid == self.vid

    def __hash__(self) -> int:
        return hash(("Ref", self.vid))

    def __repr__(self) -> str:
        return f"Ref({self.vid})"


@dataclass(eq=False, slots=True)
class Node:
    """One operation recorded inside a ruled call, replayable with other inputs or parameters."""

    fn: Callable[..., Any]
    func: Callable[..., Any]
    leaves: list[Any]
    spec: Any
    inputs: tuple[int, ...]
    output_leaves: list[Any]
    outputs: tuple[int, ...]
    op_class: type | None = None
    #: The closed-form transpose of this operation w.r.t. its first argument, when its call uses one.
    transpose: Callable[..., Any] | None = None

    def replay(self, env: Mapping[int, Tensor], recorded: Mapping[int, Tensor]) -> Any:
        leaves = [
            (env[leaf.vid] if leaf.vid in env else recorded[leaf.vid]) if type(leaf) is Ref else leaf
            for leaf in self.leaves
        ]
        args, kwargs = unflatten_call(self.spec, leaves)
        return self.fn(*args, **kwargs)

    def bind(self, result: Any, env: dict[int, Tensor]) -> None:
        for leaf, ref in zip(optree.tree_leaves(result, none_is_leaf=True), self.output_leaves, strict=True):
            if type(ref) is Ref:
                env[ref.vid] = leaf


@dataclass(frozen=True, slots=True)
class InputSlot:
    """Where input ``index`` of a ruled call stands among the arguments of its module call (:class:`Arguments`)."""

    index: int


@dataclass(frozen=True, slots=True)
class Arguments:
    """A module call's arguments, kept for a rule that runs the module again (:attr:`RuledCall.arguments`).

    Attributes:
        leaves: The flattened ``(args, kwargs)`` at the caller's level, each activation input as an :class:`InputSlot`.
        spec: Their tree structure (:func:`flatten_call`).
        outputs: For each output of the call, the position of its tensor among the flattened leaves of what the module
            returns.
    """

    leaves: tuple[Any, ...]
    spec: Any
    outputs: tuple[int, ...]

    def fill(self, inputs: Sequence[Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` with ``inputs`` in place of the call's inputs."""
        leaves = [inputs[leaf.index] if type(leaf) is InputSlot else leaf for leaf in self.leaves]
        return unflatten_call(self.spec, leaves)

    def select(self, output: Any) -> tuple[Tensor, ...]:
        """The call's outputs from ``output``, what the module returned."""
        leaves = optree.tree_leaves(output, none_is_leaf=True)
        return tuple(leaves[position] for position in self.outputs)


class RuledCall:
    """A call (module call or single operation) whose cotangents a rule computes.

    Attributes:
        site: The call site. rule: Its rule. traits: The rule's traits (:func:`lrpfunc._traits.traits_of`).
        needs_pullback: Whether the rule uses the call's true pullback.
        module: The module called, or ``None`` for an operation.
        inputs: Value ids of the activations the call read from outside, in order of first use.
        lifted: The tape leaf each input was lifted to inside the call, aligned with ``inputs`` (calls that record
            their pullback). An operation call has one input per activation operand (``x * x`` has two), a module
            call one per value it reads.
        outputs: Value ids of the floating-point activations the call returned.
        nodes: The recorded operations, replayable with other inputs and parameters.
        param_vids: Local parameter names to value ids. params: Parameters that differ from those (merged).
        forward: A forward that replaces the replay of the nodes (merged calls).
        input_sources: For each input, the class of the operation that produced it.
        op_class: The class of the operation (of the last one for a module call).
        pullbacks: Per-operation pullbacks of the nodes (the per-operation tape).
        merged_from: The BatchNorm folded into this call.
        transposed: The call is one linear operation whose pullback is its closed-form transpose
            (:func:`lrpfunc.ops.transpose_of`): it runs quietly even though its rule uses the pullback.
        arguments: The module call's arguments, for a rule that recomputes it.
    """

    __slots__ = (
        "site", "rule", "traits", "needs_pullback", "module", "inputs", "lifted", "index_of", "outputs", "nodes",
        "param_vids", "params", "forward", "input_sources", "op_class", "pullbacks", "merged_from", "transposed",
        "channel_scale", "closed_pullback", "arguments",
    )

    def __init__(self, site: CallSite, rule: Any, traits: RuleTraits, module: torch.nn.Module | None, *,
                 op_class: type | None = None) -> None:
        self.site = site
        self.rule = rule
        self.traits = traits
        self.needs_pullback = traits.needs_pullback
        self.module = module
        self.inputs: list[int] = []
        self.lifted: list[Tensor | None] = []
        self.index_of: dict[int, int] = {}
        self.outputs: list[int] = []
        self.nodes: list[Node] = []
        self.param_vids: dict[str, int] = {}
        self.params: Mapping[str, Tensor] | None = None
        self.forward: Callable[..., Any] | None = None
        self.input_sources: list[type | None] = []
        self.op_class = op_class
        self.pullbacks: list[tuple[tuple[int, ...], tuple[int, ...], Callable[..., Any]]] = []
        self.merged_from: str | None = None
        self.transposed = False
        self.channel_scale: Callable[[], Tensor] | None = None
        #: A closed-form pullback of the call's one operation w.r.t. its two inputs (a sum of activations).
        self.closed_pullback: Callable[..., tuple[Tensor, Tensor]] | None = None
        #: For a rule that recomputes the module: its arguments with the inputs as :class:`InputSlot` and how to pick
        #: the outputs from what the module returns (:class:`Arguments`).
        self.arguments: Arguments | None = None

    @property
    def quiet(self) -> bool:
        return not self.needs_pullback or self.transposed or self.closed_pullback is not None

    def lifted_vids(self) -> set[int]:
        """The values already lifted for this call (a second operand of the same value gets a leaf of its own)."""
        return {vid for vid, lifted in zip(self.inputs, self.lifted) if lifted is not None}

    def release(self) -> None:
        """Drop what only this call's rule needed (its recorded operations, merged parameters, pullbacks)."""
        self.params = None
        self.forward = None
        self.channel_scale = None
        self.nodes = []
        self.lifted = []
        self.pullbacks = []


@dataclass(eq=False, slots=True)
class Observation:
    """A point where the sweep reads (and may mask) the relevance arriving at values: a module's outputs."""

    name: str
    vids: list[int]
    #: For each value: whether it lies inside a piece (no rule produced it) and this is its first observation,
    #: so that the sweep pushes its (masked) relevance back into the piece.
    push: list[bool]


@dataclass(eq=False, slots=True)
class Split:
    """A value inside a piece of the tape that a ruled call reads: from here on a cut (later reads see a lifted leaf),
    and the sweep pushes the cotangent it gathered back into the piece below, so that each piece is pulled back once
    (a residual stream read by every block's normalisation would otherwise be one piece pulled back once per block)."""

    vid: int


@dataclass(eq=False, slots=True)
class OpStep:
    """An operation without a rule on the per-operation tape: its own pullback.

    ``kind``: ``"moves"`` (data movement or selection: relevance and gradients alike), ``"computes"`` (relevance
    only) or ``"gradient"`` (a transparent call, see :class:`Tracer`: gradients only).
    """

    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    pullback: Callable[..., Any]
    site: CallSite | None = None
    kind: str = "computes"


class Retry(Exception):
    """Raised inside a trace when a streaming decision turns out wrong; the trace is run again without it.

    ``kind`` is ``"merge"`` (a BatchNorm merged into a layer whose output is read elsewhere), ``"transpose"`` (a
    module expected to be one linear operation turned out to be more), ``key`` the module's ``(id, call index)``, or
    ``"forms"`` (a piece of the tape mixes transparent calls with operations that need relevance).
    """

    def __init__(self, kind: str, key: tuple[int, int] | None) -> None:
        super().__init__("retry")
        self.kind = kind
        self.key = key


@dataclass(eq=False)
class Trace:
    """Everything the sweep needs from one forward pass.

    Attributes:
        tape: The tape the forward pass ran on.
        steps: Ruled calls, observations and (per-operation tape) operation steps, in execution order.
        tensors: Value id to the tensor the model saw (a tape tensor).
        low: Value id to the caller-level tensor, for the values rules read.
        cut: Values whose cotangent the sweep keeps by value id (inputs, ruled calls' outputs, observed values).
        activations: Value ids that depend on the input.
        piece_parent, piece_leaves, piece_of: Union-find over the pieces of the tape between cuts.
        piece_computes: The roots of pieces with an operation other than data movement and selection without a rule
            (whose pullback of a gradient is not that of a relevance): they propagate relevance.
        piece_gradients: The roots of pieces with a transparent call (a rule that is its pullback in gradient form,
            left on the tape): they propagate gradients.
        leaf_of, origin: A cut value's lifted leaf, and back.
        param_names: Value id of each parameter or buffer to its qualified name.
        nonnegative: Values known to have no negative part, with what is known (:class:`lrpfunc._facts.Sign`).
        static_origin: Value id of a constant computed inside a module call (from parameters and buffers alone, like a
            position embedding) to that module's name.
        input_ids, output_ids: Value ids of the input and output leaves (``None`` for a leaf without one).
        source_ids: The calls whose outputs entered as inputs (:func:`lrpfunc.composites.with_sources`): each module's
            name and the value ids of its floating-point outputs (``None`` for another leaf), in call order.
        output: The model's output at the caller's level.
        sites: Every call site with its rule (or what covered it), when the tracer recorded them.
    """

    tape: Tape
    steps: list[Any]
    tensors: dict[int, Tensor]
    low: dict[int, Tensor]
    cut: set[int]
    activations: set[int]
    piece_parent: dict[int, int]
    piece_leaves: dict[int, list[tuple[int, Tensor]]]
    piece_of: dict[int, int]
    piece_computes: set[int]
    piece_gradients: set[int]
    leaf_of: dict[int, int]
    origin: dict[int, int]
    param_names: dict[int, str]
    static_origin: dict[int, str]
    input_ids: list[int | None]
    output: Any
    output_ids: list[int | None]
    sites: list[tuple[CallSite, Any, str | None]]
    nonnegative: dict[int, Sign] = field(default_factory=dict)
    source_ids: list[tuple[str, list[int | None]]] = field(default_factory=list)

    def find(self, piece: int) -> int:
        return find_piece(self.piece_parent, piece)


def source_class(node: Node, sources: Mapping[int, type | None]) -> type | None:
    """The class of the operation that produced a value, looking through data movement, selection and quotients
    (:data:`lrpfunc.ops.KEEPS_SOURCE`)."""
    if node.op_class is not None and issubclass(node.op_class, _ops.KEEPS_SOURCE) and node.inputs:
        return sources.get(node.inputs[0])
    return node.op_class
