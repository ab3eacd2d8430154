"""Properties on random small ReLU networks (hypothesis): widths 1-6, depth 1-3, random seeds, float64."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import lrpfunc
from lrpfunc import composites, rules, types

with warnings.catch_warnings():
    # to report a failing example, hypothesis' pytest plugin imports libcst, which warns on import; with
    # filterwarnings=error every failure would end in an INTERNALERROR instead of its report
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # pragma: no cover
        pass

D = torch.float64
MARGIN = 1e-2
SETTINGS = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Net:
    model: nn.Sequential
    x: torch.Tensor
    grad_output: torch.Tensor

    @property
    def params(self) -> dict:
        return dict(self.model.named_parameters())

    def pre_activations(self) -> list[torch.Tensor]:
        """The output of every Linear layer (the denominators of the rules)."""
        outputs, h = [], self.x
        with torch.no_grad():
            for layer in self.model:
                h = layer(h)
                if isinstance(layer, nn.Linear):
                    outputs.append(h)
        return outputs

    def linear_inputs(self) -> list[tuple[torch.Tensor, nn.Linear]]:
        pairs, h = [], self.x
        with torch.no_grad():
            for layer in self.model:
                if isinstance(layer, nn.Linear):
                    pairs.append((h, layer))
                h = layer(h)
        return pairs

    def margin(self) -> float:
        return min(z.abs().min().item() for z in self.pre_activations())


@st.composite
def networks(draw, bias: bool = True, positive_input: bool = False, min_width: int = 1) -> Net:
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(min_width, 6), min_size=depth + 1, max_size=depth + 1))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
    model = nn.Sequential(*layers).to(D)
    x = torch.randn(batch, widths[0], dtype=D)
    if positive_input:
        x = x.abs() + 0.1
    return Net(model, x, torch.randn(batch, widths[-1], dtype=D))


def _lrp(rule) -> lrpfunc.composites.Composite:
    return composites.layer_map([(types.Activation, rules.passthrough()), (types.Linear, rule)])


RULE_CHOICES = {
    "epsilon": lambda: rules.epsilon(),
    "epsilon_0.1": lambda: rules.epsilon(0.1),
    "zplus": lambda: rules.zplus(),
    "alpha2_beta1": lambda: rules.alpha_beta(2.0, 1.0),
    "alpha1.4_beta0.4": lambda: rules.alpha_beta(1.4, 0.4),
    "gamma": lambda: rules.gamma(0.25),
    "flat": lambda: rules.flat(),
    "wsquare": lambda: rules.wsquare(),
    "zbox": lambda: rules.zbox(-4.0, 4.0),
}


@SETTINGS
@given(net=networks())
def test_no_composite_equals_vjp(net: Net) -> None:
    output, relevance = lrpfunc.attribute(net.model)(net.params, net.x, net.grad_output)
    expected_output, pullback = torch.func.vjp(net.model, net.x)
    (expected,) = pullback(net.grad_output)
    assert torch.equal(output, expected_output)
    torch.testing.assert_close(relevance, expected, rtol=1e-13, atol=1e-15)


@SETTINGS
@given(net=networks(bias=False))
def test_lrp0_on_bias_free_relu_net_is_gradient_times_input(net: Net) -> None:
    assume(net.margin() > MARGIN)
    output = net.model(net.x).detach()
    fn = lrpfunc.attribute(net.model, _lrp(rules.epsilon(0.0)))
    _, relevance = fn(net.params, net.x, output * net.grad_output)
    (gradient,) = torch.func.vjp(net.model, net.x)[1](net.grad_output)
    torch.testing.assert_close(relevance, gradient * net.x, rtol=1e-9, atol=1e-12)


def _assert_conserved(relevance_in: torch.Tensor, relevance_out: torch.Tensor, rel: float) -> None:
    """Per sample: the input relevance sums to the seed relevance (relative to the relevance's size)."""
    got = relevance_in.sum(1)
    want = relevance_out.sum(1)
    scale = torch.maximum(relevance_out.abs().sum(1), relevance_in.abs().sum(1))
    assert ((got - want).abs() <= rel * scale + 1e-300).all(), (got, want)


@SETTINGS
@given(net=networks(bias=False))
def test_bias_free_epsilon_conserves_relevance(net: Net) -> None:
    assume(net.margin() > MARGIN)
    _, relevance = lrpfunc.attribute(net.model, _lrp(rules.epsilon(1e-9)))(net.params, net.x, net.grad_output)
    _assert_conserved(relevance, net.grad_output, 1e-6)


def _positive_denominators(net: Net) -> tuple[float, float]:
    """Smallest z+ = sum_i x_i w_ji^+ and smallest |z-| = |sum_i x_i w_ji^-| over all neurons (inputs >= 0)."""
    smallest_plus, smallest_minus = float("inf"), float("inf")
    for h, layer in net.linear_inputs():
        assert (h >= 0).all()
        w = layer.weight.detach()
        smallest_plus = min(smallest_plus, (h @ w.clamp(min=0).T).min().item())
        smallest_minus = min(smallest_minus, (-(h @ w.clamp(max=0).T)).min().item())
    return smallest_plus, smallest_minus


@SETTINGS
@given(net=networks(bias=False, positive_input=True))
def test_bias_free_zplus_on_positive_inputs_conserves_relevance(net: Net) -> None:
    smallest_plus, _ = _positive_denominators(net)
    assume(smallest_plus > MARGIN)
    _, relevance = lrpfunc.attribute(net.model, _lrp(rules.zplus(1e-12)))(net.params, net.x, net.grad_output)
    _assert_conserved(relevance, net.grad_output, 1e-6)
    # non-negative inputs: z+ distributes non-negative relevance as non-negative relevance
    _, positive = lrpfunc.attribute(net.model, _lrp(rules.zplus()))(net.params, net.x, net.grad_output.abs())
    assert (positive >= 0).all()


@SETTINGS
@given(net=networks(bias=False, positive_input=True))
def test_alpha_beta_fractional_is_accepted_finite_and_conserves(net: Net) -> None:
    rule = rules.alpha_beta(alpha=1.4, beta=0.4, stabilizer=1e-12)
    _, relevance = lrpfunc.attribute(net.model, _lrp(rule))(net.params, net.x, net.grad_output)
    assert torch.isfinite(relevance).all()
    smallest_plus, smallest_minus = _positive_denominators(net)
    # where every neuron has both positive and negative contributions, alpha R - beta R = R per neuron
    if smallest_plus > MARGIN and smallest_minus > MARGIN:
        _assert_conserved(relevance, net.grad_output, 1e-6)


@SETTINGS
@given(net=networks(bias=False, positive_input=True, min_width=3))
def test_alpha_beta_with_mixed_sign_rows_conserves(net: Net) -> None:
    with torch.no_grad():
        for layer in net.model:
            if isinstance(layer, nn.Linear):  # every row gets a positive and a negative weight
                layer.weight[:, 0] = layer.weight[:, 0].abs() + 0.5
                layer.weight[:, 1] = -layer.weight[:, 1].abs() - 0.5
    smallest_plus, smallest_minus = _positive_denominators(net)
    assume(smallest_plus > MARGIN and smallest_minus > MARGIN)
    for alpha, beta in ((1.4, 0.4), (2.0, 1.0), (1.0, 0.0)):
        rule = rules.alpha_beta(alpha, beta, stabilizer=1e-12)
        _, relevance = lrpfunc.attribute(net.model, _lrp(rule))(net.params, net.x, net.grad_output)
        _assert_conserved(relevance, net.grad_output, 1e-6)


@SETTINGS
@given(net=networks(), rule=st.sampled_from(sorted(RULE_CHOICES)))
def test_vmap_equals_per_sample_loop(net: Net, rule: str) -> None:
    fn = lrpfunc.attribute(net.model, _lrp(RULE_CHOICES[rule]()))
    v_output, v_relevance = torch.func.vmap(fn, in_dims=(None, 0, 0))(
        net.params, net.x.unsqueeze(1), net.grad_output.unsqueeze(1)
    )
    for i in range(len(net.x)):
        output, relevance = fn(net.params, net.x[i : i + 1], net.grad_output[i : i + 1])
        torch.testing.assert_close(v_output[i], output, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v_relevance[i], relevance, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(net=networks(), rule=st.sampled_from(sorted(RULE_CHOICES)), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_relevance_is_linear_in_grad_output(net: Net, rule: str, a: float, b: float) -> None:
    fn = lrpfunc.attribute(net.model, _lrp(RULE_CHOICES[rule]()))
    other = torch.randn_like(net.grad_output)
    _, r1 = fn(net.params, net.x, net.grad_output)
    _, r2 = fn(net.params, net.x, other)
    _, combined = fn(net.params, net.x, a * net.grad_output + b * other)
    scale = max(1.0, r1.abs().max().item(), r2.abs().max().item())
    torch.testing.assert_close(combined, a * r1 + b * r2, rtol=1e-9, atol=1e-9 * scale)


@SETTINGS
@given(net=networks(), rule=st.sampled_from(sorted(RULE_CHOICES)), data=st.data())
def test_permuting_the_batch_permutes_the_relevance(net: Net, rule: str, data) -> None:
    permutation = data.draw(st.permutations(range(len(net.x))))
    fn = lrpfunc.attribute(net.model, _lrp(RULE_CHOICES[rule]()))
    _, relevance = fn(net.params, net.x, net.grad_output)
    _, permuted = fn(net.params, net.x[permutation], net.grad_output[permutation])
    torch.testing.assert_close(permuted, relevance[permutation], rtol=1e-12, atol=1e-14)
