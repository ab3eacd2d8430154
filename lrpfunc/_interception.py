"""How the tracer sees a forward pass besides torch functions: process-wide patches of ``torch.nn.Module.__call__``
(module calls), ``torch.autograd.Function.apply`` (custom autograd functions, recorded as one operation) and of
``torch.utils.checkpoint`` (its function runs directly), installed while at least one thread traces and doing nothing
unless the calling thread is the one tracing. A ``torch.compile``'d module runs the module it wraps."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.utils.checkpoint as _checkpoint

from ._record import tensor_leaves

if TYPE_CHECKING:
    from ._trace import Tracer

Tensor = torch.Tensor


_state = threading.local()


_patch_lock = threading.Lock()


_patch_users = 0


MODULE_CALL = torch.nn.Module.__call__


#: ``torch.autograd.Function.apply`` as torch defines it: a Python classmethod up to torch 2.13, a classmethod of the C
#: base class from 2.14 on. Called through the descriptor protocol and restored as found, so both work.
_APPLY_OWNED = "apply" in torch.autograd.Function.__dict__


_APPLY_DESCRIPTOR = inspect.getattr_static(torch.autograd.Function, "apply")


def _FUNCTION_APPLY(cls: type, *args: Any, **kwargs: Any) -> Any:
    """The original ``cls.apply(*args, **kwargs)``."""
    return _APPLY_DESCRIPTOR.__get__(None, cls)(*args, **kwargs)


#: The generator that ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` runs around the function (renamed with
#: a different signature in torch 2.14; the patch forwards whatever it gets).
_CHECKPOINT_GENERATOR_NAME = next(
    name for name in ("_checkpoint_without_reentrant_generator_impl", "_checkpoint_without_reentrant_generator")
    if hasattr(_checkpoint, name)
)


_CHECKPOINT_GENERATOR = getattr(_checkpoint, _CHECKPOINT_GENERATOR_NAME)


_CHECKPOINT_APPLY = _checkpoint.CheckpointFunction.__dict__.get("apply")


def _traced_module_call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    tracer = getattr(_state, "tracer", None)
    if tracer is None:
        if getattr(_state, "eager", 0):
            module = _uncompiled(module)
        return MODULE_CALL(module, *args, **kwargs)
    return tracer.module_call(_uncompiled(module), args, kwargs)


def _uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module that a ``torch.compile``'d module (dynamo's ``OptimizedModule``) wraps: the record is made of
    eager operations, and a compiled graph would run under the tracer's grad level as one opaque call."""
    while type(module).__name__ == "OptimizedModule":
        original = getattr(module, "_orig_mod", None)
        if not isinstance(original, torch.nn.Module):
            break
        module = original
    return module


def _eager() -> bool:
    return getattr(_state, "tracer", None) is not None or bool(getattr(_state, "eager", 0))


def _inline_checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[None]:
    """``torch.utils.checkpoint``'s non-reentrant set-up and tear-down around the checkpointed function, skipped in a
    thread that records or differentiates a forward pass (its saved-tensor hooks fail under ``torch.func``, and what is
    recomputed in the backward pass is the same function)."""
    if _eager():
        yield
        return
    yield from _CHECKPOINT_GENERATOR(fn, *args, **kwargs)


