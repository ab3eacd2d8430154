"""Record a forward pass without touching the model.

The tracer is a :class:`torch.overrides.TorchFunctionMode`: every torch function or tensor method that the
model's forward calls passes through :meth:`Tracer.__torch_function__`, which

* substitutes the caller's parameters for the module's own (what :func:`torch.func.functional_call`
  does, but without writing to the module, so concurrent calls from several threads cannot interfere),
* runs operations that read an activation under :func:`torch.func.vjp`, keeping the true pullback,
* runs in-place operations out of place and lets later reads of the mutated tensor see the new value,
* records the operation so that rules can replay it with modified inputs or parameters.

Module calls are delimited by process-wide forward hooks that do nothing unless the calling thread is
tracing; they are installed only while at least one trace is running and never on the user's modules.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module_globals
from torch.overrides import TorchFunctionMode

from ._record import OpNode, Record, Ref, Span

__all__ = ["trace"]

Tensor = torch.Tensor

#: Functions that only read metadata: never recorded.
_METADATA: frozenset[Any] = frozenset(
    {
        Tensor.shape.__get__,
        Tensor.size,
        Tensor.dim,
        Tensor.ndim.__get__,
        Tensor.numel,
        Tensor.dtype.__get__,
        Tensor.device.__get__,
        Tensor.is_floating_point,
        Tensor.is_complex,
        Tensor.requires_grad.__get__,
        Tensor.__len__,
        Tensor.stride,
        Tensor.is_contiguous,
        Tensor.layout.__get__,
    }
)

#: Operations whose result may share memory with their first input.
_VIEW_OPS = frozenset(
    {
        "getitem", "view", "view_as", "t", "T", "mT", "H", "mH", "transpose", "permute", "narrow", "select",
        "unsqueeze", "squeeze", "expand", "expand_as", "as_strided", "diagonal", "unflatten", "flatten",
        "reshape", "reshape_as", "split", "chunk", "unbind", "movedim", "moveaxis", "swapaxes", "swapdims",
        "unfold", "real", "imag", "detach", "alias", "tensor_split", "hsplit", "vsplit", "dsplit",
    }
)

_FLOAT = object()
_OTHER = object()

_state = threading.local()
_hook_lock = threading.Lock()
_hook_users = 0
_hook_handles: tuple[Any, ...] = ()


def _pre_hook(module: torch.nn.Module, args: Any) -> None:
    tracer = getattr(_state, "tracer", None)
    if tracer is not None:
        tracer.enter_module(module)


def _post_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
    tracer = getattr(_state, "tracer", None)
    if tracer is not None:
        tracer.exit_module(module, output)


@contextmanager
def _module_call_hooks() -> Iterator[None]:
    """Install the process-wide module hooks while at least one trace runs."""
    global _hook_users, _hook_handles
    with _hook_lock:
        if _hook_users == 0:
            _hook_handles = (
                _module_globals.register_module_forward_pre_hook(_pre_hook),
                _module_globals.register_module_forward_hook(_post_hook, always_call=True),
            )
        _hook_users += 1
    try:
        yield
    finally:
        with _hook_lock:
            _hook_users -= 1
            if _hook_users == 0:
                for handle in _hook_handles:
                    handle.remove()
                _hook_handles = ()


def _is_float(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _op_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name.strip("_") or name


def _clone_then(func: Callable[..., Any]) -> Callable[..., Any]:
    """Out-of-place version of an in-place ``func``: mutate a clone of the first argument instead."""

    def out_of_place(target: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        clone = target.clone()
        func(clone, *args, **kwargs)
        return clone

    out_of_place.__name__ = getattr(func, "__name__", "inplace").strip("_")
    return out_of_place


def _out_of_place(func: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[Callable[..., Any], bool, bool]:
    """Return ``(function, mutates_first_argument, returns_none)`` for the out-of-place version of ``func``."""
    if kwargs.get("inplace") is True:
        kwargs["inplace"] = False
        return func, True, False
    name = getattr(func, "__name__", "")
    if name == "__setitem__":
        return _clone_then(func), True, True
    if name.endswith("_") and not name.endswith("__"):
        counterpart = getattr(Tensor, name[:-1], None)
        if callable(counterpart):
            return counterpart, True, False
        return _clone_then(func), True, False
    return func, False, False


def model_tensors(model: torch.nn.Module, params: Mapping[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, module's tensor, tensor to use)`` for every parameter and buffer of ``model``: the caller's
    tensor under any of the tensor's (tied) names, else the module's own."""
    names_of: dict[int, tuple[Tensor, list[str]]] = {}
    for name, tensor in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        names_of.setdefault(id(tensor), (tensor, []))[1].append(name)
    result = []
    for tensor, names in names_of.values():
        given = {id(params[name]): (name, params[name]) for name in names if name in params}
        if len(given) > 1:
            raise ValueError(
                f"params gives different tensors for the tied names {', '.join(repr(n) for n in names)}, "
                f"which are one tensor in the model; give one of them"
            )
        name, value = next(iter(given.values()), (names[0], tensor))
        result.append((name, tensor, value))
    return result


