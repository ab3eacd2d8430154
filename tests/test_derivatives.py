"""Exact derivatives of the attribution: ``gradcheck``/``gradgradcheck`` (float64, default tolerances) w.r.t.
the input, the parameters (and buffers) and ``grad_output``, and the closed form of parameter relevance.

Finite differences are only valid away from kinks (ReLU, the clamps of the modifiers, the sign switch
of the stabilizer), so every model is built from the first seed whose input, parameters, layer outputs
and ReLU inputs are all at least ``MARGIN`` away from zero; the search is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from models import TinyResNet, randomize_batchnorms
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import lrpfunc
from lrpfunc import ParamMod, canonizers, composites, rules, types

D = torch.float64
MARGIN = 1e-4


def basic_one() -> lrpfunc.rules.BasicRule:
    """One modifier triple: the epsilon rule of ``basic``'s defaults."""
    return rules.basic()


def basic_two() -> lrpfunc.rules.BasicRule:
    """Two modifier triples: z+ written out with ``basic``."""
    return rules.basic(
        input_modifiers=[lambda x: x.clamp(min=0), lambda x: x.clamp(max=0)],
        param_modifiers=[
            ParamMod(lambda w, _: w.clamp(min=0)),
            ParamMod(lambda w, _: w.clamp(max=0), zero_params="bias"),
        ],
        gradient_mapper=lambda g, outs: [g / lrpfunc.stabilize(outs[0] + outs[1])] * 2,
    )


RULES = {"basic_one_modifier": basic_one, "basic_two_modifiers": basic_two}


def _smallest_margin(model: nn.Module, x: torch.Tensor, params: bool = True) -> float:
    """Smallest distance to zero of the input, every parameter (unless ``params`` is false: derivatives
    w.r.t. ``x`` do not cross the parameters' kinks), every Linear/Conv/BatchNorm output and every ReLU
    input (pre-hooks see the input before an in-place ReLU overwrites it)."""
    values = [x.abs().min().item()]
    if params:
        values += [p.abs().min().item() for p in model.parameters()]

    def after(module, args, output):
        values.append(output.detach().abs().min().item())

    def before(module, args):
        values.append(args[0].detach().abs().min().item())

    handles = []
    for module in model.modules():
        if isinstance(module, types.Linear + types.BatchNorm):
            handles.append(module.register_forward_hook(after))
        if isinstance(module, nn.ReLU):
            handles.append(module.register_forward_pre_hook(before))
    try:
        with torch.no_grad():
            model(x.clone())
    finally:
        for handle in handles:
            handle.remove()
    return min(values)


def _first_seed_with_margin(build: Callable[[int], tuple], params: bool = True) -> tuple:
    for seed in range(1000):
        model, x, grad_output = build(seed)
        if _smallest_margin(model, x, params) > MARGIN:
            return model, x, grad_output
    raise AssertionError("no seed gives inputs away from the kinks")  # pragma: no cover


def _linear_net(seed: int) -> tuple:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).to(D).eval()
    return model, torch.randn(2, 4, dtype=D), torch.randn(2, 3, dtype=D)


def _conv_net(seed: int) -> tuple:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.Flatten()
    ).to(D).eval()
    return model, torch.randn(1, 2, 5, 5, dtype=D), torch.randn(1, 8, dtype=D)


class ResidualBlock(nn.Module):
    """torchvision's BasicBlock in small: one ``ReLU(inplace=True)`` called twice, ``out += identity``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = ResidualBlock(2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block(x)), 1))


def _residual_net(seed: int) -> tuple:
    torch.manual_seed(seed)
    model = SmallResNet().to(D).eval()
    randomize_batchnorms(model)
    return model, torch.randn(1, 2, 4, 4, dtype=D), torch.randn(1, 2, dtype=D)


def _lrp_composite(rule: lrpfunc.rules.BasicRule):
    return composites.layer_map([(types.Activation, rules.passthrough()), (types.Linear, rule)])


def _cases() -> list:
    cases = []
    for net_name, build in (("linear", _linear_net), ("conv", _conv_net)):
        for rule_name, rule in RULES.items():
            cases.append(pytest.param(build, lambda rule=rule: _lrp_composite(rule()), (), id=f"{net_name}-{rule_name}"))
    cases.append(
        pytest.param(_residual_net, composites.epsilon_plus, (canonizers.resnet(),), id="residual-epsilon_plus-resnet")
    )
    return cases


CASES = _cases()


def _setup(build, make_composite, canonizer_list):
    model, x, grad_output = _first_seed_with_margin(build)
    fn = lrpfunc.attribute(model, make_composite(), canonizer_list)
    return model, fn, x, grad_output


def _differentiable(model: nn.Module) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Every parameter, as fresh leaves (BatchNorm parameters included; merged into the convolutions by
    the resnet canonizer, so their derivatives flow through the merge)."""
    named = list(model.named_parameters())
    names = [name for name, _ in named]
    return names, tuple(t.detach().clone().requires_grad_() for _, t in named)


