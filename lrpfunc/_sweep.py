"""The modified backward pass: a reverse sweep over a :class:`~lrpfunc._trace.Trace`.

Cotangents are kept by value id. A cut value (an input, a ruled call's output, an observed value) keeps its own
cotangent; any other activation lies inside a *piece* of the tape, and a cotangent arriving there waits as a
pending sink of the piece. Before a ruled call is processed, the pieces that read its outputs are flushed: one
:func:`torch.autograd.grad` from their pending sinks to their leaves (the lifted cut values). This is complete,
because every step that reads those outputs comes later in execution order and has already been processed.

Everything here runs at the caller's level: outer ``torch.func`` transforms differentiate, batch and take
Jacobians of the sweep like of any other function.

The sweep frees as it goes (:func:`liveness`): a recorded value that no step reads is dropped before it starts (inside
a piece the autograd graph keeps what its pullback needs, as for a gradient), a value that steps read is dropped
after the last of them in the sweep's order (the first in execution order), and a piece's sinks, leaves and graph
after its last pullback. A trace is swept once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch

from . import _normalization, _stabilize
from . import ops as _ops
from ._call import Call, Propagated, RuleError
from ._facts import Sign
from ._record import Node, Observation, OpStep, Ref, RuledCall, Split, Trace, unflatten_call
from ._traits import Rule

Tensor = torch.Tensor

__all__ = ["Rule", "sweep", "Observer", "rule_name", "liveness", "Liveness"]


class Observer(Protocol):
    """Sees (and may replace) the relevance arriving at an observed module's outputs."""

    def __call__(self, name: str, position: int, relevance: Tensor, /) -> Tensor: ...


def rule_name(rule: Any) -> str:
    return getattr(rule, "name", None) or getattr(rule, "__name__", None) or type(rule).__name__


def _accumulate(store: dict[Any, Tensor], key: Any, value: Tensor) -> None:
    previous = store.get(key)
    store[key] = value if previous is None else previous + value


_NEVER = 1 << 62  # a step index after every step: "no such step"


@dataclass(eq=False, slots=True)
class Liveness:
    """When the sweep may drop each recorded value of a :class:`~lrpfunc._trace.Trace`.

    Attributes:
        first_reader: Value id to the index of the first step in execution order that reads it: the last one the
            (reverse) sweep processes.
        expire: Step index to the values (outside pieces) to drop once the sweep has processed that step.
        piece_values: Root of a piece to its values that outlive the start of the sweep (its sinks: values that steps
            read or seeds start at); dropped after the piece's last pullback, or after their first reader if later.
        first_push: Root of a piece to the index of the first step in execution order that pushes a cotangent into it
            (a :class:`~lrpfunc._trace.Split` or an :class:`~lrpfunc._trace.Observation`): a pullback of the piece
            while processing a step before which no push remains is its last.
    """

    first_reader: dict[int, int]
    expire: dict[int, list[int]]
    piece_values: dict[int, list[int]]
    first_push: dict[int, int]


def _reads(step: Any, low: Mapping[int, Tensor]) -> Iterator[int]:
    """The value ids whose recorded values (``Trace.low``, ``Trace.tensors``) the sweep may read at ``step``."""
    kind = type(step)
    if kind is RuledCall:
        yield from step.inputs
        yield from step.outputs
        yield from step.param_vids.values()
        yield from _replay_reads(step, low)
    elif kind is Observation:
        yield from step.vids
    elif kind is Split:
        yield step.vid
    else:
        yield from step.inputs
        yield from step.outputs


def _replay_reads(step: RuledCall, low: Mapping[int, Tensor]) -> Iterator[int]:
    """The recorded values that a replay of ``step``'s operations reads (:func:`_forward_of`, the transposes): the
    operands that no operation of the call made (constants), and with the statistics held the input of a held
    normalisation and the values with fewer elements than the call's largest input (:func:`_replay_holding_statistics`).
    A value that an operation of the call made is otherwise replayed, never read."""
    made: set[int] = set()
    for node in step.nodes:
        for leaf in node.leaves:
            if type(leaf) is Ref and leaf.vid not in made:
                yield leaf.vid
        for leaf in node.output_leaves:
            if type(leaf) is Ref:
                made.add(leaf.vid)
    if not made:
        return
    reference = max((low[vid].numel() for vid in step.inputs if vid in low), default=0)
    for node in step.nodes:
        if node.op_class is _ops.Normalization and node.func in _normalization.HELD and node.inputs:
            yield node.inputs[0]
        for vid in node.outputs:
            value = low.get(vid)
            if value is None or value.numel() < reference:
                yield vid