class Substitution(TorchFunctionMode):
    """Runs a forward pass with the caller's parameters in place of the module's, without recording and
    without writing to the module (what ``torch.func.functional_call`` does by swapping attributes)."""

    def __init__(self, model: torch.nn.Module, params: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.substitute = {id(tensor): value for _, tensor, value in model_tensors(model, params) if value is not tensor}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        substitute = self.substitute
        leaves, spec = optree.tree_flatten((tuple(args), dict(kwargs or {})), none_is_leaf=True)
        if any(isinstance(leaf, Tensor) and id(leaf) in substitute for leaf in leaves):
            leaves = [substitute.get(id(leaf), leaf) if isinstance(leaf, Tensor) else leaf for leaf in leaves]
            args, kwargs = optree.tree_unflatten(spec, leaves)
        return func(*args, **(kwargs or {}))


def evaluate(model: torch.nn.Module, params: Mapping[str, Tensor], x: Any) -> Any:
    """``model(x)`` with ``params``; thread-safe, never touches the module."""
    with Substitution(model, params):
        return call_model(model, x)


def _without_running_stat_updates(func: Callable[..., Any]) -> Callable[..., Any]:
    """``F.batch_norm``/``F.instance_norm`` that update clones of the running statistics, not the module's."""
    signature = inspect.signature(func)

    def normalize(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        for name in ("running_mean", "running_var"):
            value = bound.arguments.get(name)
            if isinstance(value, Tensor):
                bound.arguments[name] = value.clone()
        return func(*bound.args, **bound.kwargs)

    normalize.__name__ = func.__name__
    return normalize


_NORMALIZATIONS_WITH_RUNNING_STATS = {
    F.batch_norm: _without_running_stat_updates(F.batch_norm),
    F.instance_norm: _without_running_stat_updates(F.instance_norm),
}


class Tracer(TorchFunctionMode):
    """Records one forward pass of ``model`` with the caller's ``params``."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: Mapping[str, Tensor],
        replace_op: Sequence[Callable[[Callable[..., Any]], Callable[..., Any] | None]] = (),
    ) -> None:
        super().__init__()
        self.nodes: list[OpNode] = []
        self.spans: list[Span] = []
        self.stack: list[int] = []
        self.first_vid: list[int] = []
        self.values: dict[int, tuple[Tensor, int]] = {}
        self.tensors: dict[int, Tensor] = {}
        self.activations: set[int] = set()
        self.param_names: dict[int, str] = {}
        self.substitute: dict[int, Tensor] = {}
        self.keep_alive: list[Tensor] = []
        self.replace_op = tuple(replace_op)
        self.module_names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.module_names.setdefault(id(module), name)
        self.call_counts: dict[int, int] = {}
        self.grad_enabled = torch.is_grad_enabled()
        self.view_base: dict[int, int] = {}
        self.stale: dict[int, str] = {}
        for name, tensor, value in model_tensors(model, params):
            if value is not tensor:
                self.substitute[id(tensor)] = value
            if id(value) not in self.values:
                self.param_names[self.register(value, activation=False)] = name

    # values ------------------------------------------------------------------------------------------------
    def register(self, tensor: Tensor, *, activation: bool) -> int:
        vid = len(self.tensors)
        self.tensors[vid] = tensor
        self.values[id(tensor)] = (tensor, vid)
        if activation:
            self.activations.add(vid)
        return vid

    def resolve(self, tensor: Tensor) -> Tensor:
        """The tensor to use for ``tensor``: the caller's parameter, or the latest value after in-place ops."""
        substitute = self.substitute.get(id(tensor))
        while substitute is not None:
            tensor = substitute
            substitute = self.substitute.get(id(tensor))
        return tensor

    def vid_of(self, tensor: Tensor) -> int | None:
        entry = self.values.get(id(self.resolve(tensor)))
        return None if entry is None else entry[1]

    # module calls ------------------------------------------------------------------------------------------
    def enter_module(self, module: torch.nn.Module) -> None:
        key = id(module)
        index = self.call_counts.get(key, 0)
        self.call_counts[key] = index + 1
        name = self.module_names.get(key, f"<{type(module).__name__}>")
        params = {}
        for local, tensor in module.named_parameters():
            vid = self.vid_of(tensor)
            if vid is not None:
                params[local] = vid
        sid = len(self.spans)
        self.spans.append(
            Span(sid, name, module, index, params, parent=self.stack[-1] if self.stack else None)
        )
        self.stack.append(sid)
        self.first_vid.append(len(self.tensors))

    def exit_module(self, module: torch.nn.Module, output: Any) -> None:
        if not self.stack or self.spans[self.stack[-1]].module is not module:
            return
        span = self.spans[self.stack.pop()]
        first = self.first_vid.pop()
        inputs: dict[int, None] = {}
        for index in span.nodes:
            for vid in self.nodes[index].inputs:
                if vid < first:
                    inputs[vid] = None
        span.inputs = tuple(inputs)
        outputs = []
        for leaf in optree.tree_leaves(output, none_is_leaf=True):
            if isinstance(leaf, Tensor):
                vid = self.vid_of(leaf)
                if vid is not None and vid in self.activations:
                    outputs.append(vid)
        span.outputs = tuple(outputs)

    # operations --------------------------------------------------------------------------------------------
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        given_kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **given_kwargs)
        kwargs = dict(given_kwargs)
        fn, mutates, returns_none = _out_of_place(func, kwargs)
        fn = _NORMALIZATIONS_WITH_RUNNING_STATS.get(fn, fn)
        leaves, spec = optree.tree_flatten((tuple(args), kwargs), none_is_leaf=True)
        # torch.no_grad() inside the forward: what it computes is a constant, as for autograd
        constant = self.grad_enabled and not torch.is_grad_enabled()
        recorded = False
        act_positions: list[int] = []
        act_vids: list[int] = []
        template = list(leaves)
        for position, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                leaf = self.resolve(leaf)
                leaves[position] = leaf
                entry = self.values.get(id(leaf))
                if entry is None:
                    continue
                recorded = True
                vid = entry[1]
                if vid in self.stale:
                    raise NotImplementedError(self.stale[vid])
                template[position] = Ref(vid)
                if vid in self.activations and _is_float(leaf) and not constant:
                    act_positions.append(position)
                    act_vids.append(vid)
        if not recorded:  # nothing the record knows: run it as the model wrote it (in place included)
            return func(*args, **given_kwargs)
        for replace in self.replace_op:
            replacement = replace(fn)
            if replacement is not None:
                fn = replacement
                break

        out_shape: list[Any] = []

        def run(*activations: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
            current = list(leaves)
            for position, activation in zip(act_positions, activations):
                current[position] = activation
            call_args, call_kwargs = optree.tree_unflatten(spec, current)
            result = fn(*call_args, **call_kwargs)
            result_leaves, result_spec = optree.tree_flatten(result, none_is_leaf=True)
            floats, others, kinds = [], [], []
            for leaf in result_leaves:
                if isinstance(leaf, Tensor):
                    (floats if _is_float(leaf) else others).append(leaf)
                    kinds.append(_FLOAT if _is_float(leaf) else _OTHER)
                else:
                    kinds.append(leaf)
            out_shape[:] = [result_spec, kinds, bool(floats)]
            return tuple(floats) or (torch.zeros(()),), tuple(others)

        if act_positions:
            floats, pullback, others = torch.func.vjp(
                run, *(leaves[p] for p in act_positions), has_aux=True
            )
            result_spec, kinds, has_floats = out_shape
            if not has_floats:
                floats, pullback = (), None
        else:
            floats, others = run()
            result_spec, kinds, _ = out_shape
            floats = floats if _any_float(kinds) else ()
            pullback = None

        floats_iter, others_iter = iter(floats), iter(others)
        result_leaves, output_leaves, output_vids = [], [], []
        for kind in kinds:
            if kind is _FLOAT or kind is _OTHER:
                tensor = next(floats_iter) if kind is _FLOAT else next(others_iter)
                vid = self.register(tensor, activation=kind is _FLOAT and pullback is not None)
                result_leaves.append(tensor)
                output_leaves.append(Ref(vid))
                if kind is _FLOAT and pullback is not None:
                    output_vids.append(vid)
            else:
                result_leaves.append(kind)
                output_leaves.append(kind)
        node = OpNode(
            func=func,
            fn=fn,
            name=_op_name(func),
            leaves=template,
            spec=spec,
            inputs=tuple(act_vids),
            outputs=tuple(output_vids),
            output_leaves=output_leaves,
            pullback=pullback,
            spans=tuple(self.stack),
        )
        index = len(self.nodes)
        self.nodes.append(node)
        for sid in self.stack:
            self.spans[sid].nodes.append(index)
        result = optree.tree_unflatten(result_spec, result_leaves)
        if act_vids and node.name in _VIEW_OPS:
            for vid in output_vids:
                self.view_base[vid] = act_vids[0]
        if mutates and isinstance(leaves[0], Tensor):
            target = leaves[0]
            self._mark_bases_stale(target, node.name)
            self.keep_alive.append(target)
            self.substitute[id(target)] = result
            return None if returns_none else result
        return result

    def _mark_bases_stale(self, target: Tensor, op: str) -> None:
        """An in-place write into a view changes its base, which a record of values cannot follow."""
        entry = self.values.get(id(target))
        vid = None if entry is None else entry[1]
        where = self.spans[self.stack[-1]].name if self.stack else ""
        while vid is not None and vid in self.view_base:
            vid = self.view_base[vid]
            self.stale[vid] = (
                f"attribute: the in-place operation {op} in '{where or 'the model'}' wrote into a view "
                f"of an activation that is read afterwards; lrpfunc records values, not memory, so write it out "
                f"of place (e.g. torch.cat, torch.where or index_put instead of slicing assignment)"
            )

    def record(self, input_ids: list[int], output: Any, output_ids: list[int | None]) -> Record:
        return Record(
            nodes=self.nodes,
            spans=self.spans,
            tensors=self.tensors,
            activations=self.activations,
            param_names=self.param_names,
            input_ids=input_ids,
            output=output,
            output_ids=output_ids,
        )


def _any_float(kinds: list[Any]) -> bool:
    return any(kind is _FLOAT for kind in kinds)


def call_model(model: torch.nn.Module, x: Any) -> Any:
    """Call ``model`` with ``x``: a tuple is spread over positional arguments, a dict over keywords."""
    if isinstance(x, tuple):
        return model(*x)
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def trace(
    model: torch.nn.Module,
    params: Mapping[str, Tensor],
    x: Any,
    replace_op: Sequence[Callable[[Callable[..., Any]], Callable[..., Any] | None]] = (),
) -> Record:
    """Run ``model`` on ``x`` with ``params`` and return the :class:`Record` of the forward pass."""
    tracer = Tracer(model, params, replace_op)
    leaves, spec = optree.tree_flatten(x, none_is_leaf=True)
    seen: set[int] = set()
    for index, leaf in enumerate(leaves):
        if id(leaf) in seen:  # the same tensor passed twice is two inputs, as for torch.func.vjp
            leaves[index] = leaf.view_as(leaf)
        seen.add(id(leaf))
    x = optree.tree_unflatten(spec, leaves)
    input_ids = [tracer.register(leaf, activation=_is_float(leaf)) for leaf in leaves]
    previous = getattr(_state, "tracer", None)
    with _module_call_hooks():
        _state.tracer = tracer
        try:
            with tracer:
                output = call_model(model, x)
        finally:
            _state.tracer = previous
    output = optree.tree_map(
        lambda leaf: tracer.resolve(leaf) if isinstance(leaf, Tensor) else leaf, output, none_is_leaf=True
    )
    output_ids = [
        tracer.vid_of(leaf) if isinstance(leaf, Tensor) else None
        for leaf in optree.tree_leaves(output, none_is_leaf=True)
    ]
    for vid in output_ids:
        if vid in tracer.stale:
            raise NotImplementedError(tracer.stale[vid])
    return tracer.record(input_ids, output, output_ids)
