"""In-place operations, functionalized in one place for every tape: what each torch function does to its first
argument (mutates it, returns a view of it), its out-of-place counterpart, and :class:`Substitution`, the forward pass
with the caller's parameters and in-place writes run out of place (``functional_call`` semantics without writing to
the module)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._model import ModelInfo, call_model, model_tensors
from ._record import flatten_call, tensor_leaves, unflatten_call

Tensor = torch.Tensor


#: Functions that only read metadata: never recorded.
METADATA: frozenset[Any] = frozenset(
    {
        Tensor.shape.__get__,  # type: ignore[attr-defined]
        Tensor.size,
        Tensor.dim,
        Tensor.ndim.__get__,  # type: ignore[attr-defined]
        Tensor.numel,
        Tensor.dtype.__get__,  # type: ignore[attr-defined]
        Tensor.device.__get__,
        Tensor.is_floating_point,
        Tensor.is_complex,
        Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
        Tensor.__len__,
        Tensor.stride,
        Tensor.is_contiguous,
        Tensor.layout.__get__,  # type: ignore[attr-defined]
        Tensor.data_ptr,
        Tensor.element_size,
        Tensor.nelement,
        Tensor.get_device,
        Tensor.is_cuda.__get__,  # type: ignore[attr-defined]
        Tensor.__format__,
        Tensor.__repr__,
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


def is_float(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


OP_NAMES: dict[Any, str] = {}


def op_name_of(func: Callable[..., Any]) -> str:
    found = OP_NAMES[func] = op_name(func)
    return found


def op_name(func: Callable[..., Any]) -> str:
    """A short name of a torch function or method, e.g. ``"add"`` for ``Tensor.add_``."""
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


def _out_of_place_of(func: Callable[..., Any]) -> tuple[Callable[..., Any], bool, bool]:
    """``(function, mutates_first_argument, returns_none)`` for the out-of-place version of ``func`` (cached by
    :func:`op_facts`)."""
    name = getattr(func, "__name__", "")
    if name == "__setitem__":
        known = (_clone_then(func), True, True)
    elif name.endswith("_") and not name.endswith("__"):
        counterpart = getattr(Tensor, name[:-1], None)
        known = (counterpart, True, False) if callable(counterpart) else (_clone_then(func), True, False)
    elif name in ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "__iand__", "__ior__"):
        counterpart = getattr(Tensor, "__" + name[3:], None)
        known = (counterpart, True, False) if callable(counterpart) else (_clone_then(func), True, False)
    else:
        known = (func, False, False)
    return known


#: Per function: ``(function to run, mutates its first argument, returns None, returns a view of its first
#: argument)``, without the ``inplace=True`` keyword (handled per call).
FACTS: dict[Any, tuple[Callable[..., Any], bool, bool, bool]] = {}


def op_facts(func: Callable[..., Any]) -> tuple[Callable[..., Any], bool, bool, bool]:
    fn, mutates, returns_none = _out_of_place_of(func)
    fn = _NORMALIZATIONS_WITH_RUNNING_STATS.get(fn, fn)
    fn = _EMBEDDING_BAGS.get(fn, fn)
    found = FACTS[func] = (fn, mutates, returns_none, op_name(func) in _VIEW_OPS)
    return found


def _without_running_stat_updates(func: Callable[..., Any]) -> Callable[..., Any]:
    """``F.batch_norm``/``F.instance_norm`` that update clones of the running statistics, not the module's."""
    signature = inspect.signature(func)

    def normalize(*args: Any, **kwargs: Any) -> Any:
        training = args[5] if len(args) > 5 else kwargs.get("training", kwargs.get("use_input_stats", False))
        if func is F.instance_norm:
            training = args[5] if len(args) > 5 else kwargs.get("use_input_stats", True)
        if not training:  # running statistics are only read
            return func(*args, **kwargs)
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


_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


def _aten_embedding_bag(weight: Tensor, indices: Tensor, offsets: Tensor, scale_grad_by_freq: bool = False,
                        mode: int = 0, sparse: bool = False, per_sample_weights: Tensor | None = None,
                        include_last_offset: bool = False, padding_idx: int | None = None) -> tuple[Tensor, ...]:
    """``torch.embedding_bag`` always through ``aten._embedding_bag``: under a ``torch.func`` grad level a weight
    that requires grad outside it takes the forward-only kernel, whose integer outputs autograd then refuses
    ("Autograd not support dtype: Long")."""
    if padding_idx is None:
        padding_idx = -1
    elif -weight.size(0) <= padding_idx < 0:
        padding_idx += weight.size(0)
    return torch.ops.aten._embedding_bag(weight, indices, offsets, scale_grad_by_freq, mode, sparse,
                                         per_sample_weights, include_last_offset, padding_idx)