@pytest.mark.parametrize("build, make_composite, canonizer_list", CASES)
class TestGradcheck:
    def test_wrt_input(self, build, make_composite, canonizer_list) -> None:
        model, fn, x, grad_output = _setup(build, make_composite, canonizer_list)
        params = dict(model.named_parameters())
        f = lambda x: fn(params, x, grad_output)[1]  # noqa: E731
        inputs = (x.clone().requires_grad_(),)
        assert f(*inputs).abs().max() > 0
        assert gradcheck(f, inputs)
        assert gradgradcheck(f, inputs)

    def test_wrt_params(self, build, make_composite, canonizer_list) -> None:
        model, fn, x, grad_output = _setup(build, make_composite, canonizer_list)
        names, tensors = _differentiable(model)
        f = lambda *tensors: fn(dict(zip(names, tensors)), x, grad_output)[1]  # noqa: E731
        assert gradcheck(f, tensors)
        assert gradgradcheck(f, tensors)

    def test_wrt_grad_output(self, build, make_composite, canonizer_list) -> None:
        model, fn, x, grad_output = _setup(build, make_composite, canonizer_list)
        params = dict(model.named_parameters())
        f = lambda g: fn(params, x, g)[1]  # noqa: E731
        inputs = (grad_output.clone().requires_grad_(),)
        assert gradcheck(f, inputs)
        assert gradgradcheck(f, inputs)

    def test_wrt_everything_at_once(self, build, make_composite, canonizer_list) -> None:
        """Mixed second derivatives (input x parameters x grad_output) in one gradgradcheck."""
        model, fn, x, grad_output = _setup(build, make_composite, canonizer_list)
        names, tensors = _differentiable(model)
        f = lambda x, g, *tensors: fn(dict(zip(names, tensors)), x, g)[1]  # noqa: E731
        inputs = (x.clone().requires_grad_(), grad_output.clone().requires_grad_(), *tensors)
        assert gradgradcheck(f, inputs)


def test_residual_network_is_really_not_plain_gradient() -> None:
    """The residual case must exercise the rules (else the checks above would only test autograd)."""
    model, fn, x, grad_output = _setup(_residual_net, composites.epsilon_plus, (canonizers.resnet(),))
    params = dict(model.named_parameters())
    _, relevance = fn(params, x, grad_output)
    (gradient,) = torch.func.vjp(model, x)[1](grad_output)
    assert (relevance - gradient).abs().max() > 1e-3
    table = lrpfunc.rule_table(model, composites.epsilon_plus(), x, canonizers.resnet())
    assert any(site.label is types.Sum and rule is not None for site, rule in table)
    assert sum(1 for site, _ in table if site.name == "block.relu") == 2


def test_tiny_resnet_gradcheck_wrt_input() -> None:
    """The torchvision-style TinyResNet of the reference cases (shared in-place ReLU, downsample branch)."""

    def build(seed: int) -> tuple:
        torch.manual_seed(seed)
        model = TinyResNet().to(D).eval()
        randomize_batchnorms(model)
        return model, torch.randn(1, 3, 4, 4, dtype=D), torch.randn(1, 5, dtype=D)

    model, x, grad_output = _first_seed_with_margin(build, params=False)
    fn = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.resnet())
    params = dict(model.named_parameters())
    assert gradcheck(lambda x: fn(params, x, grad_output)[1], (x.clone().requires_grad_(),))


# --------------------------------------------------------------------------------------------------------
# Parameter relevance of epsilon in closed form
# --------------------------------------------------------------------------------------------------------


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + (torch.sign(z) + (z == 0).to(z)) * eps


