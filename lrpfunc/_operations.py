"""Recording one torch operation of the forward pass (:meth:`lrpfunc._trace.Tracer.__torch_function__`).

An operation on activations outside ruled calls is a call site of its own (:func:`record_outside`): with a rule it
becomes a :class:`~lrpfunc._record.RuledCall`, without one it runs on the tape inside a piece (or, on the
per-operation tape, as an :class:`~lrpfunc._record.OpStep` with its own pullback); an operation inside a ruled call
is recorded as one of its nodes (:func:`record_inside`); an operation on constants only is no site
(:func:`record_static`). A ``"split"`` rule in gradient form leaves its operation on the tape with the output's
gradient divided by its number of activation operands.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optree
import torch

from . import _facts as static_facts
from . import ops as _ops
from . import types as _types
from ._composite import CallSite
from ._functionalize import (
    FACTS,
    OP_NAMES,
    is_float,
    op_name,
    op_name_of,
    stale_message,
    stale_view_message,
)
from ._interception import run_operation
from ._merge import MERGEABLE_OPERATIONS, OperationLayer, note_mergeable
from ._record import (
    Node,
    OpStep,
    Ref,
    Retry,
    RuledCall,
    source_class,
    unflatten_call,
)
from ._ruled import finish_ruled, input_index, run_ruled
from ._tape import VjpTape
from ._traits import traits_of

if TYPE_CHECKING:
    from ._trace import Tracer

Tensor = torch.Tensor


def replaced(tracer: Tracer, func: Callable[..., Any]) -> Callable[..., Any]:
    """What runs for ``func``: the canonizers' replacement (``replace_op``), if any, cached per tracer."""
    found = tracer.replacement_cache.get(func)
    if found is None:
        found = func
        for replacer in tracer.replacers:
            replacement = replacer.replace_op(found)
            if replacement is not None:
                found = replacement
        tracer.replacement_cache[func] = found
    return found


def record_inside(tracer: Tracer, call: RuledCall, func: Callable[..., Any], fn: Callable[..., Any], leaves: list[Any],
                  spec: Any, act: list[int], vids: list[int | None]) -> Any:
    """An operation inside a ruled call: the activations it reads from outside become the call's inputs."""
    op_class = class_of(tracer, func, fn, leaves, spec)
    op_index = tracer.op_index
    tracer.op_index += 1
    if tracer.record_sites:
        owner = tracer.stack[-1] if tracer.stack else ""
        name = op_name(func)
        site = CallSite("op", op_index, f"{owner}/{name}" if owner else name, None, func, None, 0,
                        tracer.next_order(), op_class)
        tracer.note_covered(site, call.site.name)
    template = list(leaves)
    owner_of = tracer.owner
    quiet = call.quiet
    per_op = tracer.per_op
    inputs: list[int] = []
    for position, leaf in enumerate(leaves):
        vid = vids[position]
        if vid is None:
            if isinstance(leaf, Tensor):
                lowered = tracer.tape.lower(leaf)
                template[position] = lowered
                if quiet:
                    leaves[position] = lowered
            continue
        template[position] = Ref(vid)
        if position not in act:  # a constant the record knows (an index computed from activations): replays read it
            known = tracer.lower(vid) if call.traits.records else None
            if quiet:
                leaves[position] = known if known is not None else tracer.tape.lower(tracer.value(vid))
            continue
        inputs.append(vid)
        if owner_of.get(vid) is call:
            if quiet:  # a call that records nothing keeps nothing of its own values (no cached lowered tensor)
                leaves[position] = (tracer.lower(vid) if call.traits.records
                                    else tracer.tape.lower(tracer.value(vid)))
            continue
        if vid in tracer.merged_interior:
            raise Retry("merge", tracer.merged_interior[vid])
        index = input_index(tracer, call, vid, per_position=call.module is None)
        if quiet:
            leaves[position] = tracer.lower(vid)
        elif not per_op:
            leaves[position] = call.lifted[index]
    if per_op and not quiet and act:
        result, pullback = run_vjp(tracer, fn, leaves, spec, act)
    else:
        args, kwargs = unflatten_call(spec, leaves)
        result = run_operation(fn, args, kwargs, tracer.stack)
        pullback = None
    refs, outputs = register_outputs(tracer, result, activation=True)
    note_nonnegative(tracer, func, op_class, leaves, spec, vids, outputs)
    if not call.traits.records:  # nothing replays the call's operations: what the model drops may go
        source = tracer.source.get(inputs[0]) if issubclass(op_class, _ops.KEEPS_SOURCE) and inputs else op_class
        for vid in outputs:
            owner_of[vid] = call
            tracer.source[vid] = source
        tracer.hold_weakly(outputs)  # (the call's outputs become cuts, held again, in finish_ruled)
        return result
    tensors, low = tracer.tensors, tracer.low
    for vid in outputs:
        owner_of[vid] = call
        low[vid] = tensors[vid] if quiet or per_op else tracer.tape.lower(tensors[vid])
    node = Node(fn, func, template, spec, tuple(inputs), refs, tuple(outputs), op_class)
    if call.transposed and not call.nodes:
        node.transpose = _ops.transpose_of(func, *unflatten_call(spec, leaves))
    call.nodes.append(node)
    if pullback is not None:
        call.pullbacks.append((tuple(inputs), tuple(outputs), pullback))
    source = source_class(node, tracer.source)
    for vid in outputs:
        tracer.source[vid] = source
    return result


