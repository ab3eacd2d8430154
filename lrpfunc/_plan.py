"""Record once, run many: an attribution function traced to a graph of aten operations per input signature
(:func:`torch.fx.experimental.proxy_tensor.make_fx`) and replayed, optionally compiled by :func:`torch.compile`.

The attribution reads no tensor value into Python (rules decide from static facts of the record), so its trace is a
complete program of ``(params, x, grad_output)``: new parameter values, inputs and seeds of the same signature give
the eager result. What the trace cannot see is guarded by the cache key: the tree structure, shapes, dtypes and
devices of the arguments, which parameters are given, the model's modules, their training flags, and the identity and
shape of every parameter and buffer the model holds (a tensor that the forward reads from the model rather than
from ``params`` is part of the plan). A model whose forward reads a tensor value into Python (``if x.sum() > 0``,
``.item()``, a data-dependent shape) cannot be traced: that signature runs eagerly from then on, and
:attr:`Plan.eager` says why. Only calls that nothing outside differentiates use a plan (the fast path of
:func:`lrpfunc.attribute`: no ``torch.func`` transform active, no argument requiring grad under grad mode); the others
run eagerly, exact under every transform. A call like the previous one is recognised before any key is built, by
torch's C++ tensor guard over its tensors (:class:`_LastCall`); cached plans do their parameter-only work once per
state of the parameters (:mod:`lrpfunc._fold`).
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from . import _functorch
from ._fold import fold

Tensor = torch.Tensor

__all__ = ["Plan", "cached", "compile", "export"]


#: How many plans (signatures) one function keeps; the oldest goes first.
MAX_PLANS = 32

#: What tracing raises where the eager function would not: a tensor value read into Python (make_fx errors out on
#: ``aten._local_scalar_dense``; data-dependent guards), or an operation it cannot trace.
_UNTRACEABLE = (RuntimeError, NotImplementedError, AssertionError, TypeError)


def _strides(tensor: Tensor) -> tuple[int, ...] | None:
    return tensor.stride() if tensor.layout == torch.strided else None


def _signature(leaf: Any) -> Any:
    if isinstance(leaf, Tensor):
        return ("tensor", tuple(leaf.shape), _strides(leaf), leaf.dtype, leaf.device, leaf.layout)
    if isinstance(leaf, (int, float, bool, str, type(None))):
        return ("value", type(leaf), leaf)
    return ("object", type(leaf), id(leaf))


@dataclass
class Plan:
    """The traced plans of one attribution function, by key (see the module docstring).

    Attributes:
        graphs: Key to the callable that replays the trace (compiled where asked; for :func:`cached`, a
            :class:`lrpfunc._fold.FoldedPlan` where the trace has parameter-only work, whose ``computed`` counts the
            calls that did it); at most :data:`MAX_PLANS`, the oldest dropped first (inputs of ever new shapes trace
            ever again: pad them to a few sizes).
        eager: Key to the reason a signature runs eagerly (its trace read a value into Python).
        traces: How many traces were made; ``hits``: how many calls a plan served; ``misses``: calls run eagerly.
    """

    graphs: dict[Any, Callable[..., Any]] = field(default_factory=dict)
    eager: dict[Any, str] = field(default_factory=dict)
    traces: int = 0
    hits: int = 0
    misses: int = 0


def _simplified(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The traced graph without what a replay that nothing differentiates does not need: ``detach`` (the identity
    there), and constant tensors (``full``: the zeros and ones of stabilizers and masks) made once instead of at
    every call. A node whose value the graph returns, or that an in-place operation writes, stays as it is."""
    graph = graph_module.graph

    def keeps(node: torch.fx.Node) -> bool:
        """Whether the graph returns ``node``'s value or an operation writes into it."""
        for user in node.users:
            schema = getattr(user.target, "_schema", None)
            if user.op == "output" or (schema is not None and schema.is_mutable):
                return True
        return False

    hoisted = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or keeps(node):
            continue
        if node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target is torch.ops.aten.full.default:
            name = f"_constant_{hoisted}"
            hoisted += 1
            graph_module.register_buffer(name, node.target(*node.args, **node.kwargs))
            with graph.inserting_before(node):
                constant = graph.get_attr(name)
            node.replace_all_uses_with(constant)
            graph.erase_node(node)
    graph.lint()
    graph_module.recompile()
    return graph_module


_training = operator.attrgetter("training")


