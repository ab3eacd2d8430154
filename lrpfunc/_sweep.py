"""The modified backward pass: a reverse sweep over the record, sending each cotangent through the true
pullback of an operation or through the rule of a call.

Everything here is ordinary torch code running at the caller's ``torch.func`` level, so the outer
transforms differentiate, batch and take Jacobians of the sweep like of any other function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ._call import Call, Propagated, RuleError
from ._record import OpNode, Record, Span

Tensor = torch.Tensor

__all__ = ["Rule", "Step", "plan", "sweep", "span_call", "op_call"]


class Rule(Protocol):
    """A rule rewrites the vector-Jacobian product of one call.

    Called with the :class:`~lrpfunc.Call` and the cotangents of its outputs, it returns the cotangents
    of the call's inputs, either as a tuple (one per input) or as a :class:`~lrpfunc.Propagated` that
    also carries a relevance for each parameter.
    """

    def __call__(
        self, call: Call, grad_outputs: tuple[Tensor, ...], /
    ) -> Sequence[Tensor | None] | Propagated: ...


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the reverse sweep: an operation's true pullback, or a rule applied to a call."""

    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    node: int | None = None
    span: int | None = None
    rule: Rule | None = None


def plan(record: Record, span_rules: Mapping[int, Rule], op_rules: Mapping[int, Rule]) -> list[Step]:
    """The steps of the sweep in forward order: a rule on a call replaces the operations it ran."""
    steps: list[Step] = []
    for index, node in enumerate(record.nodes):
        ruled = next((sid for sid in node.spans if sid in span_rules), None)
        if ruled is not None:
            span = record.spans[ruled]
            if span.nodes[-1] == index:
                steps.append(Step(span.inputs, span.outputs, span=ruled, rule=span_rules[ruled]))
        elif node.pullback is not None:
            steps.append(Step(node.inputs, node.outputs, node=index, rule=op_rules.get(index)))
    return steps


def _accumulate(cotangents: dict[int, Tensor], vid: int, value: Tensor) -> None:
    previous = cotangents.get(vid)
    cotangents[vid] = value if previous is None else previous + value


def sweep(
    record: Record,
    steps: Sequence[Step],
    seeds: Mapping[int, Tensor],
    *,
    wants_param_relevance: bool = False,
    param_relevance: dict[str, Tensor] | None = None,
) -> dict[int, Tensor]:
    """Propagate ``seeds`` (cotangents by value id) backwards through ``steps``.

    Returns the cotangents of every value reached that no step consumed (the inputs of the sweep).
    """
    cotangents = dict(seeds)
    tensors = record.tensors
    for step in reversed(steps):
        grads = [cotangents.pop(vid, None) for vid in step.outputs]
        if all(grad is None for grad in grads):
            continue
        grad_outputs = tuple(
            torch.zeros_like(tensors[vid]) if grad is None else grad for vid, grad in zip(step.outputs, grads)
        )
        if step.rule is None:
            grad_inputs: Sequence[Tensor | None] = record.nodes[step.node].pullback(grad_outputs)  # type: ignore[index,misc]
        else:
            call = (
                span_call(record, step.span, wants_param_relevance)
                if step.span is not None
                else op_call(record, step.node, wants_param_relevance)  # type: ignore[arg-type]
            )
            grad_inputs = _apply_rule(step.rule, call, grad_outputs, record, step, param_relevance)
        for vid, grad in zip(step.inputs, grad_inputs):
            if grad is not None:
                _accumulate(cotangents, vid, grad)
    return cotangents


def _rule_name(rule: Any) -> str:
    return getattr(rule, "name", None) or getattr(rule, "__name__", None) or type(rule).__name__


