"""Regression tests for the silent wrong results and crashes that random architectures found in 0.2.0's engine (each
fails there)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpfunc
from lrpfunc import canonizers, composites

D = torch.float64


def _params(model: nn.Module, detached: bool = False) -> dict[str, torch.Tensor]:
    return {k: (v.detach() if detached else v) for k, v in model.named_parameters()}


def _state(model: nn.Module) -> dict[str, tuple[type, torch.Tensor]]:
    return {name: (type(tensor), tensor.detach().clone()) for name, tensor in model.state_dict(keep_vars=True).items()}


def _unchanged(model: nn.Module, before: dict[str, tuple[type, torch.Tensor]]) -> bool:
    """The same names, tensor types and values (bitwise); no functorch wrapper left behind."""
    after = model.state_dict(keep_vars=True)
    return after.keys() == before.keys() and all(
        type(after[k]) is before[k][0] and torch.equal(after[k].detach(), before[k][1]) for k in before
    )


# ----------------------------------------------------------------------------------------------------------------
# a buffer rebound or updated in forward
# ----------------------------------------------------------------------------------------------------------------


class Counting(nn.Module):
    """``self.count += 1`` rebinds the buffer; an in-place running statistic that depends on the input."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(3))
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        self.running.mul_(0.9).add_(0.1 * x.mean(0))
        if self.fail:
            raise RuntimeError("forward failed on purpose")
        return self.lin(x) + self.running.sum() + self.count


@pytest.mark.parametrize("composite", [None, composites.epsilon_plus(), composites.attnlrp()],
                         ids=["no rules", "epsilon_plus", "attnlrp"])
@pytest.mark.parametrize("detached", [True, False], ids=["detached", "parameters"])
def test_buffers_updated_in_forward_stay_unchanged_on_the_model(composite: object, detached: bool) -> None:
    model = Counting().to(D)
    x = torch.randn(4, 3, dtype=D)
    eager = copy.deepcopy(model)(x)  # the forward sees its own update within the call
    before = _state(model)
    fn = lrpfunc.attribute(model, composite)  # type: ignore[arg-type]
    for _ in range(2):
        output, relevance = fn(_params(model, detached), x, torch.ones(4, 2, dtype=D))
        torch.testing.assert_close(output, eager, rtol=0, atol=0)
        assert _unchanged(model, before)
        copy.deepcopy(model)  # no functorch wrapper left in the model
    model.fail = True
    with pytest.raises(RuntimeError, match="forward failed on purpose"):
        fn(_params(model, detached), x, torch.ones(4, 2, dtype=D))
    assert _unchanged(model, before)
    copy.deepcopy(model)


def test_buffers_stay_unchanged_under_every_entry_point() -> None:
    model = Counting().to(D)
    x = torch.randn(4, 3, dtype=D)
    before = _state(model)
    params, grad = _params(model), torch.ones(4, 2, dtype=D)
    lrpfunc.attribute_with_params(model, composites.epsilon_plus())(params, x, grad)
    lrpfunc.conservation(model, composites.epsilon_plus())(params, x, grad)
    lrpfunc.attribute_layers(model, composites.epsilon_plus(), layers=["lin"])(params, x, grad)
    lrpfunc.rule_table(model, composites.epsilon_plus(), x)
    torch.func.grad(lambda p: lrpfunc.attribute(model, composites.epsilon_plus())(p, x, grad)[1].sum())(params)
    assert _unchanged(model, before)
    copy.deepcopy(model)