def _functional_embedding_bag(input: Tensor, weight: Tensor, offsets: Tensor | None = None,  # noqa: A002
                              max_norm: float | None = None, norm_type: float = 2, scale_grad_by_freq: bool = False,
                              mode: str = "mean", sparse: bool = False, per_sample_weights: Tensor | None = None,
                              include_last_offset: bool = False, padding_idx: int | None = None) -> Tensor:
    """``F.embedding_bag`` through :func:`_aten_embedding_bag` for the plain 1-D and 2-D cases; anything else (and
    every invalid call, for its error) goes to ``F.embedding_bag`` itself."""
    common = (max_norm is None and mode in _BAG_MODES and input.dim() in (1, 2) and not input.is_nested
              and not input.is_floating_point() and weight.dim() == 2
              and (per_sample_weights is None or (mode == "sum" and per_sample_weights.shape == input.shape))
              and (input.dim() == 2) == (offsets is None))
    if not common:
        return F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                               per_sample_weights, include_last_offset, padding_idx)
    if input.dim() == 2:
        offsets = torch.arange(0, input.numel(), input.size(1), dtype=input.dtype, device=input.device)
        include_last_offset = False
        input = input.reshape(-1)  # noqa: A001
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    return _aten_embedding_bag(weight, input, offsets, scale_grad_by_freq, _BAG_MODES[mode], sparse,  # type: ignore[arg-type]
                               per_sample_weights, include_last_offset, padding_idx)[0]


_functional_embedding_bag.__name__ = "embedding_bag"


_aten_embedding_bag.__name__ = "embedding_bag"


_EMBEDDING_BAGS: dict[Any, Callable[..., Any]] = {
    F.embedding_bag: _functional_embedding_bag, torch.embedding_bag: _aten_embedding_bag
}


class Substitution(TorchFunctionMode):
    """Runs a forward pass with the caller's parameters in place of the module's, without recording and without
    writing to the module or to any tensor it did not create (what ``torch.func.functional_call`` does by swapping
    attributes, plus the tracer's treatment of in-place operations: they run out of place, later reads see the new
    value, and an in-place write into a view of a tensor that is read afterwards is refused)."""

    def __init__(self, info: ModelInfo, params: Mapping[str, Tensor], replace: Callable[[Any], Any] | None = None,
                 *, detach: bool = False) -> None:
        super().__init__()
        self.substitute = {
            id(tensor): (value.detach() if detach else value)
            for _, tensor, value in model_tensors(info, params)
            if value is not tensor or detach
        }
        self.replace = replace
        self.info = info
        self.view_base: dict[int, int] = {}
        self.views_of: dict[int, list[int]] = {}
        self.stale: dict[int, str] = {}
        self.keep_alive: list[Any] = []

    def resolve(self, tensor: Tensor) -> Tensor:
        substitute = self.substitute.get(id(tensor))
        while substitute is not None and substitute is not tensor:
            tensor = substitute
            substitute = self.substitute.get(id(tensor))
        return tensor

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        if func in METADATA:
            return func(*args, **(kwargs or {}))
        facts = FACTS.get(func)
        fn, mutates, returns_none, is_view = facts if facts is not None else op_facts(func)
        changed = fn is not func
        if kwargs:
            if kwargs.get("inplace") is True:
                kwargs = {**kwargs, "inplace": False}
                mutates = changed = True
        else:
            kwargs = {}
        leaves, spec = flatten_call(args, kwargs)
        substitute, stale = self.substitute, self.stale
        for position, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                if id(leaf) in substitute:
                    leaf = leaves[position] = self.resolve(leaf)
                    changed = True
                elif type(leaf) is torch.nn.Parameter:
                    self.info.check_tensor(leaf)
                if stale and id(leaf) in stale:
                    raise NotImplementedError(stale[id(leaf)])
        if self.replace is not None:
            fn = self.replace(fn)
        if changed:
            args, kwargs = unflatten_call(spec, leaves)
        result = fn(*args, **kwargs)
        first = leaves[0] if leaves else None
        if is_view and isinstance(first, Tensor):
            for out in tensor_leaves(result):
                self.view_base[id(out)] = id(first)
                self.views_of.setdefault(id(first), []).append(id(out))
                self.keep_alive.append(out)
            self.keep_alive.append(first)
        if mutates and isinstance(first, Tensor):
            if result is not first and isinstance(result, Tensor):
                base = self.view_base.get(id(first))
                while base is not None:
                    self.stale[base] = stale_message(op_name(func), "the model")
                    base = self.view_base.get(base)
                views = list(self.views_of.get(id(first), ()))
                while views:  # views taken before the write would see it in eager torch
                    view = views.pop()
                    self.stale[view] = stale_view_message(op_name(func), "the model")
                    views.extend(self.views_of.get(view, ()))
                self.keep_alive.append(first)
                substitute[id(first)] = result
            return None if returns_none else result
        return result


def stale_message(op: str, where: str) -> str:
    return (
        f"attribute: the in-place operation {op} in '{where}' wrote into a view of an activation that is read "
        f"afterwards; lrpfunc records values, not memory, so write it out of place (e.g. torch.cat, torch.where or "
        f"index_put instead of slicing assignment)"
    )


def stale_view_message(op: str, where: str) -> str:
    return (
        f"attribute: the in-place operation {op} in '{where}' wrote into an activation with a view taken before it "
        f"that is read afterwards (in eager torch the view sees the write); lrpfunc records values, not memory, so "
        f"take the view after the write or write out of place"
    )


def evaluate(model: torch.nn.Module, params: Mapping[str, Tensor], x: Any, info: ModelInfo | None = None) -> Any:
    """``model(x)`` with ``params``; thread-safe, never touches the module."""
    info = info or ModelInfo(model)
    with Substitution(info, params):
        return call_model(model, x, info)
