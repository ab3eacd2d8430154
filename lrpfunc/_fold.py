"""The parameter-only work of a plan, done once per state of the parameters.

A traced plan recomputes on every call what depends on the parameters alone: a BatchNorm merged into the weight of
the convolution before it, the positive part of a z+ rule's weights, their transposes. Where the parameters do not
change between calls (heatmaps over a dataset), that work gives the same tensors every time; on ResNet-18 at 64x64 it
is about a tenth of the call. :func:`fold` moves it out of the plan: the plan reads its results as attributes, and
:class:`FoldedPlan` computes them again only when a parameter they depend on is another tensor than in the previous
call, or was written to since (its ``_version`` or its storage changed). The results are held between calls (about
the size of the modified weights).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx

Tensor = torch.Tensor

__all__ = ["FoldedPlan", "fold"]


def _pure(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a deterministic operation without side effects (a random one draws anew on every call)."""
    if node.op != "call_function" or node.is_impure():
        return False
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _aliases(node: torch.fx.Node) -> bool:
    """Whether ``node``'s result may share memory with an input (a view, or a function torch does not describe)."""
    schema = getattr(node.target, "_schema", None)
    return schema is None or any(result.alias_info is not None for result in schema.returns)


def _parameter_keys(graph_module: torch.fx.GraphModule) -> list[str] | None:
    """The keys of ``params``, in the order of the graph's first placeholders (``make_fx`` of ``fn(params, x, g)``
    flattens the dict in its insertion order), or ``None`` if the graph does not take a dict of tensors first."""
    try:
        in_spec = graph_module._in_spec
        params_spec = in_spec.child(0)
        if params_spec.type is not dict or params_spec.num_leaves != params_spec.num_children:
            return None
        return list(params_spec.context)
    except (AttributeError, IndexError, TypeError, ValueError):  # no pytree signature of this form
        return None


def _escaping(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The values the graph returns, and every value they may be views of: never held between calls (the caller may
    write into what it gets)."""
    (output,) = [node for node in graph.nodes if node.op == "output"]
    escaping: set[torch.fx.Node] = set()
    pending = list(output.all_input_nodes)
    while pending:
        node = pending.pop()
        if node not in escaping:
            escaping.add(node)
            if _aliases(node):
                pending.extend(node.all_input_nodes)
    return escaping


def fold(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule | FoldedPlan:
    """``graph_module`` (a plan of ``(params, x, grad_output)``) with its parameter-only work moved out, or unchanged
    where there is none."""
    keys = _parameter_keys(graph_module)
    if not keys:
        return graph_module
    graph = graph_module.graph
    if any(_mutates(node) for node in graph.nodes):  # a held value could be written to
        return graph_module
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    parameter_nodes = placeholders[: len(keys)]
    escaping = _escaping(graph)
    known: set[torch.fx.Node] = set(parameter_nodes)
    for node in graph.nodes:
        if node in escaping:
            continue
        if node.op == "get_attr" or (_pure(node) and all(arg in known for arg in node.all_input_nodes)):
            known.add(node)
    frontier = [node for node in graph.nodes
                if node in known and node.op == "call_function" and any(user not in known for user in node.users)]
    if not frontier:
        return graph_module

    prefix_graph = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    read = [index for index, node in enumerate(parameter_nodes) if any(user in known for user in node.users)]
    for index in read:
        copies[parameter_nodes[index]] = prefix_graph.placeholder(f"param_{index}")
    for node in graph.nodes:
        if node in known and node.op != "placeholder":
            copies[node] = prefix_graph.node_copy(node, lambda arg: copies[arg])
    prefix_graph.output(tuple(copies[node] for node in frontier))
    prefix_graph.eliminate_dead_code()
    prefix = torch.fx.GraphModule(graph_module, prefix_graph)

    names = [f"_folded_{index}" for index in range(len(frontier))]
    first = next(node for node in graph.nodes if node.op != "placeholder")
    for name, node in zip(names, frontier):
        graph_module.register_buffer(name, torch.empty(0), persistent=False)  # set before every use (FoldedPlan)
        with graph.inserting_before(first):
            attribute = graph.get_attr(name)
        node.replace_all_uses_with(attribute)
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()
    return FoldedPlan(prefix, graph_module, [keys[index] for index in read], names)


class FoldedPlan:
    """A plan whose parameter-only work (:func:`fold`) is computed again only when the parameters it reads changed."""

    def __init__(self, prefix: torch.fx.GraphModule, main: torch.fx.GraphModule, keys: list[str],
                 names: list[str]) -> None:
        self.prefix, self.main, self.keys, self.names = prefix, main, keys, names
        self._held: list[Tensor] = []  # the parameters of the last computation, held so that no other takes their id
        self._state: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        #: How many calls computed the parameter-only work (the others reused it).
        self.computed = 0

    def __call__(self, params: Mapping[str, Tensor], x: Any, grad_output: Any) -> Any:
        tensors = [params[key] for key in self.keys]
        try:
            state: list[tuple[int, int]] | None = [(t._version, t.data_ptr()) for t in tensors]
        except RuntimeError:  # inference tensors have no version: compute again on every call
            state = None
        with self._lock:
            current = (state is not None and state == self._state and len(tensors) == len(self._held)
                       and all(a is b for a, b in zip(tensors, self._held)))
            if not current:
                values = self.prefix(*tensors)
                for name, value in zip(self.names, values):
                    setattr(self.main, name, value)
                self.computed += 1
                self._held, self._state = (tensors, state) if state is not None else ([], [])
            return self.main(params, x, grad_output)
