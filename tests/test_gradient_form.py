"""The gradient form of the sweep: rules without stabilizer propagate ``R / value`` instead of ``R``.

:func:`lrpfunc.attribute` uses it; :func:`lrpfunc.attribute_with_params` propagates relevance at every step (parameter
relevance needs it). Both must give the same relevance and the same derivatives, float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpfunc
from lrpfunc import _tape, composites, ops, rules, types
from lrpfunc._attribute import Setup, run_trace
from lrpfunc._record import RuledCall
from lrpfunc._tape import AutogradTape

D = torch.float64


def _both(model: nn.Module, composite, x: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    params = dict(model.named_parameters())
    _, in_gradient_form = lrpfunc.attribute(model, composite)(params, x, seed)
    _, as_relevance, _ = lrpfunc.attribute_with_params(model, composite)(params, x, seed)
    return in_gradient_form, as_relevance


def _ruled_calls(model: nn.Module, composite, x: torch.Tensor, transparent: bool) -> list[str]:
    setup = Setup("test", model, composite, ())
    with torch.no_grad():
        trace = run_trace(setup, dict(model.named_parameters()), x, AutogradTape(), transparent=transparent)
    return [repr(step.rule) for step in trace.steps if type(step) is RuledCall]


class Attention(nn.Module):
    """A pre-norm transformer block with causal sdpa, a gated MLP and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.RMSNorm(16)
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, 4, 4).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, 16))
        h = self.norm2(x)
        x = x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))
        return self.head(x[:, -1])


def test_transparent_calls_leave_only_the_modified_rules_as_steps() -> None:
    torch.manual_seed(0)
    model = Attention().to(D)
    x = torch.randn(2, 5, 16, dtype=D)
    transparent = _ruled_calls(model, composites.attnlrp(), x, True)
    every = _ruled_calls(model, composites.attnlrp(), x, False)
    # linear layers, sums, softmax and scaling are their pullbacks in gradient form, products (the uniform rule) their
    # pullbacks divided by two: they stay on the tape
    assert sorted(set(transparent)) == ["normalization()", "passthrough"]
    assert "epsilon(epsilon=0.0)" in every and "softmax" in every and "uniform" in every
    assert len(every) > 2 * len(transparent)


@pytest.mark.parametrize("tape", ["autograd", "level", "vjp"])
def test_products_split_on_the_tape_equal_the_uniform_rule_on_every_tape(tape: str) -> None:
    """A ``"split"`` rule (the uniform rule without stabilizer) on the tape divides its output's gradient by its number
    of activation operands: on the shared tapes by a hook, on the per-operation tape by its pullback. ``x * x`` counts
    twice. Equal to the rule in relevance form and under ``torch.func.grad`` (the level tape), float64."""

    class Products(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.out(h * self.b(x) + h * h)

    torch.manual_seed(3)
    model = Products().to(D)
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, seed = torch.randn(4, 4, dtype=D), torch.randn(4, 3, dtype=D)
    composite = composites.attnlrp()
    _, reference, _ = lrpfunc.attribute_with_params(model, composite)(params, x, seed)
    with _tape.forced(tape):
        _, relevance = lrpfunc.attribute(model, composite)(params, x, seed)
        loss_grad = torch.func.grad(lambda v: lrpfunc.attribute(model, composite)(params, v, seed)[1].square().sum())(x)
    torch.testing.assert_close(relevance, reference, rtol=1e-12, atol=1e-14)
    expected = torch.func.grad(
        lambda v: lrpfunc.attribute_with_params(model, composite)(params, v, seed)[1].square().sum()
    )(x)
    torch.testing.assert_close(loss_grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("composite", [composites.attnlrp(), composites.cp_lrp()], ids=["attnlrp", "cp_lrp"])
def test_gradient_form_equals_relevance_form(composite) -> None:
    torch.manual_seed(1)
    model = Attention().to(D)
    x = torch.randn(3, 6, 16, dtype=D)
    seed = torch.randn(3, 3, dtype=D)
    fast, reference = _both(model, composite, x, seed)
    assert fast.abs().sum() > 0
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-14)


def test_gradient_form_derivatives_equal_relevance_form() -> None:
    torch.manual_seed(2)
    model = Attention().to(D)
    x = torch.randn(2, 5, 16, dtype=D)
    seed = torch.eye(3, dtype=D)[[0, 2]]
    params = {k: v.detach() for k, v in model.named_parameters()}
    weight = torch.randn_like(x)
    fast = lrpfunc.attribute(model, composites.attnlrp())
    slow = lrpfunc.attribute_with_params(model, composites.attnlrp())

    def loss(fn, index):
        return lambda p, e: (fn(p, e, seed)[index] * weight).sum()

    first = torch.func.grad(loss(fast, 1), argnums=(0, 1))(params, x)
    second = torch.func.grad(loss(slow, 1), argnums=(0, 1))(params, x)
    torch.testing.assert_close(first[1], second[1], rtol=1e-10, atol=1e-12)
    for name in params:
        torch.testing.assert_close(first[0][name], second[0][name], rtol=1e-10, atol=1e-12, msg=name)
    # vmap over seeds
    seeds = torch.eye(3, dtype=D)[:, None].expand(3, 2, 3)
    batched = torch.func.vmap(lambda s: fast(params, x, s)[1])(seeds)
    looped = torch.stack([slow(params, x, s)[1] for s in seeds])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-14)


