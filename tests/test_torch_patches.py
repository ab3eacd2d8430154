"""The process-wide patches of ``torch.autograd.Function.apply`` and ``torch.nn.Module.__call__`` are installed only
while an attribution traces, and afterwards torch holds its own objects again (the very same objects, also after a
trace that raised), on every supported torch (``Function.apply`` is a ``classmethod`` up to torch 2.13 and a C
descriptor from 2.14)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import nn

import lrpfunc
from lrpfunc import composites

D = torch.float64


class Square(torch.autograd.Function):
    """x^2 in the setup_context style, with a generated vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**2

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def _torch_objects() -> tuple[Any, Any, bool]:
    """``Function.apply`` and ``Module.__call__`` as the classes hold them, and whether ``Function`` owns ``apply``."""
    return (
        inspect.getattr_static(torch.autograd.Function, "apply"),
        inspect.getattr_static(nn.Module, "__call__"),
        "apply" in vars(torch.autograd.Function),
    )


class Probe(nn.Module):
    """Linear, Square.apply, Linear; records the patched objects it sees while called, and raises if asked."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)
        self.seen: list[tuple[Any, Any, bool]] = []
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_torch_objects())
        hidden = Square.apply(self.first(x))
        if self.fail:
            raise ValueError("probe failure")
        return self.second(hidden)


def _setup() -> tuple[Probe, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Probe().to(D)
    params = {k: v.detach() for k, v in model.named_parameters()}
    return model, params, torch.randn(2, 3, dtype=D), torch.randn(2, 2, dtype=D)


def test_patches_are_installed_only_while_tracing_and_restored_identically() -> None:
    before = _torch_objects()
    model, params, x, grad_output = _setup()
    output, relevance = lrpfunc.attribute(model, composites.epsilon_plus())(params, x, grad_output)
    assert torch.isfinite(relevance).all()
    assert model.seen, "the model was not called"
    patched_apply, patched_call, _ = model.seen[0]
    assert patched_apply is not before[0], "Function.apply was not patched while tracing"
    assert patched_call is not before[1], "Module.__call__ was not patched while tracing"
    after = _torch_objects()
    assert after[0] is before[0], "Function.apply is not torch's own object after an attribution"
    assert after[1] is before[1], "Module.__call__ is not torch's own object after an attribution"
    assert after[2] == before[2]


def test_patches_are_restored_after_an_attribution_that_raised() -> None:
    before = _torch_objects()
    model, params, x, grad_output = _setup()
    model.fail = True
    with pytest.raises(ValueError, match="probe failure"):
        lrpfunc.attribute(model, composites.epsilon_plus())(params, x, grad_output)
    assert model.seen, "the model was not called"
    after = _torch_objects()
    assert after[0] is before[0], "Function.apply is not torch's own object after an attribution that raised"
    assert after[1] is before[1], "Module.__call__ is not torch's own object after an attribution that raised"
    assert after[2] == before[2]


def test_patches_are_restored_after_transformed_attributions_and_apply_still_works() -> None:
    before = _torch_objects()
    model, params, x, grad_output = _setup()
    fn = lrpfunc.attribute(model)
    torch.func.grad(lambda x: fn(params, x, grad_output)[1].square().sum())(x)
    torch.func.vmap(lambda g: fn(params, x, g)[1])(torch.stack([grad_output, 2 * grad_output]))
    after = _torch_objects()
    assert after[0] is before[0] and after[1] is before[1], "torch's own objects are not back after transforms"
    leaf = torch.tensor([1.5, -2.0], dtype=D, requires_grad=True)
    (gradient,) = torch.autograd.grad(Square.apply(leaf).sum(), leaf)
    torch.testing.assert_close(gradient, 2 * leaf.detach(), rtol=0, atol=0)
    torch.testing.assert_close(torch.func.grad(lambda t: Square.apply(t).sum())(leaf.detach()), 2 * leaf.detach())
