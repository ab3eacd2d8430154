"""Tracer edge cases: repeated module calls, in-place operations, Python control flow, pytree inputs,
functional operations, partial params and buffers. Without a composite, the attribution must be the
model's own output and its vector-Jacobian product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpfunc
from lrpfunc import composites, rules

D = torch.float64


def _params(model: nn.Module) -> dict:
    return dict(model.named_parameters())


def _autograd_reference(model: nn.Module, x: torch.Tensor, grad_output: torch.Tensor):
    """Output and input gradient by plain autograd on a copy of ``x`` (which the model may mutate)."""
    leaf = x.clone().requires_grad_()
    output = model(leaf * 1.0)
    (gradient,) = torch.autograd.grad(output, leaf, grad_output)
    return output.detach(), gradient


def _assert_equals_plain(model: nn.Module, x: torch.Tensor, grad_output: torch.Tensor | None = None) -> None:
    x_before = x.clone()
    with torch.no_grad():
        plain = model(x.clone())
    grad_output = torch.randn_like(plain) if grad_output is None else grad_output
    output, relevance = lrpfunc.attribute(model)(_params(model), x, grad_output)
    torch.testing.assert_close(output, plain, rtol=1e-14, atol=1e-14)
    expected_output, gradient = _autograd_reference(model, x, grad_output)
    torch.testing.assert_close(relevance, gradient, rtol=1e-12, atol=1e-14)
    assert torch.equal(x, x_before), "the caller's input was written"


# --------------------------------------------------------------------------------------------------------
# a module called twice
# --------------------------------------------------------------------------------------------------------


class SharedReLU(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 4)
        self.relu = nn.ReLU(inplace=inplace)
        self.l3 = nn.Linear(4, 2)

    def forward(self, x):
        return self.l3(self.relu(self.l2(self.relu(self.l1(x)))))


@pytest.mark.parametrize("inplace", [False, True])
def test_module_called_twice_has_two_call_sites(inplace: bool) -> None:
    model = SharedReLU(inplace).to(D)
    x = torch.randn(3, 4, dtype=D)
    composite = composites.layer_map([(nn.ReLU, rules.relu_beta_smooth(3.0))])
    table = lrpfunc.rule_table(model, composite, x)
    relu_sites = [site for site, _ in table if site.name == "relu"]
    assert [site.call_index for site in relu_sites] == [0, 1]
    assert "ReLU 'relu' (call 2)" in str(table)
    assert repr(table.rule_of("relu", 1)) == "relu_beta_smooth(beta_smooth=3.0)"
    # the relu op inside each call is listed as well
    assert sum(site.kind == "op" and site.name == "relu/relu" for site, _ in table) == 2


@pytest.mark.parametrize("inplace", [False, True])
def test_beta_smooth_uses_each_calls_own_input(inplace: bool) -> None:
    torch.manual_seed(0)
    model = SharedReLU(inplace).to(D)
    x, g = torch.randn(3, 4, dtype=D), torch.randn(3, 2, dtype=D)
    beta = 3.0
    _, got = lrpfunc.attribute(model, composites.layer_map([(nn.ReLU, rules.relu_beta_smooth(beta))]))(_params(model), x, g)
    w1, w2, w3 = (model.l1.weight.detach(), model.l2.weight.detach(), model.l3.weight.detach())
    z1 = model.l1(x).detach()
    z2 = model.l2(z1.clamp(min=0)).detach()
    r_a2 = g @ w3
    r_z2 = torch.sigmoid(beta * z2) * r_a2
    r_a1 = r_z2 @ w2
    r_z1 = torch.sigmoid(beta * z1) * r_a1
    torch.testing.assert_close(got, r_z1 @ w1, rtol=1e-12, atol=1e-14)
    # using one input for both calls (what a per-module store of inputs does) gives something else
    wrong = ((torch.sigmoid(beta * z2) * ((torch.sigmoid(beta * z2) * r_a2) @ w2)) @ w1)
    assert (got - wrong).abs().max() > 1e-3


def test_rules_for_each_call_of_a_shared_module_by_name_and_call() -> None:
    """A custom composite can give the two calls different rules."""

    class ByCall:
        def resolve(self, sites):
            return [
                (rules.relu_deconvnet() if site.call_index == 0 else rules.passthrough()) if site.name == "relu" else None
                for site in sites
            ]

    torch.manual_seed(1)
    model = SharedReLU(True).to(D)
    x, g = torch.randn(3, 4, dtype=D), torch.randn(3, 2, dtype=D)
    _, got = lrpfunc.attribute(model, ByCall())(_params(model), x, g)
    w1, w2, w3 = (model.l1.weight.detach(), model.l2.weight.detach(), model.l3.weight.detach())
    torch.testing.assert_close(got, (((g @ w3) @ w2).clamp(min=0)) @ w1, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------------
# in-place operations
# --------------------------------------------------------------------------------------------------------


class InPlace(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 5)
        self.l2 = nn.Linear(4, 5)
        self.l3 = nn.Linear(5, 3)
        self.how = how

    def forward(self, x):
        h = self.l1(x)
        if self.how == "add_-statement":
            h.add_(self.l2(x))  # return value discarded
        elif self.how == "iadd":
            h += self.l2(x)
        elif self.how == "imul":
            h *= 2.5
        elif self.how == "relu-inplace-functional":
            F.relu(h, inplace=True)  # return value discarded: h itself must now be relu(h)
        elif self.how == "relu-inplace-module":
            nn.ReLU(inplace=True)(h)
        elif self.how == "relu_-method":
            h.relu_()
        elif self.how == "clamp_":
            h.clamp_(min=-0.2, max=0.3)
        elif self.how == "setitem-constant":
            h[:, 0] = 0.0
        elif self.how == "setitem-activation":
            h[:, 1] = x[:, 0] * 2.0
        elif self.how == "setitem-mask":
            h[h < 0] = 0.0
        elif self.how == "chained":
            h.mul_(2.0).add_(1.0).tanh_()
        elif self.how == "returned-alias":
            h = h.sigmoid_()
        elif self.how == "index_add_":
            h.index_add_(1, torch.tensor([0, 2]), self.l2(x)[:, :2])
        elif self.how == "view-mul_":
            h[:, :2].mul_(2.0)  # in place through a view: h changes too
        elif self.how == "view-setitem":
            v = h.view(-1, 5)
            v[:, 0] = 0.0
        elif self.how == "transpose-add_":
            h.t().add_(1.0)
        return self.l3(h)


SAFE_INPLACE = [
    "add_-statement",
    "iadd",
    "imul",
    "relu-inplace-functional",
    "relu-inplace-module",
    "relu_-method",
    "clamp_",
    "setitem-constant",
    "setitem-activation",
    "setitem-mask",
    "chained",
    "returned-alias",
    "index_add_",
]
VIEW_INPLACE = ["view-mul_", "view-setitem", "transpose-add_"]


@pytest.mark.parametrize("how", SAFE_INPLACE)
def test_in_place_operations_match_the_plain_model(how: str) -> None:
    torch.manual_seed(2)
    model = InPlace(how).to(D)
    _assert_equals_plain(model, torch.randn(3, 4, dtype=D))


@pytest.mark.parametrize("how", VIEW_INPLACE)
def test_in_place_operations_through_views_are_refused_when_the_base_is_read(how: str) -> None:
    """Writing through a view changes its base (PyTorch aliasing); a record of values cannot follow that, so
    reading the base afterwards is a clear error instead of a silently wrong output."""
    torch.manual_seed(2)
    model = InPlace(how).to(D)
    fn = lrpfunc.attribute(model)
    x = torch.randn(3, 4, dtype=D)
    with pytest.raises(NotImplementedError, match=r"wrote into a view of an activation that is read afterwards"):
        fn(dict(model.named_parameters()), x, torch.ones(3, 2, dtype=D))


def test_in_place_operation_on_a_view_whose_base_is_not_read_again() -> None:
    class ViewThenInPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 6)

        def forward(self, x):
            h = self.lin(x).view(-1, 3, 2)
            h.mul_(2.0)
            return h.sum(-1)

    torch.manual_seed(5)
    _assert_equals_plain(ViewThenInPlace().to(D), torch.randn(3, 4, dtype=D))


def test_in_place_operation_on_the_input_does_not_write_the_callers_tensor() -> None:
    class MutatesInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            x.mul_(2.0)
            x[:, 0] = 1.0
            return self.lin(x)

    torch.manual_seed(3)
    model = MutatesInput().to(D)
    _assert_equals_plain(model, torch.randn(3, 4, dtype=D))


def test_in_place_residual_with_composite() -> None:
    """``out += identity`` inside a rule's span and a Sum label on it; the model's output is unchanged."""
    from models import TinyResNet

    model = TinyResNet().to(D).eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    output, relevance = lrpfunc.attribute(model, composites.epsilon_plus(), lrpfunc.canonizers.resnet())(
        _params(model), x, torch.ones(2, 5, dtype=D)
    )
    torch.testing.assert_close(output, model(x), rtol=1e-14, atol=1e-14)
    assert torch.isfinite(relevance).all()
    _assert_equals_plain(model, x)


def test_buffer_updated_in_place_in_forward_is_not_written() -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("calls", torch.zeros((), dtype=D))

        def forward(self, x):
            self.calls.add_(1.0)
            return self.lin(x) * self.calls

    model = Counter().to(D)
    x = torch.randn(2, 3, dtype=D)
    output, _ = lrpfunc.attribute(model)(_params(model), x, torch.ones(2, 3, dtype=D))
    assert model.calls.item() == 0.0
    torch.testing.assert_close(output, model.lin(x).detach() * 1.0, rtol=1e-14, atol=1e-14)  # it saw 0 + 1


# --------------------------------------------------------------------------------------------------------
# Python control flow
# --------------------------------------------------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            h = self.a(x)
        else:
            h = -self.b(x)
        while h.abs().max() > 1.0:  # a data-dependent loop
            h = h / 2.0
        scale = float(h.abs().max().item()) + 1.0  # a Python number from an activation: a constant
        for _ in range(h.shape[0] % 3 + 1):
            h = torch.tanh(h) * scale
        return h


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_data_dependent_control_flow(sign: float) -> None:
    torch.manual_seed(4)
    model = Branchy().to(D)
    x = sign * (torch.rand(2, 4, dtype=D) + 0.5) * 3.0
    assert (x.sum() > 0) == (sign > 0)
    _assert_equals_plain(model, x)


class Stops(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.how = how

    def forward(self, x):
        h = self.lin(x)
        if self.how == "detach":
            return h / h.detach().norm(dim=1, keepdim=True) + h.detach() ** 2
        with torch.no_grad():  # what is computed here is a constant for every derivative
            norm = h.norm(dim=1, keepdim=True)
        return h / norm


@pytest.mark.parametrize("how", ["detach", "no_grad"])
def test_detach_and_no_grad_inside_forward(how: str) -> None:
    torch.manual_seed(5)
    model = Stops(how).to(D)
    x = torch.randn(2, 3, dtype=D)
    _assert_equals_plain(model, x)
    g = torch.randn(2, 3, dtype=D)
    expected = torch.func.vjp(model, x)[1](g)[0]  # torch.func respects no_grad inside the function too
    torch.testing.assert_close(lrpfunc.attribute(model)(_params(model), x, g)[1], expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------------
# pytree inputs and outputs
# --------------------------------------------------------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.la = nn.Linear(3, 4)
        self.lb = nn.Linear(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, a, b):
        return self.head(torch.relu(self.la(a)) * self.lb(b))


@pytest.mark.parametrize("make_composite", [lambda: None, composites.epsilon_plus], ids=["none", "epsilon_plus"])
def test_tuple_input_gives_tuple_relevance(make_composite) -> None:
    torch.manual_seed(6)
    model = TwoInputs().to(D)
    a, b, g = torch.randn(3, 3, dtype=D), torch.randn(3, 2, dtype=D), torch.randn(3, 2, dtype=D)
    output, relevance = lrpfunc.attribute(model, make_composite())(_params(model), (a, b), g)
    assert isinstance(relevance, tuple) and len(relevance) == 2
    assert relevance[0].shape == a.shape and relevance[1].shape == b.shape
    torch.testing.assert_close(output, model(a, b), rtol=1e-14, atol=1e-14)
    if make_composite() is None:
        expected = torch.func.vjp(lambda a, b: model(a, b), a, b)[1](g)
        torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)
    else:
        assert all(r.abs().max() > 0 for r in relevance)


def test_dict_input_gives_dict_relevance() -> None:
    torch.manual_seed(7)
    model = TwoInputs().to(D)
    a, b, g = torch.randn(3, 3, dtype=D), torch.randn(3, 2, dtype=D), torch.randn(3, 2, dtype=D)
    output, relevance = lrpfunc.attribute(model)(_params(model), {"b": b, "a": a}, g)
    assert isinstance(relevance, dict) and set(relevance) == {"a", "b"}
    expected = torch.func.vjp(lambda a, b: model(a, b), a, b)[1](g)
    torch.testing.assert_close(relevance["a"], expected[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(relevance["b"], expected[1], rtol=1e-12, atol=1e-14)
    # and vmap over the dict
    per_sample = torch.func.vmap(lrpfunc.attribute(model), in_dims=(None, 0, 0))(
        _params(model), {"a": a.unsqueeze(1), "b": b.unsqueeze(1)}, g.unsqueeze(1)
    )[1]
    torch.testing.assert_close(per_sample["a"].squeeze(1), expected[0], rtol=1e-12, atol=1e-14)


def test_the_same_tensor_passed_twice() -> None:
    """``x = (a, a)``: like ``torch.func.vjp(model, a, a)``, each argument gets its own cotangent."""
    torch.manual_seed(8)

    class Product(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(3, 3)
            self.k = nn.Linear(3, 3)

        def forward(self, query, key):
            return self.q(query) * torch.tanh(self.k(key))

    model = Product().to(D)
    a, g = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    _, relevance = lrpfunc.attribute(model)(_params(model), (a, a), g)
    expected = torch.func.vjp(lambda p, q: model(p, q), a, a)[1](g)
    torch.testing.assert_close(relevance[0], expected[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(relevance[1], expected[1], rtol=1e-12, atol=1e-14)


def test_unused_and_integer_inputs_get_zero_relevance() -> None:
    class WithIndices(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.lin = nn.Linear(3, 2)

        def forward(self, x, idx, unused):
            return self.lin(x * self.emb(idx))

    torch.manual_seed(9)
    model = WithIndices().to(D)
    x, idx, unused = torch.randn(4, 3, dtype=D), torch.tensor([0, 3, 1, 4]), torch.randn(2, dtype=D)
    g = torch.randn(4, 2, dtype=D)
    output, (r_x, r_idx, r_unused) = lrpfunc.attribute(model, composites.epsilon_plus())(_params(model), (x, idx, unused), g)
    torch.testing.assert_close(output, model(x, idx, unused), rtol=1e-14, atol=1e-14)
    assert r_idx.dtype == idx.dtype and torch.equal(r_idx, torch.zeros_like(idx))
    assert torch.equal(r_unused, torch.zeros_like(unused))
    _, (plain_x, _, _) = lrpfunc.attribute(model)(_params(model), (x, idx, unused), g)
    expected = torch.func.vjp(lambda x: model(x, idx, unused), x)[1](g)[0]
    torch.testing.assert_close(plain_x, expected, rtol=1e-12, atol=1e-14)


def test_tuple_and_dict_outputs() -> None:
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.a = nn.Linear(4, 2)
            self.b = nn.Linear(4, 1)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"a": self.a(h), "pair": (self.b(h), h)}

    torch.manual_seed(10)
    model = Heads().to(D)
    x = torch.randn(3, 3, dtype=D)
    out = model(x)
    g = {"a": torch.randn_like(out["a"]), "pair": (torch.randn_like(out["pair"][0]), torch.randn_like(out["pair"][1]))}
    output, relevance = lrpfunc.attribute(model)(_params(model), x, g)
    assert set(output) == {"a", "pair"}
    expected = torch.func.vjp(model, x)[1](g)[0]
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------------
# functional operations
# --------------------------------------------------------------------------------------------------------


class Functional(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.lin = nn.Linear(16, 3)
        self.how = how

    def forward(self, x):
        h = self.conv(x)  # (N, 4, 4, 4)
        how = self.how
        if how == "cat":
            h = torch.cat([h[:, :2], torch.tanh(h[:, 2:]), h[:, :1] * 2], dim=1)[:, :4]
        elif how == "flatten-view-reshape":
            n = h.shape[0]
            h = torch.flatten(h, 1).view(n, 4, 16).reshape(n, 4, 4, 4)
        elif how == "matmul":
            h = h @ h.transpose(-1, -2) / 4.0
        elif how == "softmax":
            h = torch.softmax(h, dim=-1) * F.log_softmax(h.flatten(2), dim=-1).view_as(h)
        elif how == "max_pool-indices":
            pooled, indices = F.max_pool2d(h, 2, return_indices=True)
            h = F.max_unpool2d(pooled, indices, 2) + pooled.repeat_interleave(2, -1).repeat_interleave(2, -2)
        elif how == "max-dim":
            values, indices = torch.max(h, dim=1, keepdim=True)
            h = h * values + indices.to(h.dtype)
        elif how == "topk-sort":
            top = h.flatten(2).topk(4, dim=-1).values
            ordered = torch.sort(h.flatten(2), dim=-1, descending=True).values[..., :4]
            h = h * (top - ordered + 1.0).sum(-1)[..., None, None]
        elif how == "chunk-split-unbind-stack":
            a, b = h.chunk(2, dim=1)
            c, d = torch.split(a, 1, dim=1)
            parts = b.unbind(1)
            h = torch.stack([c[:, 0] * d[:, 0], parts[0], parts[1], c[:, 0] + 1], dim=1)
        elif how == "gather-argmax":
            idx = h.flatten(2).argmax(-1, keepdim=True)
            h = h * torch.gather(h.flatten(2), -1, idx)[..., None]
        elif how == "where-masked_fill":
            h = torch.where(h > 0, h, 0.1 * h).masked_fill(h.abs() < 0.05, 0.0)
        elif how == "einsum-permute-expand":
            g = torch.einsum("nchw,ncwv->nchv", h, h.permute(0, 1, 3, 2))
            h = g + h.mean(1, keepdim=True).expand_as(h)
        elif how == "norm-layers":
            h = F.layer_norm(h, h.shape[1:]) + F.group_norm(h, 2) + F.normalize(h, dim=1)
        elif how == "pad-interpolate-pool":
            h = F.avg_pool2d(F.interpolate(F.pad(h, (1, 1, 1, 1)), scale_factor=2, mode="bilinear"), 3)[..., :4, :4]
        elif how == "scalars-and-metadata":
            h = (2 * h - h / 3 + h**2 - (-h)).reshape(len(h), h.size(1), -1).view(h.shape) * h.numel() / 100
        elif how == "cumsum-index_select":
            h = torch.cumsum(h, dim=-1).index_select(1, torch.tensor([3, 1, 2, 0]))
        return self.lin(torch.flatten(F.adaptive_avg_pool2d(h, 2), 1).repeat(1, 4)[:, :16])


FUNCTIONAL = [
    "cat",
    "flatten-view-reshape",
    "matmul",
    "softmax",
    "max_pool-indices",
    "max-dim",
    "topk-sort",
    "chunk-split-unbind-stack",
    "gather-argmax",
    "where-masked_fill",
    "einsum-permute-expand",
    "norm-layers",
    "pad-interpolate-pool",
    "scalars-and-metadata",
    "cumsum-index_select",
]


@pytest.mark.parametrize("how", FUNCTIONAL)
def test_functional_operations_without_composite_equal_vjp(how: str) -> None:
    torch.manual_seed(11)
    model = Functional(how).to(D)
    x = torch.randn(2, 2, 4, 4, dtype=D)
    g = torch.randn(2, 3, dtype=D)
    output, relevance = lrpfunc.attribute(model)(_params(model), x, g)
    expected_output, pullback = torch.func.vjp(model, x)
    torch.testing.assert_close(output, expected_output, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(relevance, pullback(g)[0], rtol=1e-12, atol=1e-14)
    # with rules on the modules the operations still run (and the result is finite)
    _, ruled = lrpfunc.attribute(model, composites.epsilon_plus())(_params(model), x, g)
    assert torch.isfinite(ruled).all()


def test_operations_on_parameters_alone_use_the_given_params() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            w = self.lin.weight * 2.0  # computed from a parameter only
            return F.linear(torch.tanh(self.lin(x)), w.t())

    torch.manual_seed(12)
    model = Tied().to(D)
    x, g = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    params = {"lin.weight": torch.randn(3, 3, dtype=D), "lin.bias": torch.randn(3, dtype=D)}
    output, relevance = lrpfunc.attribute(model)(params, x, g)
    expected_output, pullback = torch.func.vjp(lambda x: torch.func.functional_call(model, params, (x,)), x)
    torch.testing.assert_close(output, expected_output, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(relevance, pullback(g)[0], rtol=1e-12, atol=1e-14)
    grads = torch.func.grad(lambda p: (lrpfunc.attribute(model)(p, x, g)[1] ** 2).sum())(params)
    expected = torch.func.grad(
        lambda p: (torch.func.vjp(lambda x: torch.func.functional_call(model, p, (x,)), x)[1](g)[0] ** 2).sum()
    )(params)
    torch.testing.assert_close(grads, expected, rtol=1e-12, atol=1e-14)


def test_unregistered_submodule() -> None:
    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.__dict__["hidden"] = nn.Linear(3, 2).to(D)  # not registered as a submodule

        def forward(self, x):
            return self.hidden(torch.relu(self.lin(x)))

    torch.manual_seed(13)
    model = Hidden().to(D)
    x = torch.randn(2, 3, dtype=D)
    _assert_equals_plain(model, x)
    table = lrpfunc.rule_table(model, composites.epsilon_plus(), x)
    assert "Linear '<Linear>'" in str(table)


# --------------------------------------------------------------------------------------------------------
# params: partial, buffers, tied
# --------------------------------------------------------------------------------------------------------


def test_params_with_only_some_parameters_fall_back_to_the_modules() -> None:
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(D)
    x, g = torch.randn(2, 3, dtype=D), torch.randn(2, 2, dtype=D)
    partial = {"2.weight": torch.randn(2, 4, dtype=D)}
    output, relevance = lrpfunc.attribute(model)(partial, x, g)
    expected_output, pullback = torch.func.vjp(lambda x: torch.func.functional_call(model, partial, (x,)), x)
    torch.testing.assert_close(output, expected_output, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(relevance, pullback(g)[0], rtol=1e-12, atol=1e-14)
    assert (output - model(x)).abs().max() > 1e-3
    # an empty dict means the module's own parameters
    output, relevance = lrpfunc.attribute(model)({}, x, g)
    torch.testing.assert_close(output, model(x), rtol=0, atol=0)
    # derivatives w.r.t. the partial dict
    grads = torch.func.grad(lambda p: (lrpfunc.attribute(model, composites.epsilon_plus())(p, x, g)[1] ** 2).sum())(partial)
    assert set(grads) == {"2.weight"} and grads["2.weight"].abs().max() > 0


def test_params_with_buffers() -> None:
    torch.manual_seed(15)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).to(D).eval()
    x, g = torch.randn(2, 1, 4, 4, dtype=D), torch.randn(2, 2, dtype=D)
    params = {
        **dict(model.named_parameters()),
        "1.running_mean": torch.tensor([0.3, -0.2], dtype=D),
        "1.running_var": torch.tensor([2.0, 0.5], dtype=D),
    }
    for canonizer_list in ((), (lrpfunc.canonizers.merge_batchnorm(),)):
        output, relevance = lrpfunc.attribute(model, None, canonizer_list)(params, x, g)
        expected_output, pullback = torch.func.vjp(lambda x: torch.func.functional_call(model, params, (x,)), x)
        torch.testing.assert_close(output, expected_output, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(relevance, pullback(g)[0], rtol=1e-12, atol=1e-14)
        assert (output - model(x)).abs().max() > 1e-3
    # the merged parameters use the given buffers: merged relevance equals a hand-merged layer's
    fn = lrpfunc.attribute(model, composites.layer_map([(nn.Conv2d, rules.epsilon())]), lrpfunc.canonizers.merge_batchnorm())
    _, merged = fn(params, x, g)
    scale = params["1.weight"] / torch.sqrt(params["1.running_var"] + model[1].eps)
    w = params["0.weight"] * scale[:, None, None, None]
    b = (params["0.bias"] - params["1.running_mean"]) * scale + params["1.bias"]
    z = F.conv2d(x, w, b)
    r_out = torch.func.vjp(lambda h: model[4](model[3](model[2](h))), z)[1](g)[0]
    s = z + (torch.sign(z) + (z == 0).to(z)) * 1e-6
    expected = x * torch.func.vjp(lambda x: F.conv2d(x, w, b), x)[1](r_out / s)[0]
    torch.testing.assert_close(merged, expected, rtol=1e-9, atol=1e-12)


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 3, bias=False)
        self.l2 = nn.Linear(3, 3, bias=False)
        self.l2.weight = self.l1.weight

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


@pytest.mark.parametrize("name", ["l1.weight", "l2.weight"])
def test_tied_weights_are_substituted_everywhere(name: str) -> None:
    """Both names of a tied parameter are accepted; like ``functional_call`` (which ties by default), the
    given tensor replaces the parameter in both places."""
    torch.manual_seed(16)
    model = TiedWeights().to(D)
    x, g = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    params = {name: torch.randn(3, 3, dtype=D)}
    output, relevance = lrpfunc.attribute(model)(params, x, g)
    expected_output, pullback = torch.func.vjp(lambda x: torch.func.functional_call(model, params, (x,)), x)
    torch.testing.assert_close(output, expected_output, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(relevance, pullback(g)[0], rtol=1e-12, atol=1e-14)


def test_in_place_operation_on_a_tensor_made_inside_the_forward() -> None:
    """A constant the forward creates and then mutates in place keeps PyTorch's in-place semantics."""

    class Offset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            offset = torch.zeros(3, dtype=x.dtype)
            offset.add_(2.0)
            torch.relu_(offset)
            return self.lin(x) * offset

    torch.manual_seed(7)
    _assert_equals_plain(Offset().to(D), torch.randn(2, 4, dtype=D))


def test_a_module_outside_the_model_is_foreign_without_tracing_again(monkeypatch) -> None:
    """A module the forward calls that is not the model's (HF's kernel wrappers of functions are global modules) is
    remembered as foreign on first sight; the pass goes on instead of running again. A module the model gained since
    the attribution function was built still makes the pass read the model anew."""
    import lrpfunc._attribute as attribute_module

    outside = nn.Linear(4, 4).double()

    class UsesOutside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return outside(self.inner(x))

    traces: list[int] = []
    run_trace = attribute_module.run_trace

    def counted(*args, **kwargs):
        traces.append(1)
        return run_trace(*args, **kwargs)

    monkeypatch.setattr(attribute_module, "run_trace", counted)
    model = UsesOutside().double()
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, g = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    fn = lrpfunc.attribute(model, composites.epsilon())
    _, relevance = fn(params, x, g)
    assert len(traces) == 1
    model.inner = nn.Linear(4, 4).double()  # the model changed (the same parameter names): read anew
    params = {name: p.detach() for name, p in model.named_parameters()}
    traces.clear()
    _, changed = fn(params, x, g)
    assert len(traces) == 2
    torch.testing.assert_close(changed, lrpfunc.attribute(model, composites.epsilon())(params, x, g)[1])
