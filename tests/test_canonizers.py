"""Canonizers: merge_batchnorm, resnet, softplus and a user-written one; none of them touches the module."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from models import TinyResNet, randomize_batchnorms
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import lrpfunc
from lrpfunc import canonizers, composites, rules, types

D = torch.float64


def _state(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dict": {name: sorted(m.__dict__) for name, m in model.named_modules()},
        "modules": [(name, id(m)) for name, m in model.named_modules()],
        "training": {name: m.training for name, m in model.named_modules()},
    }


def _assert_same_state(model: nn.Module, before: dict) -> None:
    after = _state(model)
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["dict"] == before["dict"] and after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    for _, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


# --------------------------------------------------------------------------------------------------------
# merge_batchnorm
# --------------------------------------------------------------------------------------------------------


def _conv_bn_net(conv_bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=conv_bias),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, bias=False),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 4),
    ).to(D).eval()
    randomize_batchnorms(model)
    return model


def _merged_by_hand(model: nn.Sequential, params: dict | None = None) -> tuple[nn.Sequential, dict]:
    """The same network with each BatchNorm folded into the convolution before it, as parameters computed
    (differentiably) from ``params``: ``W' = W g / sqrt(v + eps)``, ``b' = (b - mu) g / sqrt(v + eps) + beta``."""
    params = dict(model.named_parameters()) if params is None else params
    merged = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, dtype=D), nn.ReLU(), nn.Conv2d(3, 2, 3, dtype=D), nn.ReLU(), nn.Flatten(),
        nn.Linear(18, 4, dtype=D),
    ).eval()
    new = {}
    for conv, bn, target in (("0", "1", "0"), ("3", "4", "2")):
        module = model[int(bn)]
        scale = params[f"{bn}.weight"] / torch.sqrt(module.running_var + module.eps)
        bias = params.get(f"{conv}.bias", torch.zeros(len(scale), dtype=D))
        new[f"{target}.weight"] = params[f"{conv}.weight"] * scale[:, None, None, None]
        new[f"{target}.bias"] = (bias - module.running_mean) * scale + params[f"{bn}.bias"]
    new["5.weight"], new["5.bias"] = params["7.weight"], params["7.bias"]
    return merged, new


@pytest.mark.parametrize("conv_bias", [True, False])
def test_merge_batchnorm_keeps_the_output(conv_bias: bool) -> None:
    model = _conv_bn_net(conv_bias)
    x = torch.randn(2, 2, 5, 5, dtype=D)
    params = dict(model.named_parameters())
    with torch.no_grad():
        expected = model(x)
    grad_output = torch.ones(2, 4, dtype=D)
    merged_output, _ = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())(params, x, grad_output)
    plain_output, _ = lrpfunc.attribute(model, composites.epsilon_plus())(params, x, grad_output)
    torch.testing.assert_close(merged_output, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(plain_output, expected, rtol=1e-14, atol=1e-14)
    # and the hand-merged network agrees (to float precision)
    merged, merged_params = _merged_by_hand(model)
    torch.testing.assert_close(torch.func.functional_call(merged, merged_params, (x,)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("make_composite", [composites.epsilon_plus, composites.epsilon_alpha2_beta1_flat, lambda: composites.epsilon_gamma_box(-3.0, 3.0)])
def test_merge_batchnorm_relevance_equals_hand_merged_network(conv_bias: bool, make_composite) -> None:
    model = _conv_bn_net(conv_bias)
    x = torch.randn(2, 2, 5, 5, dtype=D)
    grad_output = torch.randn(2, 4, dtype=D)
    _, got = lrpfunc.attribute(model, make_composite(), canonizers.merge_batchnorm())(dict(model.named_parameters()), x, grad_output)
    merged, merged_params = _merged_by_hand(model)
    _, expected = lrpfunc.attribute(merged, make_composite())(merged_params, x, grad_output)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # without merging, the BatchNorms are passed through, which is something else
    _, unmerged = lrpfunc.attribute(model, make_composite())(dict(model.named_parameters()), x, grad_output)
    assert (unmerged - expected).abs().max() > 1e-3


def test_merge_batchnorm_gradients_reach_conv_and_batchnorm_parameters() -> None:
    model = _conv_bn_net(conv_bias=True)
    x = torch.randn(2, 2, 5, 5, dtype=D)
    grad_output, weight = torch.randn(2, 4, dtype=D), torch.randn(2, 2, 5, 5, dtype=D)
    fn = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())

    def loss(params):
        return (fn(params, x, grad_output)[1] * weight).sum()

    params = {name: p.detach() for name, p in model.named_parameters()}
    grads = torch.func.grad(loss)(params)
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias", "7.weight"):
        assert grads[name].abs().max() > 0, name

    # the chain rule through the hand-written merge gives the same numbers
    def loss_by_hand(params):
        merged, merged_params = _merged_by_hand(model, params)
        return (lrpfunc.attribute(merged, composites.epsilon_plus())(merged_params, x, grad_output)[1] * weight).sum()

    expected = torch.func.grad(loss_by_hand)(params)
    for name in params:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-9, atol=1e-12)


def _tiny_conv_bn(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).to(D).eval()
    randomize_batchnorms(model)
    return model, torch.randn(1, 1, 3, 3, dtype=D), torch.randn(1, 2, dtype=D)


def _away_from_kinks(model: nn.Module, x: torch.Tensor, margin: float = 1e-4) -> bool:
    """Input, parameters, BatchNorm outputs (ReLU inputs, and with the BatchNorm merged the layer's
    denominators) and Linear outputs at least ``margin`` away from zero."""
    values = [x.abs().min(), *(p.abs().min() for p in model.parameters())]
    with torch.no_grad():
        h = x
        for layer in model:
            h = layer(h)
            if isinstance(layer, (nn.BatchNorm2d, nn.Linear)):
                values.append(h.abs().min())
    return min(v.item() for v in values) > margin


def test_merge_batchnorm_parameter_derivatives_gradcheck() -> None:
    """Derivatives w.r.t. the convolution's and the BatchNorm's parameters equal finite differences."""
    for seed in range(1000):
        model, x, grad_output = _tiny_conv_bn(seed)
        if _away_from_kinks(model, x):
            break
    fn = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight"]
    tensors = tuple(dict(model.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def f(x, *tensors):
        return fn(dict(zip(names, tensors)), x, grad_output)[1]

    inputs = (x.clone().requires_grad_(), *tensors)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def test_merge_batchnorm1d_into_linear() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).to(D).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
    x, grad_output = torch.randn(5, 4, dtype=D), torch.randn(5, 2, dtype=D)
    bn = model[1]
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    merged = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(D)
    merged_params = {
        "0.weight": model[0].weight.detach() * scale[:, None],
        "0.bias": (model[0].bias.detach() - bn.running_mean) * scale + bn.bias.detach(),
        "2.weight": model[3].weight.detach(),
        "2.bias": model[3].bias.detach(),
    }
    composite = composites.layer_map([(nn.ReLU, rules.passthrough()), (nn.Linear, rules.epsilon(1e-6))])
    output, got = lrpfunc.attribute(model, composite, canonizers.merge_batchnorm())(dict(model.named_parameters()), x, grad_output)
    _, expected = lrpfunc.attribute(merged, composite)(merged_params, x, grad_output)
    torch.testing.assert_close(output, model(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_rule_table_has_no_batchnorm_site_after_merging() -> None:
    model = _conv_bn_net()
    x = torch.randn(1, 2, 5, 5, dtype=D)
    merged = lrpfunc.rule_table(model, composites.epsilon_plus(), x, canonizers.merge_batchnorm())
    unmerged = lrpfunc.rule_table(model, composites.epsilon_plus(), x)
    assert sum(isinstance(site.module, nn.BatchNorm2d) for site, _ in unmerged) == 2
    assert not any(isinstance(site.module, nn.BatchNorm2d) for site, _ in merged)
    assert "BatchNorm2d" in str(unmerged) and "BatchNorm2d" not in str(merged)
    # the convolutions keep their rules
    assert repr(merged.rule_of("0")).startswith("zplus") and repr(merged.rule_of("3")).startswith("zplus")
    with pytest.raises(KeyError):
        merged.rule_of("1")


def test_conv_without_bias_gets_the_merged_bias() -> None:
    model = _conv_bn_net(conv_bias=False)
    seen: dict[str, dict] = {}

    def spy(call, grad_outputs):
        seen[call.name] = {name: call.params[name] for name in call.params}
        return rules.epsilon()(call, grad_outputs)

    x = torch.randn(2, 2, 5, 5, dtype=D)
    fn = lrpfunc.attribute(model, composites.layer_map([(nn.Conv2d, spy)]), canonizers.merge_batchnorm())
    fn(dict(model.named_parameters()), x, torch.ones(2, 4, dtype=D))
    _, by_hand = _merged_by_hand(model)
    assert set(seen) == {"0", "3"}
    for name, target in (("0", "0"), ("3", "2")):
        assert set(seen[name]) == {"weight", "bias"}
        torch.testing.assert_close(seen[name]["weight"], by_hand[f"{target}.weight"], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(seen[name]["bias"], by_hand[f"{target}.bias"], rtol=1e-14, atol=1e-14)
    assert model[0].bias is None  # and the module is not changed


def test_merge_batchnorm_leaves_unmergeable_batchnorms_alone() -> None:
    """A BatchNorm after a ReLU, or after a convolution whose output is also read elsewhere, stays a call
    site of its own (and gets the composite's BatchNorm rule)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.bn_shared = nn.BatchNorm2d(2)
            self.relu = nn.ReLU()
            self.bn_after_relu = nn.BatchNorm2d(2)

        def forward(self, x):
            h = self.conv(x)
            out = self.bn_shared(h) + h  # h is read twice: cannot be folded
            return self.bn_after_relu(self.relu(out))

    model = Net().to(D).eval()
    randomize_batchnorms(model)
    x = torch.randn(1, 1, 4, 4, dtype=D)
    table = lrpfunc.rule_table(model, composites.epsilon_plus(), x, canonizers.merge_batchnorm())
    assert repr(table.rule_of("bn_shared")) == "passthrough"
    assert repr(table.rule_of("bn_after_relu")) == "passthrough"
    output, _ = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())(
        dict(model.named_parameters()), x, torch.ones(1, 2, 4, 4, dtype=D)
    )
    torch.testing.assert_close(output, model(x), rtol=1e-14, atol=1e-14)


