"""Regression tests for five defects found on real models (each failed on 0.1.0)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpfunc
from lrpfunc import RuleError, canonizers, composites, rules

D = torch.float64


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


# ----------------------------------------------------------------------------------------------------------------
# 1. an eval-mode nn.Dropout(inplace=True) made the tracer loop forever
# ----------------------------------------------------------------------------------------------------------------


class InPlaceEverything(nn.Module):
    """MobileNetV3/EfficientNet style: in-place activations, in-place dropout in eval mode, an in-place residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.Hardswish(inplace=True)
        self.drop = nn.Dropout(0.2, inplace=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        h += self.conv(x)
        h = self.relu(self.drop(h))
        return self.fc(self.drop(F.adaptive_avg_pool2d(h, 1).flatten(1)))


def _finishes(run, seconds: float = 60.0):
    """``run()`` in a daemon thread; its result, or a failure if it does not return in time (a hang)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(run()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"did not return within {seconds} s"
    return result[0]


@pytest.mark.parametrize("composite", [None, composites.epsilon_plus()], ids=["no-rules", "epsilon_plus"])
def test_in_place_dropout_in_eval_mode_does_not_hang(composite) -> None:
    torch.manual_seed(0)
    model = InPlaceEverything().to(D).eval()
    x, grad_output = torch.randn(2, 3, 6, 6, dtype=D), torch.randn(2, 2, dtype=D)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    output, relevance = _finishes(lambda: lrpfunc.attribute(model, composite)(_params(model), x, grad_output))
    with torch.no_grad():
        torch.testing.assert_close(output, model(x.clone()), rtol=1e-14, atol=1e-14)
    if composite is None:
        expected = torch.func.vjp(lambda x: model(x.clone()), x)[1](grad_output)[0]
        torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(relevance).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# 2. a custom autograd.Function got relevance exactly 0
# ----------------------------------------------------------------------------------------------------------------


class Cube(torch.autograd.Function):
    """x^3 in the setup_context style (which torch.func differentiates)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class OldCube(torch.autograd.Function):
    """x^3 in the old style (ctx in forward), which torch.func cannot differentiate."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class WithFunction(nn.Module):
    def __init__(self, function: type) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.function.apply(self.first(x)))


def test_custom_autograd_function_gets_its_true_vector_jacobian_product() -> None:
    torch.manual_seed(1)
    model = WithFunction(Cube).to(D)
    x, grad_output = torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)
    params = _params(model)
    expected = torch.func.vjp(model, x)[1](grad_output)[0]
    _, relevance = lrpfunc.attribute(model, None)(params, x, grad_output)
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-12)  # 0.1.0 gave exactly 0 here
    for tape in ("autograd", "level", "vjp"):
        with lrpfunc._tape.forced(tape):
            _, relevance = lrpfunc.attribute(model, None)(params, x, grad_output)
            torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-12)
            # with rules on the linear layers, the function in between still takes its true pullback
            _, ruled = lrpfunc.attribute(model, composites.layer_map([(nn.Linear, rules.epsilon())]))(params, x, grad_output)
            h = model.first(x).detach()
            z2 = Cube.apply(h)
            r2 = z2 * ((grad_output / lrpfunc.stabilize(model.second(z2).detach())) @ model.second.weight.detach())
            r1 = 3 * h**2 * r2
            by_hand = x * ((r1 / lrpfunc.stabilize(h)) @ model.first.weight.detach())
            torch.testing.assert_close(ruled, by_hand, rtol=1e-10, atol=1e-12)
    # and second order through it is exact
    second = torch.func.grad(lambda x: (lrpfunc.attribute(model, None)(params, x, grad_output)[1] ** 2).sum())(x)
    reference = torch.func.grad(lambda x: (torch.func.vjp(model, x)[1](grad_output)[0] ** 2).sum())(x)
    torch.testing.assert_close(second, reference, rtol=1e-10, atol=1e-12)


def test_custom_autograd_function_torch_func_cannot_differentiate_is_named() -> None:
    model = WithFunction(OldCube).to(D)
    x, grad_output = torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)
    message = r"custom autograd function OldCube in '' cannot be differentiated by torch.func: it has no setup_context"
    with pytest.raises(RuntimeError, match=message):
        lrpfunc.attribute(model, composites.epsilon_plus())(_params(model), x, grad_output)
    for tape in ("autograd", "level", "vjp"):
        with lrpfunc._tape.forced(tape), pytest.raises(RuntimeError, match=message):
            lrpfunc.attribute(model, composites.epsilon_plus())(_params(model), x, grad_output)


# ----------------------------------------------------------------------------------------------------------------
# 3. canonizers did not compose: the first replacement stopped the others
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recorder(canonizers.Canonizer):
    """Wraps every function it is offered, recording the name of what it wrapped."""

    seen: list = dataclasses.field(default_factory=list, compare=False)

    def replace_op(self, func):
        def recorded(*args, **kwargs):
            self.seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **kwargs)

        return recorded


def test_canonizers_are_applied_in_order_each_to_what_the_ones_before_returned() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(D)
    x, grad_output = torch.randn(2, 3, dtype=D), torch.ones(2, 2, dtype=D)
    recorder = Recorder()
    output, relevance = lrpfunc.attribute(model, composites.epsilon_plus(), [canonizers.softplus(10.0), recorder])(
        _params(model), x, grad_output
    )
    assert "softplus_instead" in recorder.seen  # the second canonizer saw what the first one made of relu
    assert "linear" in recorder.seen
    with torch.no_grad():
        expected = model[2](F.softplus(model[0](x), beta=10.0))
    torch.testing.assert_close(output, expected, rtol=1e-14, atol=1e-14)
    # the other order: softplus is offered the recorder's wrapper, which is no ReLU, so the ReLU stays
    recorder = Recorder()
    output, _ = lrpfunc.attribute(model, composites.epsilon_plus(), [recorder, canonizers.softplus(10.0)])(
        _params(model), x, grad_output
    )
    assert "relu" in recorder.seen
    with torch.no_grad():
        torch.testing.assert_close(output, model(x), rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------------
# 4. BatchNorm after a transposed convolution was not merged; a buffers-only BatchNorm got nothing
# ----------------------------------------------------------------------------------------------------------------


def _randomize(bn: nn.Module) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("groups", [1, 2])
def test_batchnorm_after_a_transposed_convolution_is_merged(groups: int) -> None:
    torch.manual_seed(2)
    up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups).to(D)
    bn = nn.BatchNorm2d(6).to(D).eval()
    _randomize(bn)
    model = nn.Sequential(up, bn, nn.ReLU(), nn.Conv2d(6, 2, 1)).to(D).eval()
    x, grad_output = torch.randn(2, 4, 5, 5, dtype=D), torch.randn(2, 2, 10, 10, dtype=D)
    composite = composites.layer_map([(nn.ReLU, rules.passthrough()), ((nn.ConvTranspose2d, nn.Conv2d), rules.epsilon())])
    table = lrpfunc.rule_table(model, composite, x, canonizers.merge_batchnorm())
    assert not any(isinstance(site.module, nn.BatchNorm2d) for site, _ in table)
    # the merged layer by hand: the output channels of a transposed convolution are dim 1 of its weight, per group
    scale = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    merged = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups).to(D)
    with torch.no_grad():
        weight = up.weight.reshape(groups, 4 // groups, 6 // groups, 3, 3) * scale.reshape(groups, 1, 6 // groups, 1, 1)
        merged.weight.copy_(weight.reshape(up.weight.shape))
        merged.bias.copy_((up.bias - bn.running_mean) * scale + bn.bias)
    by_hand = nn.Sequential(merged, nn.ReLU(), model[3]).to(D)
    _, got = lrpfunc.attribute(model, composite, canonizers.merge_batchnorm())(_params(model), x, grad_output)
    _, expected = lrpfunc.attribute(by_hand, composite)(_params(by_hand), x, grad_output)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # gradients reach the original BatchNorm's parameters through the merge
    grads = torch.func.grad(lambda p: (lrpfunc.attribute(model, composite, canonizers.merge_batchnorm())(p, x, grad_output)[1] ** 2).sum())(
        {k: v.detach() for k, v in _params(model).items()}
    )
    assert grads["1.weight"].abs().sum() > 0 and grads["1.bias"].abs().sum() > 0


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: statistics and affine parameters are all buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def test_buffers_only_batchnorm_is_merged_and_otherwise_passed() -> None:
    torch.manual_seed(3)
    frozen = FrozenBatchNorm2d(5).to(D)
    with torch.no_grad():
        frozen.weight.uniform_(0.5, 1.5)
        frozen.bias.uniform_(-0.5, 0.5)
        frozen.running_mean.uniform_(-0.3, 0.3)
        frozen.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), frozen, nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 2)).to(D)
    x, grad_output = torch.randn(2, 3, 4, 4, dtype=D), torch.randn(2, 2, dtype=D)
    composite = composites.epsilon_plus()
    # merged into the convolution before it
    table = lrpfunc.rule_table(model, composite, x, canonizers.merge_batchnorm())
    assert not any(isinstance(site.module, FrozenBatchNorm2d) for site, _ in table)
    conv = model[0]
    scale = frozen.weight / (frozen.running_var + frozen.eps).sqrt()
    merged = nn.Conv2d(3, 5, 3, padding=1).to(D)
    with torch.no_grad():
        merged.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        merged.bias.copy_((conv.bias - frozen.running_mean) * scale + frozen.bias)
    by_hand = nn.Sequential(merged, nn.ReLU(), nn.Flatten(), model[4]).to(D)
    _, got = lrpfunc.attribute(model, composite, canonizers.merge_batchnorm())(_params(model), x, grad_output)
    _, expected = lrpfunc.attribute(by_hand, composite)(_params(by_hand), x, grad_output)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # not merged: the LRP composites pass relevance through it, as through any BatchNorm
    table = lrpfunc.rule_table(model, composite, x)
    assert repr(table.rule_of("1")) == "passthrough"


# ----------------------------------------------------------------------------------------------------------------
# 5. zbox bounds broadcast from the right (a (1, C) bound on an (N, C, L) input with L == C went per position)
# ----------------------------------------------------------------------------------------------------------------


def _zbox_relevance(low, high, x: torch.Tensor, layer: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
    fn = lrpfunc.attribute(layer, composites.layer_map([(nn.Conv1d, rules.zbox(low, high))]))
    return fn(_params(layer), x, grad_output)[1]


def test_zbox_bounds_align_from_the_left_and_ambiguous_ones_raise() -> None:
    torch.manual_seed(5)
    channels = 4
    layer = nn.Conv1d(channels, 3, 3, padding=1).to(D)
    x = torch.randn(2, channels, channels, dtype=D)  # L == C: a (1, C) bound could mean either
    grad_output = torch.randn(2, 3, channels, dtype=D)
    low, high = -torch.linspace(1, 2, channels, dtype=D), torch.linspace(2, 3, channels, dtype=D)
    per_channel = _zbox_relevance(low, high, x, layer, grad_output)
    explicit = _zbox_relevance(low.reshape(1, -1, 1), high.reshape(1, -1, 1), x, layer, grad_output)
    full = _zbox_relevance(low.reshape(1, -1, 1).expand_as(x), high.reshape(1, -1, 1).expand_as(x), x, layer, grad_output)
    torch.testing.assert_close(per_channel, explicit, rtol=0, atol=0)
    torch.testing.assert_close(per_channel, full, rtol=0, atol=0)
    # per position would be different: the test distinguishes them
    per_position = _zbox_relevance(low.reshape(1, 1, -1), high.reshape(1, 1, -1), x, layer, grad_output)
    assert (per_position - per_channel).abs().max() > 1e-6
    # a float is a bound for every element
    torch.testing.assert_close(
        _zbox_relevance(-3.0, 3.0, x, layer, grad_output),
        _zbox_relevance(torch.full_like(x, -3.0), torch.full_like(x, 3.0), x, layer, grad_output),
        rtol=0,
        atol=0,
    )
    with pytest.raises(RuleError, match=r"zbox: a bound of shape \(1, 4\) does not broadcast to the input's shape \(2, 4, 4\) unambiguously"):
        _zbox_relevance(low.reshape(1, -1), high.reshape(1, -1), x, layer, grad_output)
    with pytest.raises(RuleError, match=r"a vector of 4 per-channel bounds"):
        _zbox_relevance(torch.zeros(5, dtype=D), 1.0, x, layer, grad_output)
