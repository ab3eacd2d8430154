"""Custom autograd functions inside a trace (the ``Function.apply`` patch; its restoration: test_torch_patches.py)."""

from __future__ import annotations

import torch
from torch import nn

import lrpfunc


class Double(torch.autograd.Function):
    """A custom autograd function in the ``setup_context`` style (torch.func can differentiate it)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def setup_context(ctx: object, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


class WithFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(Double.apply(x))


def test_custom_function_gets_its_true_pullback_inside_a_trace() -> None:
    model = WithFunction().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    grad_output = torch.randn(4, 2, dtype=torch.float64)
    _, relevance = lrpfunc.attribute(model, None)(dict(model.named_parameters()), x, grad_output)
    expected = grad_output @ model.lin.weight * 2
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-12)