def test_merge_batchnorm_param_relevance_reported_under_the_layer() -> None:
    model = _conv_bn_net(conv_bias=True)
    x = torch.randn(2, 2, 5, 5, dtype=D)
    fn = lrpfunc.attribute_with_params(model, composites.epsilon_plus(), canonizers.merge_batchnorm())
    _, relevance, param_relevance = fn(dict(model.named_parameters()), x, torch.randn(2, 4, dtype=D))
    assert {"0.weight", "0.bias", "7.weight", "7.bias"} <= set(param_relevance)
    assert not any(name.startswith(("1.", "4.")) for name in param_relevance)
    assert param_relevance["0.weight"].shape == model[0].weight.shape
    assert param_relevance["0.bias"].shape == model[0].bias.shape


def test_merge_batchnorm_leaves_the_module_alone() -> None:
    model = _conv_bn_net(conv_bias=False)
    before = _state(model)
    x = torch.randn(2, 2, 5, 5, dtype=D)
    lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())(
        dict(model.named_parameters()), x, torch.ones(2, 4, dtype=D)
    )
    _assert_same_state(model, before)


# --------------------------------------------------------------------------------------------------------
# resnet
# --------------------------------------------------------------------------------------------------------


def test_resnet_labels_residual_sums_in_the_rule_table() -> None:
    model = TinyResNet().to(D).eval()
    x = torch.randn(1, 3, 8, 8, dtype=D)
    table = lrpfunc.rule_table(model, composites.epsilon_plus(), x, canonizers.resnet())
    sums = [(site, rule) for site, rule in table if site.label is types.Sum]
    assert [site.name for site, _ in sums] == ["layers.0/add", "layers.1/add"]
    assert all(site.kind == "op" and repr(rule) == "norm" for site, rule in sums)
    text = str(table)
    assert "operation 'layers.0/add' [Sum]" in text and "operation 'layers.1/add' [Sum]" in text
    # the BatchNorms are merged too
    assert not any(isinstance(site.module, nn.BatchNorm2d) for site, _ in table)
    # without the canonizer nothing is labelled
    plain = lrpfunc.rule_table(model, composites.epsilon_plus(), x)
    assert not any(site.label is not None for site, _ in plain)
    assert "[Sum]" not in str(plain)


