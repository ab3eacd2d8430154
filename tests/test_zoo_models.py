"""Sanity checks of the model zoo (tests/zoo.py): every model runs forward and backward in float64, is built
deterministically, has randomised norms, and has the torchvision features its entry promises.

The features are checked on the module tree and on a trace of the torch functions its forward calls (a
``TorchFunctionMode``), so that in-place operations (``out += identity``, ``F.relu(x, inplace=True)``,
``nn.Dropout(inplace=True)``) and functional calls (``torch.cat``, ``F.avg_pool2d``) are seen as they run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import zoo
from torch import nn
from torch.overrides import TorchFunctionMode

from benchmarks.models import BasicBlock, Bottleneck

NAMES = list(zoo.ZOO)


# ---------------------------------------------------------------------------------------------------------
# A trace of the torch functions a forward pass calls
# ---------------------------------------------------------------------------------------------------------


class Trace(TorchFunctionMode):
    """Records every top-level torch function call (function, positional and keyword arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)

    def count(self, func: Callable[..., Any]) -> int:
        """How many times ``func`` was called."""
        return sum(1 for called, _, _ in self.calls if called is func)

    def count_inplace(self, func: Callable[..., Any], position: int) -> int:
        """How many times ``func`` was called with ``inplace=True`` (by keyword or at ``position``)."""

        def inplace(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
            return bool(kwargs["inplace"]) if "inplace" in kwargs else args[position:position + 1] == (True,)

        return sum(1 for called, args, kwargs in self.calls if called is func and inplace(args, kwargs))


def trace(model: nn.Module, x: torch.Tensor) -> Trace:
    with torch.no_grad(), Trace() as recorded:
        model(x)
    return recorded


def modules_of(model: nn.Module, kind: type | tuple[type, ...]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def inplace_modules(model: nn.Module, kind: type) -> list[nn.Module]:
    found = modules_of(model, kind)
    assert found, f"no {kind.__name__} in the model"
    assert all(m.inplace for m in found), f"a {kind.__name__} is not in place"
    return found


def assert_scale_times_input(t: Trace, count: int) -> None:
    """SqueezeExcitation's ``scale * input``: ``count`` products of an (N, C, 1, 1) scale and a feature map."""
    products = [args for func, args, _ in t.calls if func is torch.Tensor.mul]
    assert len(products) == count
    assert all(scale.shape[2:] == (1, 1) and features.shape[2:] != (1, 1) for scale, features in products)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


# ---------------------------------------------------------------------------------------------------------
# The features each entry promises
# ---------------------------------------------------------------------------------------------------------


def check_vgg_bn(model: nn.Module, t: Trace) -> None:
    features = list(model.features)
    triples = [features[i:i + 3] for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    assert triples and all(
        isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU) and relu.inplace for _, bn, relu in triples
    )
    assert modules_of(model.features, nn.MaxPool2d)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    relus = inplace_modules(model, nn.ReLU)
    assert t.count_inplace(F.relu, 1) == len(relus)
    assert t.count(torch.flatten) == 1


def _check_resnet(model: nn.Module, t: Trace, block: type, relus_per_block: int) -> None:
    blocks = modules_of(model, (BasicBlock, Bottleneck))
    assert blocks and all(type(b) is block for b in blocks)
    downsamples = [b.downsample for b in blocks if b.downsample is not None]
    assert downsamples and len(downsamples) < len(blocks), "expected both downsampling and identity skips"
    for d in downsamples:
        assert [type(m) for m in d] == [nn.Conv2d, nn.BatchNorm2d] and d[0].kernel_size == (1, 1)
    assert isinstance(model.maxpool, nn.MaxPool2d) and model.relu.inplace
    assert all(b.relu.inplace for b in blocks)
    # one ReLU module per block, used relus_per_block times; out += identity once per block
    assert t.count_inplace(F.relu, 1) == 1 + relus_per_block * len(blocks)
    assert t.count(torch.Tensor.add_) == len(blocks)


def check_resnet_basic(model: nn.Module, t: Trace) -> None:
    _check_resnet(model, t, BasicBlock, 2)


def check_resnet_bottleneck(model: nn.Module, t: Trace) -> None:
    _check_resnet(model, t, Bottleneck, 3)
    strides = {b.downsample[0].stride for b in modules_of(model, Bottleneck) if b.downsample is not None}
    assert strides == {(1, 1), (2, 2)}


def check_densenet(model: nn.Module, t: Trace) -> None:
    blocks = modules_of(model, zoo._DenseBlock)
    assert blocks and all(isinstance(b, nn.ModuleDict) for b in blocks)
    layers = modules_of(model, zoo._DenseLayer)
    for layer in layers:
        assert [name for name, _ in layer.named_children()] == ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]
    transitions = modules_of(model, zoo._Transition)
    assert transitions and all(isinstance(tr.pool, nn.AvgPool2d) for tr in transitions)
    inplace_modules(model, nn.ReLU)
    # bn_function concatenates per layer, each block concatenates once at its end
    assert t.count(torch.cat) == len(layers) + len(blocks)
    assert t.count(F.adaptive_avg_pool2d) == 1 and t.count(torch.flatten) == 1
    assert t.count(F.dropout) == len(layers)  # drop_rate > 0: F.dropout(training=False)
    relu_modules = len(modules_of(model, nn.ReLU))
    assert t.count_inplace(F.relu, 1) == relu_modules + 1  # + the final F.relu(features, inplace=True)


def check_mobilenet_v2(model: nn.Module, t: Trace) -> None:
    blocks = modules_of(model, zoo.InvertedResidualV2)
    residual = [b for b in blocks if b.use_res_connect]
    assert residual and len(residual) < len(blocks)
    assert any(is_depthwise(m) for m in model.modules())
    # the stem and the head are the zoo's Conv2dNormActivation, the blocks' stages the benchmarks' (the same layout)
    stages = modules_of(model, (zoo.Conv2dNormActivation, zoo.benchmark_models.Conv2dNormActivation))
    assert stages and all(isinstance(s[-1], nn.ReLU6) and s[-1].inplace for s in stages)
    assert t.count_inplace(F.hardtanh, 3) == len(stages)
    assert t.count(torch.Tensor.add) == len(residual) and t.count(torch.Tensor.add_) == 0
    assert t.count(F.adaptive_avg_pool2d) == 1
    assert [type(m) for m in model.classifier] == [nn.Dropout, nn.Linear]


def check_mobilenet_v3(model: nn.Module, t: Trace) -> None:
    se = modules_of(model, zoo.SqueezeExcitation)
    assert se and all(isinstance(s.scale_activation, nn.Hardsigmoid) and isinstance(s.activation, nn.ReLU) for s in se)
    assert modules_of(model, nn.Hardswish) and modules_of(model, nn.ReLU)
    assert any(is_depthwise(m) for m in model.modules())
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.Hardswish, nn.Dropout, nn.Linear]
    assert model.classifier[1].inplace and model.classifier[2].inplace
    assert t.count_inplace(F.dropout, 3) == 1
    residual = [b for b in modules_of(model, zoo.InvertedResidualV3) if b.use_res_connect]
    assert residual and t.count(torch.Tensor.add_) == len(residual)
    assert_scale_times_input(t, len(se))


