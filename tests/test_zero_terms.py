"""Terms known to be zero: z+, alpha-beta and gamma leave out the negative part of an input that has none.

What is known comes from the operations that made the input (:mod:`lrpfunc._facts`), never from its values. A term
left out must change nothing: not the relevance, and, where anything differentiates it, none of its derivatives. The
value is zero after any non-negative operation; the derivatives only after one that is flat at zero (a ReLU, whose
derivative at 0 is 0), not after ``clamp(min=0)``, whose derivative at 0 is 1.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import zoo
from torch import nn

import lrpfunc
from lrpfunc import Call, canonizers, composites, rules

D = torch.float64


class _Seen:
    """A rule that records what is known of each call's inputs and passes no relevance on."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[bool, bool]] = {}

    def __call__(self, call: Call, grad_outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.seen[call.name] = (call.nonnegative_inputs[0], call.flat_at_zero_inputs[0])
        return tuple(torch.zeros_like(x) for x in call.inputs)


class Signs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.raw = nn.Conv2d(2, 3, 3, padding=1)
        self.after_relu = nn.Conv2d(3, 3, 3, padding=1)
        self.after_pool = nn.Conv2d(3, 3, 1)
        self.after_clamp = nn.Conv2d(3, 3, 1)
        self.after_sum_of_clamp = nn.Conv2d(3, 3, 1)
        self.after_tanh = nn.Conv2d(3, 3, 1)
        self.after_shift = nn.Conv2d(3, 3, 1)
        self.after_difference = nn.Conv2d(3, 3, 1)
        self.after_negative_alpha = nn.Conv2d(3, 3, 1)
        self.after_half = nn.Conv2d(3, 3, 1)
        self.after_fill = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.raw(x))
        h = self.after_relu(h)
        h = self.after_pool(torch.cat([F.max_pool2d(torch.relu(h), 2), F.avg_pool2d(torch.relu(h), 2)], 2))
        h = self.after_clamp(h.clamp(min=0.0))
        h = self.after_sum_of_clamp(h.clamp(min=0.0) + torch.relu(h))
        h = self.after_tanh(torch.tanh(h))
        h = self.after_shift(torch.relu(h) - 1.0)
        h = self.after_difference(torch.relu(h) - torch.sigmoid(h))
        h = self.after_negative_alpha(torch.add(torch.relu(h), torch.relu(-h), alpha=-1.0))
        h = self.after_half(torch.relu(h).half().double())
        return self.after_fill(torch.relu(h).masked_fill(h > 0.5, -3.0))


def test_what_is_known_comes_from_the_operations_that_made_the_input() -> None:
    model = Signs().to(D)
    seen = _Seen()
    fn = lrpfunc.attribute(model, composites.layer_map([(nn.Conv2d, seen)]))
    x = torch.randn(2, 2, 8, 8, dtype=D).abs()  # non-negative values, but nothing in the record says so
    fn(dict(model.named_parameters()), x, torch.ones_like(model(x)))
    assert seen.seen == {  # (non-negative, flat at zero)
        "raw": (False, False),
        "after_relu": (True, True),
        "after_pool": (True, True),  # max and average pools of ReLU outputs, concatenated
        "after_clamp": (True, False),  # clamp's derivative at its bound is 1
        "after_sum_of_clamp": (True, False),
        "after_tanh": (False, False),
        "after_shift": (False, False),  # a constant subtracted
        "after_difference": (False, False),
        "after_negative_alpha": (False, False),
        "after_half": (True, False),  # a small positive value rounds to zero in half precision, its derivative stays
        "after_fill": (False, False),  # a fill value of its own
    }


def _zplus(zero_terms: bool) -> rules.BasicRule:
    """z+; with ``zero_terms=False`` it computes every term, known zero or not."""
    return dataclasses.replace(rules.zplus(), zero_terms=zero_terms)


def _linear_zplus(model: nn.Module) -> tuple[lrpfunc.Attribution, lrpfunc.Attribution]:
    """z+ on every ``nn.Linear`` of ``model``: leaving out the terms known to be zero, and computing every term."""
    fast, exact = (lrpfunc.attribute(model, composites.layer_map([(nn.Linear, _zplus(zero_terms))]))
                   for zero_terms in (True, False))
    return fast, exact


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    model, x = zoo.build("resnet_basic"), zoo.example_input("resnet_basic")
    params = {k: v.detach() for k, v in model.named_parameters()}
    return model, params, x, zoo.target_of("resnet_basic", model(x).detach())