def liveness(trace: Trace, seeds: Sequence[int]) -> Liveness:
    """Plan when the sweep from ``seeds`` (value ids) frees each value of ``trace``, and drop right away the values
    that it never reads.

    Kept for the whole sweep: the inputs (their relevance is read at the end) and the parameters (the caller's). A
    value outside pieces (a ruled call's output or inner value, a constant, a value on the per-operation tape) lives
    until its first reader in execution order; one that no step reads goes now. A value inside a piece is read only
    as a sink of the piece's pullback (a seed, a value that a ruled call or an observation reads): the others go now
    (the graph saves what the pullback needs), the sinks after the piece's last pullback.
    """
    steps, tensors, low = trace.steps, trace.tensors, trace.low
    first_reader: dict[int, int] = {}
    first_push: dict[int, int] = {}
    piece_of = trace.piece_of
    for index in range(len(steps) - 1, -1, -1):
        step = steps[index]
        for vid in _reads(step, low):
            first_reader[vid] = index
        kind = type(step)
        if kind is Split:
            first_push[trace.find(piece_of[step.vid])] = index
        elif kind is Observation:
            for vid, push in zip(step.vids, step.push):
                if push:
                    first_push[trace.find(piece_of[vid])] = index
    keep = {vid for vid in trace.input_ids if vid is not None}
    keep.update(vid for _, vids in trace.source_ids for vid in vids if vid is not None)
    keep.update(trace.param_names)
    seeded = set(seeds)
    expire: dict[int, list[int]] = {}
    piece_values: dict[int, list[int]] = {}
    per_op = trace.tape.per_op
    for vid in list(tensors.keys() | low.keys()):
        if vid in keep:
            continue
        reader = first_reader.get(vid)
        if not per_op and vid in piece_of:
            if reader is not None or vid in seeded:
                piece_values.setdefault(trace.find(piece_of[vid]), []).append(vid)
                continue
        elif reader is not None:
            expire.setdefault(reader, []).append(vid)
            continue
        elif vid in seeded:
            continue
        tensors.pop(vid, None)
        low.pop(vid, None)
    return Liveness(first_reader, expire, piece_values, first_push)