def record_outside(tracer: Tracer, func: Callable[..., Any], fn: Callable[..., Any], leaves: list[Any], spec: Any,
                   act: list[int], vids: list[int | None]) -> Any:
    """An operation on activations outside ruled calls: a call site of its own."""
    owner_of, merged = tracer.owner, tracer.merged_interior
    for position in act:
        vid = vids[position]
        if vid in owner_of and vid not in tracer.cut:
            if vid in merged:
                raise Retry("merge", merged[vid])
            call = owner_of[vid]
            raise NotImplementedError(
                f"attribute: a value computed inside {call.site.describe()} (which has the rule {call.rule!r}) is "
                f"read outside that call by {op_name(func)} in "
                f"'{tracer.stack[-1] if tracer.stack else 'the model'}', but is not one of its outputs; a rule can "
                f"only pass relevance to what the call returns. Give this call no rule (or one on its "
                f"submodules), or return the value from it."
            )
    op_class = None
    rule = None
    site = None
    op_index = tracer.op_index
    tracer.op_index += 1
    if tracer.resolver is not None or tracer.record_sites:
        op_class = class_of(tracer, func, fn, leaves, spec)
        label = None
        if tracer.label_sums:
            call_args, call_kwargs = unflatten_call(spec, leaves)
            label = _types.Sum if _is_residual_sum(func, call_args, call_kwargs, act, leaves) else None
        owner = tracer.stack[-1] if tracer.stack else ""
        name = OP_NAMES.get(func) or op_name_of(func)
        site = CallSite("op", op_index, f"{owner}/{name}" if owner else name, None, func, label, 0,
                        tracer.next_order(), op_class)
        if tracer.covered and not tracer.transparent_depth:
            tracer.note_covered(site, "a merged BatchNorm")
        elif tracer.transparent_depth:
            tracer.note_covered(site, "a call in gradient form")
        else:
            rule = tracer.offer(site)
    transparent = tracer.transparent_depth > 0
    traits = traits_of(rule)
    split = 0  # > 0: the operation's gradient is divided by this number (a "split" rule on the tape)
    if rule is not None and tracer.transparent and (traits.transparent or traits.splits):
        # its rule is its pullback (divided by its number of activation operands) in gradient form: on the tape
        transparent, rule, split = True, None, len(act) if traits.splits else 0
    if rule is not None:
        assert site is not None
        decompose = traits.decompose
        if decompose is not None:
            call_args, call_kwargs = unflatten_call(spec, leaves)
            with tracer:
                return decompose(func, call_args, call_kwargs)
        info = classify(tracer, func, fn, leaves, spec)
        ruled = RuledCall(site, rule, traits, None, op_class=info.op_class)
        if act == [0]:
            ruled.transposed = _ops.transpose_of(func, *unflatten_call(spec, leaves)) is not None
        elif act == [0, 1]:
            ruled.closed_pullback = _ops.sum_pullback_of(func)
        for local, tensor in info.params.items():
            vid = tracer.vid_of.get(id(tensor))
            if vid is not None:
                ruled.param_vids[local] = vid
                tracer.lower(vid)
        tracer.op_index = op_index  # inside_call counts the operation
        record_sites, tracer.record_sites = tracer.record_sites, False
        try:
            result = run_ruled(tracer, ruled, lambda: record_inside(tracer, ruled, func, fn, leaves, spec, act, vids))
        finally:
            tracer.record_sites = record_sites
        output = finish_ruled(tracer, ruled, result)
        if tracer.merge_batchnorm and func in MERGEABLE_OPERATIONS and act == [0]:
            note_mergeable(tracer, ruled, OperationLayer(info.params), output, site.name, False)
        return output
    # an operation without a rule: on the tape
    if tracer.per_op:
        result, pullback = run_vjp(tracer, fn, leaves, spec, act)
        if split:
            pullback = _divided_pullback(pullback, split)
        _, outputs = register_outputs(tracer, result, activation=True)
        for vid in outputs:
            tracer.cut.add(vid)
        if outputs:
            tracer.steps.append(OpStep(tuple(vids[p] for p in act), tuple(outputs), pullback, site,  # type: ignore[misc]
                                     "gradient" if transparent else ("moves" if _ops.moves_values(func, op_class)
                                                                     else "computes")))
    else:
        for position in act:
            vid = vids[position]
            if vid in tracer.pending_cut:
                tracer.lift_cut(vid)
            # a cut lifted now or for an earlier operand of this operation (``cat([h, h.tanh_()])`` reads the
            # in-place result twice): its leaf
            leaf_vid = tracer.leaf_of.get(vid)  # type: ignore[arg-type]
            if leaf_vid is not None:
                leaves[position] = tracer.tensors[leaf_vid]
                vids[position] = leaf_vid
        call_args, call_kwargs = unflatten_call(spec, leaves)
        result = run_operation(fn, call_args, call_kwargs, tracer.stack)
        if type(result) is Tensor and id(result) not in tracer.vid_of:  # the common case, without a tree walk
            floating = result.is_floating_point() or result.is_complex()
            vid = tracer.register(result, activation=floating)
            outputs = [vid] if floating else []
        else:
            outputs = register_outputs(tracer, result, activation=True)[1]
        if outputs:
            piece_of = tracer.piece_of
            if len(act) == 1:
                piece = piece_of[vids[act[0]]]  # type: ignore[index]
            else:
                piece = tracer.union([piece_of[vids[p]] for p in act])  # type: ignore[index]
            for vid in outputs:
                piece_of[vid] = piece
            if transparent:
                tracer.mark_piece(piece, True)
                tracer.transparent_outputs.update(outputs)
                if split:
                    for vid in outputs:  # what reaches the output passes the operation's pullback divided
                        tracer.tensors[vid].register_hook(_Divide(split))
            elif not _ops.moves_values(func, op_class):  # its pullback is not a mere move of the cotangent
                tracer.mark_piece(piece, False)
            elif any(tracer.takes_relevance(vids[p]) for p in act):  # type: ignore[arg-type]
                tracer.leaf_moved.update(outputs)
            tracer.hold_weakly(outputs)
    if outputs:
        note_nonnegative(tracer, func, op_class, leaves, spec, vids, outputs)
        if tracer.merge_batchnorm and func in MERGEABLE_OPERATIONS and act == [0]:
            operands = unflatten_call(spec, leaves)
            params = _ops.classify(func, *operands, tracer.is_activation).params
            note_mergeable(tracer, None, OperationLayer(params), result, site.name if site else op_name(func),
                           transparent)
        source = op_class
        if source is None or issubclass(source, _ops.KEEPS_SOURCE):
            source = tracer.source.get(vids[act[0]])  # type: ignore[arg-type]
        for vid in outputs:
            tracer.source[vid] = source
        if FACTS[func][3]:
            for vid in outputs:
                tracer.view_base[vid] = vids[act[0]]  # type: ignore[assignment]
                tracer.views_of.setdefault(vids[act[0]], []).append(vid)  # type: ignore[arg-type]
    return result


