"""Every rule against its closed form in matrix notation (as Zennit's own tests do), float64, at 1e-10.

A layer ``z = x W^T + b`` (a convolution is written as its matrix, built as the Jacobian of the
convolution without bias) is attributed on its own; ``X`` is the flattened batch of inputs, ``R`` the
flattened relevance arriving at the output, ``s`` the stabilizer ``z + (sign(z) + (z == 0)) * eps`` and
``(.)^+``/``(.)^-`` positive and negative parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpfunc
from lrpfunc import Stabilizer, composites, rules, stabilize

D = torch.float64
TOL = 1e-10


def stab(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return z + (torch.sign(z) + (z == 0).to(z)) * eps


def assert_close(got: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    scale = max(1.0, expected.abs().max().item())
    error = (got - expected).abs().max().item()
    assert error <= tol * scale, f"max error {error:.3e} (scale {scale:.3e})"


@dataclass
class Layer:
    """A single layer, its input, and its matrix form ``matrix(weight)`` and bias vector ``bias_vector(b)``."""

    module: nn.Module
    x: torch.Tensor
    matrix: Callable[[torch.Tensor], torch.Tensor]
    bias_vector: Callable[[torch.Tensor], torch.Tensor]

    @property
    def X(self) -> torch.Tensor:  # noqa: N802
        return self.x.flatten(1)

    @property
    def W(self) -> torch.Tensor:  # noqa: N802
        return self.module.weight.detach()

    @property
    def b(self) -> torch.Tensor:
        return self.module.bias.detach()

    def output_shape(self) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(self.module(self.x).shape)

    def attribute(self, rule, relevance: torch.Tensor) -> torch.Tensor:
        """lrpfunc's relevance of this layer alone with ``rule``, flattened."""
        composite = composites.layer_map([(type(self.module), rule)])
        fn = lrpfunc.attribute(self.module, composite)
        _, relevance_in = fn(dict(self.module.named_parameters()), self.x, relevance.reshape(self.output_shape()))
        assert relevance_in.shape == self.x.shape
        return relevance_in.flatten(1)


def _linear() -> Layer:
    torch.manual_seed(0)
    module = nn.Linear(5, 4).to(D)
    with torch.no_grad():
        module.bias.copy_(torch.tensor([0.3, -0.2, 0.5, -0.4], dtype=D))
    x = torch.randn(3, 5, dtype=D)
    return Layer(module, x, lambda w: w, lambda b: b)


def _conv(stride: int, padding: int) -> Callable[[], Layer]:
    def build() -> Layer:
        torch.manual_seed(1)
        module = nn.Conv2d(2, 3, 3, stride=stride, padding=padding).to(D)
        x = torch.randn(2, 2, 5, 5, dtype=D)
        out_shape = F.conv2d(x[:1], module.weight, None, stride, padding).shape[1:]

        def matrix(w: torch.Tensor) -> torch.Tensor:
            def conv(v: torch.Tensor) -> torch.Tensor:
                return F.conv2d(v.reshape(1, 2, 5, 5), w, None, stride, padding).flatten()

            return torch.func.jacrev(conv)(torch.zeros(50, dtype=D))

        def bias_vector(b: torch.Tensor) -> torch.Tensor:
            return b[:, None, None].expand(out_shape).flatten()

        return Layer(module, x, matrix, bias_vector)

    return build


LAYERS = {"linear": _linear, "conv-pad1": _conv(1, 1), "conv-stride2": _conv(2, 0)}


@pytest.fixture(params=sorted(LAYERS))
def layer(request: pytest.FixtureRequest) -> Layer:
    return LAYERS[request.param]()