def sweep(
    trace: Trace,
    seeds: Sequence[tuple[int, Tensor]],
    *,
    param_relevance: dict[str, Tensor] | None = None,
    observer: Observer | None = None,
    recorder: Callable[[Any, Any, Sequence[Tensor | None], Sequence[Tensor | None]], None] | None = None,
    gradient_form: bool = False,
) -> dict[int, Tensor]:
    """Propagate ``seeds`` (value id, relevance) backwards through the trace; returns the relevance of the cut
    values that no step consumed (the inputs).

    Two forms of cotangent travel: relevance ``R``, and a gradient ``g`` with ``R = value * g``. A rule that is
    ``R_in = x * J^T (R / z)`` without stabilizer (its ``gradient_form``: ``"pullback"`` for epsilon and norm with
    epsilon 0 and for softmax, whose ``J`` is the call's own Jacobian; ``"split"`` for uniform with stabilizer 0, the
    pullback divided by the number of operands; ``"modified"`` for normalization with its statistics held and for gated
    with stabilizer 0) turns whatever arrives into a gradient (``R / z``, zero where ``z = 0``: the rule's own
    division) and passes ``J^T g`` on, leaving out the product with ``x`` and the next rule's division by the same
    value. A call whose rule is ``"pullback"`` (an operation whose rule is ``"split"``, its output's gradient divided)
    may even stay on the tape (the tracer's ``transparent``): pieces of the tape with such calls propagate gradients.
    Every other rule, a piece with an operation other than data movement or selection and without a rule, an observer
    and the inputs get relevance: a gradient is multiplied by its value first (infinite values count as zero, as the
    softmax rule's masked scores); data movement passes either form. Where every rule of a chain has a gradient form,
    the sweep costs about what a gradient costs, and the result is that of the rules in relevance form wherever no
    output divided by is zero.

    Args:
        trace: The recorded forward pass.
        seeds: Relevance of output values.
        param_relevance: If given, filled with the relevance of each parameter (by qualified name); needs
            ``gradient_form=False``.
        observer: Called at each observation with the relevance arriving there (zeros if none); its result propagates
            on (relevance may also start there: an observer that adds a seed).
        recorder: Called at every step with its site, its rule, the relevance of its outputs and the relevance it
            passes to its inputs (:func:`lrpfunc.conservation`); needs ``gradient_form=False``.
        gradient_form: Rules with a gradient form propagate gradients (the caller decides, once, and traces with
            ``transparent`` alike); ``False``: every rule propagates relevance.
    """
    tape = trace.tape
    cut, origin, leaf_of = trace.cut, trace.origin, trace.leaf_of
    piece_of, piece_leaves = trace.piece_of, trace.piece_leaves
    computes, gradients = trace.piece_computes, trace.piece_gradients
    tensors, low = trace.tensors, trace.low
    cot: dict[int, Tensor] = {}  # relevance
    gcot: dict[int, Tensor] = {}  # gradients: relevance = value * gradient
    pending: dict[int, dict[int, Tensor]] = {}
    gpending: dict[int, dict[int, Tensor]] = {}
    wants_params = param_relevance is not None
    forms = gradient_form
    if forms and (wants_params or recorder is not None):
        raise ValueError(
            "sweep: parameter relevance and a recorder need every rule in relevance form (gradient_form=False)"
        )

    per_op = tape.per_op
    plan = liveness(trace, [vid for vid, _ in seeds])
    first_reader, expire, piece_values, first_push = plan.first_reader, plan.expire, plan.piece_values, plan.first_push
    at = len(trace.steps)  # the index (in execution order) of the step being processed

    def drop(vids: Sequence[int]) -> None:
        for vid in vids:
            tensors.pop(vid, None)
            low.pop(vid, None)

    def free_piece(root: int) -> None:
        """Drop the sinks and leaves of a piece pulled back for the last time (a sink that the step being processed
        or one still to come reads waits for it)."""
        piece_leaves.pop(root, None)
        for vid in piece_values.pop(root, ()):
            reader = first_reader.get(vid, _NEVER)
            if reader <= at:  # the step being processed may read it after this pullback
                expire.setdefault(reader, []).append(vid)
            else:
                tensors.pop(vid, None)
                low.pop(vid, None)

    def value_of(vid: int) -> Tensor:
        found = low.get(vid)
        if found is None:  # on the per-operation tape values live at the caller's level already
            found = tensors[vid] if per_op else low[vid]  # (the tracer lowered the others)
        return found

    def relevance_of(vid: int, gradient: Tensor) -> Tensor:
        return _finite(value_of(vid)) * gradient

    def gradient_of(vid: int, relevance: Tensor) -> Tensor:
        return _stabilize.ratio(relevance, value_of(vid))

    def add(vid: int, value: Tensor, gradient: bool = False) -> None:
        vid = origin.get(vid, vid)
        if vid in cut:
            _accumulate(gcot if gradient else cot, vid, value)
        else:
            root = trace.find(piece_of[vid])
            _accumulate((gpending if gradient else pending).setdefault(root, {}), vid, value)

    def flush(root: int) -> None:
        sinks, gsinks = pending.pop(root, None), gpending.pop(root, None)
        last = first_push.get(root, _NEVER) > at  # no cotangent will arrive in this piece any more
        if not sinks and not gsinks:
            if last:
                free_piece(root)
            return
        if root in gradients:  # transparent calls: gradients (relevance arriving is divided by its value)
            merged = dict(gsinks or {})
            for vid, value in (sinks or {}).items():
                _accumulate(merged, vid, gradient_of(vid, value))
            sinks, gradient = merged, True
        elif gsinks and not sinks and root not in computes:
            sinks, gradient = gsinks, True  # data movement and selection move gradients like relevance
        else:
            gradient = False
            sinks = dict(sinks or {})
            for vid, value in (gsinks or {}).items():
                _accumulate(sinks, vid, relevance_of(vid, value))
        leaves = piece_leaves[root]
        grads = tape.pullback([tensors[vid] for vid in sinks], [leaf for _, leaf in leaves], list(sinks.values()),
                              release=last)
        if last:
            free_piece(root)
        target = gcot if gradient else cot
        for (source, _), grad in zip(leaves, grads):
            if grad is not None:
                _accumulate(target, source, grad)

    def complete(vid: int) -> None:
        leaf = leaf_of.get(vid)
        if leaf is not None:
            flush(trace.find(piece_of[leaf]))

    def as_relevance(vid: int) -> Tensor | None:
        """The relevance of ``vid``, with its gradient form folded in."""
        relevance, gradient = cot.pop(vid, None), gcot.pop(vid, None)
        if gradient is not None:
            converted = relevance_of(vid, gradient)
            relevance = converted if relevance is None else relevance + converted
        return relevance

    for vid, value in seeds:
        add(vid, value)
    steps = trace.steps
    for at in range(len(steps) - 1, -1, -1):
        done = expire.pop(at + 1, None)  # the step processed before (the loop's body continues early)
        if done is not None:
            drop(done)
        step = steps[at]
        if type(step) is RuledCall:
            outputs = step.outputs
            for vid in outputs:
                complete(vid)
            rule = step.rule
            if forms and step.traits.gradient_form is not None:
                # the rule in gradient form: relevance that arrived is divided by its value (the rule's own division)
                grads = []
                for vid in outputs:
                    grad, relevance = gcot.pop(vid, None), cot.pop(vid, None)
                    if relevance is not None:
                        quotient = gradient_of(vid, relevance)
                        grad = quotient if grad is None else grad + quotient
                    grads.append(grad)
                if all(grad is None for grad in grads):
                    step.release()
                    continue
                call = make_call(trace, step, False)
                results = _gradient_rule(step, call, tuple(
                    torch.zeros_like(low[vid]) if grad is None else grad for vid, grad in zip(outputs, grads)
                ))
                del call
                step.release()
                for vid, grad in zip(step.inputs, results):
                    if grad is not None:
                        add(vid, grad, gradient=True)
                continue
            if step.traits.passes_through and len(outputs) == 1 and len(step.inputs) == 1 and not wants_params:
                (vid,) = outputs
                grad = as_relevance(vid)
                if grad is not None and grad.shape == low[step.inputs[0]].shape:
                    if recorder is not None:
                        recorder(step.site, rule, (grad,), (grad,))
                    add(step.inputs[0], grad)
                    step.release()
                    continue
                if grad is None:
                    step.release()
                    continue
                cot[vid] = grad  # a shape the rule refuses: let it say so
            grads = [as_relevance(vid) for vid in outputs]
            if all(grad is None for grad in grads):
                step.release()
                continue
            grad_outputs = tuple(
                torch.zeros_like(low[vid]) if grad is None else grad for vid, grad in zip(outputs, grads)
            )
            call = make_call(trace, step, wants_params)
            results = _apply_rule(trace, step, call, grad_outputs, param_relevance)
            del call
            if recorder is not None:
                recorder(step.site, rule, grad_outputs, results)
            step.release()  # the sweep reaches every step once: free what its rule computed and read
            for vid, grad in zip(step.inputs, results):
                if grad is not None:
                    add(vid, grad)
        elif type(step) is Split:
            vid = step.vid
            complete(vid)
            root = trace.find(piece_of[vid])
            for store, target in ((cot, pending), (gcot, gpending)):
                waiting = store.pop(vid, None)
                if waiting is not None:
                    _accumulate(target.setdefault(root, {}), vid, waiting)
        elif type(step) is Observation:
            for position, (vid, push) in enumerate(zip(step.vids, step.push)):
                complete(vid)
                arriving = as_relevance(vid)
                if arriving is not None:
                    cot[vid] = arriving
                if observer is not None:
                    if arriving is None:
                        arriving = torch.zeros_like(low[vid])
                    cot[vid] = observer(step.name, position, arriving)
                if push and vid in cot:
                    add_to_piece = cot.pop(vid)
                    _accumulate(pending.setdefault(trace.find(piece_of[vid]), {}), vid, add_to_piece)
        else:
            assert type(step) is OpStep
            if step.kind == "gradient":  # a transparent call: gradients
                gradient = True
                grads = []
                for vid in step.outputs:
                    grad, relevance = gcot.pop(vid, None), cot.pop(vid, None)
                    if relevance is not None:
                        quotient = gradient_of(vid, relevance)
                        grad = quotient if grad is None else grad + quotient
                    grads.append(grad)
            else:
                gradient = (step.kind == "moves" and not any(vid in cot for vid in step.outputs)
                            and any(vid in gcot for vid in step.outputs))
                grads = [gcot.pop(vid, None) if gradient else as_relevance(vid) for vid in step.outputs]
            if all(grad is None for grad in grads):
                continue
            grad_outputs = tuple(
                torch.zeros_like(tensors[vid]) if grad is None else grad for vid, grad in zip(step.outputs, grads)
            )
            pulled = step.pullback(grad_outputs)
            step.pullback = _spent  # the sweep reaches every step once: free what the pullback saved
            if recorder is not None:
                recorder(step.site, None, grad_outputs, pulled)
            for vid, grad in zip(step.inputs, pulled):
                if grad is not None:
                    add(vid, grad, gradient=gradient)
    done = expire.pop(0, None)
    if done is not None:
        drop(done)
    at = -1
    for root in list(pending.keys() | gpending.keys()):
        flush(root)
    for vid in list(gcot):
        cot[vid] = as_relevance(vid)  # type: ignore[assignment]
    return cot


