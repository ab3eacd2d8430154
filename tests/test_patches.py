"""The process-wide patches of ``Module.__call__`` and ``Function.apply`` live only while a trace runs."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import lrpfunc
from lrpfunc import composites


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
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("forward failed on purpose")
        return self.lin(Double.apply(x))


def _patched_attributes() -> tuple[object, object, bool]:
    return (
        inspect.getattr_static(torch.nn.Module, "__call__"),
        inspect.getattr_static(torch.autograd.Function, "apply"),
        "apply" in torch.autograd.Function.__dict__,
    )


@pytest.mark.parametrize("composite", [None, composites.epsilon_plus()], ids=["no rules", "epsilon_plus"])
def test_patches_are_restored_after_a_call_and_after_a_failure(composite: object) -> None:
    before = _patched_attributes()
    model = WithFunction().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    fn = lrpfunc.attribute(model, composite)  # type: ignore[arg-type]
    output, relevance = fn(dict(model.named_parameters()), x, torch.ones(4, 2, dtype=torch.float64))
    torch.testing.assert_close(output, model(x))
    assert _patched_attributes() == before
    model.fail = True
    with pytest.raises(RuntimeError, match="forward failed on purpose"):
        fn(dict(model.named_parameters()), x, torch.ones(4, 2, dtype=torch.float64))
    assert _patched_attributes() == before
    assert torch.equal(Double.apply(x), 2 * x)  # the original apply still works outside a trace


def test_custom_function_gets_its_true_pullback_inside_a_trace() -> None:
    model = WithFunction().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    grad_output = torch.randn(4, 2, dtype=torch.float64)
    _, relevance = lrpfunc.attribute(model, None)(dict(model.named_parameters()), x, grad_output)
    expected = grad_output @ model.lin.weight * 2
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-12)