class _ModelState:
    """What of the model a trace depends on besides the arguments, read cheaply on every call: each module's training
    flag and children, and the identity, shape, dtype and device of every parameter and buffer that the call does not
    give in ``params`` (those the trace reads from the model; a given one is an input of the graph, and its signature
    is part of the key already). The modules are listed once and listed again only when a module's children change (a
    module added, removed or replaced); the key then names a new generation of the structure, never an earlier one
    (a new module may reuse the memory, and so the ``id``, of one that is gone)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.generation = 0  # one more each time the modules are listed anew: a key never meets an earlier structure
        self._list()

    def _list(self) -> None:
        named = list(self.model.named_modules())  # a shared module once, under its first name
        self.modules: list[torch.nn.Module] = [module for _, module in named]
        self.child_dicts = [module._modules for module in self.modules]
        self.children = [dict(children) for children in self.child_dicts]  # compared by identity of the modules
        self.generation += 1
        # every parameter and buffer slot by qualified name
        self.slots = [(f"{prefix}.{local}" if prefix else local, tensors, local)
                      for prefix, module in named
                      for tensors in (module._parameters, module._buffers) for local in tensors]
        self.read: dict[tuple[str, ...], list[tuple[dict[str, Any], str]]] = {}

    def key(self, given: tuple[str, ...]) -> tuple[Any, ...]:
        """The state, for a call whose ``params`` has the names ``given``."""
        if not all(map(operator.eq, self.child_dicts, self.children)):  # the structure changed: list the modules anew
            self._list()
        read = self.read.get(given)
        if read is None:  # the slots the call reads from the model
            names = set(given)
            read = self.read[given] = [(tensors, local) for name, tensors, local in self.slots if name not in names]
        try:
            tensors_read = tuple([(id(t), t.shape, t.dtype, t.device) if (t := tensors[local]) is not None else None
                                  for tensors, local in read])
        except KeyError:  # a parameter or buffer was deleted: list anew
            self._list()
            return self.key(given)
        return tuple(map(_training, self.modules)), self.generation, tensors_read


def _tensor_signature(tensor: Tensor) -> tuple[Any, ...]:
    return tensor.shape, _strides(tensor), tensor.dtype, tensor.device, tensor.layout, tensor.requires_grad


def _tensor_check(tensors: Sequence[Tensor]) -> Callable[..., bool]:
    """``check(*others)``: whether ``others`` match ``tensors`` in shape, strides, dtype, device, layout and
    ``requires_grad``. torch's own tensor guard (the C++ check behind :func:`torch.compile`'s guards: 0.1 us a tensor)
    where it can be built, else the same comparison in Python (0.6 us a tensor)."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        # static sizes and strides, one list per tensor (the stubs say one flat list; the constructor wants these)
        sizes: Any = [list(t.shape) for t in tensors]
        strides: Any = [list(t.stride()) for t in tensors]
        guard = TensorGuards(*tensors, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides)
        if guard.check(*tensors):
            return guard.check
    except Exception:  # noqa: BLE001  # a torch without it, or one whose signature changed: compare in Python
        pass
    expected = [_tensor_signature(t) for t in tensors]

    def check(*others: Tensor) -> bool:
        try:
            return [_tensor_signature(t) for t in others] == expected
        except AttributeError:  # not a tensor: no match (the function says what is wrong)
            return False

    return check


@dataclass(frozen=True)
class _LastCall:
    """The previous call that a plan served, checked against the next one before any key is built: the same names,
    argument structure, grad mode and model state, and tensors that match (:func:`_tensor_check`). Most calls repeat
    the previous one's signature; they skip building the key (for a model of 200 parameters, 0.2 ms)."""

    names: tuple[str, ...]
    spec: Any
    others: tuple[Any, ...]
    grad_mode: bool
    state: tuple[Any, ...]
    check: Callable[..., bool]
    count: int
    graph: Callable[..., Any]

    @staticmethod
    def of(params: Mapping[str, Tensor], leaves: list[Any], spec: Any, grad_mode: bool, state: tuple[Any, ...],
           graph: Callable[..., Any]) -> _LastCall:
        tensors, others = _tensors_and_others(params, leaves)
        return _LastCall(tuple(params), spec, others, grad_mode, state, _tensor_check(tensors), len(tensors), graph)

    def match(self, params: Mapping[str, Tensor], x: Any, grad_output: Any,
              model_state: _ModelState) -> Callable[..., Any] | None:
        """The plan if this call has the previous call's signature, else ``None``."""
        if not isinstance(params, dict) or tuple(params) != self.names or torch.is_grad_enabled() != self.grad_mode:
            return None
        arguments: Any = (x, grad_output)
        leaves, spec = optree.tree_flatten(arguments, none_is_leaf=True)
        if spec != self.spec:
            return None
        tensors, others = _tensors_and_others(params, leaves)
        if len(tensors) != self.count or others != self.others or not self.check(*tensors):
            return None
        return self.graph if model_state.key(self.names) == self.state else None