def _relevance_out(layer: Layer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    n = layer.x.shape[0]
    return torch.randn(n, int(torch.Size(layer.output_shape()[1:]).numel()), dtype=D, generator=generator)


def test_matrix_form_reproduces_the_layer(layer: Layer) -> None:
    z = layer.X @ layer.matrix(layer.W).T + layer.bias_vector(layer.b)
    with torch.no_grad():
        assert_close(z, layer.module(layer.x).flatten(1), 1e-13)


# --------------------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------------------


def expected_epsilon(layer: Layer, R: torch.Tensor, eps: float = 1e-6, bias: bool = True) -> torch.Tensor:  # noqa: N803
    M = layer.matrix(layer.W)
    Z = layer.X @ M.T + (layer.bias_vector(layer.b) if bias else 0.0)
    return layer.X * ((R / stab(Z, eps)) @ M)


def expected_zplus(layer: Layer, R: torch.Tensor) -> torch.Tensor:  # noqa: N803
    X, W, b = layer.X, layer.W, layer.b
    Mp, Mn = layer.matrix(W.clamp(min=0)), layer.matrix(W.clamp(max=0))
    Xp, Xn = X.clamp(min=0), X.clamp(max=0)
    Z = Xp @ Mp.T + layer.bias_vector(b.clamp(min=0)) + Xn @ Mn.T
    G = R / stab(Z)
    return Xp * (G @ Mp) + Xn * (G @ Mn)


def expected_alpha_beta(layer: Layer, R: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:  # noqa: N803
    X, W, b = layer.X, layer.W, layer.b
    Mp, Mn = layer.matrix(W.clamp(min=0)), layer.matrix(W.clamp(max=0))
    Xp, Xn = X.clamp(min=0), X.clamp(max=0)
    Zp = Xp @ Mp.T + layer.bias_vector(b.clamp(min=0)) + Xn @ Mn.T
    Zn = Xp @ Mn.T + layer.bias_vector(b.clamp(max=0)) + Xn @ Mp.T
    Gp, Gn = R / stab(Zp), R / stab(Zn)
    return alpha * (Xp * (Gp @ Mp) + Xn * (Gp @ Mn)) - beta * (Xp * (Gn @ Mn) + Xn * (Gn @ Mp))


def expected_gamma(layer: Layer, R: torch.Tensor, gamma: float) -> torch.Tensor:  # noqa: N803
    """Zennit's sign-aware gamma: where z > 0 the positive contributions are emphasised (x^+ with
    w + g w^+, x^- with w + g w^-), where z < 0 the negative ones (x^+ with w + g w^-, x^- with w + g w^+)."""
    X, W, b = layer.X, layer.W, layer.b
    M = layer.matrix(W)
    Mgp = layer.matrix(W + gamma * W.clamp(min=0))
    Mgn = layer.matrix(W + gamma * W.clamp(max=0))
    Xp, Xn = X.clamp(min=0), X.clamp(max=0)
    Z = X @ M.T + layer.bias_vector(b)
    Zp = Xp @ Mgp.T + layer.bias_vector(b + gamma * b.clamp(min=0)) + Xn @ Mgn.T
    Zn = Xp @ Mgn.T + layer.bias_vector(b + gamma * b.clamp(max=0)) + Xn @ Mgp.T
    Gp = (Z > 0) * R / stab(Zp)
    Gn = (Z < 0) * R / stab(Zn)
    return Xp * (Gp @ Mgp) + Xn * (Gp @ Mgn) + Xp * (Gn @ Mgn) + Xn * (Gn @ Mgp)


def expected_zbox(layer: Layer, R: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:  # noqa: N803
    X, W, b = layer.X, layer.W, layer.b
    L, H = low.expand_as(layer.x).flatten(1), high.expand_as(layer.x).flatten(1)
    M, Mp, Mn = layer.matrix(W), layer.matrix(W.clamp(min=0)), layer.matrix(W.clamp(max=0))
    # the bias is kept in each of the three terms (as Zennit does), so it cancels in the denominator
    Z = (X @ M.T + layer.bias_vector(b)) - (L @ Mp.T + layer.bias_vector(b.clamp(min=0))) - (
        H @ Mn.T + layer.bias_vector(b.clamp(max=0))
    )
    G = R / stab(Z)
    return X * (G @ M) - L * (G @ Mp) - H * (G @ Mn)


def expected_flat(layer: Layer, R: torch.Tensor) -> torch.Tensor:  # noqa: N803
    M1 = layer.matrix(torch.ones_like(layer.W))
    Z = torch.ones_like(layer.X) @ M1.T  # inputs one, weights one, bias zero
    return (R / stab(Z)) @ M1


def expected_wsquare(layer: Layer, R: torch.Tensor) -> torch.Tensor:  # noqa: N803
    M2 = layer.matrix(layer.W**2)
    Z = torch.ones_like(layer.X) @ M2.T + layer.bias_vector(layer.b**2)
    return (R / stab(Z)) @ M2


def _bounds(layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.x.ndim == 4:  # per channel, as documented: (1, C, 1, 1)
        return (torch.tensor([-3.0, -2.5], dtype=D).reshape(1, 2, 1, 1), torch.tensor([2.0, 3.5], dtype=D).reshape(1, 2, 1, 1))
    return torch.full((1, 5), -3.0, dtype=D), torch.linspace(2.0, 4.0, 5, dtype=D).reshape(1, 5)


CASES: dict[str, tuple[Callable[[Layer], object], Callable[[Layer, torch.Tensor], torch.Tensor]]] = {
    "epsilon": (lambda layer: rules.epsilon(), expected_epsilon),
    "epsilon_nobias": (lambda layer: rules.epsilon(zero_params="bias"), lambda l, R: expected_epsilon(l, R, bias=False)),
    "zplus": (lambda layer: rules.zplus(), expected_zplus),
    "alpha2_beta1": (lambda layer: rules.alpha_beta(2.0, 1.0), lambda l, R: expected_alpha_beta(l, R, 2.0, 1.0)),
    "alpha1_beta0": (lambda layer: rules.alpha_beta(1.0, 0.0), lambda l, R: expected_alpha_beta(l, R, 1.0, 0.0)),
    "gamma_0.25": (lambda layer: rules.gamma(0.25), lambda l, R: expected_gamma(l, R, 0.25)),
    "gamma_1": (lambda layer: rules.gamma(1.0), lambda l, R: expected_gamma(l, R, 1.0)),
    "zbox_scalar": (
        lambda layer: rules.zbox(-3.0, 3.0),
        lambda l, R: expected_zbox(l, R, torch.tensor(-3.0, dtype=D), torch.tensor(3.0, dtype=D)),
    ),
    "zbox_tensor": (lambda layer: rules.zbox(*_bounds(layer)), lambda l, R: expected_zbox(l, R, *_bounds(l))),
    "flat": (lambda layer: rules.flat(), expected_flat),
    "wsquare": (lambda layer: rules.wsquare(), expected_wsquare),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_equals_closed_form(layer: Layer, case: str) -> None:
    make_rule, expected = CASES[case]
    R = _relevance_out(layer)
    got = layer.attribute(make_rule(layer), R)
    assert_close(got, expected(layer, R))


@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_form_is_not_the_gradient(layer: Layer, case: str) -> None:
    """Guard: each rule really differs from the plain gradient times input on these inputs."""
    _, expected = CASES[case]
    R = _relevance_out(layer)
    M = layer.matrix(layer.W)
    assert (expected(layer, R) - layer.X * (R @ M)).abs().max() > 1e-3


def test_zplus_equals_alpha1_beta0(layer: Layer) -> None:
    R = _relevance_out(layer)
    assert_close(layer.attribute(rules.zplus(), R), layer.attribute(rules.alpha_beta(1.0, 0.0), R), 1e-14)


def test_gamma_zero_is_epsilon_where_signs_agree() -> None:
    """With gamma = 0 the four terms add up to ``x w`` for every output (both signs), i.e. epsilon."""
    layer = _linear()
    R = _relevance_out(layer)
    assert_close(layer.attribute(rules.gamma(0.0), R), expected_epsilon(layer, R))


@pytest.mark.parametrize("eps", [0.1, 1.0 / 3.0, 2.5e-3])
def test_epsilon_with_a_large_epsilon_in_float64(layer: Layer, eps: float) -> None:
    """The stabilizer must add ``eps`` itself (a float64 number), not its float32 rounding."""
    R = _relevance_out(layer)
    assert_close(layer.attribute(rules.epsilon(eps), R), expected_epsilon(layer, R, eps))


def test_epsilon_with_a_callable_stabilizer(layer: Layer) -> None:
    R = _relevance_out(layer)
    M = layer.matrix(layer.W)
    Z = layer.X @ M.T + layer.bias_vector(layer.b)
    sign = torch.sign(Z) + (Z == 0).to(Z)
    clipped = sign * Z.abs().clamp(min=0.5)
    assert_close(layer.attribute(rules.epsilon(Stabilizer(0.5, clip=True)), R), layer.X * ((R / clipped) @ M))
    assert_close(layer.attribute(rules.epsilon(lambda z: z + 2.0), R), layer.X * ((R / (Z + 2.0)) @ M))


def test_zbox_bound_per_feature_of_a_batch_as_large_as_the_features() -> None:
    """A bound of shape ``(features,)`` broadcasts to the input like in torch (per feature), also when
    the batch size happens to equal the number of features."""
    torch.manual_seed(3)
    module = nn.Linear(4, 3).to(D)
    layer = Layer(module, torch.rand(4, 4, dtype=D) - 0.5, lambda w: w, lambda b: b)
    low = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=D)
    high = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)
    R = _relevance_out(layer)
    expected = expected_zbox(layer, R, low.expand(4, 4), high.expand(4, 4))
    # a batch of 3 broadcasts per feature ...
    three = Layer(module, layer.x[:3], lambda w: w, lambda b: b)
    assert_close(three.attribute(rules.zbox(low, high), R[:3]), expected[:3])
    # ... and so must a batch of 4
    assert_close(layer.attribute(rules.zbox(low, high), R), expected)


# --------------------------------------------------------------------------------------------------------
# norm on average pooling
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pool, size",
    [(nn.AdaptiveAvgPool2d(2), 4), (nn.AdaptiveAvgPool2d(2), 5), (nn.AdaptiveAvgPool2d((1, 3)), 5), (nn.AvgPool2d(2), 4)],
    ids=["adaptive-2-of-4", "adaptive-2-of-5-overlapping", "adaptive-1x3-of-5", "avgpool-2"],
)
def test_norm_on_average_pooling(pool: nn.Module, size: int) -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 3, size, size, dtype=D)
    out_shape = pool(x).shape
    A = torch.func.jacrev(lambda v: pool(v.reshape(1, 3, size, size)).flatten())(torch.zeros(3 * size * size, dtype=D))
    R = torch.randn(2, out_shape[1:].numel(), dtype=D)
    X = x.flatten(1)
    Z = X @ A.T
    expected = X * ((R / stab(Z)) @ A)
    fn = lrpfunc.attribute(pool, composites.layer_map([(type(pool), rules.norm())]))
    _, got = fn({}, x, R.reshape(out_shape))
    assert_close(got.flatten(1), expected)
    # every output's relevance is redistributed over its window: conservation up to the stabilizer
    torch.testing.assert_close(got.sum((1, 2, 3)), (R * Z / stab(Z)).sum(1), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# ReLU rules and passthrough
# --------------------------------------------------------------------------------------------------------


def _relu_case() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(6)
    return torch.randn(4, 7, dtype=D), torch.randn(4, 7, dtype=D)


def _attribute_relu(rule, x, R):
    module = nn.ReLU()
    _, got = lrpfunc.attribute(module, composites.layer_map([(nn.ReLU, rule)]))({}, x, R)
    return got


def test_relu_deconvnet() -> None:
    x, R = _relu_case()
    expected = R.clamp(min=0)
    assert_close(_attribute_relu(rules.relu_deconvnet(), x, R), expected, 0.0)
    assert (expected != (x > 0) * R).any()


def test_relu_guided_backprop() -> None:
    x, R = _relu_case()
    expected = (x > 0) * R * (R > 0)
    assert_close(_attribute_relu(rules.relu_guided_backprop(), x, R), expected, 0.0)
    assert (expected != (x > 0) * R).any()


@pytest.mark.parametrize("beta", [1.0, 10.0])
def test_relu_beta_smooth(beta: float) -> None:
    x, R = _relu_case()
    assert_close(_attribute_relu(rules.relu_beta_smooth(beta), x, R), torch.sigmoid(beta * x) * R, 1e-15)


def test_passthrough() -> None:
    x, R = _relu_case()
    assert_close(_attribute_relu(rules.passthrough(), x, R), R, 0.0)
    fn = lrpfunc.attribute(nn.Tanh(), composites.layer_map([(nn.Tanh, rules.passthrough())]))
    assert_close(fn({}, x, R)[1], R, 0.0)


def test_relu_rules_in_a_network_use_the_relu_input() -> None:
    """Inside a network, the ReLU rule sees the ReLU's own input (the Linear's output)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).to(D)
    x, g = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    z = model[0](x).detach()
    r_a = g @ model[2].weight.detach()
    for rule, r_z in (
        (rules.relu_guided_backprop(), (z > 0) * r_a * (r_a > 0)),
        (rules.relu_deconvnet(), r_a.clamp(min=0)),
        (rules.relu_beta_smooth(3.0), torch.sigmoid(3.0 * z) * r_a),
    ):
        fn = lrpfunc.attribute(model, composites.layer_map([(nn.ReLU, rule)]))
        _, got = fn(dict(model.named_parameters()), x, g)
        assert_close(got, r_z @ model[0].weight.detach(), 1e-13)


# --------------------------------------------------------------------------------------------------------
# the stabilizer itself
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stabilize_zero_counts_as_positive(dtype: torch.dtype) -> None:
    z = torch.tensor([-1.0, 0.0, 2.0], dtype=dtype)
    got = stabilize(z, 0.5)
    assert got.dtype == dtype
    assert torch.equal(got, torch.tensor([-1.5, 0.5, 2.5], dtype=dtype))


def test_stabilize_adds_epsilon_in_the_precision_of_z() -> None:
    z = torch.tensor([-1.0, 0.0, 2.0, 3.0e-3], dtype=D)
    for eps in (0.1, 1e-6, 1.0 / 3.0):
        expected = z + torch.tensor([-eps, eps, eps, eps], dtype=D)
        assert torch.equal(stabilize(z, eps), expected), eps
        assert torch.equal(Stabilizer(eps)(z), expected), eps
        assert torch.equal(stab(z, eps), expected), eps


def test_stabilize_clip_and_norm_scale() -> None:
    z = torch.tensor([[-1.0, 0.0, 0.2, 3.0]], dtype=D)
    assert torch.equal(stabilize(z, 0.5, clip=True), torch.tensor([[-1.0, 0.5, 0.5, 3.0]], dtype=D))
    rms = (z**2).mean().sqrt()
    expected = z + torch.tensor([[-1.0, 1.0, 1.0, 1.0]], dtype=D) * 0.1 * rms
    torch.testing.assert_close(stabilize(z, 0.1, norm_scale=True), expected, rtol=1e-15, atol=1e-15)
    assert torch.equal(stabilize(z, 0.5, clip=True, norm_scale=True), torch.sign(z + (z == 0)) * z.abs().clip(min=0.5 * rms))