def _attributions(model: nn.Module) -> tuple[lrpfunc.Attribution, lrpfunc.Attribution]:
    fast = lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.merge_batchnorm())
    every_term = composites.epsilon_plus_flat(layer_map=[((nn.Conv2d,), _zplus(False))])
    exact = lrpfunc.attribute(model, every_term, canonizers.merge_batchnorm())
    return fast, exact


def test_a_term_left_out_keeps_the_relevance(resnet) -> None:
    model, params, x, grad_output = resnet
    fast, exact = _attributions(model)
    with torch.no_grad():
        torch.testing.assert_close(fast(params, x, grad_output)[1], exact(params, x, grad_output)[1],
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's jvp set-up
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # the same warning on torch 2.14
def test_a_term_left_out_keeps_the_derivatives_after_a_relu(resnet) -> None:
    """The explanation-guided training step (parameters), the input gradient, and a forward-mode derivative."""
    model, params, x, grad_output = resnet
    fast, exact = _attributions(model)
    mask = torch.zeros_like(x[:1, :1])
    mask[..., 8:24, 8:24] = 1.0

    def loss_of(fn: lrpfunc.Attribution):
        return lambda p, v: (fn(p, v, grad_output)[1] * mask).square().sum()

    for argnums in (0, 1):
        got = torch.func.grad(loss_of(fast), argnums=argnums)(params, x)
        expected = torch.func.grad(loss_of(exact), argnums=argnums)(params, x)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    tangent = torch.randn_like(x)
    got = torch.func.jvp(lambda v: fast(params, v, grad_output)[1], (x,), (tangent,))[1]
    expected = torch.func.jvp(lambda v: exact(params, v, grad_output)[1], (x,), (tangent,))[1]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


class AtTheKink(nn.Module):
    """A bias-free layer whose first unit is exactly zero on inputs with ``x_0 = x_1``: the activation's kink."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5, bias=False)
        self.second = nn.Linear(5, 3)
        self.activation = activation
        with torch.no_grad():
            self.first.weight[0] = torch.tensor([1.0, -1.0, 0.0, 0.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        return self.second(torch.relu(h) if self.activation == "relu" else h.clamp(min=0.0))


@pytest.mark.parametrize("activation", ["relu", "clamp"])
def test_the_input_gradient_at_the_kink_equals_every_terms(activation: str) -> None:
    """At the kink, ``clamp(min=0)``'s derivative is 1: the negative part's term then has derivatives of its own (with
    respect to the input and the parameters before it), so it is computed whenever something differentiates the
    result."""
    torch.manual_seed(0)
    model = AtTheKink(activation).to(D)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 4, dtype=D)
    x[:, 1] = x[:, 0]
    grad_output = torch.randn(3, 3, dtype=D)
    fast, exact = _linear_zplus(model)

    weights = torch.randn(3, 4, dtype=D)  # a linear loss: a square's derivative is zero where the relevance is

    def gradients(fn: lrpfunc.Attribution) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return torch.func.grad(lambda p, v: (fn(p, v, grad_output)[1] * weights).sum(), argnums=(0, 1))(params, x)

    got, expected = gradients(fast), gradients(exact)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    with torch.no_grad():  # nothing differentiates: the term is left out after either, and the value stays
        torch.testing.assert_close(fast(params, x, grad_output)[1], exact(params, x, grad_output)[1],
                                   rtol=1e-12, atol=1e-14)


def test_a_difference_of_relus_keeps_its_negative_part() -> None:
    """``relu(a) - relu(b)`` has a negative part: its term is computed (a difference was once taken for a sum)."""
    torch.manual_seed(0)

    class Difference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(torch.relu(self.first(x)) - torch.relu(-x))

    model = Difference().to(D)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, grad_output = torch.randn(3, 4, dtype=D), torch.ones(3, 3, dtype=D)
    fast, exact = _linear_zplus(model)
    with torch.no_grad():
        torch.testing.assert_close(fast(params, x, grad_output)[1], exact(params, x, grad_output)[1],
                                   rtol=1e-12, atol=1e-14)