def record_static(tracer: Tracer, fn: Callable[..., Any], leaves: list[Any], spec: Any) -> Any:
    """An operation on constants only: no site; its results are constants, each remembered with the module that made
    it (the parameter relevance of a constant operand is reported under that module's name)."""
    args, kwargs = unflatten_call(spec, leaves)
    result = run_operation(fn, args, kwargs, tracer.stack)
    if tracer.stack and tracer.stack[-1]:  # a constant made inside a submodule (a position embedding): remember it
        origin = tracer.stack[-1]
        for ref in register_outputs(tracer, result, activation=False)[0]:
            if type(ref) is Ref:  # the module that made it, not one that passed it on (``.to(device)``)
                tracer.static_origin.setdefault(ref.vid, origin)
    else:
        register_outputs(tracer, result, activation=False)
    return result


def register_outputs(tracer: Tracer, result: Any, activation: bool) -> tuple[list[Any], list[int]]:
    """Register the new tensors of ``result``; returns the output leaves with :class:`Ref` placeholders and the
    value ids of the new floating-point activations."""
    if type(result) is Tensor or isinstance(result, Tensor):
        existing = tracer.vid_of.get(id(result))
        if existing is not None and tracer.value(existing) is result:
            return [Ref(existing)], []
        floating = activation and is_float(result)
        vid = tracer.register(result, activation=floating)
        return [Ref(vid)], ([vid] if floating else [])
    refs: list[Any] = []
    outputs: list[int] = []
    for leaf in optree.tree_leaves(result, none_is_leaf=True):
        if isinstance(leaf, Tensor):
            existing = tracer.vid_of.get(id(leaf))
            if existing is not None and tracer.value(existing) is leaf:
                refs.append(Ref(existing))
                continue
            floating = is_float(leaf)
            vid = tracer.register(leaf, activation=activation and floating)
            refs.append(Ref(vid))
            if activation and floating:
                outputs.append(vid)
        else:
            refs.append(leaf)
    return refs, outputs