def _tensors_and_others(params: Mapping[str, Tensor], leaves: list[Any]) -> tuple[list[Any], tuple[Any, ...]]:
    """The tensors a call's plan is checked on (the parameters, then the tensor leaves of ``(x, grad_output)``) and
    the signatures of its other leaves."""
    tensors = [*params.values(), *[leaf for leaf in leaves if isinstance(leaf, Tensor)]]
    return tensors, tuple([_signature(leaf) for leaf in leaves if not isinstance(leaf, Tensor)])


def _wrap(fn: Callable[..., Any], model: torch.nn.Module,
          finish: Callable[[torch.fx.GraphModule], Callable[..., Any]]) -> Callable[..., Any]:
    plan = Plan()
    lock = threading.Lock()
    state = _ModelState(model)
    last: _LastCall | None = None
    checks: dict[Any, _LastCall] = {}  # per key: its tensor check is built once (about 0.2 ms for 200 tensors)

    def planned(params: Mapping[str, Tensor], x: Any, grad_output: Any) -> Any:
        nonlocal last
        previous = last
        if previous is not None and not _functorch.transforms_active():
            graph = previous.match(params, x, grad_output, state)
            if graph is not None:
                plan.hits += 1
                return graph(params, x, grad_output)
        try:  # the parameters' signature in one pass (a model has many): shape, strides, dtype, device, layout, ...
            given = tuple([_tensor_signature(t) for t in params.values()])
        except AttributeError:  # not a mapping of tensors: the function says what is wrong
            return fn(params, x, grad_output)
        arguments: Any = (x, grad_output)
        leaves, spec = optree.tree_flatten(arguments, none_is_leaf=True)
        grad_mode = torch.is_grad_enabled()
        outside = _functorch.transforms_active() or (grad_mode and (
            any(signature[5] for signature in given)
            or any(isinstance(t, Tensor) and t.requires_grad for t in leaves)
        ))
        if outside or callable(grad_output):
            plan.misses += 1
            return fn(params, x, grad_output)
        names = tuple(params)
        model_state = state.key(names)
        key = (names, given, spec, tuple([_signature(leaf) for leaf in leaves]), grad_mode, model_state)
        graph = plan.graphs.get(key)
        if graph is None:
            if key in plan.eager:
                plan.misses += 1
                return fn(params, x, grad_output)
            with lock:
                graph = plan.graphs.get(key)
                if graph is None:
                    try:
                        traced = make_fx(fn)(params, x, grad_output)
                    except _UNTRACEABLE as error:  # a value read into Python, or an operation make_fx cannot trace
                        plan.eager[key] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                        plan.misses += 1
                        return fn(params, x, grad_output)
                    plan.traces += 1
                    if len(plan.graphs) >= MAX_PLANS:  # varying shapes: keep the newest plans only
                        oldest = next(iter(plan.graphs))
                        del plan.graphs[oldest]
                        checks.pop(oldest, None)
                    graph = plan.graphs[key] = finish(_simplified(traced))
        plan.hits += 1
        last = checks.get(key)
        if last is None:
            last = checks[key] = _LastCall.of(params, leaves, spec, grad_mode, model_state, graph)
        return graph(params, x, grad_output)

    planned.plan = plan  # type: ignore[attr-defined]
    return planned


def _model_of(where: str, fn: Any, model: torch.nn.Module | None = None) -> torch.nn.Module:
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(fn):
            raise TypeError(f"{where}: expected a function of (params, x, grad_output), got {type(fn).__name__}")
        return model
    found = getattr(fn, "model", None)
    if not isinstance(found, torch.nn.Module):
        raise TypeError(
            f"{where}: expected a function made by lrpfunc.attribute (or attribute_layers, ...), got "
            f"{type(fn).__name__}{' without its model' if callable(fn) else ''}; for a function built on one (an "
            f"explanation-guided training step), pass model="
        )
    return found


