"""Operation classes, the rules of the LRP composites for them, and the coverage diagnostic (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpfunc
from lrpfunc import composites, ops, rules, types

D = torch.float64


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _stab(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return z + (torch.sign(z) + (z == 0).to(z)) * eps


# ----------------------------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------------------------


class Everything(nn.Module):
    """One operation of each class, written functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, dtype=D))
        self.kernel = nn.Parameter(torch.randn(2, 1, 3, dtype=D))
        self.scale = nn.Parameter(torch.rand(4, dtype=D) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight)  # Dense
        h = torch.addmm(torch.zeros(4, dtype=D), h, self.weight)  # Dense (HF Conv1D)
        h = h + F.relu(h)  # Elementwise, Sum
        h = h * self.scale + 1.0  # Scale, Shift
        h = F.layer_norm(h, (4,))  # Normalization
        s = torch.softmax(h, dim=-1)  # Softmax
        h = s * h  # Product
        c = F.conv1d(h[:, None, :], self.kernel, padding=1)  # DataMovement, Convolution
        c = F.avg_pool1d(c, 2)  # AvgPool
        c = c.amax(dim=1)  # Selection
        return c.sum(dim=1, keepdim=True) + torch.matmul(h, h.T).mean(1, keepdim=True)  # Reduction, Product


def test_every_operation_gets_its_class() -> None:
    torch.manual_seed(0)
    model = Everything()
    table = lrpfunc.rule_table(model, composites.epsilon_plus(), torch.randn(3, 4, dtype=D))
    classes = [site.op_class for site, _ in table if site.kind == "op"]
    for expected in (ops.Dense, ops.Elementwise, ops.Sum, ops.Scale, ops.Shift, ops.Normalization, ops.Softmax,
                     ops.Product, ops.DataMovement, ops.Convolution, ops.AvgPool, ops.Selection, ops.Reduction):
        assert expected in classes, expected.__name__
    assert all(issubclass(c, ops.Operation) for c in classes)
    # the printed table has a class column
    assert "Softmax" in str(table) and "Normalization" in str(table)


def test_parameter_operands_are_the_calls_parameters() -> None:
    weight, bias = torch.randn(3, 2, dtype=D), torch.randn(3, dtype=D)
    x = torch.randn(4, 2, dtype=D)
    info = ops.classify(F.linear, (x, weight, bias), {}, lambda t: t is x)
    assert info.op_class is ops.Dense and info.params["weight"] is weight and info.params["bias"] is bias
    info = ops.classify(torch.addmm, (bias, x, weight.T), {}, lambda t: t is x)
    assert info.op_class is ops.Dense and set(info.params) == {"weight", "bias"}
    assert ops.classify(torch.matmul, (x, x.T), {}, lambda t: True).op_class is ops.Product
    assert ops.classify(torch.add, (x, 1.0), {}, lambda t: t is x).op_class is ops.Shift
    assert ops.classify(torch.sub, (x, x), {}, lambda t: True).op_class is ops.Sum
    assert ops.classify(torch.div, (x, x), {}, lambda t: True).op_class is ops.Quotient
    assert ops.classify(torch.div, (1.0, x), {}, lambda t: t is x).op_class is ops.Other  # a reciprocal
    assert ops.classify(torch.special.bessel_j0, (x,), {}, lambda t: True).op_class is ops.Other


def test_registering_an_operation() -> None:
    class Mine(ops.Elementwise):
        pass

    def twice(x: torch.Tensor) -> torch.Tensor:
        return torch.special.erf(x) * 1.0

    try:
        ops.register(torch.special.erf, Mine)
        model = nn.Linear(3, 3).to(D)

        class Wrapped(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return twice(self.lin(x))

        table = lrpfunc.rule_table(Wrapped(), composites.layer_map([(Mine, rules.passthrough())]), torch.randn(2, 3, dtype=D))
        (erf,) = [(site, rule) for site, rule in table if site.op_class is Mine]
        assert repr(erf[1]) == "passthrough"
    finally:
        ops._TABLE.pop(torch.special.erf, None)
        ops._CONSTANT.pop(torch.special.erf, None)
    with pytest.raises(TypeError, match=r"register: op_class must be a subclass of lrpfunc.ops.Operation, got int"):
        ops.register(torch.special.erf, int)


# ----------------------------------------------------------------------------------------------------------------
# functional operations get what their modules get
# ----------------------------------------------------------------------------------------------------------------


class Modules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv1(x))
        h = self.relu(self.conv2(h)) + h  # a residual written as x + f(x)
        return self.fc(torch.flatten(self.pool(h), 1))


