"""The public transforms: :func:`attribute`, :func:`attribute_with_params` and :func:`rule_table`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import optree
import torch

from ._checks import (
    ParamsRequireGradWarning,
    TrainingModeWarning,
    check_grad_output,
    check_params,
    check_setup,
    check_tensors,
    mode_dependent,
    warn_params_require_grad,
    warn_training_mode,
)
from ._composite import CallSite, Composite, RuleTable, resolver_of, sources_of
from ._functionalize import Substitution, is_float
from ._inference import outside_inference_mode
from ._interception import eager_calls, tracing
from ._model import ModelInfo, Stale, call_model
from ._record import Retry, Trace
from ._sweep import Observer, sweep
from ._tape import AutogradTape, Tape, choose_tape
from ._trace import Tracer
from .canonizers import Canonizer

Tensor = torch.Tensor

__all__ = ["attribute", "attribute_with_params", "rule_table", "Setup", "run_trace"]

AttributionFn = Callable[[Mapping[str, Tensor], Any, Any], tuple[Any, Any]]


def _distinct(leaves: list[Any]) -> list[Any]:
    """The same tensor passed twice is two inputs, as for :func:`torch.func.vjp`."""
    seen: set[int] = set()
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            if id(leaf) in seen:
                leaves[index] = leaf.view_as(leaf)
            seen.add(id(leaf))
    return leaves


@dataclass
class Setup:
    """What an attribution function holds: the model, the composite, the canonizers, and what it read from them
    once (module names, parameter names, whether the composite resolves while tracing)."""

    where: str
    model: torch.nn.Module
    composite: Composite | None
    canonizers: tuple[Canonizer, ...]
    info: ModelInfo = field(init=False)
    streaming: bool = field(init=False)
    traced: bool = field(init=False)

    def __post_init__(self) -> None:
        self.info = ModelInfo(self.model)
        self.streaming = self.composite is None or resolver_of(self.composite) is not None
        self.merge = any(c.merges_batchnorm for c in self.canonizers)
        self.labels = any(c.labels_sums for c in self.canonizers)
        self.rewrites = [c for c in self.canonizers if type(c).rewrite is not Canonizer.rewrite]
        self.replacers = [c for c in self.canonizers if type(c).replace_op is not Canonizer.replace_op]
        self.traced = self.composite is not None or bool(self.rewrites)
        self.sources = sources_of(self.composite)
        self.mode_dependent = mode_dependent(self.model, batchnorm=not self.merge)  # a merge refuses a training one
        self.warned: set[type[Warning]] = set()

    def warn(self, params: Mapping[str, Tensor], others: list[Any], tape: Tape) -> None:
        """Warn once per attribution function: when the model computes in training mode, and when the exact tape
        was chosen only because ``params`` require grad (``others``: the leaves of x, grad_output and masks)."""
        if TrainingModeWarning not in self.warned and warn_training_mode(self.where, self.model, self.mode_dependent):
            self.warned.add(TrainingModeWarning)
        exact = not isinstance(tape, AutogradTape)
        if ParamsRequireGradWarning not in self.warned and warn_params_require_grad(self.where, params, others, exact):
            self.warned.add(ParamsRequireGradWarning)

    def refresh(self, stale: Stale) -> None:
        """Read the model's structure again after a trace met a module or parameter it did not list; one that is
        still not part of the model afterwards is foreign (used by the forward pass, but not the model's own)."""
        info = ModelInfo(self.model, self.info.foreign)
        if stale.key not in info.names and stale.key not in info.ids:
            info.foreign.add(stale.key)
        self.info = info
        self.mode_dependent = mode_dependent(self.model, batchnorm=not self.merge)

    def replace(self, func: Callable[..., Any]) -> Callable[..., Any]:
        for canonizer in self.replacers:
            replacement = canonizer.replace_op(func)
            if replacement is not None:
                func = replacement
        return func


def refreshing(setup: Setup, run: Callable[[], Any]) -> Any:
    """``run()``, again after reading the model anew whenever it meets a module or parameter the setup lacks."""
    while True:
        try:
            return run()
        except Stale as stale:
            setup.refresh(stale)


class _TableResolver:
    """Rules resolved by a composite without ``resolver()`` from a first pass's sites, looked up by site."""

    def __init__(self, composite: Composite, sites: Sequence[CallSite]) -> None:
        rules = list(composite.resolve(sites))
        if len(rules) != len(sites):
            raise ValueError(f"composite {composite!r} resolved {len(rules)} rules for {len(sites)} call sites")
        self.composite = composite
        self.table = {(site.kind, site.index): rule for site, rule in zip(sites, rules)}

    def __call__(self, site: CallSite) -> Any:
        key = (site.kind, site.index)
        if key in self.table:
            return self.table[key]
        return self.composite.resolve([site])[0]  # a site the first pass did not see (inside a decomposition)


def run_trace(
    setup: Setup,
    params: Mapping[str, Tensor],
    x: Any,
    tape: Tape,
    *,
    record_sites: bool = False,
    observe: Callable[[str, int], str | None] | None = None,
    resolve: bool = True,
    transparent: bool = False,
) -> Trace:
    """Run the forward pass on ``tape`` and return its :class:`~lrpfunc._trace.Trace`.

    The composite resolves the sites as they are reached (a fresh resolver per pass: it may count what it saw). A
    composite with only ``resolve(sites)`` gets the sites of a first pass without rules. A BatchNorm merged while
    tracing whose input turns out to be read elsewhere later makes the pass run again without that merge.
    ``transparent``: calls whose rule is their pullback in gradient form stay on the tape (for a sweep that uses the
    gradient form, :func:`lrpfunc._sweep.sweep`); a piece of the tape that would mix them with operations without a
    rule makes the pass run again without them.
    """
    composite = setup.composite if resolve else None
    table: _TableResolver | None = None
    if composite is not None and not setup.streaming:
        first = run_trace(setup, params, x, AutogradTape(), record_sites=True, resolve=False)
        table = _TableResolver(composite, [site for site, _, by in first.sites if by is None])
    skip: frozenset[tuple[int, int]] = frozenset()
    skip_transpose: frozenset[tuple[int, int]] = frozenset()
    while True:
        resolver = table if table is not None else (resolver_of(composite) if composite is not None else None)
        tracer = Tracer(
            setup.info,
            params,
            tape,
            resolver=resolver,
            replacers=setup.replacers,
            merge_batchnorm=setup.merge,
            label_sums=setup.labels,
            observe=observe,
            skip_merge=skip,
            skip_transpose=skip_transpose,
            record_sites=record_sites,
            transparent=transparent,
            sources=setup.sources,
        )
        leaves, spec = optree.tree_flatten(x, none_is_leaf=True)
        leaves = _distinct(leaves)
        tape.begin()
        try:
            input_ids: list[int | None] = [
                tracer.add_input(leaf) if isinstance(leaf, Tensor) and is_float(leaf) else None for leaf in leaves
            ]
            inputs = [tracer.tensors[vid] if vid is not None else leaf for vid, leaf in zip(input_ids, leaves)]
            with tracing(tracer):
                output = call_model(setup.model, optree.tree_unflatten(spec, inputs), setup.info)
            trace = tracer.finish(input_ids, output)
        except Retry as retry:
            # a merge and a transpose name their module's key (only "forms" has none)
            if retry.kind == "merge":
                skip = skip | {cast("tuple[int, int]", retry.key)}
            elif retry.kind == "forms":
                transparent = False
            else:
                skip_transpose = skip_transpose | {cast("tuple[int, int]", retry.key)}
            continue
        finally:
            tape.end()
        for canonizer in setup.rewrites:
            canonizer.rewrite(trace)
        return trace


def _seeds(trace: Trace, grad_leaves: Sequence[Tensor]) -> list[tuple[int, Tensor]]:
    return [
        (vid, grad)
        for vid, grad in zip(trace.output_ids, grad_leaves)
        if vid is not None and vid in trace.activations
    ]


def _plain(setup: Setup, params: Mapping[str, Tensor], x: Any, grad_output: Any, tape: Tape) -> tuple[Any, Any]:
    """No rules: the vector-Jacobian product of the model (with the canonizers' replacements)."""
    where = setup.where
    leaves, spec = optree.tree_flatten(x, none_is_leaf=True)
    leaves = _distinct(leaves)
    floats = [index for index, leaf in enumerate(leaves) if is_float(leaf)]
    replace = setup.replace if setup.replacers else None
    if isinstance(tape, AutogradTape):
        with torch.enable_grad():
            for index in floats:
                leaves[index] = leaves[index].detach().requires_grad_()
            with Substitution(setup.info, params, replace, detach=True):  # checkpoints work under plain autograd
                output = call_model(setup.model, optree.tree_unflatten(spec, leaves), setup.info)
        check_tensors(where, "the model's output", output)
        grad_leaves = check_grad_output(where, output, grad_output)
        output_leaves = optree.tree_leaves(output, none_is_leaf=True)
        pairs = [(out, grad) for out, grad in zip(output_leaves, grad_leaves) if out.requires_grad]
        inputs = [leaves[index] for index in floats]
        grads: Sequence[Tensor | None] = [None] * len(inputs)
        if pairs and inputs:
            grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
        relevance = [torch.zeros_like(leaf) for leaf in leaves]
        for index, grad in zip(floats, grads):
            if grad is not None:
                relevance[index] = grad
        output = optree.tree_map(lambda t: t.detach(), output, none_is_leaf=True)
        return output, optree.tree_unflatten(spec, [r.detach() for r in relevance])
    shape: list[Any] = []

    def forward(*values: Tensor) -> tuple[tuple[Tensor, ...], tuple[Any, ...]]:
        current = list(leaves)
        for index, value in zip(floats, values):
            current[index] = value
        with Substitution(setup.info, params, replace), eager_calls():
            result = call_model(setup.model, optree.tree_unflatten(spec, current), setup.info)
        check_tensors(where, "the model's output", result)
        result_leaves, result_spec = optree.tree_flatten(result, none_is_leaf=True)
        shape[:] = [result_spec, [isinstance(leaf, Tensor) and is_float(leaf) for leaf in result_leaves]]
        differentiable = tuple(leaf for leaf in result_leaves if isinstance(leaf, Tensor) and is_float(leaf))
        others = tuple(leaf for leaf in result_leaves if not (isinstance(leaf, Tensor) and is_float(leaf)))
        return differentiable or (torch.zeros(()),), others

    primals = [leaves[index] for index in floats]
    if primals:
        differentiable, pullback, others = torch.func.vjp(  # type: ignore[misc]  # annotated without has_aux too
            forward, *primals, has_aux=True
        )
    else:
        differentiable, others = forward()
        pullback = None
    result_spec, floating = shape
    diff_iter, other_iter = iter(differentiable), iter(others)
    output = optree.tree_unflatten(result_spec, [next(diff_iter) if f else next(other_iter) for f in floating])
    check_tensors(where, "the model's output", output)
    grad_leaves = check_grad_output(where, output, grad_output)
    relevance = [torch.zeros_like(leaf) for leaf in leaves]
    if pullback is not None and any(floating):
        cotangents = tuple(grad for grad, f in zip(grad_leaves, floating) if f)
        for index, grad in zip(floats, pullback(cotangents)):
            relevance[index] = grad
    return output, optree.tree_unflatten(spec, relevance)


def _run(
    setup: Setup,
    params: Mapping[str, Tensor],
    x: Any,
    grad_output: Any,
    param_relevance: dict[str, Tensor] | None,
    *,
    observe: Callable[[str, int], str | None] | None = None,
    observer: Observer | None = None,
    seed_output: bool = True,
    more: Sequence[Tensor] = (),
) -> tuple[Any, Any]:
    """Trace and sweep. ``seed_output=False``: no relevance starts at the output (``grad_output`` is ignored; the
    sweep starts where the ``observer`` adds relevance). ``more``: further tensors the result depends on (masks),
    which decide the tape like the arguments do."""
    where = setup.where
    if any(name not in setup.info.known for name in params):  # the model may have gained a parameter
        setup.info = ModelInfo(setup.model, setup.info.foreign)
    check_params(where, setup.info, setup.model, params)
    check_tensors(where, "x", x)
    others = [*optree.tree_leaves(x, none_is_leaf=True), *optree.tree_leaves(grad_output, none_is_leaf=True), *more]
    tape = choose_tape([*params.values(), *others])
    setup.warn(params, others, tape)
    if not setup.traced and observe is None and param_relevance is None:
        return refreshing(setup, lambda: _plain(setup, params, x, grad_output, tape))
    # the one place that decides the form: rules without stabilizer propagate gradients (fast, see lrpfunc._sweep)
    # unless parameter relevance is asked for, which needs every rule in relevance form
    forms = param_relevance is None
    trace = refreshing(setup, lambda: run_trace(setup, params, x, tape, observe=observe, transparent=forms))
    check_tensors(where, "the model's output", trace.output)
    grad_leaves = check_grad_output(where, trace.output, grad_output) if seed_output else []
    with torch.no_grad() if not tape.exact else contextlib.nullcontext():
        cotangents = sweep(
            trace,
            _seeds(trace, grad_leaves) if seed_output else [],
            param_relevance=param_relevance,
            observer=observer,
            gradient_form=forms,
        )
    if param_relevance is not None:
        _source_relevance(trace, cotangents, param_relevance)
    leaves, spec = optree.tree_flatten(x, none_is_leaf=True)
    relevance = [
        cotangents[vid] if vid is not None and vid in cotangents else torch.zeros_like(leaf)
        for vid, leaf in zip(trace.input_ids, leaves)
    ]
    return trace.output, optree.tree_unflatten(spec, relevance)


def _source_key(name: str, position: int, count: int) -> str:
    """The key of a source call's output in the parameter relevance: the module's name, ``name[i]`` for the ``i``-th
    of several tensor outputs."""
    return name if count == 1 else f"{name}[{position}]"


def source_relevance(relevances: Mapping[str, Tensor], name: str) -> list[Tensor]:
    """The relevance that :func:`attribute_with_params` reported for the outputs of the source module ``name``
    (:func:`lrpfunc.composites.with_sources`), one tensor per output; empty if it reported none."""
    if name in relevances:
        return [relevances[name]]
    found: list[Tensor] = []
    while (key := _source_key(name, len(found), 2)) in relevances:
        found.append(relevances[key])
    return found


def _source_relevance(trace: Trace, cotangents: Mapping[int, Tensor], relevances: dict[str, Tensor]) -> None:
    """Add the relevance of each source call's outputs (:func:`lrpfunc.composites.with_sources`) to ``relevances``,
    under the module's name (``name[i]`` for the ``i``-th of several tensor outputs); calls of one module add up."""
    for name, vids in trace.source_ids:
        for position, vid in enumerate(vids):
            if vid is None:
                continue
            key = _source_key(name, position, len(vids))
            found = cotangents.get(vid)
            value = found if found is not None else torch.zeros_like(trace.low[vid])
            relevances[key] = relevances[key] + value if key in relevances else value


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

    Speed: when nothing outside can differentiate the result (no ``torch.func`` transform is active, and no
    argument requires grad while grad mode is on), ``fn`` uses plain autograd inside, which costs about what a
    gradient costs; under ``torch.no_grad()`` or with detached ``params`` a heatmap takes this path. Otherwise one
    ``torch.func`` grad level records the whole forward pass (see ``lrpfunc._tape``).

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
    setup = Setup(where, model, composite, check_setup(where, model, composite, canonizers))

    @outside_inference_mode
    def attribution(params: Mapping[str, Tensor], x: Any, grad_output: Any) -> tuple[Any, Any]:
        return _run(setup, params, x, grad_output, None)

    attribution.model = model  # type: ignore[attr-defined]  # for lrpfunc.cached and lrpfunc.compile
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
        reported under the layer's own parameter name. For operations with parameter operands (``F.linear``
        written in a forward, HuggingFace ``Conv1D``), the model's parameter names are used; for a constant operand
        computed inside a module from its parameters (a learned position embedding added to the token embeddings),
        the name of that module. Composes with ``torch.func`` like :func:`attribute`.
    """
    where = f"attribute_with_params({type(model).__name__}, composite)"
    setup = Setup(where, model, composite, check_setup(where, model, composite, canonizers))

    @outside_inference_mode
    def attribution(params: Mapping[str, Tensor], x: Any, grad_output: Any) -> tuple[Any, Any, dict[str, Tensor]]:
        relevances: dict[str, Tensor] = {}
        output, relevance = _run(setup, params, x, grad_output, relevances)
        return output, relevance, relevances

    return attribution


@outside_inference_mode
def rule_table(
    model: torch.nn.Module,
    composite: Composite | None,
    x: Any,
    canonizers: Sequence[Canonizer] | Canonizer = (),
    params: Mapping[str, Tensor] | None = None,
) -> RuleTable:
    """Which rule each call site gets, and its operation class, without running any backward pass.

    Runs the forward pass once on ``x`` (an example input suffices: sites depend only on the execution
    order) and returns the :class:`~lrpfunc.RuleTable`; ``print`` it to read it. Sites inside a call that has a
    rule are covered by it and listed as such.
    """
    where = f"rule_table({type(model).__name__}, composite)"
    setup = Setup(where, model, composite, check_setup(where, model, composite, canonizers))
    params = dict(params or {})
    check_params(where, setup.info, model, params)
    check_tensors(where, "x", x)
    with torch.no_grad():
        trace = refreshing(setup, lambda: run_trace(setup, params, x, AutogradTape(), record_sites=True))
    check_tensors(where, "the model's output", trace.output)
    rows = tuple((site, rule) for site, rule, _ in trace.sites)
    return RuleTable(rows, tuple(by for _, _, by in trace.sites))
