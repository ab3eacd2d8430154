"""Call sites, composites, and the table a composite resolves to."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast, runtime_checkable

import torch

__all__ = ["CallSite", "Composite", "RuleTable", "Matcher", "Entries", "resolver_of", "rule_name", "sources_of"]

#: What a composite entry matches: a module class (or a duck type from :mod:`lrpfunc.types`), an operation class
#: (:mod:`lrpfunc.ops`), a label class a canonizer attaches (:class:`lrpfunc.types.Sum`), or a torch function
#: (``torch.add``, ``torch.Tensor.add``, ``torch.nn.functional.relu``).
Matcher = type | Callable[..., Any]
Entries = Sequence[tuple[Matcher | Sequence[Matcher], Any]]


class CallSite(NamedTuple):
    """One place where a rule can attach: a module call or an operation on activations (an immutable record).

    Attributes:
        kind: ``"module"`` or ``"op"``.
        index: The module call's or the operation's position among all module calls or operations.
        name: Qualified module name (``"layer1.0.conv1"``) or ``"<module>/<operation>"`` for operations.
        module: The module called (``None`` for operations).
        func: The torch function called (``None`` for modules).
        label: A type a canonizer attached to an operation, e.g. :class:`lrpfunc.types.Sum`.
        call_index: How many earlier calls the same module had.
        order: Position in execution order among the sites.
        op_class: The operation class (:mod:`lrpfunc.ops`) of an operation; ``None`` for modules.
    """

    kind: str
    index: int  # type: ignore[assignment]  # the field shadows tuple.index on purpose
    name: str
    module: torch.nn.Module | None
    func: Callable[..., Any] | None
    label: type | None
    call_index: int
    order: int
    op_class: type | None = None

    def matches(self, matchers: Matcher | Sequence[Matcher]) -> bool:
        """Whether this site is an instance of (or is labelled as, or is of the operation class of, or calls) any
        of ``matchers``."""
        if not isinstance(matchers, (tuple, list)):
            matchers = (cast(Matcher, matchers),)  # not a tuple or list: one matcher
        for matcher in matchers:
            if isinstance(matcher, type):
                if self.module is not None and isinstance(self.module, matcher):
                    return True
                if self.label is not None and issubclass(self.label, matcher):
                    return True
                if self.op_class is not None and issubclass(self.op_class, matcher):
                    return True
            elif self.func is not None and self.func is matcher:
                return True
        return False

    def describe(self) -> str:
        """E.g. ``Conv2d 'features.0'`` or ``operation 'layer1.0/add' [Sum]``."""
        kind = type(self.module).__name__ if self.module is not None else "operation"
        label = f" [{self.label.__name__}]" if self.label is not None else ""
        call = f" (call {self.call_index + 1})" if self.call_index else ""
        return f"{kind} '{self.name}'{call}{label}"


@runtime_checkable
class Composite(Protocol):
    """Assigns rules to call sites. ``resolve`` gets every site in execution order and returns one rule (or
    ``None``) per site. Composites are values: they keep no state between calls.

    A composite may also define ``resolver()``, returning a function that takes the sites one at a time, in
    execution order, and returns each one's rule: then the rules are known while the forward pass runs, and a
    call whose rule replays its own forward pass records no pullback (the fast path). All composites of
    :mod:`lrpfunc.composites` do; a composite with only ``resolve`` costs a second forward pass that lists the
    sites first.
    """

    def resolve(self, sites: Sequence[CallSite]) -> list[Any]: ...


def resolver_of(composite: Any) -> Callable[[CallSite], Any] | None:
    """A fresh streaming resolver of the composite, or ``None`` if it only resolves whole lists of sites."""
    make = getattr(composite, "resolver", None)
    return make() if callable(make) else None


def sources_of(composite: Any) -> tuple[type, ...]:
    """The module types whose calls' outputs a composite makes inputs of the attribution (its ``sources``, see
    :func:`lrpfunc.composites.with_sources`); ``()`` for a composite without."""
    found = getattr(composite, "sources", ())
    return tuple(found) if found else ()


def rule_name(rule: Any) -> str:
    """A readable name of a rule for tables and messages."""
    if rule is None:
        return "-"
    return repr(rule) if hasattr(rule, "__dataclass_fields__") or hasattr(rule, "name") else getattr(
        rule, "__name__", type(rule).__name__
    )


def _class_name(site: CallSite) -> str:
    return site.op_class.__name__ if site.op_class is not None else ""


#: What a rule table lists in place of a rule for a call whose outputs are sources (``with_sources``).
SOURCE = "\x00source"


@dataclass(frozen=True)
class RuleTable:
    """The rule of each call site, as a composite resolved it. ``print(table)`` shows it.

    Sites inside a call that has a rule are covered by it (they get no rule of their own); they are listed with
    ``covered by ...`` in place of a rule. A site without a rule shows ``-``: the true gradient passes through it. A
    call whose outputs the composite makes inputs (:func:`lrpfunc.composites.with_sources`) shows ``(source)``.
    ``print`` adds a header and a legend that says so; :meth:`format` leaves them out on request.
    """

    rows: tuple[tuple[CallSite, Any], ...]
    covered: tuple[str | None, ...] = ()

    def __iter__(self) -> Iterator[tuple[CallSite, Any]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def rule_of(self, name: str, call_index: int = 0) -> Any:
        """The rule of the site called ``name`` (and its ``call_index``-th call); ``KeyError`` if absent."""
        for site, rule in self.rows:
            if site.name == name and site.call_index == call_index:
                return rule
        raise KeyError(f"no call site named {name!r} (call {call_index + 1}) in this table")

    def covered_by(self, name: str, call_index: int = 0) -> str | None:
        """What covers the site called ``name`` (a ruled call's name), or ``None`` if it is not covered."""
        for (site, _), by in zip(self.rows, self.covered or (None,) * len(self.rows)):
            if site.name == name and site.call_index == call_index:
                return None if by == SOURCE else by
        raise KeyError(f"no call site named {name!r} (call {call_index + 1}) in this table")

    def format(self, *, header: bool = True, legend: bool = True) -> str:
        """The table as text: one line per call site (site, operation class, rule), in execution order.

        Args:
            header: Start with a line naming the columns.
            legend: End with lines explaining ``-`` and ``(covered by ...)``.
        """
        covered = self.covered or (None,) * len(self.rows)
        lines = [
            (site.describe(), _class_name(site),
             rule_name(rule) if by is None else "(source)" if by == SOURCE else f"(covered by {by})")
            for (site, rule), by in zip(self.rows, covered)
        ]
        if header:
            lines.insert(0, _HEADER)
        left = max((len(a) for a, _, _ in lines), default=0)
        middle = max((len(b) for _, b, _ in lines), default=0)
        text = [f"{a.ljust(left)}  {b.ljust(middle)}  {c}".rstrip() for a, b, c in lines]
        notes = [*_LEGEND, _SOURCE_NOTE] if SOURCE in covered else list(_LEGEND)
        return "\n".join(text + (["", *notes] if legend else []))

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        ruled = sum(1 for _, rule in self.rows if rule is not None)
        return f"<RuleTable: {len(self.rows)} call sites, {ruled} with a rule>"


_HEADER = ("call site (in execution order)", "operation class", "rule")
_LEGEND = (
    "-               no rule at this call: the true gradient passes (the calls inside it keep their own rules)",
    "(covered by X)  inside the call X that has a rule: X's rule replaces the whole call, this one gets none",
)
_SOURCE_NOTE = "(source)        its outputs are inputs of the attribution (with_sources): relevance stops there"