class TwoBranches(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)
        self.how = how

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.how == "iadd":
            out = a
            out += b
            return out
        if self.how == "plus":
            return a + b
        if self.how == "torch.add":
            return torch.add(a, b)
        if self.how == "alpha":
            return torch.add(a, b, alpha=2.0)
        if self.how == "broadcast":
            return a + b[:1]
        return a + 1.0


@pytest.mark.parametrize("how", ["iadd", "plus", "torch.add"])
def test_resnet_sum_is_attributed_with_norm(how: str) -> None:
    torch.manual_seed(2)
    model = TwoBranches(how).to(D)
    x, grad_output = torch.randn(2, 3, dtype=D), torch.randn(2, 4, dtype=D)
    composite = composites.layer_map([(types.Sum, rules.norm())])
    fn = lrpfunc.attribute(model, composite, canonizers.resnet())
    table = lrpfunc.rule_table(model, composite, x, canonizers.resnet())
    assert [repr(rule) for site, rule in table if site.label is types.Sum] == ["norm"]
    _, got = fn(dict(model.named_parameters()), x, grad_output)
    a, b = model.a(x).detach(), model.b(x).detach()
    z = a + b
    s = z + (torch.sign(z) + (z == 0).to(z)) * 1e-6
    expected = (a * grad_output / s) @ model.a.weight.detach() + (b * grad_output / s) @ model.b.weight.detach()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    (gradient,) = torch.func.vjp(model, x)[1](grad_output)
    assert (got - gradient).abs().max() > 1e-3


