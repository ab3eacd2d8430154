"""The attribution frees what it no longer needs: values inside pieces of the tape are not held by the record."""

from __future__ import annotations

import weakref

import torch
from torch import nn

import lrpfunc
import lrpfunc._attribute as attribute_module
from lrpfunc import composites

D = torch.float64


class Temporary(nn.Module):
    """A linear layer, then data movement (no rules) whose middle value the model drops at once."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)
        self.middle: weakref.ref[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        middle = torch.cat([h, h.flip(-1)], dim=-1).roll(1, -1)
        self.middle = weakref.ref(middle)
        return self.out(middle[..., 2:6].contiguous())


def test_values_inside_pieces_are_dropped_before_the_sweep(monkeypatch) -> None:
    torch.manual_seed(0)
    model = Temporary().to(D)
    alive: list[bool] = []
    sweep = attribute_module.sweep

    def checked(trace, *args, **kwargs):
        assert model.middle is not None
        alive.append(model.middle() is not None)
        return sweep(trace, *args, **kwargs)

    monkeypatch.setattr(attribute_module, "sweep", checked)
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, g = torch.randn(3, 4, dtype=D), torch.randn(3, 2, dtype=D)
    _, relevance = lrpfunc.attribute(model, composites.epsilon_plus())(params, x, g)
    assert alive == [False]  # the autograd graph keeps what the pullback needs; the record keeps nothing more
    monkeypatch.setattr(attribute_module, "sweep", sweep)
    _, again = lrpfunc.attribute(model, composites.epsilon_plus())(params, x, g)
    assert torch.equal(relevance, again)


class Scores(nn.Module):
    """Attention scores ``q @ k^T`` scaled, then a softmax: the scores are only an intermediate value."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.scores: weakref.ref[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2)
        self.scores = weakref.ref(scores)
        return (scores * 0.5).softmax(-1) @ self.v(x)


def test_products_in_gradient_form_stay_on_the_tape_and_hold_nothing(monkeypatch) -> None:
    """Under AttnLRP the uniform rule is ``J^T g / 2`` in gradient form: ``q @ k^T`` stays on the tape with its output's
    gradient divided, so the score matrix (the memory of long contexts) is freed before the sweep, as for a gradient."""
    torch.manual_seed(0)
    model = Scores().to(D)
    alive: list[bool] = []
    sweep = attribute_module.sweep

    def checked(trace, *args, **kwargs):
        assert model.scores is not None
        alive.append(model.scores() is not None)
        return sweep(trace, *args, **kwargs)

    monkeypatch.setattr(attribute_module, "sweep", checked)
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, g = torch.randn(2, 5, 4, dtype=D), torch.randn(2, 5, 4, dtype=D)
    _, relevance = lrpfunc.attribute(model, composites.attnlrp(epsilon=0.0))(params, x, g)
    assert alive == [False]
    monkeypatch.setattr(attribute_module, "sweep", sweep)
    # the same rules in relevance form (every rule a step of its own)
    _, reference, _ = lrpfunc.attribute_with_params(model, composites.attnlrp(epsilon=0.0))(params, x, g)
    torch.testing.assert_close(relevance, reference, rtol=1e-12, atol=1e-14)


def test_a_rule_on_a_merged_layer_holds_its_modified_weight_alone(monkeypatch) -> None:
    """With a BatchNorm folded into a convolution, z+ reads the merged weight once and keeps only its positive part:
    the merged weight is freed before the modified convolution runs (on a large layer, a weight's memory less)."""
    from lrpfunc import _basic, canonizers

    merged: list[weakref.ref[torch.Tensor]] = []
    dead_after_apply: list[bool] = []
    scale_weight, apply = canonizers._scale_weight, _basic.ParamMod.apply

    def recorded(*args, **kwargs):
        weight = scale_weight(*args, **kwargs)
        merged.append(weakref.ref(weight))
        return weight

    def checked(self, call, rule="ParamMod"):
        before = len(merged)
        modified = apply(self, call, rule)
        if self.modifier is not _basic.keep_param and len(merged) > before:
            dead_after_apply.append(all(ref() is None for ref in merged[before:]))
        return modified

    monkeypatch.setattr(canonizers, "_scale_weight", recorded)
    monkeypatch.setattr(_basic.ParamMod, "apply", checked)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).to(D).eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, g = torch.randn(2, 3, 8, 8, dtype=D), torch.randn(2, 3, dtype=D)
    fn = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())
    _, relevance = fn(params, x, g)
    assert dead_after_apply and all(dead_after_apply)
    monkeypatch.setattr(_basic.ParamMod, "apply", apply)
    monkeypatch.setattr(canonizers, "_scale_weight", scale_weight)
    torch.testing.assert_close(fn(params, x, g)[1], relevance, rtol=0, atol=0)
