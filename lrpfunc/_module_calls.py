"""Recording a module call: inside a ruled or merged call it is covered, on constants it is no site, a BatchNorm may
fold into the layer before it, and otherwise it is offered to the composite, whose rule makes it a ruled call (or,
for a rule that is the call's own pullback in gradient form, leaves everything inside on the tape)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import optree
import torch

from ._call import RuleError
from ._composite import SOURCE, CallSite
from ._functionalize import is_float
from ._interception import MODULE_CALL
from ._merge import MERGEABLE_MODULES, NOT_MERGED, TRANSPOSABLE, is_batchnorm, note_mergeable, try_merge
from ._record import Arguments, InputSlot, Observation, RuledCall, flatten_call, tensor_leaves
from ._ruled import finish_ruled, run_ruled
from ._traits import traits_of

if TYPE_CHECKING:
    from ._trace import Tracer

Tensor = torch.Tensor


def record_module_call(tracer: Tracer, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run and record one module call of the forward pass (see the module docstring); returns its output."""
    key = id(module)
    index = tracer.call_counts.get(key, 0)
    tracer.call_counts[key] = index + 1
    name = tracer.names.get(key)
    if name is None:
        tracer.info.check_module(module)
        name = f"<{type(module).__name__}>"
    module_index = tracer.module_index
    tracer.module_index += 1
    call = tracer.call
    if call is not None or tracer.covered or tracer.transparent_depth:
        if tracer.record_sites:
            site = CallSite("module", module_index, name, module, None, None, index, tracer.next_order(), None)
            by = (call.site.name if call is not None
                  else ("a merged BatchNorm" if tracer.covered else "a call in gradient form"))
            tracer.note_covered(site, by)
        tracer.stack.append(name)
        try:
            return MODULE_CALL(module, *args, **kwargs)
        finally:
            tracer.stack.pop()
    observed = tracer.observe(name, index) if tracer.observe is not None else None
    if tracer.sources and isinstance(module, tracer.sources):
        if tracer.record_sites:
            site = CallSite("module", module_index, name, module, None, None, index, tracer.next_order(), None)
            tracer.sites.append((site, None, SOURCE))
        return record_constant_call(tracer, module, name, args, kwargs, observed, source=True)
    if tracer.merge_batchnorm and is_batchnorm(module):
        merged = try_merge(tracer, module, module_index, index, name, args, kwargs)
        if merged is not NOT_MERGED:
            if observed is not None:
                add_observation(tracer, observed, merged)
            return merged
    if not reads_activation(tracer, args, kwargs):
        return record_constant_call(tracer, module, name, args, kwargs, observed)
    site = CallSite("module", module_index, name, module, None, None, index, tracer.next_order(), None)
    rule = tracer.offer(site)
    traits = traits_of(rule)
    transparent = rule is not None and tracer.transparent and traits.transparent
    arguments: tuple[list[Any], Any] | None = None
    argument_vids: list[int | None] = []
    tracer.stack.append(name)
    try:
        if transparent:  # its rule is its pullback in gradient form: everything inside goes on the tape
            tracer.transparent_depth += 1
            try:
                output = MODULE_CALL(module, *args, **kwargs)
            finally:
                tracer.transparent_depth -= 1
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
                and (key, index) not in tracer.skip_transpose
            )
            for local, tensor in tracer.info.module_params(module):
                vid = tracer.vid(tensor)
                if vid is not None:
                    ruled.param_vids[local] = vid
                    tracer.lower(vid)
            if traits.recomputes:  # the vids as the call sees them, before it runs
                arguments = flatten_call(args, kwargs)
                argument_vids = [tracer.vid(leaf) if isinstance(leaf, Tensor) else None for leaf in arguments[0]]
            output = run_ruled(tracer, ruled, lambda: MODULE_CALL(module, *args, **kwargs))
    finally:
        tracer.stack.pop()
    if ruled is not None:
        output = finish_ruled(tracer, ruled, output)
        if arguments is not None:
            ruled.arguments = kept_arguments(tracer, ruled, arguments, argument_vids, output)
    if tracer.merge_batchnorm and isinstance(module, MERGEABLE_MODULES):
        note_mergeable(tracer, ruled, module, output, name, transparent)
    if observed is not None:
        add_observation(tracer, observed, output)
    return output


