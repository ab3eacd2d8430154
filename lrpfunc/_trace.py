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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch
from torch.overrides import TorchFunctionMode

from ._composite import CallSite
from ._facts import Sign
from ._functionalize import FACTS, METADATA, op_facts, op_name
from ._model import ModelInfo, model_tensors
from ._module_calls import record_module_call
from ._operations import mark_bases_stale, record_inside, record_outside, record_static, replaced
from ._pieces import Pieces
from ._record import Retry, RuledCall, Trace, flatten_call
from ._tape import Tape
from ._values import Values

Tensor = torch.Tensor


Resolver = Callable[[CallSite], Any]

class Tracer(TorchFunctionMode):
    """Records one forward pass of a model on a :class:`~lrpfunc._tape.Tape`; see the module docstring.

    The tracer holds the state of the recording: the values (:class:`~lrpfunc._values.Values`), the pieces of the tape
    (:class:`~lrpfunc._pieces.Pieces`), the cuts, the steps and the sites. Recording a module call
    (:mod:`lrpfunc._module_calls`), an operation (:mod:`lrpfunc._operations`), a ruled call (:mod:`lrpfunc._ruled`) and
    a BatchNorm fold (:mod:`lrpfunc._merge`) are functions of the tracer in those modules.
    """

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
        sources: tuple[type, ...] = (),
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
        # a rule whose gradient form is the call's own pullback (for an operation: or that pullback divided, "split")
        # leaves the call on the tape (see _sweep): ``transparent`` allows it; inside such a module call everything is
        # on the tape as well
        self.transparent = transparent
        self.transparent_depth = 0
        self.sources = sources  # module types whose outputs enter as inputs (with_sources)
        self.source_ids: list[tuple[str, list[int | None]]] = []
        self.info = info
        self.names = info.names
        # values (the table's dictionaries and methods, named here for the hot paths)
        values = self.values = Values(tape)
        self.vid_of, self.tensors, self.low = values.vid_of, values.tensors, values.low
        self.activations, self.substitute, self.keep_alive = values.activations, values.substitute, values.keep_alive
        self.register, self.value, self.hold = values.register, values.value, values.hold
        self.hold_weakly, self.resolve, self.vid = values.hold_weakly, values.resolve, values.vid
        self.lower, self.is_activation = values.lower, values.is_activation
        self.owner: dict[int, RuledCall] = {}
        self.source: dict[int, type | None] = {}
        self.param_names: dict[int, str] = {}
        self.static_origin: dict[int, str] = {}
        self.view_base: dict[int, int] = {}
        self.views_of: dict[int, list[int]] = {}
        self.stale: dict[int, str] = {}
        # cuts and pieces
        self.cut: set[int] = set()
        self.pending_cut: set[int] = set()
        self.leaf_of: dict[int, int] = {}
        self.origin: dict[int, int] = {}
        pieces = self.pieces = Pieces()
        self.piece_of, self.new_piece, self.find, self.union = pieces.of, pieces.new, pieces.find, pieces.union
        self.mark_piece = pieces.mark
        self.observed: set[int] = set()
        # values inside pieces whose elements may be those of a leaf that takes relevance (see note_relevance_sink)
        self.leaf_moved: set[int] = set()
        self.transparent_outputs: set[int] = set()  # outputs of transparent calls on the tape (they divide by them)
        #: Values known to have no negative part, from the operations that made them (:mod:`lrpfunc._facts`), with
        #: what is known (:attr:`Sign.NONNEGATIVE` or :attr:`Sign.FLAT_AT_ZERO`).
        self.nonnegative: dict[int, Sign] = {}
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
        self.param_names.update(values.add_model_tensors(model_tensors(info, params), detach=not tape.exact))

    def add_input(self, tensor: Tensor) -> int:
        """Register a float input leaf of the model: lifted to a leaf of the tape, a cut, a piece of its own."""
        leaf = self.tape.lift(tensor) if not self.per_op else tensor
        vid = self.register(leaf, activation=True)
        self.low[vid] = tensor if self.per_op else self.tape.lower(leaf)
        self.cut.add(vid)
        if not self.per_op:
            self.new_piece(vid, vid, leaf)
        return vid

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
            self.nonnegative[leaf_vid] = self.nonnegative[vid]
        self.new_piece(leaf_vid, vid, leaf)
        self.substitute[id(tensor)] = leaf
        self.keep_alive.append(tensor)
        return leaf_vid

    def module_call(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A module call of the forward pass (from :mod:`lrpfunc._interception`): :func:`record_module_call`."""
        return record_module_call(self, module, args, kwargs)

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
            fn = replaced(self, fn)
        # the tensor an in-place operation writes to, as the model sees it (the calls below replace leaves by
        # lowered or lifted tensors)
        target = leaves[0] if mutates and leaves else None
        call = self.call
        if call is not None:
            result = record_inside(self, call, func, fn, leaves, spec, act, vids)
        elif act:
            result = record_outside(self, func, fn, leaves, spec, act, vids)
        else:
            result = record_static(self, fn, leaves, spec)
        if isinstance(target, Tensor):
            if result is not target and isinstance(result, Tensor):
                mark_bases_stale(self, target, op_name(func))
                self.keep_alive.append(target)
                self.substitute[id(target)] = result
            return None if returns_none else result
        return result

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
            piece_parent=self.pieces.parent,
            piece_leaves=self.pieces.leaves,
            piece_of=self.piece_of,
            piece_computes=self.pieces.computes,
            piece_gradients=self.pieces.gradients,
            leaf_of=self.leaf_of,
            origin=self.origin,
            param_names=self.param_names,
            static_origin=self.static_origin,
            input_ids=input_ids,
            output=lowered,
            output_ids=output_ids,
            sites=self.sites,
            nonnegative=self.nonnegative,
            source_ids=self.source_ids,
        )
        self.values.weak = {}  # the values still held weakly are no cut: the sweep never reads them
        return trace