def check_efficientnet(model: nn.Module, t: Trace) -> None:
    blocks = modules_of(model, zoo.MBConv)
    residual = [b for b in blocks if b.use_res_connect]
    assert residual and t.count(torch.Tensor.add_) == len(residual)
    depths = modules_of(model, zoo.StochasticDepth)
    assert len(depths) == len(blocks) and any(d.p > 0 for d in depths)
    se = modules_of(model, zoo.SqueezeExcitation)
    assert se and all(isinstance(s.activation, nn.SiLU) and s.activation.inplace for s in se)
    assert all(isinstance(s.scale_activation, nn.Sigmoid) for s in se)
    assert_scale_times_input(t, len(se))
    assert [type(m) for m in model.classifier] == [nn.Dropout, nn.Linear] and model.classifier[0].inplace
    assert t.count_inplace(F.dropout, 3) == 1
    assert t.count_inplace(F.silu, 1) == len(modules_of(model, nn.SiLU))


def _check_convnext(model: nn.Module, t: Trace, channels_norm: type) -> None:
    blocks = modules_of(model, zoo.CNBlock)
    assert blocks
    for b in blocks:
        assert [type(m) for m in b.block] == [
            nn.Conv2d, zoo.Permute, nn.LayerNorm, nn.Linear, nn.GELU, nn.Linear, zoo.Permute
        ]
        assert is_depthwise(b.block[0]) and b.block[0].kernel_size == (7, 7)
        assert b.layer_scale.shape == (b.block[0].in_channels, 1, 1)
        assert isinstance(b.stochastic_depth, zoo.StochasticDepth)
    assert any(b.stochastic_depth.p > 0 for b in blocks)
    stem = model.features[0]
    assert isinstance(stem, zoo.Conv2dNormActivation) and isinstance(stem[1], channels_norm)
    downsampling = [m for m in model.features if isinstance(m, nn.Sequential) and isinstance(m[0], channels_norm)]
    assert downsampling and isinstance(model.classifier[0], channels_norm)
    assert t.count(torch.Tensor.add_) == len(blocks)
    assert t.count(F.layer_norm) == len(modules_of(model, nn.LayerNorm))


