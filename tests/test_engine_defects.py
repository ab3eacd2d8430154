"""Regression tests for the silent wrong results and crashes that random architectures found in 0.2.0's engine (each
fails there)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import randomize_batchnorm
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


# ----------------------------------------------------------------------------------------------------------------
# accumulating scatters (how mixtures of experts gather their experts' outputs) take the sum rule
# ----------------------------------------------------------------------------------------------------------------


class MixtureOfExperts(nn.Module):
    """Top-k routing; the experts' outputs, scaled by their routing weights, gathered with ``index_add`` (Mixtral,
    Qwen-MoE) or, ``dense=True``, by a constant 0/1 matrix per expert and a sum over experts: the same function, whose
    rules written out (the sum rule over the experts, epsilon 0 through the matrix) equal the sum rule of the scatter."""

    def __init__(self, top: int, dense: bool = False, experts: int = 3, width: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(experts))
        self.head = nn.Linear(width, 2, bias=False)
        self.top, self.dense = top, dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.router(x).softmax(-1)
        chosen = weights.topk(self.top, -1).indices
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens = (chosen == e).any(-1).nonzero()[:, 0]
            values = expert(x[tokens]) * weights[tokens, e, None]
            if self.dense:
                out = out + F.one_hot(tokens, x.shape[0]).to(x.dtype).T @ values
            else:
                out = out.index_add(0, tokens, values)
        return self.head(out)


@pytest.mark.parametrize("top", [1, 2])
def test_index_add_takes_the_sum_rule_like_the_dense_mixture(top: int) -> None:
    torch.manual_seed(3)
    model = MixtureOfExperts(top).to(D)
    dense = MixtureOfExperts(top, dense=True).to(D)
    dense.load_state_dict(model.state_dict())
    x = torch.randn(6, 4, dtype=D)
    grad_output = torch.randn(6, 2, dtype=D)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-13, atol=1e-13)
    table = lrpfunc.rule_table(model, composites.cp_lrp(), x)
    assert any(site.kind == "op" and site.func is torch.Tensor.index_add and site.op_class is lrpfunc.ops.Sum
               for site, _ in table.rows)
    for composite in (composites.cp_lrp(), composites.attnlrp()):
        _, relevance = lrpfunc.attribute(model, composite)(_params(model), x, grad_output)
        _, expected = lrpfunc.attribute(dense, composite)(_params(dense), x, grad_output)
        torch.testing.assert_close(relevance, expected, rtol=1e-10, atol=1e-12)
    # CP-LRP holds the routing weights: the bias-free mixture conserves (0.2.0 counted each expert's share twice)
    _, relevance = lrpfunc.attribute(model, composites.cp_lrp())(_params(model), x, grad_output)
    assert float(relevance.detach().sum()) == pytest.approx(float(grad_output.sum()), rel=1e-10)


def test_index_add_with_repeated_indices_conserves() -> None:
    class Gather(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return torch.zeros_like(h).index_add(1, torch.tensor([0, 0]), h)

    model = Gather().to(D)
    x = torch.randn(2, 3, dtype=D)
    grad_output = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    composite = composites.layer_map([((nn.Linear, lrpfunc.ops.Sum, lrpfunc.ops.Shift), lrpfunc.rules.epsilon(0.0))])
    _, relevance = lrpfunc.attribute(model, composite)(_params(model), x, grad_output)
    assert float(relevance.detach().sum()) == pytest.approx(2.0, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# merge_batchnorm when the layer's output is read besides its BatchNorm
# ----------------------------------------------------------------------------------------------------------------


class ReadBesidesBatchNorm(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.form = form
        randomize_batchnorm(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.lin(x)
        if self.form == "sum":
            return c + self.bn(c)
        if self.form == "product":
            return self.bn(c) * c
        return torch.cat([self.bn(c), c], 1)


@pytest.mark.parametrize("form", ["sum", "product", "cat"])
@pytest.mark.parametrize("composite", ["attnlrp", "cp_lrp", "epsilon_plus"])
def test_merge_batchnorm_leaves_a_batchnorm_whose_input_is_read_elsewhere(form: str, composite: str) -> None:
    """The BatchNorm cannot be folded without changing what the other read sees: it keeps its own call site, in the
    gradient form as in relevance form (0.2.0 folded it silently when the layer itself had a rule in gradient form)."""
    torch.manual_seed(4)
    model = ReadBesidesBatchNorm(form).to(D).eval()
    x = torch.randn(5, 3, dtype=D)
    grad_output = torch.randn_like(model(x))
    params = _params(model)
    make = getattr(composites, composite)
    merged = lrpfunc.attribute(model, make(), canonizers.merge_batchnorm())(params, x, grad_output)[1]
    unmerged = lrpfunc.attribute(model, make())(params, x, grad_output)[1]
    report = lrpfunc.conservation(model, make(), canonizers.merge_batchnorm())(params, x, grad_output)
    torch.testing.assert_close(merged, unmerged, rtol=1e-12, atol=1e-14)
    assert report.total_out == pytest.approx(float(merged.detach().sum()), rel=1e-10, abs=1e-12)
    table = lrpfunc.rule_table(model, make(), x, canonizers.merge_batchnorm())
    assert any(site.name == "bn" and site.kind == "module" and rule is not None for site, rule in table.rows)


# ----------------------------------------------------------------------------------------------------------------
# merge_batchnorm after a functional linear map or convolution
# ----------------------------------------------------------------------------------------------------------------


class ConvBatchNorm(nn.Module):
    """``bn(conv(x))`` as a module or written with ``F.conv2d`` / ``F.linear`` on the same parameters."""

    def __init__(self, functional: bool, image: bool) -> None:
        super().__init__()
        self.functional, self.image = functional, image
        self.layer = nn.Conv2d(2, 3, 3, padding=1) if image else nn.Linear(4, 3)
        self.bn = nn.BatchNorm2d(3) if image else nn.BatchNorm1d(3)
        self.head = nn.Linear(3 * 5 * 5 if image else 3, 2)
        randomize_batchnorm(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.functional:
            h = self.layer(x)
        elif self.image:
            h = F.conv2d(x, self.layer.weight, self.layer.bias, padding=1)
        else:
            h = F.linear(x, self.layer.weight, self.layer.bias)
        return self.head(torch.relu(self.bn(h)).flatten(1))


@pytest.mark.parametrize("image", [False, True], ids=["linear", "conv2d"])
@pytest.mark.parametrize("composite", ["epsilon_plus", "attnlrp"])
def test_merge_batchnorm_after_a_functional_layer_equals_the_module_form(image: bool, composite: str) -> None:
    torch.manual_seed(5)
    module_form = ConvBatchNorm(False, image).to(D).eval()
    functional = ConvBatchNorm(True, image).to(D).eval()
    functional.load_state_dict(module_form.state_dict())
    x = torch.randn(3, 2, 5, 5, dtype=D) if image else torch.randn(3, 4, dtype=D)
    grad_output = torch.randn(3, 2, dtype=D)
    make = getattr(composites, composite)

    def relevance(model: nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return lrpfunc.attribute(model, make(), canonizers.merge_batchnorm())(params, x, grad_output)[1]

    expected, got = relevance(module_form, _params(module_form)), relevance(functional, _params(functional))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    unmerged = lrpfunc.attribute(functional, make())(_params(functional), x, grad_output)[1]
    assert not torch.allclose(got, unmerged)  # the merge happened (the BatchNorm has no site of its own)
    weight = torch.randn_like(x)

    def loss(model: nn.Module) -> dict[str, torch.Tensor]:
        return torch.func.grad(lambda p: (relevance(model, p) * weight).sum())(_params(model, detached=True))

    torch.testing.assert_close(loss(functional), loss(module_form), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# epsilon 0: relevance seeded on an output that is exactly zero
# ----------------------------------------------------------------------------------------------------------------


class Concatenated(nn.Module):
    """``h = relu(l1(x)); cat([h, l2(h)])``: some outputs are exactly zero (the ReLU's)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5, bias=False), nn.Linear(5, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        return torch.cat([h, self.l2(h)], 1)


@pytest.mark.parametrize("make_composite", [composites.attnlrp, lambda: composites.epsilon_plus(epsilon=0, stabilizer=0)],
                         ids=["attnlrp", "epsilon_plus_0"])
def test_epsilon_zero_keeps_relevance_seeded_on_zero_outputs(make_composite: object) -> None:
    """By the rules: the ReLU passes its relevance on whatever its output (passthrough), ``l1`` divides by its own
    output ``z1`` (nonzero where the ReLU gave zero), ``l2`` by its own; nothing is divided by the zero outputs."""
    torch.manual_seed(0)
    model = Concatenated().to(D)
    x = torch.randn(1, 4, dtype=D)
    seed = torch.ones(1, 10, dtype=D)
    h = torch.relu(model.l1(x))
    assert (h == 0).any()
    z1, z2 = model.l1(x), model.l2(h)
    relevance_h = seed[:, :5] + h * ((seed[:, 5:] / z2) @ model.l2.weight)  # cat, then l2's epsilon 0 rule
    expected = x * ((relevance_h / z1) @ model.l1.weight)  # passthrough, then l1's epsilon 0 rule
    params = _params(model)
    _, fast = lrpfunc.attribute(model, make_composite())(params, x, seed)  # type: ignore[operator]
    _, relevance_form, _ = lrpfunc.attribute_with_params(model, make_composite())(params, x, seed)  # type: ignore[operator]
    torch.testing.assert_close(fast, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(relevance_form, expected.detach(), rtol=1e-10, atol=1e-12)
    assert abs(float(fast.detach().sum()) - 10.0) < 1e-9
    _, tiny = lrpfunc.attribute(model, composites.attnlrp(epsilon=1e-12))(params, x, seed)
    torch.testing.assert_close(fast, tiny, rtol=1e-6, atol=1e-8)


def test_epsilon_zero_keeps_relevance_on_zero_inputs_moved_to_the_output() -> None:
    """The model's input itself returned beside a layer's output: its zero elements keep their seeded relevance."""

    class InputAndLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, self.linear(x)], 1)

    torch.manual_seed(1)
    model = InputAndLayer().to(D)
    x = torch.randn(2, 4, dtype=D)
    x[0, 1] = 0.0
    seed = torch.ones(2, 7, dtype=D)
    params = _params(model)
    _, fast = lrpfunc.attribute(model, composites.attnlrp())(params, x, seed)
    _, relevance_form, _ = lrpfunc.attribute_with_params(model, composites.attnlrp())(params, x, seed)
    torch.testing.assert_close(fast, relevance_form, rtol=1e-10, atol=1e-12)
    assert abs(float(fast[0, 1].detach()) - 1.0) < 1e-12  # the seed on x[0, 1] = 0 (the layer adds nothing there)


