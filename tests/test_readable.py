"""What users read: the plain epsilon composite, short reprs of composites, and the headed rule table."""

from __future__ import annotations

import pytest
import torch
from models import TinyResNet
from torch import nn

import lrpfunc
from lrpfunc import canonizers, composites, rules, types

D = torch.float64


class Functional(nn.Module):
    """Linear layers as operations (``F.linear``, ``@``), not modules, and a max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.w1 = nn.Parameter(torch.randn(5, 16))
        self.w2 = nn.Parameter(torch.randn(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        return torch.relu(torch.nn.functional.linear(h, self.w1)) @ self.w2


def test_epsilon_zero_on_a_bias_free_relu_network_is_gradient_times_input() -> None:
    """Relevance ``f * t`` at the output (``grad_output``), epsilon 0, no biases: ``R = x * d(f . t)/dx``."""
    model = Functional().to(D)
    params = dict(model.named_parameters())
    x, target = torch.randn(3, 2, 4, 4, dtype=D), torch.randn(3, 3, dtype=D)
    output, relevance = lrpfunc.attribute(model, composites.epsilon(0.0))(params, x, model(x).detach() * target)
    leaf = x.clone().requires_grad_()
    grad = torch.autograd.grad(model(leaf), leaf, target)[0]
    torch.testing.assert_close(output, model(x))
    torch.testing.assert_close(relevance, x * grad, rtol=1e-10, atol=1e-12)


def test_epsilon_rules_every_linear_call_module_or_operation() -> None:
    table = lrpfunc.rule_table(Functional().to(D), composites.epsilon(0.01), torch.randn(2, 2, 4, 4, dtype=D))
    ruled = {site.name: rule for site, rule in table if rule is not None}
    linear = {name: rule for name, rule in ruled.items() if repr(rule) == "epsilon(epsilon=0.01)"}
    assert set(linear) == {"conv", "linear", "matmul"}, ruled
    assert table.rule_of("max_pool2d") is None  # max pooling keeps the true gradient


def test_epsilon_is_the_readme_epsilon_everywhere_column() -> None:
    """``composites.epsilon`` is what the zoo table's last column measured (epsilon_plus with epsilon on convs)."""
    model = TinyResNet().to(D).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 8, 8, dtype=D)
    target = torch.eye(model(x).shape[1], dtype=D)[[0, 1]]
    readme = composites.epsilon_plus(zero_params="bias", layer_map=[(types.Convolution, rules.epsilon(zero_params="bias"))])
    merge = canonizers.merge_batchnorm()
    expected = lrpfunc.attribute(model, readme, merge)(params, x, target)[1]
    relevance = lrpfunc.attribute(model, composites.epsilon(zero_params="bias"), merge)(params, x, target)[1]
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)


def test_epsilon_takes_extra_entries_first() -> None:
    zplus = rules.zplus()
    table = lrpfunc.rule_table(Functional().to(D), composites.epsilon(layer_map=[(nn.Conv2d, zplus)]),
                               torch.randn(2, 2, 4, 4, dtype=D))
    assert table.rule_of("conv") is zplus


