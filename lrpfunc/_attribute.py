"""The public transforms: :func:`attribute`, :func:`attribute_with_params` and :func:`rule_table`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch

from ._composite import CallSite, Composite, RuleTable, call_sites
from ._record import Record
from ._sweep import Rule, plan, sweep
from ._tracer import trace
from .canonizers import Canonizer

Tensor = torch.Tensor

__all__ = ["attribute", "attribute_with_params", "rule_table"]

AttributionFn = Callable[[Mapping[str, Tensor], Any, Any], tuple[Any, Any]]


def _check_setup(where: str, model: Any, composite: Any, canonizers: Any) -> tuple[Canonizer, ...]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    if composite is not None and not isinstance(composite, Composite):
        raise TypeError(
            f"{where}: composite must be None or a composite from lrpfunc.composites (an object with "
            f"resolve(sites)), got {type(composite).__name__}"
        )
    if isinstance(canonizers, Canonizer):
        canonizers = (canonizers,)
    canonizers = tuple(canonizers)
    for canonizer in canonizers:
        if not isinstance(canonizer, Canonizer):
            raise TypeError(
                f"{where}: canonizers must be lrpfunc.canonizers.Canonizer instances, got {type(canonizer).__name__}"
            )
    return canonizers


def _check_params(where: str, model: torch.nn.Module, params: Any) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{where}: params must be a mapping of names to tensors like dict(model.named_parameters()), "
            f"got {type(params).__name__}"
        )
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    known |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    unknown = [name for name in params if name not in known]
    if unknown:
        raise ValueError(
            f"{where}: params has names that are neither parameters nor buffers of {type(model).__name__}: "
            f"{', '.join(repr(name) for name in unknown)}"
        )
    for name, value in params.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: params[{name!r}] must be a tensor, got {type(value).__name__}")


def _check_tensors(where: str, what: str, tree: Any) -> None:
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, Tensor):
            location = what + "".join(f"[{key!r}]" for key in path)
            raise TypeError(f"{where}: {location} must be a tensor (or a pytree of tensors), got {type(leaf).__name__}")


def check_grad_output(where: str, output: Any, grad_output: Any) -> list[Tensor]:
    """The leaves of ``grad_output``, checked to have the structure and shapes of the model's ``output``."""
    output_leaves, output_spec = optree.tree_flatten(output, none_is_leaf=True)
    grad_leaves, grad_spec = optree.tree_flatten(grad_output, none_is_leaf=True)
    if grad_spec != output_spec:
        raise ValueError(
            f"{where}: grad_output must have the structure of the model's output ({output_spec}), got {grad_spec}"
        )
    for index, (out, grad) in enumerate(zip(output_leaves, grad_leaves)):
        if not isinstance(grad, Tensor) or grad.shape != out.shape:
            got = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            leaf = f" (output leaf {index})" if len(output_leaves) > 1 else ""
            raise ValueError(
                f"{where}: grad_output{leaf} must have the output's shape {tuple(out.shape)}, got {got}"
            )
    return grad_leaves


def _resolve(record: Record, composite: Composite | None) -> tuple[list[CallSite], list[Rule | None]]:
    sites = call_sites(record)
    if composite is None:
        return sites, [None] * len(sites)
    rules = list(composite.resolve(sites))
    if len(rules) != len(sites):
        raise ValueError(f"composite {composite!r} resolved {len(rules)} rules for {len(sites)} call sites")
    return sites, rules


def _record(
    where: str,
    model: torch.nn.Module,
    canonizers: tuple[Canonizer, ...],
    params: Mapping[str, Tensor],
    x: Any,
) -> Record:
    _check_params(where, model, params)
    _check_tensors(where, "x", x)
    record = trace(model, params, x, [c.replace_op for c in canonizers])
    for canonizer in canonizers:
        canonizer.rewrite(record)
    _check_tensors(where, "the model's output", record.output)
    return record


def _run(
    where: str,
    model: torch.nn.Module,
    composite: Composite | None,
    canonizers: tuple[Canonizer, ...],
    params: Mapping[str, Tensor],
    x: Any,
    grad_output: Any,
    param_relevance: dict[str, Tensor] | None,
) -> tuple[Any, Any]:
    record = _record(where, model, canonizers, params, x)
    grad_leaves = check_grad_output(where, record.output, grad_output)
    sites, rules = _resolve(record, composite)
    span_rules = {site.index: rule for site, rule in zip(sites, rules) if rule is not None and site.kind == "module"}
    op_rules = {site.index: rule for site, rule in zip(sites, rules) if rule is not None and site.kind == "op"}
    seeds: dict[int, Tensor] = {}
    for vid, grad in zip(record.output_ids, grad_leaves):
        if vid is not None and vid in record.activations:
            seeds[vid] = seeds[vid] + grad if vid in seeds else grad
    cotangents = sweep(
        record,
        plan(record, span_rules, op_rules),
        seeds,
        wants_param_relevance=param_relevance is not None,
        param_relevance=param_relevance,
    )
    x_leaves, x_spec = optree.tree_flatten(x, none_is_leaf=True)
    relevance = [
        cotangents.get(vid, torch.zeros_like(leaf)) if vid in record.activations else torch.zeros_like(leaf)
        for vid, leaf in zip(record.input_ids, x_leaves)
    ]
    return record.output, optree.tree_unflatten(x_spec, relevance)