class Functional(Modules):
    """The same network, every layer written as a function of the parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(x, self.conv1.weight, self.conv1.bias, padding=1))
        h = torch.relu(F.conv2d(h, self.conv2.weight, self.conv2.bias, padding=1)) + h
        return F.linear(torch.flatten(F.avg_pool2d(h, 2), 1), self.fc.weight, self.fc.bias)


@pytest.mark.parametrize(
    "make",
    [composites.epsilon_plus, composites.epsilon_plus_flat, composites.epsilon_alpha2_beta1, lambda: composites.epsilon_gamma_box(-3.0, 3.0),
     composites.guided_backprop, composites.excitation_backprop],
    ids=["epsilon_plus", "epsilon_plus_flat", "alpha2_beta1", "gamma_box", "guided_backprop", "excitation_backprop"],
)
def test_functional_layers_get_what_their_modules_get(make) -> None:
    torch.manual_seed(1)
    modules = Modules().to(D)
    functional = Functional().to(D)
    functional.load_state_dict(modules.state_dict())
    x, grad_output = torch.randn(2, 3, 8, 8, dtype=D), torch.randn(2, 5, dtype=D)
    _, expected = lrpfunc.attribute(modules, make())(_params(modules), x, grad_output)
    _, got = lrpfunc.attribute(functional, make())(_params(functional), x, grad_output)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    gradient = torch.func.vjp(modules, x)[1](grad_output)[0]
    assert (got - gradient).abs().max() > 1e-3  # the rules act


def test_residual_sum_gets_the_sum_rule_without_a_canonizer() -> None:
    torch.manual_seed(2)
    model = Modules().to(D)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    table = lrpfunc.rule_table(model, composites.epsilon_plus(), x)
    (site, rule), = [(site, rule) for site, rule in table if site.op_class is ops.Sum]
    assert repr(rule) == "norm" and site.label is None  # by its class, not by a canonizer's label


def test_dense_operation_with_a_parameter_is_a_layer_the_z_rules_act_on() -> None:
    """HuggingFace GPT-2's Conv1D: ``addmm(bias, x.view(-1, nx), weight)``; its parameters are the call's."""

    class Conv1D(nn.Module):
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf, dtype=D))
            self.bias = nn.Parameter(torch.randn(nf, dtype=D))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.size()[:-1] + (self.weight.size(-1),)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(shape)

    torch.manual_seed(3)
    conv1d = Conv1D(4, 3)
    linear = nn.Linear(3, 4).to(D)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.T)
        linear.bias.copy_(conv1d.bias)
    x, grad_output = torch.randn(2, 5, 3, dtype=D), torch.randn(2, 5, 4, dtype=D)
    pairs = [
        (composites.epsilon_plus(zero_params="bias"), composites.epsilon_plus(zero_params="bias")),
        (composites.layer_map([(ops.Dense, rules.zplus())]), composites.layer_map([(nn.Linear, rules.zplus())])),
    ]
    for composite, same_for_modules in pairs:
        _, expected = lrpfunc.attribute(linear, same_for_modules)(_params(linear), x, grad_output)
        _, got = lrpfunc.attribute(conv1d, composite)(_params(conv1d), x, grad_output)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # its parameter relevance is reported under the model's own parameter names
    _, _, by_param = lrpfunc.attribute_with_params(conv1d, composites.epsilon_plus())(_params(conv1d), x, grad_output)
    assert set(by_param) == {"weight", "bias"}


# ----------------------------------------------------------------------------------------------------------------
# the rules of the operation classes, against closed forms
# ----------------------------------------------------------------------------------------------------------------


def test_uniform_rule_on_products() -> None:
    class Products(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.matmul(a, b) + (a * a).sum(-1, keepdim=True)

    torch.manual_seed(4)
    a, b = torch.randn(3, 4, dtype=D), torch.randn(4, 5, dtype=D)
    grad_output = torch.randn(3, 5, dtype=D)
    composite = composites.layer_map([(ops.Product, rules.uniform()), (ops.Sum, rules.norm()), (ops.Reduction, rules.norm())])
    _, (r_a, r_b) = lrpfunc.attribute(Products(), composite)({}, (a, b), grad_output)
    z1, z2 = a @ b, (a * a).sum(-1, keepdim=True)
    z = z1 + z2
    r1, r2 = z1 * grad_output / _stab(z), (z2 * grad_output / _stab(z)).sum(-1, keepdim=True)  # the sum rule
    g1 = r1 / (2 * _stab(z1))
    squares = a * a
    r_square = squares * (r2 / _stab(z2))  # the reduction: epsilon
    expected_a = a * (g1 @ b.T) + 2 * (a * a) * r_square / (2 * _stab(squares))  # a * a: both operands are a
    torch.testing.assert_close(r_a, expected_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r_b, b * (a.T @ g1), rtol=1e-10, atol=1e-12)


def test_softmax_rule_and_masked_entries() -> None:
    class Masked(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = torch.tensor([0.0, float("-inf"), 0.0, 0.0], dtype=D)
            return torch.softmax(x + mask, dim=-1)

    torch.manual_seed(5)
    x, grad_output = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    grad_output[:, 1] = 0  # nothing arrives where the probability is 0 (what a product with the weights gives)
    composite = composites.layer_map([(ops.Softmax, rules.softmax())])
    _, relevance = lrpfunc.attribute(Masked(), composite)({}, x, grad_output)
    masked = x + torch.tensor([0.0, float("-inf"), 0.0, 0.0], dtype=D)
    s = torch.softmax(masked, -1)
    expected = torch.where(torch.isinf(masked), 0.0, masked) * (grad_output - s * grad_output.sum(-1, keepdim=True))
    # the -inf entry gets 0; the shift by the mask's 0 (no rule) passes the rest on unchanged
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-12)
    assert relevance[:, 1].eq(0).all() and torch.isfinite(relevance).all()


class RMSNorm(nn.Module):
    """HuggingFace's LlamaRMSNorm, written by hand (matched by its name); ``gemma`` uses ``(1 + weight)``."""

    def __init__(self, size: int, gemma: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(size, dtype=D) + 0.5)
        self.variance_epsilon = 1e-6
        self.gemma = gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        h = x * torch.rsqrt(variance + self.variance_epsilon)
        return h * (1.0 + self.weight) if self.gemma else self.weight * h