def classify(tracer: Tracer, func: Callable[..., Any], fn: Callable[..., Any], leaves: list[Any],
             spec: Any) -> _ops.OpInfo:
    """The operation class and parameter operands of ``fn`` (if the table knows the replacement) or of ``func``."""
    args, kwargs = unflatten_call(spec, leaves)
    return _ops.classify(fn if fn is not func and _ops.registered(fn) else func, args, kwargs, tracer.is_activation)


def class_of(tracer: Tracer, func: Callable[..., Any], fn: Callable[..., Any], leaves: list[Any], spec: Any) -> type:
    """Only the operation class (cheaper than :meth:`classify`)."""
    target = fn if fn is not func and _ops.registered(fn) else func
    found = _ops._CONSTANT.get(target)
    if found is not None:
        return found
    args, kwargs = unflatten_call(spec, leaves)
    return _ops.class_of(target, args, kwargs, tracer.is_activation)


def note_nonnegative(tracer: Tracer, func: Callable[..., Any], op_class: type | None, leaves: list[Any], spec: Any,
                     vids: list[int | None], outputs: Sequence[int]) -> None:
    """Note the ``outputs`` of ``func`` as non-negative where the operation makes them so (a static fact)."""
    if not outputs:
        return
    sign = static_facts.sign_of(func, op_class, leaves, spec, vids, tracer.nonnegative)
    if sign:
        tracer.nonnegative.update(dict.fromkeys(outputs, sign))


def run_vjp(tracer: Tracer, fn: Callable[..., Any], leaves: list[Any], spec: Any,
            act: list[int]) -> tuple[Any, Callable[..., Any]]:
    """Run ``fn`` under :func:`torch.func.vjp` w.r.t. the activation leaves (the per-operation tape)."""
    shape: list[Any] = []
    stack = tracer.stack

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


def mark_bases_stale(tracer: Tracer, target: Tensor, op: str) -> None:
    """An in-place write into a view changes its base, which a record of values cannot follow."""
    vid = tracer.vid_of.get(id(target))
    where = tracer.stack[-1] if tracer.stack else ""
    views = list(tracer.views_of.get(vid, ())) if vid is not None else []
    while views:  # views taken before the write would see it in eager torch
        view = views.pop()
        tracer.stale[view] = stale_view_message(op, where or "the model")
        views.extend(tracer.views_of.get(view, ()))
    while vid is not None and vid in tracer.view_base:
        vid = tracer.view_base[vid]
        tracer.stale[vid] = stale_message(op, where or "the model")


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


def _is_residual_sum(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], act: list[int],
                     leaves: list[Any]) -> bool:
    """Two activations of the same shape added with ``alpha == 1`` (what the resnet canonizer labels)."""
    if op_name(func) != "add" or len(act) != 2:
        return False
    first, second = (leaves[p] for p in act)
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    return first.shape == second.shape and alpha == 1
