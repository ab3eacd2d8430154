"""Rule traits: declared as attributes, read once by :func:`lrpfunc._traits.traits_of`, checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpfunc
from lrpfunc import RuleError, composites, rules
from lrpfunc._traits import RuleTraits, traits_of


def test_defaults_for_a_plain_function() -> None:
    def rule(call, grad_outputs):  # type: ignore[no-untyped-def]
        return grad_outputs

    assert traits_of(rule) == RuleTraits()
    assert traits_of(None) == RuleTraits()
    assert traits_of(rule).records and not traits_of(rule).transparent


def test_built_in_rules_declare_their_traits() -> None:
    assert traits_of(rules.epsilon(0.0)).gradient_form == "pullback"
    assert traits_of(rules.epsilon(0.0)).transparent
    assert traits_of(rules.epsilon(1e-6)).gradient_form is None
    assert traits_of(rules.passthrough()).passes_through
    assert traits_of(rules.attention()).decompose is not None
    rule = rules.zplus()
    assert traits_of(rule) is traits_of(rule)  # read once per rule object


class _BadForm:
    name = "bad"
    gradient_form = "gradient"

    def __call__(self, call, grad_outputs):  # type: ignore[no-untyped-def]
        return grad_outputs


class _ModifiedWithoutMethod:
    name = "half-declared"
    gradient_form = "modified"

    def __call__(self, call, grad_outputs):  # type: ignore[no-untyped-def]
        return grad_outputs


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (_BadForm(), r"rule bad: gradient_form must be None, 'pullback', 'split' or 'modified', got 'gradient'"),
        (_ModifiedWithoutMethod(), r"rule half-declared: gradient_form 'modified' needs a method modified_gradient"),
    ],
)
def test_malformed_traits_are_refused_by_name(rule: object, message: str) -> None:
    with pytest.raises(RuleError, match=message):
        traits_of(rule)
    model = nn.Sequential(nn.Linear(3, 2))
    fn = lrpfunc.attribute(model, composites.layer_map([(nn.Linear, rule)]))
    with pytest.raises(RuleError, match=message):
        fn(dict(model.named_parameters()), torch.randn(2, 3), torch.ones(2, 2))
