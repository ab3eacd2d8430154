"""The 38 Zennit 0.5.1 reference cases (tests/data/README.md): first order equal to Zennit, second order
and parameter derivatives equal to finite differences (where Zennit itself is wrong)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import build

import lrpfunc
from lrpfunc import canonizers, composites, rules, types

DATA = Path(__file__).parent / "data"
CASES = sorted(
    entry["file"] for entry in json.loads((DATA / "index.json").read_text()) if not entry["file"].startswith("attr")
)

RULES = {
    "epsilon": lambda: rules.epsilon(),
    "epsilon_0.25": lambda: rules.epsilon(0.25),
    "epsilon_nobias": lambda: rules.epsilon(zero_params="bias"),
    "zplus": lambda: rules.zplus(),
    "alpha2_beta1": lambda: rules.alpha_beta(2.0, 1.0),
    "alpha1_beta0": lambda: rules.alpha_beta(1.0, 0.0),
    "gamma_0.25": lambda: rules.gamma(0.25),
    "gamma_1": lambda: rules.gamma(1.0),
    "flat": lambda: rules.flat(),
    "wsquare": lambda: rules.wsquare(),
    "zbox": lambda: rules.zbox(-3.0, 3.0),
}
COMPOSITES = {
    "epsilon_plus": composites.epsilon_plus,
    "epsilon_plus_flat": composites.epsilon_plus_flat,
    "epsilon_alpha2_beta1": composites.epsilon_alpha2_beta1,
    "epsilon_alpha2_beta1_flat": composites.epsilon_alpha2_beta1_flat,
    "epsilon_gamma_box": lambda: composites.epsilon_gamma_box(-3.0, 3.0),
    "guided_backprop": composites.guided_backprop,
    "excitation_backprop": composites.excitation_backprop,
    "deconvnet": composites.deconvnet,
    "beta_smooth": composites.beta_smooth,
}
CANONIZERS = {"none": (), "merge_batchnorm": (canonizers.merge_batchnorm(),), "resnet": (canonizers.resnet(),)}


def _composite(case: dict) -> lrpfunc.composites.Composite:
    if case["kind"] == "rule":
        return composites.layer_map(
            [
                (types.Activation, rules.passthrough()),
                (types.AvgPool, rules.norm()),
                (types.Linear, RULES[case["composite"]]()),
            ]
        )
    return COMPOSITES[case["composite"]]()


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    return error.abs().max().item() / (scale if scale > 0 else 1.0)


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> dict:
    data = torch.load(DATA / request.param, weights_only=False)
    model = build(data["model"], data["state_dict"])
    fn = lrpfunc.attribute(model, _composite(data), CANONIZERS[data["canonizer"]])
    return {**data, "fn": fn, "params": dict(model.named_parameters())}


def test_first_order_equals_zennit(case: dict) -> None:
    output, relevance = case["fn"](case["params"], case["x"], case["grad_output"])
    assert (output - case["output"]).abs().max().item() < 1e-10
    assert _relative(relevance - case["relevance"], case["relevance"]) < 1e-9


def test_second_order_wrt_input_is_exact(case: dict) -> None:
    fn, params = case["fn"], case["params"]
    second = torch.func.grad(lambda x: (fn(params, x, case["grad_output"])[1] * case["w"]).sum())(case["x"])
    assert _relative(second - case["second_order_x"], case["second_order_x"]) < 1e-6
    along_dx = (second * case["dx"]).sum().item()
    assert along_dx == pytest.approx(case["fd_second_order_x_along_dx"], rel=1e-4, abs=1e-8)


def test_parameter_derivative_matches_finite_differences(case: dict) -> None:
    fn = case["fn"]
    grads = torch.func.grad(lambda p: (fn(p, case["x"], case["grad_output"])[1] * case["w"]).sum())(case["params"])
    directional = sum((grads[name] * direction).sum() for name, direction in case["dtheta"].items()).item()
    expected = case["fd_param_derivative_along_dtheta"]
    assert abs(directional - expected) <= 1e-4 * max(1.0, abs(expected))


def test_zennit_recipe_is_wrong_where_documented() -> None:
    """The reference's Zennit second-order recipe differs from the exact value we reproduce."""
    data = torch.load(DATA / "00_mlp_rule_epsilon_none.pt", weights_only=False)
    gap = (data["second_order_x_zennit_recipe"] - data["second_order_x"]).abs().max().item()
    assert gap > 1.0