def cached(fn: Callable[..., Any], *, model: torch.nn.Module | None = None,
           hold_parameter_work: bool = True) -> Callable[..., Any]:
    """``fn`` (from :func:`lrpfunc.attribute`) with its calls traced once per signature and replayed.

    Definition:
        The first call with a new key (see the module docstring) traces ``fn`` with ``make_fx`` into a graph of aten
        operations; later calls with that key run the graph with their ``params``, ``x`` and ``grad_output``: the
        same operations as eager ``fn`` on the same path, without tracing the model in Python again. Calls that
        something outside differentiates, calls with a callable ``grad_output``, and signatures whose trace read a
        value into Python run ``fn`` itself. ``cached(fn).plan`` counts traces, hits and misses and says why a
        signature runs eagerly.

        Any function of ``(params, x, grad_output)`` built on an attribution of ``model`` and on ``torch.func``
        transforms of it is traced the same way when ``model=`` names the model: an explanation-guided training step
        ``torch.func.grad(loss)`` becomes one graph of the forward pass, the modified backward pass and its
        derivative (the transform is traced, not run around the plan).

        What a plan computes from the parameters alone (a BatchNorm merged into the weight before it, the positive
        part of a z+ rule's weights) is computed again only when a parameter it reads is another tensor than in the
        previous call or was written to since, and is held in between: heatmaps over a dataset with the same
        parameters do that work once. It holds about the size of the modified weights (ResNet-18 with
        EpsilonPlusFlat: 44.6 MiB, the size of its parameters); ``hold_parameter_work=False`` computes it on every
        call instead and holds nothing.

    Raises:
        TypeError: ``fn`` is not an attribution function of this package and no ``model`` is given.

    Example:
        >>> fast = lrpfunc.cached(lrpfunc.attribute(model, composites.epsilon_plus()))
        >>> for x, y in loader:
        ...     _, relevance = fast(params, x, torch.nn.functional.one_hot(y, 10).to(x))
        >>> step = lrpfunc.compile(lambda p, x, g: torch.func.grad(lambda p: loss(fn(p, x, g)[1]))(p), model=model)
    """
    return _wrap(fn, _model_of("cached", fn, model), fold if hold_parameter_work else lambda graph: graph)


def compile(  # noqa: A001
    fn: Callable[..., Any], *, model: torch.nn.Module | None = None, **options: Any
) -> Callable[..., Any]:
    """:func:`cached`, with each traced graph compiled by ``torch.compile(graph, **options)`` (e.g.
    ``mode="reduce-overhead"`` for CUDA graphs on a GPU). Compilation happens on the first call of each signature;
    the compiled plan gives the eager result to float rounding (inductor may fuse and reorder arithmetic). ``model``:
    as for :func:`cached` (a training step built on an attribution).

    With inductor and no ``mode``, the compiled code does not assert its inputs' sizes and strides again
    (``options={"size_asserts": False}`` unless ``options`` says otherwise): the plan's key holds them, and the
    compiled function's guards check them before every call. On a 100-layer MLP the asserts were a third of the
    compiled call.

    Raises:
        TypeError: ``fn`` is not an attribution function of this package and no ``model`` is given.
    """
    if options.get("mode") is None and options.get("backend", "inductor") == "inductor":
        options = {**options, "options": {"size_asserts": False, **(options.get("options") or {})}}
    return _wrap(fn, _model_of("compile", fn, model), lambda graph: torch.compile(graph, **options))


class _Explainer(torch.nn.Module):
    """The traced attribution with its parameters as buffers: ``(x, grad_output) -> (output, relevance)``."""

    def __init__(self, graph: torch.fx.GraphModule, params: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.graph = graph
        self.names = list(params)
        for index, value in enumerate(params.values()):
            self.register_buffer(f"param_{index}", value.detach())

    def forward(self, x: Any, grad_output: Any) -> Any:
        params = {name: getattr(self, f"param_{index}") for index, name in enumerate(self.names)}
        return self.graph(params, x, grad_output)


def export(fn: Callable[..., tuple[Any, Any]], params: Mapping[str, Tensor], x: Any, grad_output: Any,
           **options: Any) -> torch.export.ExportedProgram:
    """An explainer for deployment: the attribution ``fn`` (from :func:`lrpfunc.attribute`) with ``params`` fixed, as
    a :class:`torch.export.ExportedProgram` of ``(x, grad_output) -> (output, relevance)``.

    Definition:
        ``fn`` is traced on the example ``(params, x, grad_output)`` with symbolic sizes, its parameters and the
        model's buffers become the program's buffers, and :func:`torch.export.export` exports it with ``options``
        (``dynamic_shapes=...`` for other batch sizes). ``torch.export.save(program, path)`` writes it;
        ``torch.export.load(path).module()(x, grad_output)`` gives the relevance without lrpfunc, its model class or
        Python tracing.

    Raises:
        TypeError: ``fn`` is not an attribution function of this package.
        RuntimeError: The forward reads a tensor value into Python (it cannot be traced), or the export fails.
    """
    model = _model_of("export", fn)
    # the buffers too, so that every tensor the trace reads is an input (traced with symbolic sizes)
    tensors = (*model.named_buffers(), *params.items())
    detached = {name: value.detach() for name, value in tensors}
    graph = make_fx(fn, tracing_mode="symbolic")(detached, x, grad_output)  # the sizes as symbols
    return torch.export.export(_Explainer(graph, detached), (x, grad_output), **options)

