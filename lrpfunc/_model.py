"""What the engine reads from a model once (:class:`ModelInfo`: module names, parameters and buffers by name, the
tables a forward may rebind), and calling the model so that it is left as found."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from operator import is_
from typing import Any

import torch

Tensor = torch.Tensor


class ModelInfo:
    """What the tracer reads from a model once: module names and every parameter and buffer with its names.

    Reading it walks the whole model, which costs as much as a small model's forward pass, so an attribution
    function reads it once and again only when a trace meets a module or a parameter it does not list (the model was
    changed, :class:`Stale`); modules and parameters that are not part of the model at all are then remembered as
    foreign.
    """

    def __init__(self, model: torch.nn.Module, foreign: set[int] | None = None) -> None:
        self.model = model
        self.names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), name)
        names_of: dict[int, tuple[Tensor, list[str]]] = {}
        for name, tensor in (
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ):
            names_of.setdefault(id(tensor), (tensor, []))[1].append(name)
        self.tensors: list[tuple[Tensor, list[str]]] = list(names_of.values())
        self.by_name: dict[str, Tensor] = {name: tensor for tensor, names in self.tensors for name in names}
        self.known = self.by_name.keys()
        self.ids = set(names_of)
        self.foreign: set[int] = set() if foreign is None else foreign
        self._module_params: dict[int, list[tuple[str, Tensor]]] = {}
        #: Every module's parameter and buffer tables (``_parameters``, ``_buffers``), which a forward can rebind
        #: (``self.count += 1`` assigns a new tensor to the buffer): :meth:`preserved` puts them back.
        self.tables: list[dict[str, Any]] = []
        for module in model.modules():
            self.tables.append(module._parameters)
            self.tables.append(module._buffers)

    @contextmanager
    def preserved(self) -> Iterator[None]:
        """Run a forward pass that leaves the model as it found it: a parameter or buffer that the forward rebinds
        (``self.count += 1``, ``self.stat = self.stat * 0.9 + ...``) is seen rebound for the rest of the call, as in
        eager torch, and bound to its own tensor again afterwards, also when the call raises (``functional_call``
        semantics). In-place writes never reach the model's tensors: the tracer runs them out of place."""
        saved = [(table, tuple(table), tuple(table.values())) for table in self.tables]
        try:
            yield
        finally:
            for table, keys, values in saved:  # every binding's identity, compared in C (``map(is_, ...)``)
                if len(table) != len(keys) or not all(map(is_, table.values(), values)) or tuple(table) != keys:
                    table.clear()
                    table.update(zip(keys, values))

    def module_params(self, module: torch.nn.Module) -> list[tuple[str, Tensor]]:
        """``module.named_parameters()``, read once per module."""
        found = self._module_params.get(id(module))
        if found is None:
            found = self._module_params[id(module)] = list(module.named_parameters())
        return found

    def check_module(self, module: torch.nn.Module) -> None:
        """Raise :class:`Stale` for a module that the model did not list when this was read but holds now; one that is
        not part of the model (a module the library around it calls, such as a kernel wrapper of a function) is
        remembered as foreign, and the trace goes on."""
        key = id(module)
        if key not in self.names and key not in self.foreign:
            if any(found is module for found in self.model.modules()):
                raise Stale(key)
            self.foreign.add(key)

    def check_tensor(self, tensor: Tensor) -> None:
        """Raise :class:`Stale` for a parameter that the model did not list when this was read but holds now (one that
        is not the model's is remembered as foreign)."""
        key = id(tensor)
        if type(tensor) is torch.nn.Parameter and key not in self.ids and key not in self.foreign:
            if any(found is tensor for found in self.model.parameters()):
                raise Stale(key)
            self.foreign.add(key)


class Stale(Exception):
    """A trace met a module or parameter that the model's :class:`ModelInfo` does not list."""

    def __init__(self, key: int) -> None:
        super().__init__("the model changed since it was read")
        self.key = key


def model_tensors(info: ModelInfo, params: Mapping[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, module's tensor, tensor to use)`` for every parameter and buffer: the caller's tensor under any of
    the tensor's (tied) names, else the module's own."""
    result = []
    for tensor, names in info.tensors:
        if len(names) == 1:
            name = names[0]
            result.append((name, tensor, params.get(name, tensor)))
            continue
        given = {id(params[name]): (name, params[name]) for name in names if name in params}
        if len(given) > 1:
            raise ValueError(
                f"params gives different tensors for the tied names {', '.join(repr(n) for n in names)}, "
                f"which are one tensor in the model; give one of them"
            )
        name, value = next(iter(given.values()), (names[0], tensor))
        result.append((name, tensor, value))
    return result


def call_model(model: torch.nn.Module, x: Any, info: ModelInfo) -> Any:
    """Call ``model`` with ``x`` (a tuple is spread over positional arguments, a dict over keywords), leaving its
    parameter and buffer bindings as they were (:meth:`ModelInfo.preserved`)."""
    with info.preserved():
        if isinstance(x, tuple):
            return model(*x)
        if isinstance(x, dict):
            return model(**x)
        return model(x)
