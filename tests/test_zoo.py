"""Every architecture of the zoo (torchvision's styles: in-place operations, functional activations and pooling,
residual sums, squeeze-excitation products, LayerNorm by hand, transposed convolutions), float64."""

from __future__ import annotations

import pytest
import torch
import zoo
from torch import nn

import lrpfunc
from lrpfunc import canonizers, composites, ops, rules, types

D = torch.float64
NAMES = list(zoo.ZOO)
# torch itself warns when vmap meets adaptive average pooling of a permuted tensor (ConvNeXt's head)
TORCH_VMAP_WARNING = pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
CONVOLUTIONS = types.Convolution + (ops.Convolution,)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


@pytest.mark.parametrize("name", NAMES)
def test_no_rules_equals_vjp(name: str) -> None:
    model, x = zoo.build(name), zoo.example_input(name)
    params = _params(model)
    output, pullback = torch.func.vjp(lambda x: torch.func.functional_call(model, params, (x,)), x)
    grad_output = torch.randn_like(output)
    got_output, relevance = lrpfunc.attribute(model, None)(params, x, grad_output)
    torch.testing.assert_close(got_output, output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(relevance, pullback(grad_output)[0], rtol=1e-12, atol=1e-12)
    # a composite that gives no site a rule traces every operation and still equals the vector-Jacobian product
    nothing = composites.layer_map([(nn.Embedding, rules.epsilon())])
    torch.testing.assert_close(lrpfunc.attribute(model, nothing)(params, x, grad_output)[1], pullback(grad_output)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_relevance_is_conserved_on_every_architecture(name: str) -> None:
    """With the model's biases zeroed, rules that conserve by construction (epsilon on every linear layer, and the
    LRP composites' rules for activations, sums, products, pooling and normalisation) conserve the relevance on every
    architecture, without the resnet canonizer: no operation is left with the plain gradient."""
    model, x = zoo.without_biases(zoo.build(name)), zoo.example_input(name)
    grad_output = zoo.target_of(name, model(x).detach())
    composite = composites.epsilon_plus(zero_params="bias", layer_map=[(CONVOLUTIONS, rules.epsilon(zero_params="bias"))])
    _, relevance = lrpfunc.attribute(model, composite, canonizers.merge_batchnorm())(_params(model), x, grad_output)
    ratio = (relevance.sum() / grad_output.sum()).item()
    assert abs(ratio - 1) < 1e-3, (name, ratio)


#: Architectures on which z+ (epsilon_plus) conserves: no output unit with relevance has a zero positive
#: pre-activation. The depthwise and projection convolutions of MobileNet/EfficientNet, the 1x1 convolutions of the
#: small Bottleneck blocks and U-Net's output layer have such units, and z+ gives their relevance away by definition
#: (see test_zplus_loses_exactly_the_relevance_of_units_without_positive_contributions).
ZPLUS_CONSERVES = ["vgg_bn", "resnet_basic", "densenet", "convnext", "convnext_fb", "inception"]


@pytest.mark.parametrize("name", ZPLUS_CONSERVES)
def test_epsilon_plus_conserves_where_zplus_can(name: str) -> None:
    model, x = zoo.without_biases(zoo.build(name)), zoo.example_input(name)
    grad_output = zoo.target_of(name, model(x).detach())
    fn = lrpfunc.attribute(model, composites.epsilon_plus(zero_params="bias"), canonizers.merge_batchnorm())
    _, relevance = fn(_params(model), x, grad_output)
    assert abs((relevance.sum() / grad_output.sum()).item() - 1) < 1e-3


def test_zplus_loses_exactly_the_relevance_of_units_without_positive_contributions() -> None:
    torch.manual_seed(4)
    layer = nn.Conv2d(3, 5, 1, bias=False).to(D)
    x = torch.randn(2, 3, 4, 4, dtype=D).clamp(min=0)  # sparse, as after a ReLU
    grad_output = torch.randn(2, 5, 4, 4, dtype=D)
    _, relevance = lrpfunc.attribute(layer, composites.layer_map([(nn.Conv2d, rules.zplus())]))(_params(layer), x, grad_output)
    positive = torch.nn.functional.conv2d(x, layer.weight.detach().clamp(min=0))
    kept = (grad_output * positive / (positive + 1e-6)).sum()
    assert (positive == 0).any()
    torch.testing.assert_close(relevance.sum(), kept, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_named_composites_run_and_are_finite(name: str) -> None:
    model, x = zoo.build(name), zoo.example_input(name)
    grad_output = torch.randn_like(model(x))
    for composite in (composites.epsilon_plus_flat(), composites.epsilon_gamma_box(-3.0, 3.0)):
        _, relevance = lrpfunc.attribute(model, composite, canonizers.merge_batchnorm())(_params(model), x, grad_output)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all() and relevance.abs().sum() > 0


@TORCH_VMAP_WARNING
@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_a_loop(name: str) -> None:
    model, x = zoo.build(name), zoo.example_input(name)
    grad_output = torch.randn_like(model(x))
    fn = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())
    params = _params(model)
    batched = torch.func.vmap(fn, in_dims=(None, 0, 0))(params, x[:, None], grad_output[:, None])[1][:, 0]
    loop = torch.cat([fn(params, x[i : i + 1], grad_output[i : i + 1])[1] for i in range(x.shape[0])])
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)


def _central(f, h: float) -> torch.Tensor:
    return (f(h) - f(-h)) / (2 * h)


def _directional(f) -> torch.Tensor:
    """The derivative of ``f(t)`` at ``t = 0`` by Richardson extrapolation of central differences (error O(h^4): the
    explanations are strongly curved where a stabilised denominator is small)."""
    h = 1e-6
    return (4 * _central(f, h / 2) - _central(f, h)) / 3


@pytest.mark.parametrize("name", NAMES)
def test_explanation_gradients_match_finite_differences(name: str) -> None:
    """d/dx and d/dtheta of sum(R * w) along a random direction, against central differences (float64)."""
    torch.manual_seed(7)
    model, x = zoo.build(name), zoo.example_input(name)
    grad_output = zoo.target_of(name, model(x).detach())
    fn = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())
    params = {k: v.detach() for k, v in _params(model).items()}
    weight = torch.randn_like(x)

    def of_x(x: torch.Tensor) -> torch.Tensor:
        return (fn(params, x, grad_output)[1] * weight).sum()

    def of_params(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (fn(p, x, grad_output)[1] * weight).sum()

    dx = torch.randn_like(x)
    exact = (torch.func.grad(of_x)(x) * dx).sum()
    torch.testing.assert_close(exact, _directional(lambda t: of_x(x + t * dx)), rtol=1e-5, atol=1e-8)
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    grads = torch.func.grad(of_params)(params)
    exact = sum((grads[k] * direction[k]).sum() for k in params)
    numeric = _directional(lambda t: of_params({k: v + t * direction[k] for k, v in params.items()}))
    torch.testing.assert_close(exact, numeric, rtol=1e-5, atol=1e-8)