def check_convnext(model: nn.Module, t: Trace) -> None:
    _check_convnext(model, t, zoo.LayerNorm2d)


def check_convnext_fb(model: nn.Module, t: Trace) -> None:
    _check_convnext(model, t, zoo.LayerNorm)
    norms = modules_of(model, zoo.LayerNorm)
    assert norms and all(n.data_format == "channels_first" for n in norms)
    assert not modules_of(model, zoo.LayerNorm2d)
    assert t.count(torch.sqrt) == len(norms)


def check_inception(model: nn.Module, t: Trace) -> None:
    convs = modules_of(model, zoo.BasicConv2d)
    assert convs and all(c.bn.eps == 0.001 for c in convs)
    kinds = [type(m) for m in model.children()]
    assert kinds.count(zoo.InceptionA) == 2
    assert {zoo.InceptionB, zoo.InceptionC, zoo.InceptionE} <= set(kinds)
    assert t.count_inplace(F.relu, 1) == len(convs)
    assert not modules_of(model, nn.AvgPool2d)
    assert t.count(F.avg_pool2d) == 4  # InceptionA x2, InceptionC, InceptionE: F.avg_pool2d(x, 3, 1, 1)
    assert t.count(F.max_pool2d) == len(modules_of(model, nn.MaxPool2d)) + 1  # + InceptionB's F.max_pool2d
    assert t.count(torch.cat) == 2 + 1 + 1 + 3  # A x2, B, C, E (two nested and one outer)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and isinstance(model.dropout, nn.Dropout)
    assert t.count(torch.flatten) == 1


def check_unet(model: nn.Module, t: Trace) -> None:
    pairs = [
        (a, b)
        for seq in modules_of(model, nn.Sequential)
        for a, b in zip(list(seq)[:-1], list(seq)[1:])
        if isinstance(a, nn.ConvTranspose2d)
    ]
    assert pairs and all(isinstance(b, nn.BatchNorm2d) for _, b in pairs)
    assert len(modules_of(model, nn.MaxPool2d)) == 2
    cats = [kwargs for func, _, kwargs in t.calls if func is torch.cat]
    assert len(cats) == len(pairs) and all(kwargs.get("dim") == 1 for kwargs in cats)
    assert model.outc.kernel_size == (1, 1)


FEATURES: dict[str, Callable[[nn.Module, Trace], None]] = {
    "vgg_bn": check_vgg_bn,
    "resnet_basic": check_resnet_basic,
    "resnet_bottleneck": check_resnet_bottleneck,
    "densenet": check_densenet,
    "mobilenet_v2": check_mobilenet_v2,
    "mobilenet_v3": check_mobilenet_v3,
    "efficientnet": check_efficientnet,
    "convnext": check_convnext,
    "convnext_fb": check_convnext_fb,
    "inception": check_inception,
    "unet": check_unet,
}


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_zoo_has_the_promised_models() -> None:
    assert list(zoo.ZOO) == list(FEATURES)
    assert all(entry.notes and "\n" not in entry.notes for entry in zoo.ZOO.values())


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_finite_with_the_expected_shape(name: str) -> None:
    model, x = zoo.build(name), zoo.example_input(name)
    assert x.dtype == torch.float64 and x.shape == zoo.ZOO[name].input_shape
    with torch.no_grad():
        output = model(x)
    assert output.dtype == torch.float64
    assert output.shape == zoo.ZOO[name].output_shape
    assert torch.isfinite(output).all()
    assert output.std() > 1e-2, "activations vanish: the outputs would not exercise the rules"


