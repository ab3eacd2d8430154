"""Where relevance leaks or is created: relevance in and out of every call site, :func:`conservation`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch

from ._attribute import Setup, _seeds, refreshing, run_trace
from ._checks import check_grad_output, check_params, check_setup, check_tensors
from ._composite import CallSite, Composite, rule_name
from ._inference import outside_inference_mode
from ._sweep import sweep
from ._tape import AutogradTape, VjpTape
from .canonizers import Canonizer

Tensor = torch.Tensor

__all__ = ["conservation", "ConservationReport", "SiteRelevance"]


@dataclass(frozen=True)
class SiteRelevance:
    """The relevance through one call site.

    Attributes:
        site: The call site (a module call, or an operation on activations).
        rule: The rule that propagated it (``None``: the true gradient).
        relevance_in: The sum of the relevance arriving at the site's outputs.
        relevance_out: The sum of the relevance the site passed on to its inputs.
    """

    site: CallSite
    rule: Any
    relevance_in: float
    relevance_out: float

    @property
    def created(self) -> float:
        """``relevance_out - relevance_in``: positive where the site creates relevance, negative where it absorbs."""
        return self.relevance_out - self.relevance_in


@dataclass(frozen=True)
class ConservationReport:
    """Relevance in and out of every call site that relevance reached, in execution order.

    Attributes:
        rows: One :class:`SiteRelevance` per site that relevance reached.
        total_in: The sum of ``grad_output``.
        total_out: The sum of the input relevance (over every input leaf, and the outputs of source calls: see
            :func:`lrpfunc.composites.with_sources`).
    """

    rows: tuple[SiteRelevance, ...]
    total_in: float
    total_out: float

    @property
    def ratio(self) -> float:
        """``total_out / total_in`` (1 where the rules conserve)."""
        return self.total_out / self.total_in if self.total_in else float("nan")

    def leaks(self, tolerance: float = 1e-6) -> list[SiteRelevance]:
        """The sites that create or absorb more than ``tolerance`` times the total relevance, largest first."""
        scale = abs(self.total_in) or 1.0
        found = [row for row in self.rows if abs(row.created) > tolerance * scale]
        return sorted(found, key=lambda row: -abs(row.created))

    def __str__(self) -> str:
        lines = [("site", "class", "rule", "in", "out", "created")]
        for row in self.rows:
            op_class = row.site.op_class.__name__ if row.site.op_class is not None else ""
            lines.append((row.site.describe(), op_class, rule_name(row.rule), f"{row.relevance_in:.6g}",
                          f"{row.relevance_out:.6g}", f"{row.created:+.3g}"))
        widths = [max(len(line[column]) for line in lines) for column in range(6)]
        text = [
            "  ".join(cell.rjust(width) if column >= 3 else cell.ljust(width) for column, (cell, width) in
                      enumerate(zip(line, widths))).rstrip()
            for line in lines
        ]
        text.append(f"total: in {self.total_in:.6g}, out {self.total_out:.6g}, ratio {self.ratio:.6g}")
        return "\n".join(text)


def conservation(
    model: torch.nn.Module,
    composite: Composite | None = None,
    canonizers: Sequence[Canonizer] | Canonizer = (),
) -> Callable[[Mapping[str, Tensor], Any, Any], ConservationReport]:
    """Relevance in and out of every call site, to find where an attribution leaks or creates relevance.

    Definition:
        The attribution of :func:`lrpfunc.attribute` with the same arguments, computed with every operation as a
        step of its own (the per-operation tape), recording at each step the sum of the relevance that arrives at
        its outputs and the sum it passes to its inputs. A rule set conserves (with zeroed biases) where every row
        has ``relevance_in == relevance_out``; a site without a rule that changes the sum takes the true gradient
        where an LRP rule was meant to apply (a residual sum without the sum rule doubles relevance).

    Returns:
        ``fn(params, x, grad_output) -> ConservationReport``; ``print`` the report to read it, or call
        ``report.leaks()`` for the sites that break conservation.

    Example:
        >>> report = lrpfunc.conservation(model, composites.epsilon_plus(zero_params="bias"))(params, x, target)
        >>> print(report.leaks()[:3])
    """
    where = f"conservation({type(model).__name__}, composite)"
    setup = Setup(where, model, composite, check_setup(where, model, composite, canonizers))

    @outside_inference_mode
    def report(params: Mapping[str, Tensor], x: Any, grad_output: Any) -> ConservationReport:
        check_params(where, setup.info, setup.model, params)
        check_tensors(where, "x", x)
        setup.warn(params, [], AutogradTape())  # the training mode only: a report's tape is never the user's choice
        rows: list[tuple[int, SiteRelevance]] = []

        def record(site: CallSite | None, rule: Any, grads_in: Sequence[Tensor | None],
                   grads_out: Sequence[Tensor | None]) -> None:
            if site is None:
                return
            total_in = sum(float(g.sum()) for g in grads_in if g is not None)
            total_out = sum(float(g.sum()) for g in grads_out if g is not None)
            rows.append((site.order, SiteRelevance(site, rule, total_in, total_out)))

        with torch.no_grad():
            trace = refreshing(setup, lambda: run_trace(setup, params, x, VjpTape(), record_sites=True))
            check_tensors(where, "the model's output", trace.output)
            grad_leaves = check_grad_output(where, trace.output, grad_output)
            cotangents = sweep(trace, _seeds(trace, grad_leaves), recorder=record)
        leaves = optree.tree_leaves(x, none_is_leaf=True)
        # what reaches the inputs, and the sources (outputs of calls that the composite made inputs, with_sources)
        reached = [*trace.input_ids, *(vid for _, vids in trace.source_ids for vid in vids)]
        total_out = sum(float(cotangents[vid].sum()) for vid in reached if vid is not None and vid in cotangents)
        total_in = sum(float(g.sum()) for g in grad_leaves)
        del leaves
        return ConservationReport(tuple(row for _, row in sorted(rows, key=lambda item: item[0])), total_in, total_out)

    return report