def _inline_checkpoint_apply(cls: type, function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
    """``CheckpointFunction.apply`` (the reentrant checkpoint), which runs ``function`` directly in such a thread (it
    is an autograd function that ``torch.func`` cannot differentiate)."""
    if _eager():
        return function(*args)
    return _traced_apply(cls, function, preserve_rng_state, *args)


class FunctionApply:
    """``cls.apply`` of a :class:`torch.autograd.Function` subclass as one recorded operation."""

    _cache: ClassVar[dict[type, FunctionApply]] = {}

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        #: Whether torch.func can differentiate it (the setup_context style).
        self.functional = getattr(cls, "setup_context", None) is not getattr(
            torch.autograd.function._SingleLevelFunction, "setup_context", None
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _FUNCTION_APPLY(self.cls, *args, **kwargs)

    @classmethod
    def of(cls, function: type) -> FunctionApply:
        found = cls._cache.get(function)
        if found is None:
            found = cls._cache[function] = cls(function)
        return found


def _traced_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    tracer = getattr(_state, "tracer", None)
    if tracer is None or not torch.overrides.has_torch_function(tuple(tensor_leaves((args, kwargs)))):
        return _FUNCTION_APPLY(cls, *args, **kwargs)
    apply = FunctionApply.of(cls)
    return torch.overrides.handle_torch_function(apply, tuple(tensor_leaves((args, kwargs))), *args, **kwargs)


@contextmanager
def _patches() -> Iterator[None]:
    """Install the module-call and Function.apply patches while at least one trace runs."""
    global _patch_users
    # torch 2.13 declares Function.apply a classmethod, 2.14 an untyped attribute: the ignores of its assignments
    # hold for both (unused-ignore)
    with _patch_lock:
        if _patch_users == 0:
            torch.nn.Module.__call__ = _traced_module_call  # type: ignore[method-assign]
            torch.autograd.Function.apply = classmethod(_traced_apply)  # type: ignore[method-assign,assignment,unused-ignore]
            setattr(_checkpoint, _CHECKPOINT_GENERATOR_NAME, _inline_checkpoint)
            _checkpoint.CheckpointFunction.apply = classmethod(  # type: ignore[method-assign,assignment,unused-ignore]
                _inline_checkpoint_apply
            )
        _patch_users += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                torch.nn.Module.__call__ = MODULE_CALL  # type: ignore[method-assign]
                if _APPLY_OWNED:
                    torch.autograd.Function.apply = _APPLY_DESCRIPTOR  # type: ignore[method-assign,unused-ignore]
                else:
                    del torch.autograd.Function.apply
                setattr(_checkpoint, _CHECKPOINT_GENERATOR_NAME, _CHECKPOINT_GENERATOR)
                if _CHECKPOINT_APPLY is None:
                    del _checkpoint.CheckpointFunction.apply
                else:
                    _checkpoint.CheckpointFunction.apply = _CHECKPOINT_APPLY  # type: ignore[method-assign,unused-ignore]


def run_operation(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], stack: Sequence[str]) -> Any:
    """``fn(*args, **kwargs)``; a custom autograd function that ``torch.func`` cannot differentiate is refused, on
    every tape alike (the plain-autograd tape could run it, but whether a call may take that tape depends on its
    arguments, and the answer must not)."""
    if type(fn) is not FunctionApply:
        return fn(*args, **kwargs)
    if not fn.functional:
        where = stack[-1] if stack else "the model"
        raise RuntimeError(
            f"attribute: the custom autograd function {fn.cls.__qualname__} in '{where}' cannot be differentiated by "
            f"torch.func: it has no setup_context staticmethod (its forward takes ctx). lrpfunc propagates through it "
            f"with torch.func, so rewrite it in the setup_context style (forward without ctx plus a setup_context "
            f"staticmethod; https://pytorch.org/docs/stable/notes/extending.func.html), or give its module a rule."
        )
    return fn(*args, **kwargs)


@contextmanager
def eager_calls() -> Iterator[None]:
    """In this thread, for a forward pass that ``torch.func`` differentiates without a tracer: a ``torch.compile``'d
    module runs the module it wraps, and ``torch.utils.checkpoint`` runs its function directly (as while tracing)."""
    with _patches():
        _state.eager = getattr(_state, "eager", 0) + 1
        try:
            yield
        finally:
            _state.eager -= 1


@contextmanager
def tracing(tracer: Tracer) -> Iterator[None]:
    previous = getattr(_state, "tracer", None)
    with _patches():
        _state.tracer = tracer
        try:
            with tracer:
                yield
        finally:
            _state.tracer = previous