def test_a_layer_output_returned_beside_its_merged_batchnorm_is_not_merged() -> None:
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.bn = nn.Linear(3, 3), nn.BatchNorm1d(3)
            randomize_batchnorm(self.bn)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = self.lin(x)
            return c, self.bn(c)

    torch.manual_seed(6)
    model = Both().to(D).eval()
    x = torch.randn(4, 3, dtype=D)
    seed = (torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D))
    for make in (composites.attnlrp, composites.epsilon_plus):
        merged = lrpfunc.attribute(model, make(), canonizers.merge_batchnorm())(_params(model), x, seed)[1]
        unmerged = lrpfunc.attribute(model, make())(_params(model), x, seed)[1]
        torch.testing.assert_close(merged, unmerged, rtol=1e-12, atol=1e-14)


class ViewThenWrite(nn.Module):
    """A view taken before an in-place write to its base sees the write in eager torch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        v = h[:, :2]
        h.relu_()
        return v * 1.0


@pytest.mark.parametrize("composite", [None, composites.epsilon_plus()], ids=["none", "epsilon_plus"])
def test_a_view_read_after_an_in_place_write_to_its_base_is_refused(composite: object) -> None:
    """Records hold values, not memory: the view would keep the old values (0.2.0 returned them silently)."""
    model = ViewThenWrite().to(D)
    x = torch.randn(3, 3, dtype=D)
    before = _state(model)
    with pytest.raises(NotImplementedError, match=r"the in-place operation relu in 'the model' wrote into an activation "
                                                  r"with a view taken before it that is read afterwards"):
        lrpfunc.attribute(model, composite)(_params(model, detached=True), x, torch.ones(3, 2, dtype=D))  # type: ignore[arg-type]
    assert _unchanged(model, before)
