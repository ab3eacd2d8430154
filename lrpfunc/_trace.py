"""Record one forward pass on a tape, resolving the composite as the calls happen.

The tracer is a :class:`torch.overrides.TorchFunctionMode` (every torch function and tensor method the forward
calls passes through :meth:`Tracer.__torch_function__`), plus two process-wide patches that do nothing unless the
calling thread is tracing: ``torch.nn.Module.__call__`` (module calls) and ``torch.autograd.Function.apply``
(custom autograd functions, recorded as one operation). While tracing it

* substitutes the caller's parameters for the module's own (``functional_call`` semantics, without writing to the
  module, so concurrent calls cannot interfere),
* offers every call site (a module call, or an operation on activations) to the composite in execution order and
  gets its rule back; the sites inside a call that has a rule are covered by it and not offered,
* runs a call that has a rule either on the tape with its inputs lifted to fresh leaves (when the rule uses the
  call's true pullback) or quietly at the caller's level (when the rule replays the call), recording its
  operations so that the rule can replay them with modified inputs and parameters,
* cuts the tape at the outputs of ruled calls, lazily: an output is lifted to a fresh leaf when an operation
  without a rule first reads it, so the operations between ruled calls form *pieces* whose pullbacks are one
  :func:`torch.autograd.grad` call each (:mod:`lrpfunc._sweep`),
* runs in-place operations out of place (recorded values never change) and lets later reads of the mutated
  tensor see the new value,
* holds the values inside pieces weakly until something makes them a cut (a ruled call or an observation reads
  them, the model returns them): the tape's graph saves what their pullback needs, as for a gradient, and a value
  the model dropped can never be read again.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as _checkpoint
from torch.overrides import TorchFunctionMode

from . import _facts as static_facts
from . import ops as _ops
from . import types as _types
from ._composite import CallSite
from ._tape import Tape, VjpTape
from ._traits import traits_of

Tensor = torch.Tensor

__all__ = ["Tracer", "Trace", "RuledCall", "Observation", "Split", "OpStep", "Node", "Ref", "tracing", "evaluate", "Retry", "ModelInfo", "Stale"]

# ------------------------------------------------------------------------------------------------------------
# process-wide patches (active only for the tracing thread)
# ------------------------------------------------------------------------------------------------------------

_state = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0
_MODULE_CALL = torch.nn.Module.__call__
#: ``torch.autograd.Function.apply`` as torch defines it: a Python classmethod up to torch 2.13, a classmethod of the C
#: base class from 2.14 on. Called through the descriptor protocol and restored as found, so both work.
_APPLY_OWNED = "apply" in torch.autograd.Function.__dict__
_APPLY_DESCRIPTOR = inspect.getattr_static(torch.autograd.Function, "apply")


def _FUNCTION_APPLY(cls: type, *args: Any, **kwargs: Any) -> Any:
    """The original ``cls.apply(*args, **kwargs)``."""
    return _APPLY_DESCRIPTOR.__get__(None, cls)(*args, **kwargs)


#: The generator that ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` runs around the function (renamed with
#: a different signature in torch 2.14; the patch forwards whatever it gets).
_CHECKPOINT_GENERATOR_NAME = next(
    name for name in ("_checkpoint_without_reentrant_generator_impl", "_checkpoint_without_reentrant_generator")
    if hasattr(_checkpoint, name)
)
_CHECKPOINT_GENERATOR = getattr(_checkpoint, _CHECKPOINT_GENERATOR_NAME)
_CHECKPOINT_APPLY = _checkpoint.CheckpointFunction.__dict__.get("apply")


def _current() -> Tracer | None:
    return getattr(_state, "tracer", None)


def _traced_module_call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    tracer = getattr(_state, "tracer", None)
    if tracer is None:
        if getattr(_state, "eager", 0):
            module = _uncompiled(module)
        return _MODULE_CALL(module, *args, **kwargs)
    return tracer.module_call(_uncompiled(module), args, kwargs)


def _uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module that a ``torch.compile``'d module (dynamo's ``OptimizedModule``) wraps: the record is made of
    eager operations, and a compiled graph would run under the tracer's grad level as one opaque call."""
    while type(module).__name__ == "OptimizedModule":
        original = getattr(module, "_orig_mod", None)
        if not isinstance(original, torch.nn.Module):
            break
        module = original
    return module


def _eager() -> bool:
    return getattr(_state, "tracer", None) is not None or bool(getattr(_state, "eager", 0))


def _inline_checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[None]:
    """``torch.utils.checkpoint``'s non-reentrant set-up and tear-down around the checkpointed function, skipped in a
    thread that records or differentiates a forward pass (its saved-tensor hooks fail under ``torch.func``, and what is
    recomputed in the backward pass is the same function)."""
    if _eager():
        yield
        return
    yield from _CHECKPOINT_GENERATOR(fn, *args, **kwargs)