def kept_arguments(tracer: Tracer, ruled: RuledCall, arguments: tuple[list[Any], Any],
                   argument_vids: list[int | None], output: Any) -> Arguments:
    """The arguments of a module call whose rule recomputes it: each input of the call as its slot, every other tensor
    at the caller's level; and where the call's outputs are among what the module returned.

    Raises:
        RuleError: An input of the call is not among its arguments (the module read it from elsewhere), or an output is
            not among what it returned.
    """
    leaves, spec = arguments
    kept: list[Any] = []
    slotted: set[int] = set()
    for leaf, vid in zip(leaves, argument_vids):
        if vid is not None and vid in ruled.index_of:
            kept.append(InputSlot(ruled.index_of[vid]))
            slotted.add(vid)
        elif isinstance(leaf, Tensor):
            kept.append(tracer.lower(vid) if vid is not None else tracer.tape.lower(tracer.resolve(leaf)))
        else:
            kept.append(leaf)
    missing = [index for index, vid in enumerate(ruled.inputs) if vid not in slotted]
    if missing:
        raise RuleError(
            f"rule {ruled.rule!r} recomputes {ruled.site.describe()} from its arguments, but the call read "
            f"activation input(s) {missing} from elsewhere (an attribute or a closure); pass them as arguments, or "
            f"give this call another rule"
        )
    returned = [tracer.vid(leaf) if isinstance(leaf, Tensor) else None
                for leaf in optree.tree_leaves(output, none_is_leaf=True)]
    positions = tuple(returned.index(vid) for vid in ruled.outputs)
    return Arguments(tuple(kept), spec, positions)


def reads_activation(tracer: Tracer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a tensor among a call's arguments is an activation (depends on the model's input)."""
    activations = tracer.activations
    for leaf in flatten_call(args, kwargs)[0]:
        if isinstance(leaf, Tensor):
            vid = tracer.vid(leaf)
            if vid is not None and vid in activations:
                return True
    return False


def record_constant_call(tracer: Tracer, module: torch.nn.Module, name: str, args: tuple[Any, ...],
                         kwargs: dict[str, Any], observed: str | None, *, source: bool = False) -> Any:
    """A module call on constants alone (a learned query, a position table, an encoder fed token ids while the
    relevance goes to the decoder's embeddings): no relevance passes through it, so it is no call site, like an
    operation on constants; its output is a constant. A submodule or operation inside it that does read an
    activation is a call site of its own. ``source``: the call's outputs are sources
    (:func:`lrpfunc.composites.with_sources`): each floating-point tensor it returns enters the pass as a fresh input,
    whose relevance the sweep keeps (:func:`enter_sources`)."""
    tracer.stack.append(name)
    try:
        output = MODULE_CALL(module, *args, **kwargs)
    finally:
        tracer.stack.pop()
    if source:
        output = enter_sources(tracer, name, output)
    if observed is not None:
        add_observation(tracer, observed, output)
    return output


def enter_sources(tracer: Tracer, name: str, output: Any) -> Any:
    """``output`` of the source call ``name`` with each floating-point tensor replaced by a fresh input of the pass
    (a cut and a piece of its own), noted in ``tracer.source_ids``."""
    vids: list[int | None] = []

    def enter(leaf: Any) -> Any:
        if not isinstance(leaf, Tensor):
            return leaf
        if not is_float(leaf):
            vids.append(None)
            return leaf
        known = tracer.vid(leaf)
        value = tracer.lower(known) if known is not None else tracer.tape.lower(tracer.resolve(leaf))
        vid = tracer.add_input(value)
        vids.append(vid)
        return tracer.tensors[vid]

    tracer.raw += 1  # the tracer's own operations (lifting to the tape)
    try:
        output = optree.tree_map(enter, output, none_is_leaf=True)
    finally:
        tracer.raw -= 1
    tracer.source_ids.append((name, vids))
    return output


def add_observation(tracer: Tracer, name: str, output: Any) -> None:
    """An observed module's output (:func:`lrpfunc.attribute_layers`): its activations become cuts, and an
    :class:`~lrpfunc._record.Observation` step where the sweep reads (and may change) the relevance arriving there."""
    vids, push = [], []
    for leaf in tensor_leaves(output):
        vid = tracer.vid(leaf)
        if vid is None or vid not in tracer.activations or not is_float(tracer.value(vid)):
            continue
        tracer.hold(vid)
        vids.append(vid)
        tracer.lower(vid)  # the sweep reads its value (relevance = value * gradient)
        tracer.note_relevance_sink(vid)
        first = vid not in tracer.observed
        tracer.observed.add(vid)
        # a value inside a piece becomes a cut here; the sweep pushes its relevance back into the piece
        push.append(first and vid not in tracer.cut)
        if vid not in tracer.cut:
            tracer.cut.add(vid)
            if not tracer.per_op:
                tracer.pending_cut.add(vid)
    tracer.steps.append(Observation(name, vids, push))