@pytest.mark.parametrize("how", ["alpha", "broadcast", "scalar"])
def test_resnet_does_not_label_other_additions(how: str) -> None:
    model = TwoBranches(how).to(D)
    x = torch.randn(2, 3, dtype=D)
    table = lrpfunc.rule_table(model, composites.layer_map([(types.Sum, rules.norm())]), x, canonizers.resnet())
    assert not any(site.label is types.Sum for site, _ in table)


def test_resnet_leaves_the_module_alone() -> None:
    model = TinyResNet().to(D).eval()
    randomize_batchnorms(model)
    before = _state(model)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    output, _ = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.resnet())(
        dict(model.named_parameters()), x, torch.ones(2, 5, dtype=D)
    )
    torch.testing.assert_close(output, model(x), rtol=1e-14, atol=1e-14)
    _assert_same_state(model, before)


# --------------------------------------------------------------------------------------------------------
# softplus
# --------------------------------------------------------------------------------------------------------


class ManyReLUs(nn.Module):
    """Every way of writing a ReLU; ``softplus_beta`` set computes softplus instead (the reference)."""

    def __init__(self, softplus_beta: float | None = None) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 6)
        self.act = nn.ReLU()
        self.act_inplace = nn.ReLU(inplace=True)
        self.l2 = nn.Linear(6, 6)
        self.l3 = nn.Linear(6, 2)
        self.beta = softplus_beta

    def _relu(self, h, how):
        if self.beta is not None:
            return F.softplus(h, beta=self.beta)
        return {
            "module": self.act,
            "module_inplace": self.act_inplace,
            "functional": F.relu,
            "functional_inplace": lambda t: F.relu(t, inplace=True),
            "torch": torch.relu,
            "method": torch.Tensor.relu,
            "method_inplace": torch.Tensor.relu_,
        }[how](h)

    def forward(self, x):
        h = self._relu(self.l1(x), "module")
        h = self._relu(h * 1.5, "module_inplace")
        h = self._relu(self.l2(h), "functional")
        h = self._relu(h - 0.1, "functional_inplace")
        h = self._relu(h + 0.2, "torch")
        h = self._relu(h * 0.9, "method")
        h = self._relu(h - 0.05, "method_inplace")
        return self.l3(h)