def _spent(grad_outputs: Any) -> Any:
    raise RuntimeError("lrpfunc._sweep: a step's pullback ran twice; a trace is swept once")


def _finite(value: Tensor) -> Tensor:
    """``value`` with infinities as zero: a gradient times a masked score (``-inf``) is no relevance."""
    if value.is_floating_point():
        return torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)
    return value


def _gradient_rule(step: RuledCall, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """The rule of ``step`` in gradient form, checked like a rule's result: ``J^T g / n`` for a ``"split"`` rule (``n``
    activation inputs), else ``step.rule.modified_gradient(call, grad_outputs)``."""
    if step.traits.splits:
        count = len(call.inputs)
        gradients = call.pullback(tuple(grad / count for grad in grad_outputs))
    else:
        gradients = step.rule.modified_gradient(call, grad_outputs)
    return _checked(step.rule, call, tuple(gradients), "gradient")


def _checked(rule: Any, call: Call, results: tuple[Tensor | None, ...], what: str) -> tuple[Tensor | None, ...]:
    """``results``, after checking that there is one per activation input of ``call``, each of that input's shape."""
    if len(results) != len(call.inputs):
        raise RuleError(
            f"rule {rule_name(rule)} returned {len(results)} input {what}(s) for {call.describe()}, which has "
            f"{len(call.inputs)} activation input(s)"
        )
    for position, (grad, tensor) in enumerate(zip(results, call.inputs)):
        if grad is not None and grad.shape != tensor.shape:
            raise RuleError(
                f"rule {rule_name(rule)} returned a {what} of shape {tuple(grad.shape)} for input {position} of "
                f"{call.describe()}, expected shape {tuple(tensor.shape)}"
            )
    return results


# ------------------------------------------------------------------------------------------------------------
# the Call a rule receives
# ------------------------------------------------------------------------------------------------------------


def make_call(trace: Trace, step: RuledCall, wants_param_relevance: bool) -> Call:
    """The :class:`~lrpfunc.Call` that the rule of ``step`` receives."""
    low = trace.low
    if step.params is not None:
        params = step.params
    else:
        params = {local: low[vid] for local, vid in step.param_vids.items()}
    site = step.site
    return Call(
        site.name,
        step.module,
        None if site.kind == "module" else site.name.rsplit("/", 1)[-1],
        site.call_index,
        tuple([low[vid] for vid in step.inputs]),
        tuple([low[vid] for vid in step.outputs]),
        params,
        wants_param_relevance,
        _forward_of(trace, step),
        _pullback_of(trace, step),
        step.op_class,
        tuple(step.input_sources),
        _transpose_of(trace, step) if step.transposed else None,
        tuple([vid in trace.nonnegative for vid in step.inputs]),
        step.arguments,
        tuple([trace.nonnegative.get(vid) is Sign.FLAT_AT_ZERO for vid in step.inputs]),
    )


def _forward_of(trace: Trace, step: RuledCall) -> Callable[..., tuple[Tensor, ...]]:
    if step.forward is not None:
        return step.forward
    nodes, inputs, outputs = step.nodes, tuple(step.inputs), tuple(step.outputs)
    param_vids, low = step.param_vids, trace.low

    def forward(values: tuple[Tensor, ...], params: Mapping[str, Tensor],
                hold_statistics: bool = False) -> tuple[Tensor, ...]:
        env: dict[int, Tensor] = dict(zip(inputs, values))
        for local, value in params.items():
            vid = param_vids.get(local)
            if vid is not None:
                env[vid] = value
        if hold_statistics:
            _replay_holding_statistics(nodes, env, low, values)
        else:
            for node in nodes:
                node.bind(node.replay(env, low), env)
        return tuple(env[vid] for vid in outputs)

    return forward


_LINEAR_CLASSES = (_ops.Linear, _ops.Sum, _ops.DataMovement)


def _replay_holding_statistics(nodes: Sequence[Node], env: dict[int, Tensor], low: Mapping[int, Tensor],
                               values: Sequence[Tensor]) -> None:
    """Replay with the statistics of normalisations held at their recorded values.

    A normalisation operation (``layer_norm``, ``group_norm``, ``rms_norm``, batch statistics) runs with its
    divisor (standard deviation, root mean square) computed from its recorded input; written out by hand, a value
    that depends nonlinearly on the call's input and has fewer elements than it (a variance, a ``rsqrt`` of a mean
    square) takes its recorded value. What is left is affine in the input: the centring, the scale and the shift.
    """
    reference = max((value.numel() for value in values), default=0)
    nonlinear: set[int] = set()
    for node in nodes:
        held = _normalization.HELD.get(node.func) if node.op_class is _ops.Normalization else None
        if held is not None:
            leaves = [
                (env[leaf.vid] if leaf.vid in env else low[leaf.vid]) if type(leaf) is Ref else leaf
                for leaf in node.leaves
            ]
            args, kwargs = unflatten_call(node.spec, leaves)
            recorded = low[node.inputs[0]]
            node.bind(held(recorded, *args, **kwargs), env)
            continue
        node.bind(node.replay(env, low), env)
        op_class = node.op_class
        is_nonlinear = not (op_class is not None and issubclass(op_class, _LINEAR_CLASSES)) or any(
            vid in nonlinear for vid in node.inputs
        )
        if is_nonlinear:
            for vid in node.outputs:
                nonlinear.add(vid)
                if env[vid].numel() < reference:
                    env[vid] = low[vid]


def _pullback_of(trace: Trace, step: RuledCall) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]:
    tape, low = trace.tape, trace.low
    inputs, outputs = tuple(step.inputs), tuple(step.outputs)

    def unavailable(grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        raise RuleError(
            f"rule {rule_name(step.rule)} on {step.site.describe()} called call.pullback, but says "
            f"needs_pullback=False, so the call ran without its true pullback; set needs_pullback = True on the rule"
        )

    if not step.needs_pullback:
        return unavailable
    if step.transposed:
        return _transposed_pullback(trace, step)
    if step.closed_pullback is not None:
        return _closed_pullback(trace, step)
    if tape.per_op:
        pullbacks = step.pullbacks
        if step.module is None and len(pullbacks) == 1:  # an operation: its own pullback, one gradient per operand
            return lambda grad_outputs: tuple(pullbacks[0][2](tuple(grad_outputs)))

        def pullback(grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            cot: dict[int, Tensor] = {}
            for vid, grad in zip(outputs, grad_outputs):
                _accumulate(cot, vid, grad)
            for ins, outs, pull in reversed(pullbacks):
                grads = [cot.pop(vid, None) for vid in outs]
                if all(grad is None for grad in grads):
                    continue
                full = tuple(torch.zeros_like(low[vid]) if grad is None else grad for vid, grad in zip(outs, grads))
                for vid, grad in zip(ins, pull(full)):
                    if grad is not None:
                        _accumulate(cot, vid, grad)
            return tuple(cot[vid] if vid in cot else torch.zeros_like(low[vid]) for vid in inputs)

        return pullback
    # a call that is not quiet has every input lifted to a leaf of the shared tape
    tensors, lifted = trace.tensors, cast("list[Tensor]", step.lifted)

    def tape_pullback(grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        grads = tape.pullback([tensors[vid] for vid in outputs], list(lifted), list(grad_outputs))
        return tuple(torch.zeros_like(low[vid]) if grad is None else grad for vid, grad in zip(inputs, grads))

    return tape_pullback


def _transpose_of(trace: Trace, step: RuledCall) -> Callable[[Tensor, Mapping[str, Tensor]], Tensor]:
    """``(grad, params) -> input gradient`` of the call's linear operation with the weight ``params["weight"]``."""
    node, low = step.nodes[0], trace.low
    transpose = node.transpose
    assert transpose is not None
    value = low[step.inputs[0]]

    def apply(grad: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        leaves = [low[leaf.vid] if type(leaf) is Ref else leaf for leaf in node.leaves]
        args, kwargs = unflatten_call(node.spec, leaves)
        return transpose(grad, params["weight"], value, args, kwargs)

    return apply


def _transposed_pullback(trace: Trace, step: RuledCall) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]:
    """The pullback of a call that is one linear operation: its closed-form transpose with the call's weight (the
    merged weight when a BatchNorm was folded in)."""
    node, low = step.nodes[0], trace.low
    transpose = node.transpose
    assert transpose is not None
    value = low[step.inputs[0]]
    scale = step.channel_scale

    def pullback(grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        leaves = [low[leaf.vid] if type(leaf) is Ref else leaf for leaf in node.leaves]
        args, kwargs = unflatten_call(node.spec, leaves)
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        (grad,) = grad_outputs
        if scale is not None:  # a BatchNorm folded in: its pullback scales each output channel
            factor = scale()
            grad = grad * factor.reshape(-1, *([1] * (grad.ndim - 2))) if grad.ndim > 2 else grad * factor
        return (transpose(grad, weight, value, args, kwargs),)

    return pullback


def _closed_pullback(trace: Trace, step: RuledCall) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]:
    """The pullback of a sum of two activations, in closed form."""
    node, low, pullback = step.nodes[0], trace.low, step.closed_pullback
    assert pullback is not None
    first, second = (low[vid] for vid in step.inputs)

    def pull(grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        leaves = [low[leaf.vid] if type(leaf) is Ref else leaf for leaf in node.leaves]
        args, kwargs = unflatten_call(node.spec, leaves)
        return pullback(grad_outputs[0], first, second, args, kwargs)

    return pull


def _apply_rule(
    trace: Trace,
    step: RuledCall,
    call: Call,
    grad_outputs: tuple[Tensor, ...],
    param_relevance: dict[str, Tensor] | None,
) -> tuple[Tensor | None, ...]:
    rule = step.rule
    result = rule(call, grad_outputs)
    params: Mapping[str, Tensor] = {}
    if isinstance(result, Propagated):
        params = result.params
        result = result.inputs
    elif isinstance(result, Tensor):
        result = (result,)
    result = _checked(rule, call, tuple(result), "relevance")
    if param_relevance is not None and params:
        prefix = f"{call.name}." if call.name and call.module is not None else (f"{call.name}:" if call.name else "")
        for local, value in params.items():
            vid = step.param_vids.get(local) if step.forward is None else None
            name = trace.param_names.get(vid) if vid is not None else None
            if name is None and vid is not None and vid in trace.static_origin:
                name = trace.static_origin[vid]  # a constant operand: the module that made it
            _accumulate(param_relevance, name if name is not None else prefix + local, value)
    return result