@pytest.mark.parametrize("name", NAMES)
def test_model_is_in_eval_mode_and_float64(name: str) -> None:
    model = zoo.build(name)
    assert not any(m.training for m in model.modules())
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("name", NAMES)
def test_vjp_of_functional_call_gives_the_input_gradient(name: str) -> None:
    model, x = zoo.build(name), zoo.example_input(name)
    params = dict(model.named_parameters())
    output, pullback = torch.func.vjp(lambda x: torch.func.functional_call(model, params, (x,)), x)
    grad_output = torch.randn(output.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (grad_x,) = pullback(grad_output)
    assert grad_x.shape == x.shape and torch.isfinite(grad_x).all() and grad_x.abs().sum() > 0

    x_leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model(x_leaf), x_leaf, grad_output)
    torch.testing.assert_close(grad_x, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic_in_the_seed(name: str) -> None:
    first = zoo.build(name, seed=3).state_dict()
    again = zoo.build(name, seed=3).state_dict()
    other = zoo.build(name, seed=4).state_dict()
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    floating = [key for key, value in first.items() if value.is_floating_point()]
    assert all(not torch.equal(first[key], other[key]) for key in floating)


def test_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    zoo.build("resnet_basic", seed=5)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", NAMES)
def test_norms_layer_scales_and_biases_are_random(name: str) -> None:
    model = zoo.build(name)
    batchnorms = modules_of(model, nn.BatchNorm2d)
    layernorms = modules_of(model, (nn.LayerNorm, zoo.LayerNorm))
    assert batchnorms or layernorms
    for bn in batchnorms:
        for value, trivial in ((bn.weight, 1.0), (bn.bias, 0.0), (bn.running_mean, 0.0), (bn.running_var, 1.0)):
            assert (value != trivial).all() and value.unique().numel() == value.numel()
    for ln in layernorms:
        assert (ln.weight != 1).all() and (ln.bias != 0).all() and ln.weight.unique().numel() == ln.weight.numel()
    for block in modules_of(model, zoo.CNBlock):
        assert block.layer_scale.min() > 0.1, "torchvision's 1e-6 layer scale would hide the block"
    biases = [m.bias for m in modules_of(model, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) if m.bias is not None]
    assert all((b != 0).all() for b in biases)


@pytest.mark.parametrize("name", NAMES)
def test_architectural_features_are_present(name: str) -> None:
    model = zoo.build(name)
    FEATURES[name](model, trace(model, zoo.example_input(name)))


def test_facebook_channels_first_layernorm_equals_layernorm2d() -> None:
    x = zoo.example_input("convnext")
    with torch.no_grad():
        torch.testing.assert_close(zoo.build("convnext")(x), zoo.build("convnext_fb")(x), rtol=1e-12, atol=1e-12)


def test_stochastic_depth_is_the_identity_in_eval_mode_only() -> None:
    x = torch.randn(64, 3, 2, 2, dtype=torch.float64)
    depth = zoo.StochasticDepth(0.5, "row").eval()
    assert depth(x) is x
    torch.manual_seed(0)
    dropped = depth.train()(x)
    kept = (dropped != 0).flatten(1).all(1)
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(dropped[kept], 2 * x[kept])  # survivors scaled by 1 / (1 - p)
    assert (dropped[~kept] == 0).all()
    assert zoo.StochasticDepth(0.0, "row").train()(x) is x


@pytest.mark.parametrize(
    ("p", "mode", "message"),
    [
        (1.5, "row", r"drop probability has to be between 0 and 1, but got 1\.5"),
        (0.5, "column", r"mode has to be either 'batch' or 'row', but got column"),
    ],
)
def test_stochastic_depth_rejects_bad_arguments(p: float, mode: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        zoo.stochastic_depth(torch.zeros(2, 3), p, mode)


@pytest.mark.parametrize("function", [zoo.build, zoo.example_input])
def test_unknown_model_names_the_function_and_the_choices(function: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match=rf"{function.__name__}\('resnet18'\): unknown zoo model; expected one of "
                                         r"\['convnext', 'convnext_fb', 'densenet', "):
        function("resnet18")


def test_example_input_is_deterministic_in_the_seed() -> None:
    assert torch.equal(zoo.example_input("unet", seed=2), zoo.example_input("unet", seed=2))
    assert not torch.equal(zoo.example_input("unet", seed=2), zoo.example_input("unet", seed=3))
