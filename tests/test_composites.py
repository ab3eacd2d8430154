"""Composite combinators: matching, precedence, "first" in execution order, and the printable table."""

from __future__ import annotations

import torch
from torch import nn

import lrpfunc
from lrpfunc import composites, rules, types


class RegisteredBackwards(nn.Module):
    """``late`` is registered first but executed last: "first layer" must follow execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(3, 2)
        self.early = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(torch.relu(self.early(x)))


def _table(model: nn.Module, composite: composites.Composite) -> lrpfunc.RuleTable:
    return lrpfunc.rule_table(model, composite, torch.randn(2, 4))


def test_first_layer_is_first_in_execution_order() -> None:
    flat, eps = rules.flat(), rules.epsilon()
    table = _table(RegisteredBackwards(), composites.first_layer_map([(nn.Linear, flat)], [(nn.Linear, eps)]))
    assert table.rule_of("early") is flat
    assert table.rule_of("late") is eps


def test_nested_type_tuples_match() -> None:
    eps = rules.epsilon()
    table = _table(RegisteredBackwards(), composites.layer_map([((types.Linear,), eps)]))
    assert table.rule_of("early") is eps and table.rule_of("late") is eps


def test_earlier_entries_and_composites_take_precedence() -> None:
    first, second = rules.epsilon(0.1), rules.epsilon(0.2)
    by_name = composites.name_map([("late", first)])
    by_type = composites.layer_map([(nn.Linear, second), (nn.Linear, first)])
    table = _table(RegisteredBackwards(), composites.mixed([by_name, by_type]))
    assert table.rule_of("late") is first
    assert table.rule_of("early") is second


def test_operations_match_by_function() -> None:
    passthrough = rules.passthrough()
    table = _table(RegisteredBackwards(), composites.layer_map([(torch.relu, passthrough)]))
    (site, rule), = [(site, rule) for site, rule in table if site.kind == "op" and site.name == "relu"]
    assert rule is passthrough


def test_table_prints_every_site_with_its_rule() -> None:
    text = str(_table(RegisteredBackwards(), composites.epsilon_plus()))
    assert "Linear 'early'" in text and "epsilon(epsilon=1e-06)" in text
    assert "operation 'relu'" in text


def test_named_composites_pass_extra_entries_first() -> None:
    zplus = rules.zplus()
    composite = composites.epsilon_plus(layer_map=[(nn.Linear, zplus)])
    assert _table(RegisteredBackwards(), composite).rule_of("late") is zplus
