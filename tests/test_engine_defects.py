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


# ----------------------------------------------------------------------------------------------------------------
# in-place operations under a rule: the forward is eager torch's, the relevance that of the out-of-place twin
# ----------------------------------------------------------------------------------------------------------------


class _TwoLayers(nn.Module):
    def __init__(self, width: int = 3, out: int = 2) -> None:
        super().__init__()
        self.a = nn.Linear(3, width)
        self.b = nn.Linear(width, out)


class ReluInPlace(_TwoLayers):
    def forward(self, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        h = self.a(x)
        if inplace:
            h.relu_()
        else:
            h = torch.relu(h)
        return self.b(h)


class LeakyInPlace(_TwoLayers):
    def forward(self, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        h = self.a(x)
        if inplace:
            F.leaky_relu_(h)
        else:
            h = F.leaky_relu(h)
        return self.b(h)


class PreActivationResidual(_TwoLayers):
    """``identity = h; h = relu_(h)``: the identity is the same tensor object, so it sees the activation too."""

    def __init__(self) -> None:
        super().__init__(width=3, out=3)

    def forward(self, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        h = self.a(x)
        identity = h
        h = F.relu_(h) if inplace else F.relu(h)
        return self.b(h) + (identity if inplace else h)


class SiluModuleInPlace(_TwoLayers):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.SiLU(inplace=True)
        self.act_out = nn.SiLU()

    def forward(self, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        h = self.a(x)
        alias = h
        if inplace:
            self.act(h)
            return self.b(alias)
        return self.b(self.act_out(h))


class CatInPlace(_TwoLayers):
    """``cat([h, h.tanh_()])``: Python reads ``h`` first, but cat runs after the in-place op: both halves are tanh(h)."""

    def __init__(self) -> None:
        super().__init__(width=3, out=2)

    def forward(self, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        h = self.a(x)
        if inplace:
            return torch.cat([h, h.tanh_()], 1)
        t = torch.tanh(h)
        return torch.cat([t, t], 1)


class MinusInPlace(_TwoLayers):
    """``h - F.leaky_relu_(h)``: both operands are the activated tensor, so the difference is zero."""

    def forward(self, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        h = self.a(x)
        if inplace:
            return self.b(h - F.leaky_relu_(h))
        t = F.leaky_relu(h)
        return self.b(t - t)


class _OutOfPlace(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, inplace=False)


_IN_PLACE = [ReluInPlace, LeakyInPlace, PreActivationResidual, SiluModuleInPlace, CatInPlace, MinusInPlace]
_COMPOSITES = {"none": None, "epsilon_plus": composites.epsilon_plus(), "attnlrp": composites.attnlrp(),
               "cp_lrp": composites.cp_lrp()}


@pytest.mark.parametrize("tape", ["autograd", "level", "vjp"])
@pytest.mark.parametrize("composite", list(_COMPOSITES), ids=list(_COMPOSITES))
@pytest.mark.parametrize("cls", _IN_PLACE, ids=[c.__name__ for c in _IN_PLACE])
def test_in_place_operations_keep_the_eager_forward_under_every_rule(cls: type, composite: str, tape: str) -> None:
    torch.manual_seed(1)
    model = cls().to(D)
    twin = _OutOfPlace(model)
    x = torch.randn(5, 3, dtype=D)
    eager = model(x.clone())
    torch.testing.assert_close(twin(x), eager, rtol=0, atol=0)  # the twin is the same function
    grad_output = torch.randn_like(eager)
    with lrpfunc._tape.forced(tape):
        output, relevance = lrpfunc.attribute(model, _COMPOSITES[composite])(_params(model), x, grad_output)
        _, expected = lrpfunc.attribute(twin, _COMPOSITES[composite])(_params(twin), x, grad_output)
    torch.testing.assert_close(output, eager, rtol=0, atol=1e-15)
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", _IN_PLACE, ids=[c.__name__ for c in _IN_PLACE])
def test_in_place_operations_differentiate_like_their_twin(cls: type) -> None:
    torch.manual_seed(2)
    model = cls().to(D)
    twin = _OutOfPlace(model)
    x = torch.randn(4, 3, dtype=D)
    grad_output = torch.randn_like(model(x.clone()))

    def loss(m: nn.Module) -> torch.Tensor:
        fn = lrpfunc.attribute(m, composites.attnlrp())
        return torch.func.grad(lambda x: (fn(_params(m), x, grad_output)[1] ** 2).sum())(x)

    torch.testing.assert_close(loss(model), loss(twin), rtol=1e-10, atol=1e-12)
    report = lrpfunc.conservation(model, composites.attnlrp())(_params(model), x, grad_output)
    _, relevance = lrpfunc.attribute(model, composites.attnlrp())(_params(model), x, grad_output)
    assert report.total_out == pytest.approx(float(relevance.detach().sum()), rel=1e-9, abs=1e-12)