def test_lrp0_on_a_relu_network_without_biases_is_gradient_times_input() -> None:
    """Epsilon 0 on every layer and ReLUs passing relevance: LRP-0, which for a network without biases is gradient
    times input (the gradient of the output seeded with ``R / output``), dead units (exactly zero outputs) included, in
    both forms, without a single NaN."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(),
                          nn.Linear(16, 4, bias=False)).to(D)
    x = torch.randn(10, 8, dtype=D)
    x[:, :3] = 0.0  # zero inputs
    seed = torch.randn(10, 4, dtype=D)
    composite = composites.layer_map([*composites.layer_map_base(0.0), (types.Linear, rules.epsilon(0.0))])
    fast, reference = _both(model, composite, x, seed)
    leaf = x.clone().requires_grad_()
    output = model(leaf)
    (gradient,) = torch.autograd.grad(output, leaf, seed / output.detach())
    assert torch.isfinite(fast).all() and torch.isfinite(reference).all()
    torch.testing.assert_close(fast, x * gradient, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(reference, x * gradient, rtol=1e-12, atol=1e-14)


class Mixed(nn.Module):
    """A linear layer, an operation without a rule (exp), another linear layer: one piece of the tape that needs a
    gradient (the transparent layers) and relevance (exp, which takes the true gradient of relevance)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.exp(0.3 * self.first(x)))


def test_a_piece_that_needs_both_forms_is_traced_again_without_transparent_calls() -> None:
    torch.manual_seed(4)
    model = Mixed().to(D)
    x = torch.randn(4, 6, dtype=D)
    seed = torch.randn(4, 2, dtype=D)
    composite = composites.layer_map([(nn.Linear, rules.epsilon(0.0))])  # exp and the scaling get no rule
    fast, reference = _both(model, composite, x, seed)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-14)
    assert _ruled_calls(model, composite, x, True) == ["epsilon(epsilon=0.0)"] * 2  # the retry keeps them as calls
    # written out: epsilon 0 on the second layer, the true gradient of relevance through exp, epsilon 0 on the first
    with torch.no_grad():
        h = model.first(x)
        a = torch.exp(0.3 * h)
        r = a * ((seed / model.second(a)) @ model.second.weight)
        r = r * 0.3 * a  # exp and the scaling have no rule: their true derivative, applied to relevance
        expected = x * ((r / h) @ model.first.weight)
    torch.testing.assert_close(fast, expected, rtol=1e-12, atol=1e-14)


def test_rules_with_a_stabilizer_have_no_gradient_form() -> None:
    assert rules.epsilon(1e-6).gradient_form is None
    assert rules.epsilon(0.0, zero_params="bias").gradient_form is None
    assert rules.epsilon(0.0).gradient_form == "pullback"
    assert rules.epsilon(lrpfunc.Stabilizer(0.0)).gradient_form == "pullback"
    assert rules.norm(0.0).gradient_form == "pullback"
    assert rules.normalization(0.0).gradient_form == "modified"
    assert rules.uniform(0.0).gradient_form == "split" and rules.uniform(1e-6).gradient_form is None
    assert rules.gated(0.0).gradient_form == "modified"
    assert rules.softmax().gradient_form == "pullback"
    assert getattr(rules.zplus(), "gradient_form", None) is None
    assert getattr(rules.passthrough(), "gradient_form", None) is None
    # the epsilon 0 relevance form divides safely: a zero output passes nothing
    call_free = rules.epsilon(0.0).gradient_mapper(torch.tensor([1.0, 2.0]), [torch.tensor([0.0, 4.0])])
    assert torch.equal(call_free[0], torch.tensor([0.0, 0.5]))


def test_data_movement_and_selection_move_gradients() -> None:
    """Max pooling, views and where between transparent layers keep the gradient form (no conversion)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(D)
    x = torch.randn(2, 2, 8, 8, dtype=D)
    seed = torch.randn(2, 3, dtype=D)
    composite = composites.layer_map([(types.Linear, rules.epsilon(0.0))])
    fast, reference = _both(model, composite, x, seed)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-14)
    assert _ruled_calls(model, composite, x, True) == []  # one piece of the tape, one autograd call
    assert ops.moves_values(torch.nn.functional.max_pool2d, ops.Selection)
    assert not ops.moves_values(torch.cumsum, ops.DataMovement)
