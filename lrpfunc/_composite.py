"""Call sites, composites and the table a composite resolves to."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

import torch

from ._record import Record
from ._sweep import Rule, op_site_name

__all__ = ["CallSite", "Composite", "RuleTable", "call_sites", "Matcher", "Entries"]

#: What a composite entry matches: a module class, an operation label class (:mod:`lrpfunc.types`),
#: or a torch function (``torch.add``, ``torch.Tensor.add``, ``torch.nn.functional.relu``).
Matcher = Union[type, Callable[..., Any]]
Entries = Sequence[tuple[Union[Matcher, Sequence[Matcher]], Rule]]


@dataclass(frozen=True, eq=False)
class CallSite:
    """One place where a rule can attach: a module call or a functional operation.

    Attributes:
        kind: ``"module"`` or ``"op"``.
        index: The span id (module) or operation index (op) in the record.
        name: Qualified module name (``"layer1.0.conv1"``) or ``"<module>/<operation>"`` for operations.
        module: The module called (``None`` for operations).
        func: The torch function called (``None`` for modules).
        label: A type a canonizer attached to an operation, e.g. :class:`lrpfunc.types.Sum`.
        call_index: How many earlier calls the same module had.
        order: Position in execution order among all sites.
    """

    kind: str
    index: int
    name: str
    module: torch.nn.Module | None
    func: Callable[..., Any] | None
    label: type | None
    call_index: int
    order: int

    def matches(self, matchers: Matcher | Sequence[Matcher]) -> bool:
        """Whether this site is an instance of (or labelled as, or calls) any of ``matchers``."""
        if not isinstance(matchers, (tuple, list)):
            matchers = (matchers,)
        for matcher in matchers:
            if isinstance(matcher, type):
                if self.module is not None and isinstance(self.module, matcher):
                    return True
                if self.label is not None and issubclass(self.label, matcher):
                    return True
            elif self.func is not None and self.func is matcher:
                return True
        return False

    def describe(self) -> str:
        """E.g. ``Conv2d 'features.0'`` or ``operation add 'layer1.0/add' [Sum]``."""
        if self.module is not None:
            kind = type(self.module).__name__
        else:
            kind = "operation"
        label = f" [{self.label.__name__}]" if self.label is not None else ""
        call = f" (call {self.call_index + 1})" if self.call_index else ""
        return f"{kind} '{self.name}'{call}{label}"


@runtime_checkable
class Composite(Protocol):
    """Assigns rules to call sites. ``resolve`` gets every site in execution order and returns one rule
    (or ``None``) per site. Composites are values: they keep no state between calls."""

    def resolve(self, sites: Sequence[CallSite]) -> list[Rule | None]: ...


def call_sites(record: Record) -> list[CallSite]:
    """Every module call and every operation on activations of ``record``, in execution order."""
    sites: list[tuple[tuple[float, int, int], CallSite]] = []
    for span in record.spans:
        if span.removed:
            continue
        first = span.nodes[0] if span.nodes else math.inf
        site = CallSite("module", span.sid, span.name, span.module, None, None, span.call_index, 0)
        sites.append(((first, 0, span.sid), site))
    for index, node in enumerate(record.nodes):
        if node.pullback is None:
            continue
        site = CallSite("op", index, op_site_name(record, node), None, node.func, node.label, 0, 0)
        sites.append(((index, 1, 0), site))
    sites.sort(key=lambda item: item[0])
    return [dataclasses.replace(site, order=order) for order, (_, site) in enumerate(sites)]


def rule_name(rule: Any) -> str:
    """A readable name of a rule for tables and messages."""
    if rule is None:
        return "-"
    return repr(rule) if hasattr(rule, "__dataclass_fields__") or hasattr(rule, "name") else getattr(
        rule, "__name__", type(rule).__name__
    )


@dataclass(frozen=True)
class RuleTable:
    """The rule of each call site, as a composite resolved it. ``print(table)`` shows it."""

    rows: tuple[tuple[CallSite, Rule | None], ...]

    def __iter__(self) -> Iterable[tuple[CallSite, Rule | None]]:  # type: ignore[override]
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def rule_of(self, name: str, call_index: int = 0) -> Rule | None:
        """The rule of the site called ``name`` (and its ``call_index``-th call); ``KeyError`` if absent."""
        for site, rule in self.rows:
            if site.name == name and site.call_index == call_index:
                return rule
        raise KeyError(f"no call site named {name!r} (call {call_index + 1}) in this table")

    def __str__(self) -> str:
        lines = [(site.describe(), rule_name(rule)) for site, rule in self.rows]
        width = max((len(left) for left, _ in lines), default=0)
        return "\n".join(f"{left.ljust(width)}  {right}" for left, right in lines)
