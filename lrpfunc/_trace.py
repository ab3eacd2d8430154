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

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import optree
import torch
from torch.overrides import TorchFunctionMode

from . import _facts as static_facts
from . import ops as _ops
from . import types as _types
from ._composite import CallSite
from ._functionalize import (
    FACTS,
    METADATA,
    OP_NAMES,
    is_float,
    op_facts,
    op_name,
    op_name_of,
    stale_message,
    stale_view_message,
)
from ._interception import MODULE_CALL, run_operation
from ._merge import (
    MERGEABLE_MODULES,
    MERGEABLE_OPERATIONS,
    NOT_MERGED,
    TRANSPOSABLE,
    OperationLayer,
    is_batchnorm,
    merge_parameters,
    one_linear_operation,
)
from ._model import ModelInfo, model_tensors
from ._record import (
    FastSpec,
    Node,
    Observation,
    OpStep,
    Ref,
    Retry,
    RuledCall,
    Split,
    Trace,
    find_piece,
    flatten_call,
    tensor_leaves,
    unflatten_call,
)
from ._tape import Tape, VjpTape
from ._traits import traits_of

Tensor = torch.Tensor


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
        # a rule whose gradient form is the call's own pullback leaves the call on the tape (see _sweep):
        # ``transparent`` allows it; inside such a module call everything is on the tape as well
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
        self.views_of: dict[int, list[int]] = {}
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
        # values inside pieces whose elements may be those of a leaf that takes relevance (see note_relevance_sink)
        self.leaf_moved: set[int] = set()
        self.transparent_outputs: set[int] = set()  # outputs of transparent calls on the tape (they divide by them)
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
        return find_piece(self.piece_parent, piece)

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

    def takes_relevance(self, vid: int) -> bool:
        """Whether ``vid`` (an operand of an operation on the tape) is a leaf of its piece whose cotangent leaves the
        piece as relevance (an input, an observed value, the output of a rule without gradient form), or a value
        moved from one."""
        if vid in self.leaf_moved:
            return True
        if vid not in self.cut and vid not in self.origin:
            return False
        origin = self.origin.get(vid, vid)
        owner = self.owner.get(origin)
        if owner is not None:
            return owner.traits.gradient_form is None
        return origin not in self.transparent_outputs

    def note_relevance_sink(self, vid: int) -> None:
        """Relevance (a seed, an observer's, a rule's without gradient form) arrives at ``vid``. If its elements may be
        those of a leaf that takes relevance (data movement from it: ``cat([h, f(h)])`` with ``h`` a ReLU's output),
        the piece propagates relevance: in gradient form, relevance arriving at a zero element would be divided by zero
        and lost on its way to the leaf, while the rules pass it on (a static fact of the record, never of values)."""
        if vid in self.leaf_moved and not self.per_op:
            self.mark_piece(self.piece_of[vid], False)

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
                by = (call.site.name if call is not None
                      else ("a merged BatchNorm" if self.covered else "a call in gradient form"))
                self.note_covered(site, by)
            self.stack.append(name)
            try:
                return MODULE_CALL(module, *args, **kwargs)
            finally:
                self.stack.pop()
        observed = self.observe(name, index) if self.observe is not None else None
        if self.merge_batchnorm and is_batchnorm(module):
            merged = self.try_merge(module, module_index, index, name, args, kwargs)
            if merged is not NOT_MERGED:
                if observed is not None:
                    self.add_observation(observed, merged)
                return merged
        if not self.reads_activation(args, kwargs):
            return self.constant_call(module, name, args, kwargs, observed)
        site = CallSite("module", module_index, name, module, None, None, index, self.next_order(), None)
        rule = self.offer(site)
        traits = traits_of(rule)
        transparent = rule is not None and self.transparent and traits.transparent
        self.stack.append(name)
        try:
            if transparent:  # its rule is its pullback in gradient form: everything inside goes on the tape
                self.transparent_depth += 1
                try:
                    output = MODULE_CALL(module, *args, **kwargs)
                finally:
                    self.transparent_depth -= 1
                ruled = None
            elif rule is None:
                output = MODULE_CALL(module, *args, **kwargs)
                ruled = None
            else:
                ruled = RuledCall(site, rule, traits, module)
                ruled.transposed = (
                    type(module) in TRANSPOSABLE
                    and getattr(module, "padding_mode", "zeros") == "zeros"
                    and not isinstance(getattr(module, "padding", 0), str)
                    and (key, index) not in self.skip_transpose
                )
                for local, tensor in self.info.module_params(module):
                    vid = self.vid(tensor)
                    if vid is not None:
                        ruled.param_vids[local] = vid
                        self.lower(vid)
                output = self.run_ruled(ruled, lambda: MODULE_CALL(module, *args, **kwargs))
        finally:
            self.stack.pop()
        if ruled is not None:
            output = self.finish_ruled(ruled, output)
        if self.merge_batchnorm and isinstance(module, MERGEABLE_MODULES):
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
            output = MODULE_CALL(module, *args, **kwargs)
        finally:
            self.stack.pop()
        if observed is not None:
            self.add_observation(observed, output)
        return output

    def note_mergeable(self, ruled: RuledCall | None, layer: Any, output: Any, name: str, transparent: bool) -> None:
        """A linear layer (a module, or an operation as :class:`OperationLayer`) produced ``output``: a BatchNorm
        called next on it may be folded into it (:meth:`try_merge`)."""
        outputs = [self.vid(leaf) for leaf in tensor_leaves(output)]
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
            if vid is None or vid not in self.activations or not is_float(self.value(vid)):
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
        if ruled.transposed and not one_linear_operation(ruled):
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
            if call.traits.gradient_form is None:
                self.note_relevance_sink(vid)
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
            inside = cast(Tensor, ruled.lifted[index])  # lifted: the call is not quiet, on the shared tape
        else:
            inside = self.lower(vid)
        alias = inside.view_as(inside)
        new_vid = self.register(alias, activation=True)
        self.owner[new_vid] = ruled
        self.low[new_vid] = self.tape.lower(alias) if not ruled.quiet and not self.per_op else alias
        self.source[new_vid] = self.source.get(vid)
        if vid in self.nonnegative:
            self.nonnegative.add(new_vid)
        ruled.nodes.append(Node(Tensor.view_as, Tensor.view_as, [Ref(vid), Ref(vid)], FastSpec(2, ()), (vid,),
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
            return NOT_MERGED
        producer, layer, vid, layer_name, transparent = last
        if self.vid(args[0]) != vid:
            return NOT_MERGED
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
                    return MODULE_CALL(bn, *args, **kwargs)
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
            output = self.run_ruled(producer, lambda: MODULE_CALL(bn, *args, **kwargs))
            self.raw += 1
            try:
                merge_parameters(self, producer, layer, bn, vid, layer_nodes)
            finally:
                self.raw -= 1
            return self.finish_ruled(producer, output)
        finally:
            self.stack.pop()

    # observations -----------------------------------------------------------------------------------------------
    def add_observation(self, name: str, output: Any) -> None:
        vids, push = [], []
        for leaf in tensor_leaves(output):
            vid = self.vid(leaf)
            if vid is None or vid not in self.activations or not is_float(self.value(vid)):
                continue
            self.hold(vid)
            vids.append(vid)
            self.lower(vid)  # the sweep reads its value (relevance = value * gradient)
            self.note_relevance_sink(vid)
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
        if func in METADATA or self.raw:
            return func(*args, **(kwargs or {}))
        given_kwargs = kwargs or {}
        facts = FACTS.get(func)
        fn, mutates, returns_none, _ = facts if facts is not None else op_facts(func)
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
        if type(result) is Tensor or isinstance(result, Tensor):
            existing = self.vid_of.get(id(result))
            if existing is not None and self.value(existing) is result:
                return [Ref(existing)], []
            floating = activation and is_float(result)
            vid = self.register(result, activation=floating)
            return [Ref(vid)], ([vid] if floating else [])
        refs: list[Any] = []
        outputs: list[int] = []
        for leaf in optree.tree_leaves(result, none_is_leaf=True):
            if isinstance(leaf, Tensor):
                existing = self.vid_of.get(id(leaf))
                if existing is not None and self.value(existing) is leaf:
                    refs.append(Ref(existing))
                    continue
                floating = is_float(leaf)
                vid = self.register(leaf, activation=activation and floating)
                refs.append(Ref(vid))
                if activation and floating:
                    outputs.append(vid)
            else:
                refs.append(leaf)
        return refs, outputs

    def static_op(self, fn: Callable[..., Any], leaves: list[Any], spec: Any) -> Any:
        args, kwargs = unflatten_call(spec, leaves)
        result = run_operation(fn, args, kwargs, self.stack)
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

    def inside_call(self, call: RuledCall, func: Callable[..., Any], fn: Callable[..., Any], leaves: list[Any],
                    spec: Any, act: list[int], vids: list[int | None]) -> Any:
        """An operation inside a ruled call: the activations it reads from outside become the call's inputs."""
        op_class = self.class_of(func, fn, leaves, spec)
        op_index = self.op_index
        self.op_index += 1
        if self.record_sites:
            owner = self.stack[-1] if self.stack else ""
            name = op_name(func)
            site = CallSite("op", op_index, f"{owner}/{name}" if owner else name, None, func, None, 0,
                            self.next_order(), op_class)
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
            result = run_operation(fn, args, kwargs, self.stack)
            pullback = None
        refs, outputs = self._register_outputs(result, activation=True)
        self.note_nonnegative(func, op_class, leaves, spec, vids, outputs)
        tensors, low = self.tensors, self.low
        for vid in outputs:
            owner_of[vid] = call
            low[vid] = tensors[vid] if quiet or per_op else self.tape.lower(tensors[vid])
        if not call.traits.records:
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

    def outside_call(self, func: Callable[..., Any], fn: Callable[..., Any], leaves: list[Any], spec: Any,
                     act: list[int], vids: list[int | None]) -> Any:
        """An operation on activations outside ruled calls: a call site of its own."""
        owner_of, merged = self.owner, self.merged_interior
        for position in act:
            vid = vids[position]
            if vid in owner_of and vid not in self.cut:
                if vid in merged:
                    raise Retry("merge", merged[vid])
                call = owner_of[vid]
                raise NotImplementedError(
                    f"attribute: a value computed inside {call.site.describe()} (which has the rule {call.rule!r}) is "
                    f"read outside that call by {op_name(func)} in "
                    f"'{self.stack[-1] if self.stack else 'the model'}', but is not one of its outputs; a rule can "
                    f"only pass relevance to what the call returns. Give this call no rule (or one on its "
                    f"submodules), or return the value from it."
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
            name = OP_NAMES.get(func) or op_name_of(func)
            site = CallSite("op", op_index, f"{owner}/{name}" if owner else name, None, func, label, 0,
                            self.next_order(), op_class)
            if self.covered and not self.transparent_depth:
                self.note_covered(site, "a merged BatchNorm")
            elif self.transparent_depth:
                self.note_covered(site, "a call in gradient form")
            else:
                rule = self.offer(site)
        transparent = self.transparent_depth > 0
        traits = traits_of(rule)
        split = 0  # > 0: the operation's gradient is divided by this number (a "split" rule on the tape)
        if rule is not None and self.transparent and (traits.transparent or traits.splits):
            # its rule is its pullback (divided by its number of activation operands) in gradient form: on the tape
            transparent, rule, split = True, None, len(act) if traits.splits else 0
        if rule is not None:
            assert site is not None
            decompose = traits.decompose
            if decompose is not None:
                call_args, call_kwargs = unflatten_call(spec, leaves)
                with self:
                    return decompose(func, call_args, call_kwargs)
            info = self.classify(func, fn, leaves, spec)
            ruled = RuledCall(site, rule, traits, None, op_class=info.op_class)
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
            if self.merge_batchnorm and func in MERGEABLE_OPERATIONS and act == [0]:
                self.note_mergeable(ruled, OperationLayer(info.params), output, site.name, False)
            return output
        # an operation without a rule: on the tape
        if self.per_op:
            result, pullback = self._run_vjp(fn, leaves, spec, act)
            if split:
                pullback = _divided_pullback(pullback, split)
            _, outputs = self._register_outputs(result, activation=True)
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
                    self.lift_cut(vid)
                # a cut lifted now or for an earlier operand of this operation (``cat([h, h.tanh_()])`` reads the
                # in-place result twice): its leaf
                leaf_vid = self.leaf_of.get(vid)  # type: ignore[arg-type]
                if leaf_vid is not None:
                    leaves[position] = self.tensors[leaf_vid]
                    vids[position] = leaf_vid
            call_args, call_kwargs = unflatten_call(spec, leaves)
            result = run_operation(fn, call_args, call_kwargs, self.stack)
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
                    self.transparent_outputs.update(outputs)
                    if split:
                        for vid in outputs:  # what reaches the output passes the operation's pullback divided
                            self.tensors[vid].register_hook(_Divide(split))
                elif not _ops.moves_values(func, op_class):  # its pullback is not a mere move of the cotangent
                    self.mark_piece(piece, False)
                elif any(self.takes_relevance(vids[p]) for p in act):  # type: ignore[arg-type]
                    self.leaf_moved.update(outputs)
                self.hold_weakly(outputs)
        if outputs:
            self.note_nonnegative(func, op_class, leaves, spec, vids, outputs)
            if self.merge_batchnorm and func in MERGEABLE_OPERATIONS and act == [0]:
                operands = unflatten_call(spec, leaves)
                params = _ops.classify(func, *operands, self.is_activation).params
                self.note_mergeable(None, OperationLayer(params), result, site.name if site else op_name(func),
                                    transparent)
            source = op_class
            if source is _ops.DataMovement or source is None:
                source = self.source.get(vids[act[0]])  # type: ignore[arg-type]
            for vid in outputs:
                self.source[vid] = source
            if FACTS[func][3]:
                for vid in outputs:
                    self.view_base[vid] = vids[act[0]]  # type: ignore[assignment]
                    self.views_of.setdefault(vids[act[0]], []).append(vid)  # type: ignore[arg-type]
        return result

    def note_nonnegative(self, func: Callable[..., Any], op_class: type | None, leaves: list[Any], spec: Any,
                         vids: list[int | None], outputs: Sequence[int]) -> None:
        """Note the ``outputs`` of ``func`` as non-negative where the operation makes them so (a static fact)."""
        if outputs and static_facts.nonnegative(func, op_class, leaves, spec, vids, self.nonnegative):
            self.nonnegative.update(outputs)

    def _run_vjp(self, fn: Callable[..., Any], leaves: list[Any], spec: Any,
                 act: list[int]) -> tuple[Any, Callable[..., Any]]:
        """Run ``fn`` under :func:`torch.func.vjp` w.r.t. the activation leaves (the per-operation tape)."""
        shape: list[Any] = []
        stack = self.stack

        def run(*activations: Tensor) -> tuple[tuple[Tensor, ...], tuple[Any, ...]]:
            current = list(leaves)
            for position, activation in zip(act, activations):
                current[position] = activation
            call_args, call_kwargs = unflatten_call(spec, current)
            result = run_operation(fn, call_args, call_kwargs, stack)
            result_leaves, result_spec = optree.tree_flatten(result, none_is_leaf=True)
            floats = tuple(leaf for leaf in result_leaves if isinstance(leaf, Tensor) and is_float(leaf))
            others = tuple(leaf for leaf in result_leaves if isinstance(leaf, Tensor) and not is_float(leaf))
            shape[:] = [result_leaves, result_spec]
            return floats or (torch.zeros(()),), others

        floats, pullback, others = VjpTape.run(run, [leaves[p] for p in act])
        result_leaves, result_spec = shape
        has_floats = any(isinstance(leaf, Tensor) and is_float(leaf) for leaf in result_leaves)
        float_iter, other_iter = iter(floats), iter(others)
        rebuilt = []
        for leaf in result_leaves:
            if isinstance(leaf, Tensor):
                rebuilt.append(next(float_iter) if is_float(leaf) else next(other_iter))
            else:
                rebuilt.append(leaf)
        result = optree.tree_unflatten(result_spec, rebuilt)
        return result, (pullback if has_floats else _no_pullback(len(act)))

    def _mark_bases_stale(self, target: Tensor, op: str) -> None:
        """An in-place write into a view changes its base, which a record of values cannot follow."""
        vid = self.vid_of.get(id(target))
        where = self.stack[-1] if self.stack else ""
        views = list(self.views_of.get(vid, ())) if vid is not None else []
        while views:  # views taken before the write would see it in eager torch
            view = views.pop()
            self.stale[view] = stale_view_message(op, where or "the model")
            views.extend(self.views_of.get(view, ()))
        while vid is not None and vid in self.view_base:
            vid = self.view_base[vid]
            self.stale[vid] = stale_message(op, where or "the model")

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
                if vid in self.merged_interior:  # a layer's output returned beside its merged BatchNorm's
                    raise Retry("merge", self.merged_interior[vid])
                self.note_relevance_sink(vid)  # the seeds are relevance
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


def _identity_pullback(grads: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(grads)


def _no_pullback(count: int) -> Callable[..., Any]:
    def pullback(grads: Any) -> tuple[None, ...]:
        return (None,) * count

    return pullback


class _Divide:
    """A gradient hook: ``g / count`` (the pullback of a ``"split"`` rule's operation on the tape)."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self, grad: Tensor) -> Tensor:
        return grad / self.count


def _divided_pullback(pullback: Callable[..., Any], count: int) -> Callable[..., Any]:
    """``pullback`` of the output gradients divided by ``count`` (a ``"split"`` rule on the per-operation tape)."""

    def divided(grads: Any) -> Any:
        return pullback(tuple(grad / count for grad in grads))

    return divided


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
