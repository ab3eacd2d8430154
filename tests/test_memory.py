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