def test_param_relevance_epsilon_single_linear_closed_form() -> None:
    """For ``z = x W^T + b``, ``G = R / s(z)``: input relevance ``x * (G W)``, weight relevance
    ``W * (G^T x)`` (summed over the batch), bias relevance ``b * sum_n G``."""
    torch.manual_seed(1)
    eps = 0.1
    model = nn.Linear(4, 3).to(D)
    x, relevance_out = torch.randn(5, 4, dtype=D), torch.randn(5, 3, dtype=D)
    fn = lrpfunc.attribute_with_params(model, composites.layer_map([(nn.Linear, rules.epsilon(eps))]))
    output, relevance, param_relevance = fn(dict(model.named_parameters()), x, relevance_out)

    w, b = model.weight.detach(), model.bias.detach()
    z = x @ w.T + b
    gamma = relevance_out / _stab(z, eps)
    torch.testing.assert_close(output, z, rtol=0, atol=1e-14)
    torch.testing.assert_close(relevance, x * (gamma @ w), rtol=1e-12, atol=1e-14)
    assert set(param_relevance) == {"weight", "bias"}
    torch.testing.assert_close(param_relevance["weight"], w * (gamma.T @ x), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(param_relevance["bias"], b * gamma.sum(0), rtol=1e-12, atol=1e-14)
    # input and bias relevance together redistribute R * z / s(z)
    total = relevance.sum() + param_relevance["bias"].sum()
    torch.testing.assert_close(total, (relevance_out * z / _stab(z, eps)).sum(), rtol=1e-12, atol=1e-14)
    # the weight relevance sums to the input relevance (each sum_i x_i w_ji G_j, regrouped)
    torch.testing.assert_close(param_relevance["weight"].sum(), relevance.sum(), rtol=1e-12, atol=1e-14)


def test_param_relevance_epsilon_two_layers_closed_form() -> None:
    """Names are qualified and each layer's parameter relevance uses the relevance reaching that layer."""
    torch.manual_seed(2)
    eps = 1e-6
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(D)
    composite = composites.layer_map([(nn.ReLU, rules.passthrough()), (nn.Linear, rules.epsilon(eps))])
    x, relevance_out = torch.randn(3, 4, dtype=D), torch.randn(3, 3, dtype=D)
    params = dict(model.named_parameters())
    _, relevance, param_relevance = lrpfunc.attribute_with_params(model, composite)(params, x, relevance_out)

    w1, b1, w2, b2 = (params[n].detach() for n in ("0.weight", "0.bias", "2.weight", "2.bias"))
    z1 = x @ w1.T + b1
    a1 = z1.clamp(min=0)
    z2 = a1 @ w2.T + b2
    g2 = relevance_out / _stab(z2, eps)
    r1 = a1 * (g2 @ w2)  # relevance at the ReLU output, passed through to z1
    g1 = r1 / _stab(z1, eps)
    assert set(param_relevance) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(param_relevance["2.weight"], w2 * (g2.T @ a1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(param_relevance["2.bias"], b2 * g2.sum(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(param_relevance["0.weight"], w1 * (g1.T @ x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(param_relevance["0.bias"], b1 * g1.sum(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(relevance, x * (g1 @ w1), rtol=1e-10, atol=1e-12)
    # the plain attribute() gives the same input relevance
    _, plain = lrpfunc.attribute(model, composite)(params, x, relevance_out)
    torch.testing.assert_close(plain, relevance, rtol=0, atol=0)


def test_param_relevance_is_differentiable() -> None:
    """gradcheck/gradgradcheck of the weight relevance w.r.t. the input and the weight."""

    def build(seed: int) -> tuple:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
        return model, torch.randn(2, 3, dtype=D), torch.randn(2, 2, dtype=D)

    model, x, grad_output = _first_seed_with_margin(build)
    fn = lrpfunc.attribute_with_params(model, composites.layer_map([(nn.Linear, rules.epsilon(1e-6))]))
    names, tensors = _differentiable(model)

    def f(x, *tensors):
        _, relevance, param_relevance = fn(dict(zip(names, tensors)), x, grad_output)
        return relevance, param_relevance["0.weight"], param_relevance["2.weight"], param_relevance["0.bias"]

    inputs = (x.clone().requires_grad_(), *tensors)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)