class ChannelsFirstLayerNorm(nn.Module):
    """facebookresearch ConvNeXt's LayerNorm for data_format="channels_first", by hand."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels, dtype=D) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels, dtype=D))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _held_epsilon(x: torch.Tensor, held: "callable", grad_output: torch.Tensor) -> torch.Tensor:
    """x * J^T (R / s(y)) of the affine map ``held`` (the normalisation with its divisor held)."""
    y, pullback = torch.func.vjp(held, x)
    return x * pullback(grad_output / _stab(y))[0]


@pytest.mark.parametrize("kind", ["layer_norm", "layer_norm_module", "channels_first", "rms", "gemma", "group_norm"])
def test_normalization_rule_holds_the_divisor(kind: str) -> None:
    torch.manual_seed(6)
    if kind in ("channels_first", "group_norm"):
        x, shape = torch.randn(2, 4, 3, 3, dtype=D), (4,)
    else:
        x, shape = torch.randn(2, 3, 4, dtype=D), (4,)
    recorded = x.clone()
    if kind == "layer_norm_module":
        module = nn.LayerNorm(4).to(D)
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_()
        std = (recorded.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()

        def held(v):
            return (v - v.mean(-1, keepdim=True)) / std * module.weight.detach() + module.bias.detach()

    elif kind == "layer_norm":
        class Functional(nn.Module):
            def forward(self, v):
                return F.layer_norm(v, shape)

        module = Functional()
        std = (recorded.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()

        def held(v):
            return (v - v.mean(-1, keepdim=True)) / std

    elif kind == "channels_first":
        module = ChannelsFirstLayerNorm(4)
        std = ((recorded - recorded.mean(1, keepdim=True)).pow(2).mean(1, keepdim=True) + module.eps).sqrt()

        def held(v):
            return module.weight.detach()[:, None, None] * (v - v.mean(1, keepdim=True)) / std + module.bias.detach()[:, None, None]

    elif kind in ("rms", "gemma"):
        module = RMSNorm(4, gemma=kind == "gemma")
        rms = (recorded.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        scale = (1.0 + module.weight.detach()) if kind == "gemma" else module.weight.detach()

        def held(v):
            return v / rms * scale

    else:
        module = nn.GroupNorm(2, 4).to(D)
        grouped = recorded.reshape(2, 2, -1)
        std = (grouped.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()

        def held(v):
            g = v.reshape(2, 2, -1)
            return ((g - g.mean(-1, keepdim=True)) / std).reshape(v.shape) * module.weight.detach()[:, None, None] + module.bias.detach()[:, None, None]

    grad_output = torch.randn_like(module(x))
    composite = composites.epsilon_plus()
    _, relevance = lrpfunc.attribute(module, composite)(_params(module), x, grad_output)
    torch.testing.assert_close(relevance, _held_epsilon(x, held, grad_output), rtol=1e-10, atol=1e-12)
    if kind in ("rms", "gemma"):  # a diagonal map: the identity, up to the stabilizer
        y = module(x).detach()
        torch.testing.assert_close(relevance, grad_output * y / _stab(y), rtol=1e-12, atol=1e-12)


def test_normalization_modules_known_by_their_names() -> None:
    table = lrpfunc.rule_table(RMSNorm(4), composites.epsilon_plus(), torch.randn(2, 4, dtype=D))
    assert isinstance(RMSNorm(4), types.RMSNormLike) and repr(table.rule_of("")) == "normalization()"
    assert isinstance(ChannelsFirstLayerNorm(3), types.LayerNormLike)
    assert not isinstance(nn.Linear(2, 2), types.RMSNormLike)
    custom = types.duck("HasGain", has=["gain"])
    module = nn.Module()
    module.gain = 1.0
    assert isinstance(module, custom) and not isinstance(nn.Module(), custom)


def test_gated_rule_holds_attention_weights_and_gates_constant() -> None:
    class Attention(nn.Module):
        def forward(self, scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return torch.softmax(scores, -1) @ values + torch.sigmoid(values) * values

    torch.manual_seed(7)
    scores, values = torch.randn(3, 3, dtype=D), torch.randn(3, 4, dtype=D)
    grad_output = torch.randn(3, 4, dtype=D)
    composite = composites.layer_map([(ops.Product, rules.gated()), (ops.Sum, rules.norm())])
    _, (r_scores, r_values) = lrpfunc.attribute(Attention(), composite)({}, (scores, values), grad_output)
    a = torch.softmax(scores, -1)
    z1, z2 = a @ values, torch.sigmoid(values) * values
    z = z1 + z2
    r1, r2 = z1 * grad_output / _stab(z), z2 * grad_output / _stab(z)
    expected = values * (a.T @ (r1 / _stab(z1))) + values * torch.sigmoid(values) * r2 / _stab(z2)
    torch.testing.assert_close(r_values, expected, rtol=1e-10, atol=1e-12)
    assert r_scores.eq(0).all()  # nothing reaches the scores through the attention weights


# ----------------------------------------------------------------------------------------------------------------
# closed-form pullbacks and left-out zero terms equal the general path
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer",
    [
        lambda: nn.Linear(5, 3),
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        lambda: nn.Conv3d(2, 3, 2),
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
    ],
    ids=["linear", "conv1d", "conv2d-grouped-dilated", "conv3d", "conv-transpose2d"],
)
def test_closed_form_transposes_equal_the_recorded_pullback(layer) -> None:
    torch.manual_seed(8)
    module = layer().to(D)
    shapes = {nn.Linear: (3, 5), nn.Conv1d: (2, 4, 9), nn.Conv2d: (2, 4, 9, 8), nn.Conv3d: (2, 2, 4, 4, 4), nn.ConvTranspose2d: (2, 4, 5, 5)}
    x = torch.randn(*shapes[type(module)], dtype=D)
    grad_output = torch.randn_like(module(x))
    composite = composites.layer_map([(types.Linear, rules.epsilon())])
    _, fast = lrpfunc.attribute(module, composite)(_params(module), x, grad_output)
    z, pullback = torch.func.vjp(module, x)
    torch.testing.assert_close(fast, x * pullback(grad_output / _stab(z))[0], rtol=1e-12, atol=1e-12)
    for rule in (rules.zplus(), rules.gamma(0.25), rules.alpha_beta(2.0, 1.0), rules.flat()):
        composite = composites.layer_map([(types.Linear, rule)])
        _, fast = lrpfunc.attribute(module, composite)(_params(module), x.clamp(min=0), grad_output)
        with lrpfunc._tape.forced("vjp"):  # no closed forms, no left-out terms: the general path
            _, general = lrpfunc.attribute(module, composite)(_params(module), x.clamp(min=0), grad_output)
        torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# the coverage diagnostic
# ----------------------------------------------------------------------------------------------------------------


def test_conservation_report_finds_the_sites_that_break_conservation() -> None:
    torch.manual_seed(9)
    model = Modules().to(D)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    grad_output = torch.eye(5, dtype=D)[[1, 3]]
    params = _params(model)
    # every class has its rule: every site conserves, and the report's totals are the attribution's
    composite = composites.epsilon_plus(layer_map=[(types.Convolution, rules.epsilon())])
    report = lrpfunc.conservation(model, composite)(params, x, grad_output)
    _, relevance = lrpfunc.attribute(model, composite)(params, x, grad_output)
    assert report.leaks(1e-4) == [] and abs(report.ratio - 1) < 1e-4  # epsilon's stabilizer: ~1e-5 here
    assert report.total_out == pytest.approx(relevance.sum().item(), rel=1e-12)
    assert "created" in str(report) and "total: in" in str(report)
    # without the sum rule, the plain gradient of x + f(x) doubles the relevance that passes through it
    no_sums = composites.layer_map([(types.Activation + (ops.Elementwise,), rules.passthrough()), (types.AvgPool, rules.norm()),
                                    (types.Linear, rules.epsilon())])
    report = lrpfunc.conservation(model, no_sums)(params, x, grad_output)
    (worst, *_) = report.leaks(1e-6)
    assert worst.site.op_class is ops.Sum and worst.rule is None and worst.created > 0
    assert report.ratio > 1.01
