"""Recording a call that has a rule: running it (quietly, at the caller's level, when its rule replays it), its inputs
(a value read from inside a piece splits the piece there) and its outputs (cuts of the tape)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import optree
import torch

from . import _merge
from . import ops as _ops
from ._functionalize import (
    is_float,
)
from ._record import (
    FastSpec,
    Node,
    Ref,
    Retry,
    RuledCall,
    Split,
    source_class,
)

if TYPE_CHECKING:
    from ._trace import Tracer

Tensor = torch.Tensor


def run_ruled(tracer: Tracer, ruled: RuledCall, run: Callable[[], Any]) -> Any:
    """Run the ruled call (``run``) with ``ruled`` as the current call, quietly if its rule replays it."""
    tracer.call = ruled
    try:
        if not ruled.quiet or not tracer.tape.has_quiet:
            return run()
        with tracer.tape.quiet():
            return run()
    finally:
        tracer.call = None


def finish_ruled(tracer: Tracer, ruled: RuledCall, output: Any) -> Any:
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
        vid = tracer.vid(leaf)
        if vid is None or vid not in tracer.activations or not is_float(tracer.value(vid)):
            continue
        if tracer.owner.get(vid) is not ruled:
            leaves[position] = passed_through(tracer, ruled, vid)
            changed = True
            vid = tracer.vid_of[id(leaves[position])]
        if vid not in ruled.outputs:
            ruled.outputs.append(vid)
    for vid in ruled.outputs:
        tracer.cut.add(vid)
        tracer.pending_cut.add(vid)
        if vid not in tracer.low:  # made inside a call that records nothing: held weakly until now
            value = tracer.hold(vid)
            tracer.low[vid] = value if ruled.quiet or tracer.per_op else tracer.tape.lower(value)
    if ruled.transposed and not _merge.one_linear_operation(ruled):
        raise Retry("transpose", (id(ruled.module), ruled.site.call_index))
    if ruled.nodes and ruled.op_class is None:
        ruled.op_class = ruled.nodes[-1].op_class
    for vid in ruled.outputs:
        producer = next((node for node in reversed(ruled.nodes) if vid in node.outputs), None)
        if producer is not None:
            tracer.source[vid] = source_class(producer, tracer.source)
    tracer.steps.append(ruled)
    if not changed:
        return output
    return leaves[0] if spec is None else optree.tree_unflatten(spec, leaves)


def passed_through(tracer: Tracer, ruled: RuledCall, vid: int) -> Tensor:
    """A new value of ``ruled`` equal to its input (or an earlier value) ``vid``."""
    tracer.raw += 1
    try:
        return _passed_through(tracer, ruled, vid)
    finally:
        tracer.raw -= 1


def _passed_through(tracer: Tracer, ruled: RuledCall, vid: int) -> Tensor:
    index = input_index(tracer, ruled, vid, per_position=False)
    if not ruled.quiet and not tracer.per_op:
        inside = cast(Tensor, ruled.lifted[index])  # lifted: the call is not quiet, on the shared tape
    else:
        inside = tracer.lower(vid)
    alias = inside.view_as(inside)
    new_vid = tracer.register(alias, activation=True)
    tracer.owner[new_vid] = ruled
    tracer.low[new_vid] = tracer.tape.lower(alias) if not ruled.quiet and not tracer.per_op else alias
    tracer.source[new_vid] = tracer.source.get(vid)
    if vid in tracer.nonnegative:
        tracer.nonnegative[new_vid] = tracer.nonnegative[vid]
    ruled.nodes.append(Node(Tensor.view_as, Tensor.view_as, [Ref(vid), Ref(vid)], FastSpec(2, ()), (vid,),
                            [Ref(new_vid)], (new_vid,), _ops.DataMovement))
    if not ruled.quiet and tracer.per_op:
        ruled.pullbacks.append(((vid,), (new_vid,), _identity_pullback))
    return alias


def input_index(tracer: Tracer, call: RuledCall, vid: int, *, per_position: bool) -> int:
    """The index of value ``vid`` among the inputs of ``call``, adding it if new (always for an operand of an
    operation call, so that ``x * x`` has two inputs; once per value for a module call)."""
    index = None if per_position else call.index_of.get(vid)
    if index is not None:
        return index
    index = len(call.inputs)
    call.inputs.append(vid)
    call.input_sources.append(tracer.source.get(vid))
    call.index_of.setdefault(vid, index)
    tracer.lower(vid)
    if vid not in tracer.cut and not tracer.per_op and vid not in tracer.origin:
        tracer.hold(vid)
        tracer.cut.add(vid)  # a value inside a piece: split the piece here
        tracer.pending_cut.add(vid)
        tracer.steps.append(Split(vid))
        if call.traits.gradient_form is None:
            tracer.note_relevance_sink(vid)
    lifted = None
    if not call.quiet and not tracer.per_op:
        tensor = tracer.value(vid)
        fresh = tensor.grad_fn is None and tensor.requires_grad and vid not in call.lifted_vids()
        lifted = tensor if fresh else tracer.tape.lift(tensor)
    call.lifted.append(lifted)
    return index


def _identity_pullback(grads: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(grads)