def _apply_rule(
    rule: Rule,
    call: Call,
    grad_outputs: tuple[Tensor, ...],
    record: Record,
    step: Step,
    param_relevance: dict[str, Tensor] | None,
) -> Sequence[Tensor | None]:
    result = rule(call, grad_outputs)
    params: Mapping[str, Tensor] = {}
    if isinstance(result, Propagated):
        result, params = result.inputs, result.params
    elif isinstance(result, Tensor):
        result = (result,)
    result = tuple(result)
    if len(result) != len(call.inputs):
        raise RuleError(
            f"rule {_rule_name(rule)} returned {len(result)} input relevance(s) for {call.describe()}, "
            f"which has {len(call.inputs)} activation input(s)"
        )
    for position, (grad, tensor) in enumerate(zip(result, call.inputs)):
        if grad is not None and grad.shape != tensor.shape:
            raise RuleError(
                f"rule {_rule_name(rule)} returned a relevance of shape {tuple(grad.shape)} for input "
                f"{position} of {call.describe()}, expected shape {tuple(tensor.shape)}"
            )
    if param_relevance is not None and params:
        prefix = f"{call.name}." if call.name else ""
        span = record.spans[step.span] if step.span is not None else None
        for local, value in params.items():
            vid = span.params.get(local) if span is not None and span.sid not in record.params_override else None
            name = record.param_names.get(vid, prefix + local) if vid is not None else prefix + local
            _accumulate(param_relevance, name, value)  # type: ignore[arg-type]
    return result


def _true_pullback(record: Record, node_ids: Sequence[int], inputs: tuple[int, ...], outputs: tuple[int, ...]) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]:
    steps = [
        Step(record.nodes[i].inputs, record.nodes[i].outputs, node=i)
        for i in node_ids
        if record.nodes[i].pullback is not None
    ]

    def pullback(grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if len(steps) == 1 and steps[0].inputs == inputs and steps[0].outputs == outputs:
            return tuple(record.nodes[steps[0].node].pullback(grad_outputs))  # type: ignore[index,misc]
        cotangents = sweep(record, steps, dict(zip(outputs, grad_outputs)))
        return tuple(
            cotangents[vid] if vid in cotangents else torch.zeros_like(record.tensors[vid]) for vid in inputs
        )

    return pullback


def _replay(record: Record, span: Span) -> Callable[[tuple[Tensor, ...], Mapping[str, Tensor]], tuple[Tensor, ...]]:
    nodes = [record.nodes[i] for i in span.nodes]

    def forward(inputs: tuple[Tensor, ...], params: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        env: dict[int, Tensor] = dict(zip(span.inputs, inputs))
        for local, value in params.items():
            vid = span.params.get(local)
            if vid is not None:
                env[vid] = value
        for node in nodes:
            node.bind_outputs(node.replay(env, record.tensors), env)
        return tuple(env[vid] for vid in span.outputs)

    return forward


def span_call(record: Record, sid: int, wants_param_relevance: bool = False) -> Call:
    """The :class:`Call` that a rule on module call ``sid`` receives."""
    span = record.spans[sid]
    params = record.params_override.get(sid)
    if params is None:
        params = {local: record.tensors[vid] for local, vid in span.params.items()}
    return Call(
        name=span.name,
        module=span.module,
        op=None,
        call_index=span.call_index,
        inputs=tuple(record.tensors[vid] for vid in span.inputs),
        outputs=tuple(record.tensors[vid] for vid in span.outputs),
        params=params,
        wants_param_relevance=wants_param_relevance,
        _forward=span.forward or _replay(record, span),
        _pullback=_true_pullback(record, span.nodes, span.inputs, span.outputs),
    )


def op_site_name(record: Record, node: OpNode) -> str:
    """``"<enclosing module>/<operation>"``, e.g. ``"layer1.0/add"``."""
    owner = record.spans[node.spans[-1]].name if node.spans else ""
    return f"{owner}/{node.name}" if owner else node.name


def op_call(record: Record, index: int, wants_param_relevance: bool = False) -> Call:
    """The :class:`Call` that a rule on operation ``index`` receives."""
    node = record.nodes[index]

    def forward(inputs: tuple[Tensor, ...], params: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        env = dict(zip(node.inputs, inputs))
        node.bind_outputs(node.replay(env, record.tensors), env)
        return tuple(env[vid] for vid in node.outputs)

    return Call(
        name=op_site_name(record, node),
        module=None,
        op=node.name,
        call_index=0,
        inputs=tuple(record.tensors[vid] for vid in node.inputs),
        outputs=tuple(record.tensors[vid] for vid in node.outputs),
        params={},
        wants_param_relevance=wants_param_relevance,
        _forward=forward,
        _pullback=_true_pullback(record, [index], node.inputs, node.outputs),
    )