@pytest.mark.parametrize("beta", [10.0, 2.0])
def test_softplus_replaces_every_relu(beta: float) -> None:
    torch.manual_seed(3)
    model = ManyReLUs().to(D)
    reference = ManyReLUs(beta).to(D)
    reference.load_state_dict(model.state_dict())
    x, grad_output = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    params = dict(model.named_parameters())
    output, relevance = lrpfunc.attribute(model, None, canonizers.softplus(beta))(params, x, grad_output)
    expected_output, pullback = torch.func.vjp(reference, x)
    torch.testing.assert_close(output, expected_output, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(relevance, pullback(grad_output)[0], rtol=1e-12, atol=1e-13)
    with torch.no_grad():
        assert (model(x) - expected_output).abs().max() > 1e-4  # the ReLU model is a different function


def test_softplus_gives_nonzero_second_derivatives() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(D)
    x, grad_output, weight = torch.randn(2, 3, dtype=D), torch.randn(2, 2, dtype=D), torch.randn(2, 3, dtype=D)
    params = dict(model.named_parameters())

    def second(canonizer_list):
        fn = lrpfunc.attribute(model, None, canonizer_list)
        return torch.func.grad(lambda x: (fn(params, x, grad_output)[1] * weight).sum())(x)

    assert second(()).abs().max() == 0  # a ReLU network is piecewise linear
    smooth = second((canonizers.softplus(10.0),))
    assert smooth.abs().max() > 1e-3
    # and it is the second derivative of the softplus network
    reference = nn.Sequential(nn.Linear(3, 8), nn.Softplus(10.0), nn.Linear(8, 8), nn.Softplus(10.0), nn.Linear(8, 2)).to(D)
    reference.load_state_dict(model.state_dict())

    def reference_relevance(x):
        return torch.func.vjp(reference, x)[1](grad_output)[0]

    expected = torch.func.grad(lambda x: (reference_relevance(x) * weight).sum())(x)
    torch.testing.assert_close(smooth, expected, rtol=1e-10, atol=1e-12)


def test_softplus_composes_with_a_composite_and_other_canonizers() -> None:
    model = TinyResNet().to(D).eval()
    randomize_batchnorms(model)
    x = torch.randn(1, 3, 8, 8, dtype=D)
    fn = lrpfunc.attribute(model, composites.epsilon_plus(), (canonizers.softplus(5.0), canonizers.resnet()))
    params = dict(model.named_parameters())
    second = torch.func.grad(lambda x: (fn(params, x, torch.ones(1, 5, dtype=D))[1] ** 2).sum())(x)
    assert torch.isfinite(second).all() and second.abs().max() > 0
    table = lrpfunc.rule_table(model, composites.epsilon_plus(), x, (canonizers.softplus(5.0), canonizers.resnet()))
    assert sum(site.label is types.Sum for site, _ in table) == 2


# --------------------------------------------------------------------------------------------------------
# a canonizer written by the user
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TanhAsHardtanh(canonizers.Canonizer):
    def replace_op(self, func):
        if func in (torch.tanh, torch.Tensor.tanh, F.tanh):
            return lambda x, *args, **kwargs: F.hardtanh(x)
        return None


class TanhNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 5)
        self.act = nn.Tanh()
        self.l2 = nn.Linear(5, 2)

    def forward(self, x):
        h = self.act(self.l1(x) * 3.0)
        h = torch.tanh(h + self.l1.bias.sum()) + h.tanh()
        return self.l2(F.tanh(h))


def _hardtanh_reference(model: TanhNet, x: torch.Tensor) -> torch.Tensor:
    h = F.hardtanh(model.l1(x) * 3.0)
    h = F.hardtanh(h + model.l1.bias.sum()) + F.hardtanh(h)
    return model.l2(F.hardtanh(h))


def test_custom_canonizer_replaces_the_operation() -> None:
    torch.manual_seed(5)
    model = TanhNet().to(D)
    before = _state(model)
    x, grad_output = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    fn = lrpfunc.attribute(model, None, [TanhAsHardtanh()])
    output, relevance = fn(dict(model.named_parameters()), x, grad_output)
    expected_output, pullback = torch.func.vjp(lambda x: _hardtanh_reference(model, x), x)
    torch.testing.assert_close(output, expected_output, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(relevance, pullback(grad_output)[0], rtol=1e-12, atol=1e-14)
    assert (model(x) - expected_output).abs().max() > 1e-3  # hardtanh saturates where tanh does not
    # the module is untouched and still computes tanh
    _assert_same_state(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), TanhNet.forward(model, x))
        torch.testing.assert_close(model(x), model.l2(torch.tanh(torch.tanh(torch.tanh(model.l1(x) * 3.0) + model.l1.bias.sum()) + torch.tanh(torch.tanh(model.l1(x) * 3.0)))))
    # composites still see the module call of nn.Tanh (and may give it a rule)
    table = lrpfunc.rule_table(model, composites.layer_map([(nn.Tanh, rules.passthrough())]), x, [TanhAsHardtanh()])
    assert repr(table.rule_of("act")) == "passthrough"


def test_custom_canonizer_with_a_rewrite_sees_only_its_own_record() -> None:
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Spy(canonizers.Canonizer):
        def rewrite(self, record) -> None:
            seen.append(record)

    model = TanhNet().to(D)
    x = torch.randn(2, 3, dtype=D)
    fn = lrpfunc.attribute(model, composites.epsilon_plus(), Spy())
    fn(dict(model.named_parameters()), x, torch.ones(2, 2, dtype=D))
    fn(dict(model.named_parameters()), x, torch.ones(2, 2, dtype=D))
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert not any(isinstance(v, type(seen[0])) for m in model.modules() for v in vars(m).values())