def attribute(
    model: torch.nn.Module,
    composite: Composite | None = None,
    canonizers: Sequence[Canonizer] | Canonizer = (),
) -> AttributionFn:
    """Turn ``model`` and a composite into the pure attribution function.

    Definition:
        ``fn(params, x, grad_output) -> (output, relevance)`` where ``output = model(x)`` evaluated with
        ``params`` and ``relevance`` is the modified vector-Jacobian product: the reverse sweep of
        ``grad_output`` through the recorded forward pass in which each call that the composite assigns a
        rule to is propagated by that rule, and every other operation by its true pullback. Without a
        composite, ``relevance`` equals ``torch.func.vjp(model)(grad_output)``.

        ``relevance`` is an ordinary differentiable function of ``params``, ``x`` and ``grad_output``:
        ``torch.func.grad``, ``vmap``, ``jacrev``, ``jacfwd`` and ``hessian`` compose with ``fn`` and give
        the exact derivatives of that function.

    Args:
        model: Any ``torch.nn.Module``; it is never modified, and nothing is stored on it.
        composite: Which rule goes to which call (:mod:`lrpfunc.composites`); ``None`` for no rules.
        canonizers: Rewrites of the recorded function (:mod:`lrpfunc.canonizers`), applied in order.

    Returns:
        ``fn(params, x, grad_output)``. ``params`` maps qualified names to tensors (parameters, and
        optionally buffers); names it lacks fall back to the model's own tensors. ``x`` is a tensor or a
        pytree of tensors (a tuple is passed as positional arguments, a dict as keyword arguments);
        ``relevance`` has its structure. ``grad_output`` has the structure and shapes of ``output``.

    Raises:
        TypeError, ValueError: Bad arguments (the message names what was expected and what came).
        lrpfunc.RuleError: A rule cannot handle the call it was given.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> fn = attribute(model, lrpfunc.composites.epsilon_plus())
        >>> params = dict(model.named_parameters())
        >>> x = torch.randn(5, 4)
        >>> out, relevance = fn(params, x, torch.eye(2)[[0] * 5])
        >>> per_sample = torch.func.vmap(fn, in_dims=(None, 0, 0))(params, x, torch.eye(2)[[0] * 5])
    """
    where = f"attribute({type(model).__name__}, composite)"
    canonizers = _check_setup(where, model, composite, canonizers)

    def attribution(params: Mapping[str, Tensor], x: Any, grad_output: Any) -> tuple[Any, Any]:
        return _run(where, model, composite, canonizers, params, x, grad_output, None)

    return attribution


def attribute_with_params(
    model: torch.nn.Module,
    composite: Composite | None = None,
    canonizers: Sequence[Canonizer] | Canonizer = (),
) -> Callable[[Mapping[str, Tensor], Any, Any], tuple[Any, Any, dict[str, Tensor]]]:
    """Like :func:`attribute`, and also the relevance of each parameter.

    Definition:
        For every call whose rule reports parameter relevance (every :func:`lrpfunc.rules.basic` rule),
        the rule's reducer applied to the modified parameters and the vector-Jacobian products w.r.t.
        them (the quantity of Zennit issue 183's proof of concept); calls of the same module add up.

    Returns:
        ``fn(params, x, grad_output) -> (output, relevance, param_relevance)`` where ``param_relevance``
        maps qualified parameter names to tensors of the parameters' shapes. For calls a canonizer merged
        (BatchNorm folded into a convolution), the relevance is that of the merged parameter and is
        reported under the layer's own parameter name. Composes with ``torch.func`` like
        :func:`attribute`.
    """
    where = f"attribute_with_params({type(model).__name__}, composite)"
    canonizers = _check_setup(where, model, composite, canonizers)

    def attribution(params: Mapping[str, Tensor], x: Any, grad_output: Any) -> tuple[Any, Any, dict[str, Tensor]]:
        relevances: dict[str, Tensor] = {}
        output, relevance = _run(where, model, composite, canonizers, params, x, grad_output, relevances)
        return output, relevance, relevances

    return attribution


def rule_table(
    model: torch.nn.Module,
    composite: Composite | None,
    x: Any,
    canonizers: Sequence[Canonizer] | Canonizer = (),
    params: Mapping[str, Tensor] | None = None,
) -> RuleTable:
    """Which rule each call site gets, without running any backward pass.

    Runs the forward pass once on ``x`` (an example input suffices: sites depend only on the execution
    order) and returns the :class:`~lrpfunc.RuleTable`; ``print`` it to read it.
    """
    where = f"rule_table({type(model).__name__}, composite)"
    canonizers = _check_setup(where, model, composite, canonizers)
    record = _record(where, model, canonizers, dict(params or {}), x)
    sites, rules = _resolve(record, composite)
    return RuleTable(tuple(zip(sites, rules)))