NAMED = {
    "epsilon": composites.epsilon,
    "epsilon_plus": composites.epsilon_plus,
    "epsilon_plus_flat": composites.epsilon_plus_flat,
    "epsilon_alpha2_beta1": composites.epsilon_alpha2_beta1,
    "epsilon_alpha2_beta1_flat": composites.epsilon_alpha2_beta1_flat,
    "epsilon_gamma_box": lambda: composites.epsilon_gamma_box(-3.0, 3.0),
    "guided_backprop": composites.guided_backprop,
    "deconvnet": composites.deconvnet,
    "beta_smooth": composites.beta_smooth,
    "excitation_backprop": composites.excitation_backprop,
    "attnlrp": composites.attnlrp,
    "cp_lrp": composites.cp_lrp,
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_composites_print_as_the_call_that_built_them(name: str) -> None:
    text = repr(NAMED[name]())
    assert text.startswith(f"{name}(") and text.endswith(")") and len(text) <= 100, text
    assert "\n" not in text and "<" not in text


def test_composite_reprs_pin() -> None:
    assert repr(composites.epsilon_plus_flat()) == "epsilon_plus_flat(epsilon=1e-06, stabilizer=1e-06)"
    assert repr(composites.epsilon_plus(zero_params="bias")) == (
        "epsilon_plus(epsilon=1e-06, stabilizer=1e-06, zero_params='bias')"
    )
    assert repr(composites.epsilon_gamma_box(torch.zeros(3, 1, 1), torch.ones(3, 1, 1), gamma=0.5)) == (
        "epsilon_gamma_box(low=tensor(3, 1, 1), high=tensor(3, 1, 1), epsilon=1e-06, gamma=0.5, stabilizer=1e-06)"
    )
    assert repr(composites.cp_lrp(layer_map=[(types.Dense, rules.gamma(0.05))])) == (
        "cp_lrp(epsilon=0.0, stabilizer=0.0, layer_map=[1 entry])"
    )
    assert repr(composites.epsilon(0.1)) == "epsilon(epsilon=0.1, stabilizer=1e-06)"
    by_type = composites.layer_map([(nn.ReLU, rules.passthrough()), (nn.Linear, rules.epsilon())])
    by_name = composites.name_map([(("a", "b"), rules.flat())])
    assert repr(by_type) == "layer_map([2 entries])"
    assert repr(by_name) == "name_map([1 entry])"
    assert repr(composites.mixed([by_name, composites.epsilon()])) == (
        "mixed([name_map([1 entry]), epsilon(epsilon=1e-06, stabilizer=1e-06)])"
    )
    assert repr(composites.first_layer_map([(nn.Linear, rules.flat())], by_type)) == (
        "first_layer_map([1 entry], layer_map([2 entries]))"
    )


def test_labels_do_not_change_what_a_composite_is() -> None:
    """The label is no dataclass field: equality, fields and resolution are those of the unlabelled composite."""
    composite = composites.epsilon_plus()
    assert "_label" not in {field for field in composite.__dataclass_fields__}
    assert composites.epsilon_plus.__name__ == "epsilon_plus" and "z+" in (composites.epsilon_plus.__doc__ or "")


def _table() -> lrpfunc.RuleTable:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(D)
    return lrpfunc.rule_table(model, composites.epsilon_plus(), torch.randn(2, 4, dtype=D))


def test_rule_table_has_a_header_and_a_legend() -> None:
    lines = str(_table()).splitlines()
    assert lines[0].split() == ["call", "site", "(in", "execution", "order)", "operation", "class", "rule"]
    assert lines[1].startswith("Sequential ''") and lines[1].endswith("-")
    assert lines[2].startswith("Linear '0'") and lines[2].endswith("epsilon(epsilon=1e-06)")
    assert lines[3].startswith("operation '0/linear'") and lines[3].split()[-3:] == ["Dense", "(covered", "by", "0)"][-3:]
    assert lines[-3] == ""
    assert lines[-2].startswith("-  ") and "true gradient" in lines[-2]
    assert lines[-1].startswith("(covered by X)") and "rule replaces the whole call" in lines[-1]
    # the rule column starts at the same place on every line, the header's included
    column = lines[0].index("rule")
    assert all(line[column:].strip() for line in lines[1:8])
    assert lines[2][column:] == "epsilon(epsilon=1e-06)"


def test_rule_table_without_header_and_legend_is_one_line_per_site() -> None:
    table = _table()
    lines = table.format(header=False, legend=False).splitlines()
    assert len(lines) == len(table) == 7
    assert lines[0].startswith("Sequential ''")


def test_rule_table_repr_is_short() -> None:
    assert repr(_table()) == "<RuleTable: 7 call sites, 3 with a rule>"