def _inline_checkpoint_apply(cls: type, function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
    """``CheckpointFunction.apply`` (the reentrant checkpoint), which runs ``function`` directly in such a thread (it
    is an autograd function that ``torch.func`` cannot differentiate)."""
    if _eager():
        return function(*args)
    return _traced_apply(cls, function, preserve_rng_state, *args)


class FunctionApply:
    """``cls.apply`` of a :class:`torch.autograd.Function` subclass as one recorded operation."""

    _cache: dict[type, FunctionApply] = {}

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        #: Whether torch.func can differentiate it (the setup_context style).
        self.functional = getattr(cls, "setup_context", None) is not getattr(
            torch.autograd.function._SingleLevelFunction, "setup_context", None
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _FUNCTION_APPLY(self.cls, *args, **kwargs)

    @classmethod
    def of(cls, function: type) -> FunctionApply:
        found = cls._cache.get(function)
        if found is None:
            found = cls._cache[function] = cls(function)
        return found


def _traced_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    tracer = getattr(_state, "tracer", None)
    if tracer is None or not torch.overrides.has_torch_function(tuple(_tensor_leaves((args, kwargs)))):
        return _FUNCTION_APPLY(cls, *args, **kwargs)
    apply = FunctionApply.of(cls)
    return torch.overrides.handle_torch_function(apply, tuple(_tensor_leaves((args, kwargs))), *args, **kwargs)


def _tensor_leaves(tree: Any) -> list[Tensor]:
    return [leaf for leaf in optree.tree_leaves(tree, none_is_leaf=True) if isinstance(leaf, Tensor)]


@contextmanager
def _patches() -> Iterator[None]:
    """Install the module-call and Function.apply patches while at least one trace runs."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            torch.nn.Module.__call__ = _traced_module_call  # type: ignore[method-assign]
            torch.autograd.Function.apply = classmethod(_traced_apply)  # type: ignore[method-assign,assignment]
            setattr(_checkpoint, _CHECKPOINT_GENERATOR_NAME, _inline_checkpoint)
            _checkpoint.CheckpointFunction.apply = classmethod(_inline_checkpoint_apply)  # type: ignore[method-assign,assignment]
        _patch_users += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                torch.nn.Module.__call__ = _MODULE_CALL  # type: ignore[method-assign]
                if _APPLY_OWNED:
                    torch.autograd.Function.apply = _APPLY_DESCRIPTOR  # type: ignore[method-assign]
                else:
                    del torch.autograd.Function.apply
                setattr(_checkpoint, _CHECKPOINT_GENERATOR_NAME, _CHECKPOINT_GENERATOR)
                if _CHECKPOINT_APPLY is None:
                    del _checkpoint.CheckpointFunction.apply
                else:
                    _checkpoint.CheckpointFunction.apply = _CHECKPOINT_APPLY  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------------------------
# operation bookkeeping helpers
# ------------------------------------------------------------------------------------------------------------

#: Functions that only read metadata: never recorded.
_METADATA: frozenset[Any] = frozenset(
    {
        Tensor.shape.__get__,  # type: ignore[attr-defined]
        Tensor.size,
        Tensor.dim,
        Tensor.ndim.__get__,  # type: ignore[attr-defined]
        Tensor.numel,
        Tensor.dtype.__get__,  # type: ignore[attr-defined]
        Tensor.device.__get__,  # type: ignore[attr-defined]
        Tensor.is_floating_point,
        Tensor.is_complex,
        Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
        Tensor.__len__,
        Tensor.stride,
        Tensor.is_contiguous,
        Tensor.layout.__get__,  # type: ignore[attr-defined]
        Tensor.data_ptr,
        Tensor.element_size,
        Tensor.nelement,
        Tensor.get_device,
        Tensor.is_cuda.__get__,  # type: ignore[attr-defined]
        Tensor.__format__,
        Tensor.__repr__,
    }
)

#: Operations whose result may share memory with their first input.
_VIEW_OPS = frozenset(
    {
        "getitem", "view", "view_as", "t", "T", "mT", "H", "mH", "transpose", "permute", "narrow", "select",
        "unsqueeze", "squeeze", "expand", "expand_as", "as_strided", "diagonal", "unflatten", "flatten",
        "reshape", "reshape_as", "split", "chunk", "unbind", "movedim", "moveaxis", "swapaxes", "swapdims",
        "unfold", "real", "imag", "detach", "alias", "tensor_split", "hsplit", "vsplit", "dsplit",
    }
)

_FLOAT, _OTHER = object(), object()


def _is_float(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


_OP_NAMES: dict[Any, str] = {}


def _op_name_of(func: Callable[..., Any]) -> str:
    found = _OP_NAMES[func] = op_name(func)
    return found


def op_name(func: Callable[..., Any]) -> str:
    """A short name of a torch function or method, e.g. ``"add"`` for ``Tensor.add_``."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name.strip("_") or name


def _clone_then(func: Callable[..., Any]) -> Callable[..., Any]:
    """Out-of-place version of an in-place ``func``: mutate a clone of the first argument instead."""

    def out_of_place(target: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        clone = target.clone()
        func(clone, *args, **kwargs)
        return clone

    out_of_place.__name__ = getattr(func, "__name__", "inplace").strip("_")
    return out_of_place


_OUT_OF_PLACE: dict[Any, tuple[Callable[..., Any], bool, bool]] = {}


def _out_of_place(func: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[Callable[..., Any], bool, bool]:
    """``(function, mutates_first_argument, returns_none)`` for the out-of-place version of ``func``."""
    if kwargs.get("inplace") is True:
        kwargs["inplace"] = False
        return func, True, False
    known = _OUT_OF_PLACE.get(func)
    if known is not None:
        return known
    return _out_of_place_of(func)


def _out_of_place_of(func: Callable[..., Any]) -> tuple[Callable[..., Any], bool, bool]:
    name = getattr(func, "__name__", "")
    if name == "__setitem__":
        known = (_clone_then(func), True, True)
    elif name.endswith("_") and not name.endswith("__"):
        counterpart = getattr(Tensor, name[:-1], None)
        known = (counterpart, True, False) if callable(counterpart) else (_clone_then(func), True, False)
    elif name in ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "__iand__", "__ior__"):
        counterpart = getattr(Tensor, "__" + name[3:], None)
        known = (counterpart, True, False) if callable(counterpart) else (_clone_then(func), True, False)
    else:
        known = (func, False, False)
    _OUT_OF_PLACE[func] = known
    return known


#: Per function: ``(function to run, mutates its first argument, returns None, returns a view of its first
#: argument)``, without the ``inplace=True`` keyword (handled per call).
_FACTS: dict[Any, tuple[Callable[..., Any], bool, bool, bool]] = {}


def _facts(func: Callable[..., Any]) -> tuple[Callable[..., Any], bool, bool, bool]:
    fn, mutates, returns_none = _out_of_place_of(func)
    fn = _NORMALIZATIONS_WITH_RUNNING_STATS.get(fn, fn)
    fn = _EMBEDDING_BAGS.get(fn, fn)
    found = _FACTS[func] = (fn, mutates, returns_none, op_name(func) in _VIEW_OPS)
    return found


def _without_running_stat_updates(func: Callable[..., Any]) -> Callable[..., Any]:
    """``F.batch_norm``/``F.instance_norm`` that update clones of the running statistics, not the module's."""
    signature = inspect.signature(func)

    def normalize(*args: Any, **kwargs: Any) -> Any:
        training = args[5] if len(args) > 5 else kwargs.get("training", kwargs.get("use_input_stats", False))
        if func is F.instance_norm:
            training = args[5] if len(args) > 5 else kwargs.get("use_input_stats", True)
        if not training:  # running statistics are only read
            return func(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        for name in ("running_mean", "running_var"):
            value = bound.arguments.get(name)
            if isinstance(value, Tensor):
                bound.arguments[name] = value.clone()
        return func(*bound.args, **bound.kwargs)

    normalize.__name__ = func.__name__
    return normalize


_NORMALIZATIONS_WITH_RUNNING_STATS = {
    F.batch_norm: _without_running_stat_updates(F.batch_norm),
    F.instance_norm: _without_running_stat_updates(F.instance_norm),
}

_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


def _aten_embedding_bag(weight: Tensor, indices: Tensor, offsets: Tensor, scale_grad_by_freq: bool = False,
                        mode: int = 0, sparse: bool = False, per_sample_weights: Tensor | None = None,
                        include_last_offset: bool = False, padding_idx: int | None = None) -> tuple[Tensor, ...]:
    """``torch.embedding_bag`` always through ``aten._embedding_bag``: under a ``torch.func`` grad level a weight
    that requires grad outside it takes the forward-only kernel, whose integer outputs autograd then refuses
    ("Autograd not support dtype: Long")."""
    if padding_idx is None:
        padding_idx = -1
    elif -weight.size(0) <= padding_idx < 0:
        padding_idx += weight.size(0)
    return torch.ops.aten._embedding_bag(weight, indices, offsets, scale_grad_by_freq, mode, sparse,
                                         per_sample_weights, include_last_offset, padding_idx)


def _functional_embedding_bag(input: Tensor, weight: Tensor, offsets: Tensor | None = None,  # noqa: A002
                              max_norm: float | None = None, norm_type: float = 2, scale_grad_by_freq: bool = False,
                              mode: str = "mean", sparse: bool = False, per_sample_weights: Tensor | None = None,
                              include_last_offset: bool = False, padding_idx: int | None = None) -> Tensor:
    """``F.embedding_bag`` through :func:`_aten_embedding_bag` for the plain 1-D and 2-D cases; anything else (and
    every invalid call, for its error) goes to ``F.embedding_bag`` itself."""
    common = (max_norm is None and mode in _BAG_MODES and input.dim() in (1, 2) and not input.is_nested
              and not input.is_floating_point() and weight.dim() == 2
              and (per_sample_weights is None or (mode == "sum" and per_sample_weights.shape == input.shape))
              and (input.dim() == 2) == (offsets is None))
    if not common:
        return F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                               per_sample_weights, include_last_offset, padding_idx)
    if input.dim() == 2:
        offsets = torch.arange(0, input.numel(), input.size(1), dtype=input.dtype, device=input.device)
        include_last_offset = False
        input = input.reshape(-1)  # noqa: A001
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    return _aten_embedding_bag(weight, input, offsets, scale_grad_by_freq, _BAG_MODES[mode], sparse,  # type: ignore[arg-type]
                               per_sample_weights, include_last_offset, padding_idx)[0]


_functional_embedding_bag.__name__ = "embedding_bag"
_aten_embedding_bag.__name__ = "embedding_bag"

_EMBEDDING_BAGS = {F.embedding_bag: _functional_embedding_bag, torch.embedding_bag: _aten_embedding_bag}


class _FastSpec:
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
            return optree.tree_flatten((tuple(args), dict(kwargs)), none_is_leaf=True)
    for value in kwargs.values():
        if isinstance(value, _CONTAINERS):
            return optree.tree_flatten((tuple(args), dict(kwargs)), none_is_leaf=True)
    return [*args, *kwargs.values()], _FastSpec(len(args), tuple(kwargs))


def unflatten_call(spec: Any, leaves: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inverse of :func:`flatten_call`."""
    if type(spec) is _FastSpec:
        count = spec.count
        return tuple(leaves[:count]), dict(zip(spec.keys, leaves[count:]))
    return optree.tree_unflatten(spec, list(leaves))


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
            (env[leaf.vid] if leaf.vid in env else recorded[leaf.vid]) if type(leaf) is Ref else leaf for leaf in self.leaves
        ]
        args, kwargs = unflatten_call(self.spec, leaves)
        return self.fn(*args, **kwargs)

    def bind(self, result: Any, env: dict[int, Tensor]) -> None:
        for leaf, ref in zip(optree.tree_leaves(result, none_is_leaf=True), self.output_leaves, strict=True):
            if type(ref) is Ref:
                env[ref.vid] = leaf


class RuledCall:
    """A call (module call or single operation) whose cotangents a rule computes.

    Attributes:
        site: The call site. rule: Its rule. needs_pullback: Whether the rule uses the call's true pullback.
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
        passes_through: The rule passes the relevance through unchanged: the sweep moves the cotangent itself.
        records: Whether the call's operations are recorded (a rule that neither replays nor pulls back needs none).
    """

    __slots__ = (
        "site", "rule", "needs_pullback", "module", "inputs", "lifted", "index_of", "outputs", "nodes", "param_vids", "params",
        "forward", "input_sources", "op_class", "pullbacks", "merged_from", "transposed", "passes_through", "records",
        "channel_scale", "closed_pullback",
    )

    def __init__(self, site: CallSite, rule: Any, needs_pullback: bool, module: torch.nn.Module | None, *,
                 op_class: type | None = None) -> None:
        self.site = site
        self.rule = rule
        self.needs_pullback = needs_pullback
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
        traits = traits_of(rule)
        self.passes_through = traits.passes_through
        self.records = traits.records
        self.channel_scale: Callable[[], Tensor] | None = None
        #: A closed-form pullback of the call's one operation w.r.t. its two inputs (a sum of activations).
        self.closed_pullback: Callable[..., tuple[Tensor, Tensor]] | None = None

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

    def __init__(self, kind: str, key: tuple[int, int]) -> None:
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
        nonnegative: Values known to have no negative part (:mod:`lrpfunc._facts`).
        static_origin: Value id of a constant computed inside a module call (from parameters and buffers alone, like a
            position embedding) to that module's name.
        input_ids, output_ids: Value ids of the input and output leaves (``None`` for a leaf without one).
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
    nonnegative: set[int] = field(default_factory=set)

    def find(self, piece: int) -> int:
        parent = self.piece_parent
        while parent[piece] != piece:
            parent[piece] = parent[parent[piece]]
            piece = parent[piece]
        return piece


# ------------------------------------------------------------------------------------------------------------
# the tracer
# ------------------------------------------------------------------------------------------------------------


class ModelInfo:
    """What the tracer reads from a model once: module names and every parameter and buffer with its names.

    Reading it walks the whole model, which costs as much as a small model's forward pass, so an attribution
    function reads it once and again only when a trace meets a module or a parameter it does not list (the model was
    changed, :class:`Stale`); modules and parameters that are not part of the model at all are then remembered as
    foreign.
    """

    def __init__(self, model: torch.nn.Module, foreign: set[int] | None = None) -> None:
        self.names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), name)
        names_of: dict[int, tuple[Tensor, list[str]]] = {}
        for name, tensor in (
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ):
            names_of.setdefault(id(tensor), (tensor, []))[1].append(name)
        self.tensors: list[tuple[Tensor, list[str]]] = list(names_of.values())
        self.known = {name for _, names in self.tensors for name in names}
        self.ids = set(names_of)
        self.foreign: set[int] = set() if foreign is None else foreign
        self._module_params: dict[int, list[tuple[str, Tensor]]] = {}
        #: Every module's parameter and buffer tables (``_parameters``, ``_buffers``), which a forward can rebind
        #: (``self.count += 1`` assigns a new tensor to the buffer): :meth:`preserved` puts them back.
        self.tables: list[dict[str, Any]] = []
        for module in model.modules():
            self.tables.append(module._parameters)
            self.tables.append(module._buffers)

    @contextmanager
    def preserved(self) -> Iterator[None]:
        """Run a forward pass that leaves the model as it found it: a parameter or buffer that the forward rebinds
        (``self.count += 1``, ``self.stat = self.stat * 0.9 + ...``) is seen rebound for the rest of the call, as in
        eager torch, and bound to its own tensor again afterwards, also when the call raises (``functional_call``
        semantics). In-place writes never reach the model's tensors: the tracer runs them out of place."""
        saved = [(table, list(table.items())) for table in self.tables]
        try:
            yield
        finally:
            for table, items in saved:
                if len(table) != len(items) or any(table.get(key) is not value for key, value in items):
                    table.clear()
                    table.update(items)

    def module_params(self, module: torch.nn.Module) -> list[tuple[str, Tensor]]:
        """``module.named_parameters()``, read once per module."""
        found = self._module_params.get(id(module))
        if found is None:
            found = self._module_params[id(module)] = list(module.named_parameters())
        return found

    def check_module(self, module: torch.nn.Module) -> None:
        """Raise :class:`Stale` for a module the model did not list when this was read."""
        if id(module) not in self.names and id(module) not in self.foreign:
            raise Stale(id(module))

    def check_tensor(self, tensor: Tensor) -> None:
        """Raise :class:`Stale` for a parameter the model did not list when this was read."""
        if type(tensor) is torch.nn.Parameter and id(tensor) not in self.ids and id(tensor) not in self.foreign:
            raise Stale(id(tensor))


class Stale(Exception):
    """A trace met a module or parameter that the model's :class:`ModelInfo` does not list."""

    def __init__(self, key: int) -> None:
        super().__init__("the model changed since it was read")
        self.key = key


def model_tensors(info: ModelInfo, params: Mapping[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, module's tensor, tensor to use)`` for every parameter and buffer: the caller's tensor under any of
    the tensor's (tied) names, else the module's own."""
    result = []
    for tensor, names in info.tensors:
        if len(names) == 1:
            name = names[0]
            result.append((name, tensor, params.get(name, tensor)))
            continue
        given = {id(params[name]): (name, params[name]) for name in names if name in params}
        if len(given) > 1:
            raise ValueError(
                f"params gives different tensors for the tied names {', '.join(repr(n) for n in names)}, "
                f"which are one tensor in the model; give one of them"
            )
        name, value = next(iter(given.values()), (names[0], tensor))
        result.append((name, tensor, value))
    return result


class Substitution(TorchFunctionMode):
    """Runs a forward pass with the caller's parameters in place of the module's, without recording and without
    writing to the module or to any tensor it did not create (what ``torch.func.functional_call`` does by swapping
    attributes, plus the tracer's treatment of in-place operations: they run out of place, later reads see the new
    value, and an in-place write into a view of a tensor that is read afterwards is refused)."""

    def __init__(self, info: ModelInfo, params: Mapping[str, Tensor], replace: Callable[[Any], Any] | None = None,
                 *, detach: bool = False) -> None:
        super().__init__()
        self.substitute = {
            id(tensor): (value.detach() if detach else value)
            for _, tensor, value in model_tensors(info, params)
            if value is not tensor or detach
        }
        self.replace = replace
        self.info = info
        self.view_base: dict[int, int] = {}
        self.stale: dict[int, str] = {}
        self.keep_alive: list[Any] = []

    def resolve(self, tensor: Tensor) -> Tensor:
        substitute = self.substitute.get(id(tensor))
        while substitute is not None and substitute is not tensor:
            tensor = substitute
            substitute = self.substitute.get(id(tensor))
        return tensor

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        if func in _METADATA:
            return func(*args, **(kwargs or {}))
        facts = _FACTS.get(func)
        fn, mutates, returns_none, is_view = facts if facts is not None else _facts(func)
        changed = fn is not func
        if kwargs:
            if kwargs.get("inplace") is True:
                kwargs = {**kwargs, "inplace": False}
                mutates = changed = True
        else:
            kwargs = {}
        leaves, spec = flatten_call(args, kwargs)
        substitute, stale = self.substitute, self.stale
        for position, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                if id(leaf) in substitute:
                    leaf = leaves[position] = self.resolve(leaf)
                    changed = True
                elif type(leaf) is torch.nn.Parameter:
                    self.info.check_tensor(leaf)
                if stale and id(leaf) in stale:
                    raise NotImplementedError(stale[id(leaf)])
        if self.replace is not None:
            fn = self.replace(fn)
        if changed:
            args, kwargs = unflatten_call(spec, leaves)
        result = fn(*args, **kwargs)
        first = leaves[0] if leaves else None
        if is_view and isinstance(first, Tensor):
            for out in _tensor_leaves(result):
                self.view_base[id(out)] = id(first)
                self.keep_alive.append(out)
            self.keep_alive.append(first)
        if mutates and isinstance(first, Tensor):
            if result is not first and isinstance(result, Tensor):
                base = self.view_base.get(id(first))
                while base is not None:
                    self.stale[base] = _stale_message(op_name(func), "the model")
                    base = self.view_base.get(base)
                self.keep_alive.append(first)
                substitute[id(first)] = result
            return None if returns_none else result
        return result


def _stale_message(op: str, where: str) -> str:
    return (
        f"attribute: the in-place operation {op} in '{where}' wrote into a view of an activation that is read "
        f"afterwards; lrpfunc records values, not memory, so write it out of place (e.g. torch.cat, torch.where or "
        f"index_put instead of slicing assignment)"
    )


def call_model(model: torch.nn.Module, x: Any, info: ModelInfo) -> Any:
    """Call ``model`` with ``x`` (a tuple is spread over positional arguments, a dict over keywords), leaving its
    parameter and buffer bindings as they were (:meth:`ModelInfo.preserved`)."""
    with info.preserved():
        if isinstance(x, tuple):
            return model(*x)
        if isinstance(x, dict):
            return model(**x)
        return model(x)


def evaluate(model: torch.nn.Module, params: Mapping[str, Tensor], x: Any, info: ModelInfo | None = None) -> Any:
    """``model(x)`` with ``params``; thread-safe, never touches the module."""
    info = info or ModelInfo(model)
    with Substitution(info, params):
        return call_model(model, x, info)


Resolver = Callable[[CallSite], Any]


class Tracer(TorchFunctionMode):
    """Records one forward pass of a model on a :class:`~lrpfunc._tape.Tape`; see the module docstring."""

    def __init__(
        self,
        info: ModelInfo,
        params: Mapping[str, Tensor],
        tape: Tape,
        *,
        resolver: Resolver | None,
        replacers: Sequence[Any] = (),
        merge_batchnorm: bool = False,
        label_sums: bool = False,
        observe: Callable[[str, int], str | None] | None = None,
        skip_merge: frozenset[tuple[int, int]] = frozenset(),
        skip_transpose: frozenset[tuple[int, int]] = frozenset(),
        record_sites: bool = False,
        transparent: bool = False,
    ) -> None:
        super().__init__()
        self.tape = tape
        self.per_op = tape.per_op
        self.resolver = resolver
        self.replacers = tuple(replacers)
        self.merge_batchnorm = merge_batchnorm
        self.label_sums = label_sums
        self.observe = observe
        self.skip_merge = skip_merge
        self.skip_transpose = skip_transpose
        self.record_sites = record_sites
        # a rule whose gradient form is the call's own pullback leaves the call on the tape (see _sweep): ``transparent``
        # allows it; inside such a module call everything is on the tape as well
        self.transparent = transparent
        self.transparent_depth = 0
        self.info = info
        self.names = info.names
        # values
        self.vid_of: dict[int, int] = {}
        self.tensors: dict[int, Tensor] = {}
        #: Values inside pieces that no cut holds yet, held weakly (a dead one leaves ``vid_of``).
        self.weak: dict[int, weakref.ref[Tensor]] = {}
        self.next_vid = 0
        self.low: dict[int, Tensor] = {}
        self.activations: set[int] = set()
        self.owner: dict[int, RuledCall] = {}
        self.source: dict[int, type | None] = {}
        self.param_names: dict[int, str] = {}
        self.static_origin: dict[int, str] = {}
        self.substitute: dict[int, Tensor] = {}
        self.keep_alive: list[Tensor] = []
        self.view_base: dict[int, int] = {}
        self.stale: dict[int, str] = {}
        # cuts and pieces
        self.cut: set[int] = set()
        self.pending_cut: set[int] = set()
        self.leaf_of: dict[int, int] = {}
        self.origin: dict[int, int] = {}
        self.piece_parent: dict[int, int] = {}
        self.piece_leaves: dict[int, list[tuple[int, Tensor]]] = {}
        self.piece_of: dict[int, int] = {}
        self.piece_computes: set[int] = set()
        self.piece_gradients: set[int] = set()
        self.observed: set[int] = set()
        #: Values known to have no negative part, from the operations that made them (:mod:`lrpfunc._facts`).
        self.nonnegative: set[int] = set()
        # calls and sites
        self.steps: list[Any] = []
        self.call: RuledCall | None = None
        self.covered = 0  # > 0 inside a BatchNorm merged into a layer without rule: its sites are covered
        self.stack: list[str] = []
        self.call_counts: dict[int, int] = {}
        self.order = 0
        self.op_index = 0
        self.module_index = 0
        self.sites: list[tuple[CallSite, Any, str | None]] = []
        self.replacement_cache: dict[Any, Any] = {}
        self.grad_enabled = torch.is_grad_enabled()
        self.raw = 0  # > 0 while the tracer runs torch operations of its own
        # BatchNorm merging: the last Linear/Conv call whose output nothing has read yet
        self.last_layer: tuple[RuledCall | None, Any, int, str, bool] | None = None
        self.merged_interior: dict[int, tuple[int, int]] = {}
        detach = not tape.exact
        for name, tensor, value in model_tensors(info, params):
            if detach:
                value = value.detach()
            if value is not tensor:
                self.substitute[id(tensor)] = value
            if id(value) not in self.vid_of:
                self.param_names[self.register(value, activation=False)] = name
                self.low[self.vid_of[id(value)]] = value

    # values ---------------------------------------------------------------------------------------------------
    def register(self, tensor: Tensor, *, activation: bool) -> int:
        vid = self.next_vid
        self.next_vid = vid + 1
        self.tensors[vid] = tensor
        self.vid_of[id(tensor)] = vid
        if activation:
            self.activations.add(vid)
        return vid

    def value(self, vid: int) -> Tensor:
        """The tensor of value ``vid``, held strongly or (inside a piece) weakly."""
        found = self.tensors.get(vid)
        if found is None:
            found = self.weak[vid]()
            if found is None:
                raise RuntimeError(f"lrpfunc._trace: value {vid} was read after it was freed")
        return found

    def hold_weakly(self, vids: Sequence[int]) -> None:
        """Hold the new values ``vids`` inside a piece weakly: when the model drops one, nothing can read it again, and
        it leaves ``vid_of`` (before its id can be reused)."""
        tensors, weak, vid_of = self.tensors, self.weak, self.vid_of
        for vid in vids:
            tensor = tensors.pop(vid)
            key = id(tensor)

            def forget(_: Any, key: int = key, vid: int = vid) -> None:
                if vid_of.get(key) == vid:
                    del vid_of[key]
                weak.pop(vid, None)

            weak[vid] = weakref.ref(tensor, forget)

    def hold(self, vid: int) -> Tensor:
        """Hold value ``vid`` strongly from now on (it became a cut or an output: the sweep reads it)."""
        found = self.tensors.get(vid)
        if found is None:
            found = self.tensors[vid] = self.value(vid)
            del self.weak[vid]
        return found

    def resolve(self, tensor: Tensor) -> Tensor:
        """The tensor to use for ``tensor``: the caller's parameter, the latest value after in-place operations, or
        the leaf a cut lifted it to."""
        substitute = self.substitute.get(id(tensor))
        while substitute is not None and substitute is not tensor:
            tensor = substitute
            substitute = self.substitute.get(id(tensor))
        return tensor

    def vid(self, tensor: Tensor) -> int | None:
        return self.vid_of.get(id(self.resolve(tensor)))

    def lower(self, vid: int) -> Tensor:
        """The caller-level tensor of value ``vid`` (cached)."""
        found = self.low.get(vid)
        if found is None:
            found = self.low[vid] = self.tape.lower(self.value(vid))
        return found

    def add_input(self, tensor: Tensor) -> int:
        """Register a float input leaf of the model: lifted to a leaf of the tape, a cut, a piece of its own."""
        leaf = self.tape.lift(tensor) if not self.per_op else tensor
        vid = self.register(leaf, activation=True)
        self.low[vid] = tensor if self.per_op else self.tape.lower(leaf)
        self.cut.add(vid)
        if not self.per_op:
            self.new_piece(vid, vid, leaf)
        return vid

    def new_piece(self, leaf_vid: int, origin: int, tensor: Tensor) -> None:
        self.piece_parent[leaf_vid] = leaf_vid
        self.piece_leaves[leaf_vid] = [(origin, tensor)]
        self.piece_of[leaf_vid] = leaf_vid

    def find(self, piece: int) -> int:
        parent = self.piece_parent
        while parent[piece] != piece:
            parent[piece] = parent[parent[piece]]
            piece = parent[piece]
        return piece

    def union(self, pieces: Sequence[int]) -> int:
        roots = {self.find(piece) for piece in pieces}
        first = roots.pop()
        for other in roots:
            self.piece_parent[other] = first
            self.piece_leaves[first].extend(self.piece_leaves.pop(other))
            for marks in (self.piece_computes, self.piece_gradients):
                if other in marks:
                    marks.discard(other)
                    marks.add(first)
        return first

    def mark_piece(self, piece: int, gradient: bool) -> None:
        """Note that an operation of the piece needs gradients (``gradient``: a transparent call) or relevance (an
        operation other than data movement without a rule); a piece cannot need both."""
        root = self.find(piece)
        (self.piece_gradients if gradient else self.piece_computes).add(root)
        if root in self.piece_gradients and root in self.piece_computes:
            raise Retry("forms", None)

    def lift_cut(self, vid: int) -> int:
        """Lift the cut value ``vid`` (a ruled call's output or an observed value) to a fresh leaf that later reads
        see; returns the leaf's value id."""
        self.pending_cut.discard(vid)
        tensor = self.tensors[vid]
        leaf = self.tape.lift(tensor)
        leaf_vid = self.register(leaf, activation=True)
        self.leaf_of[vid] = leaf_vid
        self.origin[leaf_vid] = vid
        self.source[leaf_vid] = self.source.get(vid)
        if vid in self.nonnegative:
            self.nonnegative.add(leaf_vid)
        self.new_piece(leaf_vid, vid, leaf)
        self.substitute[id(tensor)] = leaf
        self.keep_alive.append(tensor)
        return leaf_vid

    def is_activation(self, value: Any) -> bool:
        if not isinstance(value, Tensor):
            return False
        vid = self.vid_of.get(id(value))
        return vid is not None and vid in self.activations

    # sites ------------------------------------------------------------------------------------------------------
    def offer(self, site: CallSite) -> Any:
        rule = self.resolver(site) if self.resolver is not None else None
        if self.record_sites:
            self.sites.append((site, rule, None))
        return rule

    def note_covered(self, site: CallSite, by: str) -> None:
        if self.record_sites:
            self.sites.append((site, None, by))

    def next_order(self) -> int:
        order = self.order
        self.order += 1
        return order

    # module calls -----------------------------------------------------------------------------------------------
    def module_call(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = id(module)
        index = self.call_counts.get(key, 0)
        self.call_counts[key] = index + 1
        name = self.names.get(key)
        if name is None:
            self.info.check_module(module)
            name = f"<{type(module).__name__}>"
        module_index = self.module_index
        self.module_index += 1
        call = self.call
        if call is not None or self.covered or self.transparent_depth:
            if self.record_sites:
                site = CallSite("module", module_index, name, module, None, None, index, self.next_order(), None)
                by = call.site.name if call is not None else ("a merged BatchNorm" if self.covered else "a call in gradient form")
                self.note_covered(site, by)
            self.stack.append(name)
            try:
                return _MODULE_CALL(module, *args, **kwargs)
            finally:
                self.stack.pop()
        observed = self.observe(name, index) if self.observe is not None else None
        if self.merge_batchnorm and _is_batchnorm(module):
            merged = self.try_merge(module, module_index, index, name, args, kwargs)
            if merged is not _NOT_MERGED:
                if observed is not None:
                    self.add_observation(observed, merged)
                return merged
        if not self.reads_activation(args, kwargs):
            return self.constant_call(module, name, args, kwargs, observed)
        site = CallSite("module", module_index, name, module, None, None, index, self.next_order(), None)
        rule = self.offer(site)
        transparent = rule is not None and self.transparent and traits_of(rule).transparent
        self.stack.append(name)
        try:
            if transparent:  # its rule is its pullback in gradient form: everything inside goes on the tape
                self.transparent_depth += 1
                try:
                    output = _MODULE_CALL(module, *args, **kwargs)
                finally:
                    self.transparent_depth -= 1
                ruled = None
            elif rule is None:
                output = _MODULE_CALL(module, *args, **kwargs)
                ruled = None
            else:
                ruled = RuledCall(site, rule, traits_of(rule).needs_pullback, module)
                ruled.transposed = (
                    type(module) in _TRANSPOSABLE
                    and getattr(module, "padding_mode", "zeros") == "zeros"
                    and not isinstance(getattr(module, "padding", 0), str)
                    and (key, index) not in self.skip_transpose
                )
                for local, tensor in self.info.module_params(module):
                    vid = self.vid(tensor)
                    if vid is not None:
                        ruled.param_vids[local] = vid
                        self.lower(vid)
                output = self.run_ruled(ruled, lambda: _MODULE_CALL(module, *args, **kwargs))
        finally:
            self.stack.pop()
        if ruled is not None:
            output = self.finish_ruled(ruled, output)
        if self.merge_batchnorm and isinstance(module, _MERGEABLE):
            self.note_mergeable(ruled, module, output, name, transparent)
        if observed is not None:
            self.add_observation(observed, output)
        return output

    def reads_activation(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether a tensor among a call's arguments is an activation (depends on the model's input)."""
        activations = self.activations
        for leaf in flatten_call(args, kwargs)[0]:
            if isinstance(leaf, Tensor):
                vid = self.vid(leaf)
                if vid is not None and vid in activations:
                    return True
        return False

    def constant_call(self, module: torch.nn.Module, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                      observed: str | None) -> Any:
        """A module call on constants alone (a learned query, a position table, an encoder fed token ids while the
        relevance goes to the decoder's embeddings): no relevance passes through it, so it is no call site, like an
        operation on constants; its output is a constant. A submodule or operation inside it that does read an
        activation is a call site of its own."""
        self.stack.append(name)
        try:
            output = _MODULE_CALL(module, *args, **kwargs)
        finally:
            self.stack.pop()
        if observed is not None:
            self.add_observation(observed, output)
        return output

    def note_mergeable(self, ruled: RuledCall | None, layer: Any, output: Any, name: str, transparent: bool) -> None:
        """A linear layer (a module, or an operation as :class:`_OperationLayer`) produced ``output``: a BatchNorm
        called next on it may be folded into it (:meth:`try_merge`)."""
        outputs = [self.vid(leaf) for leaf in _tensor_leaves(output)]
        if len(outputs) == 1 and outputs[0] is not None and outputs[0] in self.activations:
            self.last_layer = (ruled, layer, outputs[0], name, transparent)

    def run_ruled(self, ruled: RuledCall, run: Callable[[], Any]) -> Any:
        self.call = ruled
        try:
            if not ruled.quiet or not self.tape.has_quiet:
                return run()
            with self.tape.quiet():
                return run()
        finally:
            self.call = None

    def finish_ruled(self, ruled: RuledCall, output: Any) -> Any:
        """Register the outputs of a finished ruled call. An input returned unchanged becomes a new value (a view)
        that the call produced, so that the call's rule stands between the two."""
        if isinstance(output, Tensor):
            leaves, spec = [output], None
        else:
            leaves, spec = optree.tree_flatten(output, none_is_leaf=True)
        changed = False
        for position, leaf in enumerate(leaves):
            if not isinstance(leaf, Tensor):
                continue
            vid = self.vid(leaf)
            if vid is None or vid not in self.activations or not _is_float(self.value(vid)):
                continue
            if self.owner.get(vid) is not ruled:
                leaves[position] = self.passed_through(ruled, vid)
                changed = True
                vid = self.vid_of[id(leaves[position])]
            if vid not in ruled.outputs:
                ruled.outputs.append(vid)
        for vid in ruled.outputs:
            self.cut.add(vid)
            self.pending_cut.add(vid)
        if ruled.transposed and not _one_linear_operation(ruled):
            raise Retry("transpose", (id(ruled.module), ruled.site.call_index))
        if ruled.nodes and ruled.op_class is None:
            ruled.op_class = ruled.nodes[-1].op_class
        for vid in ruled.outputs:
            producer = next((node for node in reversed(ruled.nodes) if vid in node.outputs), None)
            if producer is not None:
                self.source[vid] = _source_class(producer, self.source)
        self.steps.append(ruled)
        if not changed:
            return output
        return leaves[0] if spec is None else optree.tree_unflatten(spec, leaves)

    def passed_through(self, ruled: RuledCall, vid: int) -> Tensor:
        """A new value of ``ruled`` equal to its input (or an earlier value) ``vid``."""
        self.raw += 1
        try:
            return self._passed_through(ruled, vid)
        finally:
            self.raw -= 1

    def input_index(self, call: RuledCall, vid: int, *, per_position: bool) -> int:
        """The index of value ``vid`` among the inputs of ``call``, adding it if new (always for an operand of an
        operation call, so that ``x * x`` has two inputs; once per value for a module call)."""
        index = None if per_position else call.index_of.get(vid)
        if index is not None:
            return index
        index = len(call.inputs)
        call.inputs.append(vid)
        call.input_sources.append(self.source.get(vid))
        call.index_of.setdefault(vid, index)
        self.lower(vid)
        if vid not in self.cut and not self.per_op and vid not in self.origin:
            self.hold(vid)
            self.cut.add(vid)  # a value inside a piece: split the piece here
            self.pending_cut.add(vid)
            self.steps.append(Split(vid))
        lifted = None
        if not call.quiet and not self.per_op:
            tensor = self.value(vid)
            fresh = tensor.grad_fn is None and tensor.requires_grad and vid not in call.lifted_vids()
            lifted = tensor if fresh else self.tape.lift(tensor)
        call.lifted.append(lifted)
        return index

    def _passed_through(self, ruled: RuledCall, vid: int) -> Tensor:
        index = self.input_index(ruled, vid, per_position=False)
        if not ruled.quiet and not self.per_op:
            inside = ruled.lifted[index]
        else:
            inside = self.lower(vid)
        alias = inside.view_as(inside)
        new_vid = self.register(alias, activation=True)
        self.owner[new_vid] = ruled
        self.low[new_vid] = self.tape.lower(alias) if not ruled.quiet and not self.per_op else alias
        self.source[new_vid] = self.source.get(vid)
        if vid in self.nonnegative:
            self.nonnegative.add(new_vid)
        ruled.nodes.append(Node(Tensor.view_as, Tensor.view_as, [Ref(vid), Ref(vid)], _FastSpec(2, ()), (vid,),
                                [Ref(new_vid)], (new_vid,), _ops.DataMovement))
        if not ruled.quiet and self.per_op:
            ruled.pullbacks.append(((vid,), (new_vid,), _identity_pullback))
        return alias

    # BatchNorm merging ------------------------------------------------------------------------------------------
    def try_merge(self, bn: torch.nn.Module, module_index: int, index: int, name: str, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
        """Fold the eval-mode BatchNorm ``bn`` into the Linear/Conv call that produced its input, if nothing else has
        read that output. A later read raises :class:`Retry`, and the forward pass runs again without this merge."""
        last = self.last_layer
        if last is None or not args or not isinstance(args[0], Tensor) or (id(bn), index) in self.skip_merge:
            return _NOT_MERGED
        producer, layer, vid, layer_name, transparent = last
        if self.vid(args[0]) != vid:
            return _NOT_MERGED
        batch_statistics = getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None
        trains = isinstance(bn, _types.BatchNorm) and bn.training and bn.track_running_stats  # frozen ones never do
        if batch_statistics or trains:
            raise ValueError(
                f"merge_batchnorm: {type(bn).__name__} '{name}' runs in training mode (batch statistics), which cannot "
                f"be folded into '{layer_name}'. Call model.eval() first, or attribute without merge_batchnorm."
            )
        self.last_layer = None  # a merged BatchNorm is no call site at all
        self.stack.append(name)
        try:
            if producer is None:  # a layer without a rule: layer and BatchNorm keep their true gradient together
                self.covered += 1
                self.transparent_depth += transparent  # a transparent layer's BatchNorm is transparent with it
                try:
                    return _MODULE_CALL(bn, *args, **kwargs)
                finally:
                    self.covered -= 1
                    self.transparent_depth -= transparent
                    self.merged_interior[vid] = (id(bn), index)  # a later read of the layer's output undoes the merge
            # reopen the layer's call: the BatchNorm runs inside it and its output becomes the call's output
            self.steps.remove(producer)
            for out in producer.outputs:
                self.cut.discard(out)
                self.pending_cut.discard(out)
                self.merged_interior[out] = (id(bn), index)
            layer_nodes = len(producer.nodes)
            producer.outputs = []
            producer.merged_from = name
            output = self.run_ruled(producer, lambda: _MODULE_CALL(bn, *args, **kwargs))
            self.raw += 1
            try:
                _merge_parameters(self, producer, layer, bn, vid, layer_nodes)
            finally:
                self.raw -= 1
            return self.finish_ruled(producer, output)
        finally:
            self.stack.pop()

    # observations -----------------------------------------------------------------------------------------------
    def add_observation(self, name: str, output: Any) -> None:
        vids, push = [], []
        for leaf in _tensor_leaves(output):
            vid = self.vid(leaf)
            if vid is None or vid not in self.activations or not _is_float(self.value(vid)):
                continue
            self.hold(vid)
            vids.append(vid)
            self.lower(vid)  # the sweep reads its value (relevance = value * gradient)
            first = vid not in self.observed
            self.observed.add(vid)
            # a value inside a piece becomes a cut here; the sweep pushes its relevance back into the piece
            push.append(first and vid not in self.cut)
            if vid not in self.cut:
                self.cut.add(vid)
                if not self.per_op:
                    self.pending_cut.add(vid)
        self.steps.append(Observation(name, vids, push))

    # operations -------------------------------------------------------------------------------------------------
    def replaced(self, func: Callable[..., Any]) -> Callable[..., Any]:
        found = self.replacement_cache.get(func)
        if found is None:
            found = func
            for replacer in self.replacers:
                replacement = replacer.replace_op(found)
                if replacement is not None:
                    found = replacement
            self.replacement_cache[func] = found
        return found

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        if func in _METADATA or self.raw:
            return func(*args, **(kwargs or {}))
        given_kwargs = kwargs or {}
        facts = _FACTS.get(func)
        fn, mutates, returns_none, _ = facts if facts is not None else _facts(func)
        if given_kwargs.get("inplace") is True:
            kwargs = {**given_kwargs, "inplace": False}
            mutates = True
        else:
            kwargs = given_kwargs
        leaves, spec = flatten_call(args, kwargs)
        constant = self.grad_enabled and not torch.is_grad_enabled()
        vid_of, activations, substitute, stale = self.vid_of, self.activations, self.substitute, self.stale
        known = False
        act: list[int] = []
        vids: list[int | None] = []
        for position, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                if id(leaf) in substitute:
                    leaf = self.resolve(leaf)
                    leaves[position] = leaf
                vid = vid_of.get(id(leaf))
                vids.append(vid)
                if vid is None:
                    if type(leaf) is torch.nn.Parameter:
                        self.info.check_tensor(leaf)
                    continue
                known = True
                if stale and vid in stale:
                    raise NotImplementedError(stale[vid])
                if vid in activations and not constant:  # activations are floating-point by construction
                    act.append(position)
            else:
                vids.append(None)
        if not known:  # nothing the record knows: run it as the model wrote it (in place included)
            return func(*args, **given_kwargs)
        last = self.last_layer
        if last is not None and act and any(vids[p] == last[2] for p in act):
            self.last_layer = None
        if self.merged_interior and act and self.call is None:
            for position in act:  # the output of a layer whose BatchNorm was merged, read by something else
                key = self.merged_interior.get(vids[position])  # type: ignore[arg-type]
                if key is not None:
                    raise Retry("merge", key)
        if self.replacers:
            fn = self.replaced(fn)
        # the tensor an in-place operation writes to, as the model sees it (the calls below replace leaves by
        # lowered or lifted tensors)
        target = leaves[0] if mutates and leaves else None
        call = self.call
        if call is not None:
            result = self.inside_call(call, func, fn, leaves, spec, act, vids)
        elif act:
            result = self.outside_call(func, fn, leaves, spec, act, vids)
        else:
            result = self.static_op(fn, leaves, spec)
        if isinstance(target, Tensor):
            if result is not target and isinstance(result, Tensor):
                self._mark_bases_stale(target, op_name(func))
                self.keep_alive.append(target)
                self.substitute[id(target)] = result
            return None if returns_none else result
        return result

    def _register_outputs(self, result: Any, activation: bool) -> tuple[list[Any], list[int]]:
        """Register the new tensors of ``result``; returns the output leaves with :class:`Ref` placeholders and the
        value ids of the new floating-point activations."""
        tensors = self.tensors
        if type(result) is Tensor or isinstance(result, Tensor):
            existing = self.vid_of.get(id(result))
            if existing is not None and self.value(existing) is result:
                return [Ref(existing)], []
            is_float = activation and _is_float(result)
            vid = self.register(result, activation=is_float)
            return [Ref(vid)], ([vid] if is_float else [])
        refs: list[Any] = []
        outputs: list[int] = []
        for leaf in optree.tree_leaves(result, none_is_leaf=True):
            if isinstance(leaf, Tensor):
                existing = self.vid_of.get(id(leaf))
                if existing is not None and self.value(existing) is leaf:
                    refs.append(Ref(existing))
                    continue
                is_float = _is_float(leaf)
                vid = self.register(leaf, activation=activation and is_float)
                refs.append(Ref(vid))
                if activation and is_float:
                    outputs.append(vid)
            else:
                refs.append(leaf)
        return refs, outputs

    def static_op(self, fn: Callable[..., Any], leaves: list[Any], spec: Any) -> Any:
        args, kwargs = unflatten_call(spec, leaves)
        result = _run(fn, args, kwargs, self.stack)
        if self.stack and self.stack[-1]:  # a constant made inside a submodule (a position embedding): remember it
            origin = self.stack[-1]
            for ref in self._register_outputs(result, activation=False)[0]:
                if type(ref) is Ref:  # the module that made it, not one that passed it on (``.to(device)``)
                    self.static_origin.setdefault(ref.vid, origin)
        else:
            self._register_outputs(result, activation=False)
        return result

    def classify(self, func: Callable[..., Any], fn: Callable[..., Any], leaves: list[Any], spec: Any) -> _ops.OpInfo:
        """The operation class and parameter operands of ``fn`` (if the table knows the replacement) or of ``func``."""
        args, kwargs = unflatten_call(spec, leaves)
        return _ops.classify(fn if fn is not func and _ops.registered(fn) else func, args, kwargs, self.is_activation)

    def class_of(self, func: Callable[..., Any], fn: Callable[..., Any], leaves: list[Any], spec: Any) -> type:
        """Only the operation class (cheaper than :meth:`classify`)."""
        target = fn if fn is not func and _ops.registered(fn) else func
        found = _ops._CONSTANT.get(target)
        if found is not None:
            return found
        args, kwargs = unflatten_call(spec, leaves)
        return _ops.class_of(target, args, kwargs, self.is_activation)

    def inside_call(self, call: RuledCall, func: Callable[..., Any], fn: Callable[..., Any], leaves: list[Any], spec: Any,
                    act: list[int], vids: list[int | None]) -> Any:
        """An operation inside a ruled call: the activations it reads from outside become the call's inputs."""
        op_class = self.class_of(func, fn, leaves, spec)
        op_index = self.op_index
        self.op_index += 1
        if self.record_sites:
            owner = self.stack[-1] if self.stack else ""
            name = op_name(func)
            site = CallSite("op", op_index, f"{owner}/{name}" if owner else name, None, func, None, 0, self.next_order(),
                            op_class)
            self.note_covered(site, call.site.name)
        template = list(leaves)
        owner_of = self.owner
        quiet = call.quiet
        per_op = self.per_op
        inputs: list[int] = []
        for position, leaf in enumerate(leaves):
            vid = vids[position]
            if vid is None:
                if isinstance(leaf, Tensor):
                    lowered = self.tape.lower(leaf)
                    template[position] = lowered
                    if quiet:
                        leaves[position] = lowered
                continue
            template[position] = Ref(vid)
            if position not in act:
                if quiet:
                    leaves[position] = self.lower(vid)
                continue
            inputs.append(vid)
            if owner_of.get(vid) is call:
                if quiet:
                    leaves[position] = self.lower(vid)
                continue
            if vid in self.merged_interior:
                raise Retry("merge", self.merged_interior[vid])
            index = self.input_index(call, vid, per_position=call.module is None)
            if quiet:
                leaves[position] = self.lower(vid)
            elif not per_op:
                leaves[position] = call.lifted[index]
        if per_op and not quiet and act:
            result, pullback = self._run_vjp(fn, leaves, spec, act)
        else:
            args, kwargs = unflatten_call(spec, leaves)
            result = _run(fn, args, kwargs, self.stack)
            pullback = None
        refs, outputs = self._register_outputs(result, activation=True)
        self.note_nonnegative(func, op_class, leaves, spec, vids, outputs)
        tensors, low = self.tensors, self.low
        for vid in outputs:
            owner_of[vid] = call
            low[vid] = tensors[vid] if quiet or per_op else self.tape.lower(tensors[vid])
        if not call.records:
            source = self.source.get(inputs[0]) if op_class is _ops.DataMovement and inputs else op_class
            for vid in outputs:
                self.source[vid] = source
            return result
        node = Node(fn, func, template, spec, tuple(inputs), refs, tuple(outputs), op_class)
        if call.transposed and not call.nodes:
            node.transpose = _ops.transpose_of(func, *unflatten_call(spec, leaves))
        call.nodes.append(node)
        if pullback is not None:
            call.pullbacks.append((tuple(inputs), tuple(outputs), pullback))
        source = _source_class(node, self.source)
        for vid in outputs:
            self.source[vid] = source
        return result

    def outside_call(self, func: Callable[..., Any], fn: Callable[..., Any], leaves: list[Any], spec: Any, act: list[int],
                     vids: list[int | None]) -> Any:
        """An operation on activations outside ruled calls: a call site of its own."""
        owner_of, merged = self.owner, self.merged_interior
        for position in act:
            vid = vids[position]
            if vid in owner_of and vid not in self.cut:
                if vid in merged:
                    raise Retry("merge", merged[vid])  # type: ignore[index]
                call = owner_of[vid]  # type: ignore[index]
                raise NotImplementedError(
                    f"attribute: a value computed inside {call.site.describe()} (which has the rule {call.rule!r}) is read "
                    f"outside that call by {op_name(func)} in '{self.stack[-1] if self.stack else 'the model'}', but is not "
                    f"one of its outputs; a rule can only pass relevance to what the call returns. Give this call no rule "
                    f"(or one on its submodules), or return the value from it."
                )
        op_class = None
        rule = None
        site = None
        op_index = self.op_index
        self.op_index += 1
        if self.resolver is not None or self.record_sites:
            op_class = self.class_of(func, fn, leaves, spec)
            label = None
            if self.label_sums:
                call_args, call_kwargs = unflatten_call(spec, leaves)
                label = _types.Sum if _is_residual_sum(func, call_args, call_kwargs, act, leaves) else None
            owner = self.stack[-1] if self.stack else ""
            name = _OP_NAMES.get(func) or _op_name_of(func)
            site = CallSite("op", op_index, f"{owner}/{name}" if owner else name, None, func, label, 0, self.next_order(),
                            op_class)
            if self.covered and not self.transparent_depth:
                self.note_covered(site, "a merged BatchNorm")
            elif self.transparent_depth:
                self.note_covered(site, "a call in gradient form")
            else:
                rule = self.offer(site)
        transparent = self.transparent_depth > 0
        if rule is not None and self.transparent and traits_of(rule).transparent:
            transparent, rule = True, None  # its rule is its pullback in gradient form: on the tape
        if rule is not None:
            assert site is not None
            decompose = traits_of(rule).decompose
            if decompose is not None:
                call_args, call_kwargs = unflatten_call(spec, leaves)
                with self:
                    return decompose(func, call_args, call_kwargs)
            info = self.classify(func, fn, leaves, spec)
            ruled = RuledCall(site, rule, traits_of(rule).needs_pullback, None, op_class=info.op_class)
            if act == [0]:
                ruled.transposed = _ops.transpose_of(func, *unflatten_call(spec, leaves)) is not None
            elif act == [0, 1]:
                ruled.closed_pullback = _ops.sum_pullback_of(func)
            for local, tensor in info.params.items():
                vid = self.vid_of.get(id(tensor))
                if vid is not None:
                    ruled.param_vids[local] = vid
                    self.lower(vid)
            self.op_index = op_index  # inside_call counts the operation
            record_sites, self.record_sites = self.record_sites, False
            try:
                result = self.run_ruled(ruled, lambda: self.inside_call(ruled, func, fn, leaves, spec, act, vids))
            finally:
                self.record_sites = record_sites
            output = self.finish_ruled(ruled, result)
            if self.merge_batchnorm and func in _MERGEABLE_OPERATIONS and act == [0]:
                self.note_mergeable(ruled, _OperationLayer(info.params), output, site.name, False)
            return output
        # an operation without a rule: on the tape
        if self.per_op:
            result, pullback = self._run_vjp(fn, leaves, spec, act)
            refs, outputs = self._register_outputs(result, activation=True)
            for vid in outputs:
                self.cut.add(vid)
            if outputs:
                self.steps.append(OpStep(tuple(vids[p] for p in act), tuple(outputs), pullback, site,  # type: ignore[misc]
                                         "gradient" if transparent else ("moves" if _ops.moves_values(func, op_class)
                                                                         else "computes")))
        else:
            for position in act:
                vid = vids[position]
                if vid in self.pending_cut:
                    self.lift_cut(vid)  # type: ignore[arg-type]
                # a cut lifted now or for an earlier operand of this operation (``cat([h, h.tanh_()])`` reads the
                # in-place result twice): its leaf
                leaf_vid = self.leaf_of.get(vid)  # type: ignore[arg-type]
                if leaf_vid is not None:
                    leaves[position] = self.tensors[leaf_vid]
                    vids[position] = leaf_vid
            call_args, call_kwargs = unflatten_call(spec, leaves)
            result = _run(fn, call_args, call_kwargs, self.stack)
            if type(result) is Tensor and id(result) not in self.vid_of:
                vid = self.next_vid
                self.next_vid = vid + 1
                self.tensors[vid] = result
                self.vid_of[id(result)] = vid
                if result.is_floating_point() or result.is_complex():
                    self.activations.add(vid)
                    outputs = [vid]
                else:
                    outputs = []
            else:
                outputs = self._register_outputs(result, activation=True)[1]
            if outputs:
                piece_of = self.piece_of
                if len(act) == 1:
                    piece = piece_of[vids[act[0]]]  # type: ignore[index]
                else:
                    piece = self.union([piece_of[vids[p]] for p in act])  # type: ignore[index]
                for vid in outputs:
                    piece_of[vid] = piece
                if transparent:
                    self.mark_piece(piece, True)
                elif not _ops.moves_values(func, op_class):  # its pullback is not a mere move of the cotangent
                    self.mark_piece(piece, False)
                self.hold_weakly(outputs)
        if outputs:
            self.note_nonnegative(func, op_class, leaves, spec, vids, outputs)
            if self.merge_batchnorm and func in _MERGEABLE_OPERATIONS and act == [0]:
                operands = unflatten_call(spec, leaves)
                params = _ops.classify(func, *operands, self.is_activation).params
                self.note_mergeable(None, _OperationLayer(params), result, site.name if site else op_name(func),
                                    transparent)
            source = op_class
            if source is _ops.DataMovement or source is None:
                source = self.source.get(vids[act[0]])  # type: ignore[arg-type]
            for vid in outputs:
                self.source[vid] = source
            if _FACTS[func][3]:
                for vid in outputs:
                    self.view_base[vid] = vids[act[0]]  # type: ignore[assignment]
        return result

    def note_nonnegative(self, func: Callable[..., Any], op_class: type | None, leaves: list[Any], spec: Any,
                         vids: list[int | None], outputs: Sequence[int]) -> None:
        """Note the ``outputs`` of ``func`` as non-negative where the operation makes them so (a static fact)."""
        nonnegative = self.nonnegative
        if outputs and static_facts.nonnegative(func, op_class, leaves, lambda: unflatten_call(spec, leaves),
                                          lambda position: vids[position] in nonnegative):
            nonnegative.update(outputs)

    def _run_vjp(self, fn: Callable[..., Any], leaves: list[Any], spec: Any, act: list[int]) -> tuple[Any, Callable[..., Any]]:
        """Run ``fn`` under :func:`torch.func.vjp` w.r.t. the activation leaves (the per-operation tape)."""
        shape: list[Any] = []
        stack = self.stack

        def run(*activations: Tensor) -> tuple[tuple[Tensor, ...], tuple[Any, ...]]:
            current = list(leaves)
            for position, activation in zip(act, activations):
                current[position] = activation
            call_args, call_kwargs = unflatten_call(spec, current)
            result = _run(fn, call_args, call_kwargs, stack)
            result_leaves, result_spec = optree.tree_flatten(result, none_is_leaf=True)
            floats = tuple(leaf for leaf in result_leaves if isinstance(leaf, Tensor) and _is_float(leaf))
            others = tuple(leaf for leaf in result_leaves if isinstance(leaf, Tensor) and not _is_float(leaf))
            shape[:] = [result_leaves, result_spec]
            return floats or (torch.zeros(()),), others

        floats, pullback, others = VjpTape.run(run, [leaves[p] for p in act])
        result_leaves, result_spec = shape
        has_floats = any(isinstance(leaf, Tensor) and _is_float(leaf) for leaf in result_leaves)
        float_iter, other_iter = iter(floats), iter(others)
        rebuilt = []
        for leaf in result_leaves:
            if isinstance(leaf, Tensor):
                rebuilt.append(next(float_iter) if _is_float(leaf) else next(other_iter))
            else:
                rebuilt.append(leaf)
        result = optree.tree_unflatten(result_spec, rebuilt)
        return result, (pullback if has_floats else _no_pullback(len(act)))

    def _mark_bases_stale(self, target: Tensor, op: str) -> None:
        """An in-place write into a view changes its base, which a record of values cannot follow."""
        vid = self.vid_of.get(id(target))
        where = self.stack[-1] if self.stack else ""
        while vid is not None and vid in self.view_base:
            vid = self.view_base[vid]
            self.stale[vid] = _stale_message(op, where or "the model")

    def finish(self, input_ids: list[int | None], output: Any) -> Trace:
        """The :class:`Trace` of the finished forward pass; ``output`` is the model's output as returned."""
        output = optree.tree_map(lambda leaf: self.resolve(leaf) if isinstance(leaf, Tensor) else leaf, output,
                                 none_is_leaf=True)
        output_ids = [self.vid_of.get(id(leaf)) if isinstance(leaf, Tensor) else None
                      for leaf in optree.tree_leaves(output, none_is_leaf=True)]
        for vid in output_ids:
            if vid is not None and vid in self.stale:
                raise NotImplementedError(self.stale[vid])
            if vid is not None:
                self.hold(vid)  # the sweep starts there
        lowered = optree.tree_map(
            lambda leaf: self.lower(self.vid_of[id(leaf)]) if isinstance(leaf, Tensor) and id(leaf) in self.vid_of
            else (self.tape.lower(leaf) if isinstance(leaf, Tensor) else leaf),
            output,
            none_is_leaf=True,
        )
        trace = Trace(
            tape=self.tape,
            steps=self.steps,
            tensors=self.tensors,
            low=self.low,
            cut=self.cut,
            activations=self.activations,
            piece_parent=self.piece_parent,
            piece_leaves=self.piece_leaves,
            piece_of=self.piece_of,
            piece_computes=self.piece_computes,
            piece_gradients=self.piece_gradients,
            leaf_of=self.leaf_of,
            origin=self.origin,
            param_names=self.param_names,
            static_origin=self.static_origin,
            input_ids=input_ids,
            output=lowered,
            output_ids=output_ids,
            sites=self.sites,
            nonnegative=self.nonnegative,
        )
        self.weak = {}  # the values still held weakly are no cut: the sweep never reads them
        return trace


def _run(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], stack: Sequence[str]) -> Any:
    """``fn(*args, **kwargs)``; a custom autograd function that ``torch.func`` cannot differentiate is refused, on
    every tape alike (the plain-autograd tape could run it, but whether a call may take that tape depends on its
    arguments, and the answer must not)."""
    if type(fn) is not FunctionApply:
        return fn(*args, **kwargs)
    if not fn.functional:
        where = stack[-1] if stack else "the model"
        raise RuntimeError(
            f"attribute: the custom autograd function {fn.cls.__qualname__} in '{where}' cannot be differentiated by "
            f"torch.func: it has no setup_context staticmethod (its forward takes ctx). lrpfunc propagates through it "
            f"with torch.func, so rewrite it in the setup_context style (forward without ctx plus a setup_context "
            f"staticmethod; https://pytorch.org/docs/stable/notes/extending.func.html), or give its module a rule."
        )
    return fn(*args, **kwargs)


_NOT_MERGED = object()
_BATCHNORM_TYPES: dict[type, bool] = {}


def _is_batchnorm(module: torch.nn.Module) -> bool:
    """A BatchNorm module, with running statistics as parameters and buffers or (frozen) as buffers only."""
    kind = type(module)
    found = _BATCHNORM_TYPES.get(kind)
    if found is None:
        found = isinstance(module, _types.BatchNorm)
        if not found and isinstance(module, _types.FrozenBatchNorm):
            return True  # decided per module: a frozen BatchNorm is known by its buffers
        _BATCHNORM_TYPES[kind] = found
    return found


#: Module types whose forward is one linear operation with a closed-form transpose (when their padding is explicit).
_TRANSPOSABLE = frozenset(
    {
        torch.nn.Linear,
        torch.nn.Conv1d,
        torch.nn.Conv2d,
        torch.nn.Conv3d,
        torch.nn.ConvTranspose1d,
        torch.nn.ConvTranspose2d,
        torch.nn.ConvTranspose3d,
    }
)


def _one_linear_operation(call: RuledCall) -> bool:
    """Whether ``call`` (before a BatchNorm is merged into it) is one operation with a transpose, reading the call's
    single input as its first argument and producing its single output."""
    if len(call.inputs) != 1 or not call.nodes:
        return False
    node = call.nodes[0]
    if len(node.inputs) != 1 or node.inputs[0] != call.inputs[0] or type(node.leaves[0]) is not Ref:
        return False
    if node.leaves[0].vid != call.inputs[0] or node.transpose is None:
        return False
    return len(call.nodes) == 1 or call.merged_from is not None


_MERGEABLE = (
    torch.nn.Linear,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
)

#: Operations a BatchNorm can be merged into (written in a forward, with parameters as weight and bias).
_MERGEABLE_OPERATIONS = frozenset(_ops._all("linear conv1d conv2d conv3d"))


class _OperationLayer:
    """A linear operation (``F.linear``, ``F.conv2d``) as the layer a BatchNorm is merged into: its weight and bias
    operands, read like a module's."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.weight = params.get("weight")
        self.bias = params.get("bias")


def _identity_pullback(grads: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(grads)


def _no_pullback(count: int) -> Callable[..., Any]:
    def pullback(grads: Any) -> tuple[None, ...]:
        return (None,) * count

    return pullback


def _source_class(node: Node, sources: Mapping[int, type | None]) -> type | None:
    """The class of the operation that produced a value, looking through data movement."""
    if node.op_class is _ops.DataMovement and node.inputs:
        return sources.get(node.inputs[0])
    return node.op_class


def _is_residual_sum(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], act: list[int],
                     leaves: list[Any]) -> bool:
    """Two activations of the same shape added with ``alpha == 1`` (what the resnet canonizer labels)."""
    if op_name(func) != "add" or len(act) != 2:
        return False
    first, second = (leaves[p] for p in act)
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    return first.shape == second.shape and alpha == 1


def _merge_parameters(tracer: Tracer, call: RuledCall, layer: torch.nn.Module, bn: torch.nn.Module, layer_output: int,
                      layer_nodes: int) -> None:
    """Give ``call`` (a layer and the BatchNorm folded into it) the merged parameters and a forward using them."""
    from .canonizers import merged_layer

    def tensor_of(module: torch.nn.Module, local: str) -> Tensor | None:
        tensor = getattr(module, local, None)
        if not isinstance(tensor, Tensor):
            return None
        vid = tracer.vid(tensor)
        return tracer.lower(vid) if vid is not None else tensor

    statistics = {local: tensor_of(bn, local) for local in ("weight", "bias", "running_mean", "running_var")}
    call.params, call.forward, call.channel_scale = merged_layer(
        layer,
        tensor_of(layer, "weight"),
        tensor_of(layer, "bias"),
        statistics,
        float(getattr(bn, "eps", 1e-5)),
        call.nodes[:layer_nodes],
        call.inputs[:],
        layer_output,
        tracer.low,
        call.param_vids,
    )


# ------------------------------------------------------------------------------------------------------------


@contextmanager
def eager_calls() -> Iterator[None]:
    """In this thread, for a forward pass that ``torch.func`` differentiates without a tracer: a ``torch.compile``'d
    module runs the module it wraps, and ``torch.utils.checkpoint`` runs its function directly (as while tracing)."""
    with _patches():
        _state.eager = getattr(_state, "eager", 0) + 1
        try:
            yield
        finally:
            _state.eager -= 1


@contextmanager
def tracing(tracer: Tracer) -> Iterator[None]:
    previous = getattr(_state, "tracer", None)
    with _patches():
        _state.tracer = tracer
        try:
            with tracer:
                yield
        finally:
            _state.tracer = previous
