"""Cached and compiled attribution: one trace per signature, replayed; equal to the eager function, guarded against
what the trace cannot see, eager where a trace is impossible or where something outside differentiates."""

from __future__ import annotations

import gc

import pytest
import torch
import zoo
from torch import nn

import lrpfunc
from lrpfunc import canonizers, composites

D = torch.float64


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["vgg_bn", "resnet_basic", "mobilenet_v2"])
def test_cached_equals_eager_on_the_zoo(name: str) -> None:
    model, x = zoo.build(name), zoo.example_input(name)
    params = _params(model)
    grad_output = zoo.target_of(name, model(x).detach())
    fn = lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.merge_batchnorm())
    fast = lrpfunc.cached(fn)
    for value in (x, zoo.example_input(name, seed=1)):
        output, relevance = fast(params, value, grad_output)
        expected_output, expected = fn(params, value, grad_output)
        torch.testing.assert_close(output, expected_output, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)
    assert fast.plan.traces == 1 and fast.plan.hits == 2


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.norm(self.a(x))))


def _mlp() -> tuple[MLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MLP().to(D).eval()
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(5, 4, dtype=D), torch.randn(5, 3, dtype=D)


def test_new_values_reuse_the_plan_and_what_the_trace_cannot_see_makes_a_new_one() -> None:
    model, x, g = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    fast = lrpfunc.cached(fn)
    params = _params(model)
    fast(params, x, g)
    changed = {name: value + 0.1 for name, value in params.items()}  # new values, same signature: no new trace
    torch.testing.assert_close(fast(changed, x, g)[1], fn(changed, x, g)[1], rtol=1e-12, atol=1e-14)
    assert fast.plan.traces == 1
    with torch.no_grad():  # a buffer changed in place: the plan reads the model's own tensor
        model.norm.running_mean.add_(0.5)
    torch.testing.assert_close(fast(params, x, g)[1], fn(params, x, g)[1], rtol=1e-12, atol=1e-14)
    assert fast.plan.traces == 1
    model.norm.running_var = model.norm.running_var * 2  # a buffer rebound: a new plan
    torch.testing.assert_close(fast(params, x, g)[1], fn(params, x, g)[1], rtol=1e-12, atol=1e-14)
    assert fast.plan.traces == 2
    model.train()  # training mode: BatchNorm on batch statistics, a new plan
    with pytest.warns(lrpfunc.TrainingModeWarning):
        expected = fn(params, x, g)[1]
    torch.testing.assert_close(fast(params, x, g)[1], expected, rtol=1e-12, atol=1e-14)
    assert fast.plan.traces == 3
    model.eval()
    fast(params, x[:2], g[:2])  # another shape: a new plan
    assert fast.plan.traces == 4


def test_a_changed_structure_or_a_tensor_the_call_does_not_give_makes_a_new_plan() -> None:
    model, x, g = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    fast = lrpfunc.cached(fn)
    params = _params(model)
    partial = {name: value for name, value in params.items() if not name.endswith(".bias")}
    fast(partial, x, g)
    with torch.no_grad():  # a bias the call does not give, read from the model: the same object changes in place
        next(t for name, t in model.named_parameters() if name.endswith(".bias")).add_(1.0)
    torch.testing.assert_close(fast(partial, x, g)[1], fn(partial, x, g)[1], rtol=1e-12, atol=1e-14)
    assert fast.plan.traces == 1
    name, module = next((name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear))
    module.bias = nn.Parameter(module.bias.detach() - 2.0)  # a parameter the call does not give, replaced
    torch.testing.assert_close(fast(partial, x, g)[1], fn(partial, x, g)[1], rtol=1e-12, atol=1e-14)
    assert fast.plan.traces == 2
    fast(params, x, g)  # all given: the model's own tensors are not read
    module.bias = nn.Parameter(module.bias.detach() + 5.0)
    fast(params, x, g)
    assert fast.plan.traces == 3
    parent, _, local = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    replacement = nn.Linear(module.in_features, module.out_features).double()
    setattr(owner, local, replacement)  # a module replaced: the structure changed, a new plan
    params = _params(model)
    torch.testing.assert_close(fast(params, x, g)[1], fn(params, x, g)[1], rtol=1e-12, atol=1e-14)
    assert fast.plan.traces == 4


@pytest.mark.parametrize("torch_guard", [True, False], ids=["torch-tensor-guard", "python-check"])
def test_a_call_like_the_previous_one_reuses_its_plan_and_any_difference_is_seen(torch_guard: bool,
                                                                                monkeypatch) -> None:
    """The check against the previous call (before any key is built) sees every change the key would see: strides,
    ``requires_grad``, a shape, grad mode, the training flag, a module replaced. With torch's C++ tensor guard, and
    with the Python comparison that replaces it where the guard cannot be built."""
    if not torch_guard:
        class Unavailable:
            def __init__(self, *args: object, **kwargs: object) -> None:
                raise TypeError("not in this torch")

        monkeypatch.setattr(torch._C._dynamo.guards, "TensorGuards", Unavailable)
    model, x, g = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    fast = lrpfunc.cached(fn)
    params = _params(model)

    def check(params: dict[str, torch.Tensor], x: torch.Tensor, traces: int) -> None:
        seed = g[: len(x)]
        torch.testing.assert_close(fast(params, x, seed)[1], fn(params, x, seed)[1], rtol=1e-12, atol=1e-14)
        assert fast.plan.traces == traces

    check(params, x, 1)
    check({name: value * 2 for name, value in params.items()}, x + 1, 1)  # new values: the same plan
    transposed = dict(params, **{"a.weight": params["a.weight"].t().contiguous().t()})  # other strides
    check(transposed, x, 2)
    check(params, x, 2)  # back to the first plan, found by its key
    with torch.no_grad():
        check(params, x, 3)  # grad mode is part of the signature
    hits = fast.plan.hits
    wanted = dict(params, **{"b.bias": params["b.bias"].clone().requires_grad_()})
    check(wanted, x, 3)  # differentiable from outside: eager
    assert fast.plan.hits == hits and fast.plan.misses >= 1
    check(params, x.t().contiguous().t(), 4)  # an input of other strides
    model.norm = nn.BatchNorm1d(8).to(D).eval()  # a module replaced: the structure changed
    check(params, x, 5)
    model.train()
    with pytest.warns(lrpfunc.TrainingModeWarning):
        check(params, x, 6)
    model.eval()
    check(params, x[:3], 7)
    for value in (x, x[:3], x):  # two shapes in turn: both plans are kept
        check(params, value, 7)
    with pytest.raises(TypeError, match=r"params\['a.weight'\] must be a tensor, got list"):
        fast(dict(params, **{"a.weight": params["a.weight"].tolist()}), x, g)


def test_a_forward_that_reads_a_value_runs_eagerly_and_follows_its_branch() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return h * 2 if h.sum() > 0 else -h

    torch.manual_seed(0)
    model = Branchy().to(D)
    params = _params(model)
    fn = lrpfunc.attribute(model, composites.epsilon())
    fast = lrpfunc.cached(fn)
    x, g = torch.randn(2, 4, dtype=D), torch.randn(2, 3, dtype=D)
    for value in (x, -x, x):  # the branch flips between calls
        output, relevance = fast(params, value, g)
        expected_output, expected = fn(params, value, g)
        torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
        torch.testing.assert_close(relevance, expected, rtol=0, atol=0)
    assert fast.plan.traces == 0 and len(fast.plan.eager) == 1
    (reason,) = fast.plan.eager.values()
    assert "RuntimeError" in reason or "Guard" in reason


def test_calls_differentiated_from_outside_run_eagerly_and_exactly() -> None:
    model, x, g = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    fast = lrpfunc.cached(fn)
    params = _params(model)

    def loss(f, v: torch.Tensor) -> torch.Tensor:
        return f(params, v, g)[1].square().sum()

    torch.testing.assert_close(torch.func.grad(lambda v: loss(fast, v))(x), torch.func.grad(lambda v: loss(fn, v))(x))
    per_sample = torch.func.vmap(fast, in_dims=(None, 0, 0))(params, x[:, None], g[:, None])[1]
    torch.testing.assert_close(per_sample[:, 0], fn(params, x, g)[1], rtol=1e-12, atol=1e-14)
    assert fast.plan.traces == 0 and fast.plan.misses >= 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, importing its compiler
def test_compiled_equals_eager() -> None:
    model, x, g = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    compiled = lrpfunc.compile(fn)
    params = _params(model)
    try:
        torch.testing.assert_close(compiled(params, x, g)[1], fn(params, x, g)[1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(compiled(params, -x, g)[1], fn(params, -x, g)[1], rtol=1e-10, atol=1e-12)
        assert compiled.plan.traces == 1 and compiled.plan.hits == 2
    finally:  # the compiler's caches hold fake tensors in reference cycles: leave none to later tests
        del compiled
        torch._dynamo.reset()
        gc.collect()


def test_cached_refuses_what_is_not_an_attribution_function() -> None:
    with pytest.raises(TypeError, match=r"cached: expected a function made by lrpfunc.attribute .*got function "
                                        r"without its model"):
        lrpfunc.cached(lambda params, x, g: (x, x))
    with pytest.raises(TypeError, match=r"compile: expected a function made by lrpfunc.attribute .*got int"):
        lrpfunc.compile(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cached: model must be a torch.nn.Module, got str"):
        lrpfunc.cached(lambda params, x, g: (x, x), model="net")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cached: expected a function of \(params, x, grad_output\), got int"):
        lrpfunc.cached(3, model=nn.Linear(2, 2))  # type: ignore[arg-type]


def test_a_training_step_traced_as_one_graph_equals_the_eager_step() -> None:
    """``torch.func.grad`` of an explanation loss, traced with the attribution inside: the forward pass, the modified
    backward pass and its derivative w.r.t. the parameters in one graph, replayed for new values."""
    model, x, g = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())

    def step(params: dict[str, torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        return torch.func.grad(lambda p: fn(p, x, g)[1].square().sum())(params)

    fast = lrpfunc.cached(step, model=model)
    params = _params(model)
    for scale in (1.0, 0.5):
        values = {name: value * scale for name, value in params.items()}
        got, expected = fast(values, x * scale, g), step(values, x * scale, g)
        assert set(got) == set(expected) and got["a.weight"].abs().max() > 0
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14)
    assert fast.plan.traces == 1 and fast.plan.hits == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, while exporting
def test_export_gives_the_eager_relevance_for_other_batch_sizes(tmp_path) -> None:
    model, x, g = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    params = _params(model)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = lrpfunc.export(fn, params, x, g, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, tmp_path / "explainer.pt2")
    explainer = torch.export.load(tmp_path / "explainer.pt2").module()
    for rows in (5, 2, 9):
        value, seed = torch.randn(rows, 4, dtype=D), torch.randn(rows, 3, dtype=D)
        output, relevance = explainer(value, seed)
        expected_output, expected = fn(params, value, seed)
        torch.testing.assert_close(output, expected_output, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match=r"export: expected a function made by lrpfunc.attribute"):
        lrpfunc.export(lambda p, v, s: (v, v), params, x, g)


def test_parameter_only_work_is_done_once_per_state_of_the_parameters() -> None:
    """The merged BatchNorm and the rules' modified weights are computed again exactly when a parameter they read is
    another tensor or was written to; otherwise they are reused, and the relevance always equals the eager one."""
    model = zoo.build("resnet_basic")
    x = zoo.example_input("resnet_basic")
    g = zoo.target_of("resnet_basic", model(x).detach())
    fn = lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.merge_batchnorm())
    fast = lrpfunc.cached(fn)
    params = _params(model)

    def check(params: dict[str, torch.Tensor], computed: int) -> None:
        torch.testing.assert_close(fast(params, x, g)[1], fn(params, x, g)[1], rtol=1e-12, atol=1e-14)
        (plan,) = fast.plan.graphs.values()
        assert plan.computed == computed

    check(params, 1)
    check(params, 1)
    check(dict(params), 1)  # another dict of the same tensors
    name = next(name for name in params if name.endswith("conv1.weight"))
    with torch.no_grad():
        params[name].mul_(-1.5)  # written in place: its version changed
    check(params, 2)
    check({key: value.clone() for key, value in params.items()}, 3)  # new tensors of the same values
    params[name].data = params[name].data * 2  # another storage under the same tensor
    check(params, 4)
    check(params, 4)
    assert fast.plan.traces == 1
    unheld = lrpfunc.cached(fn, hold_parameter_work=False)
    torch.testing.assert_close(unheld(params, x, g)[1], fn(params, x, g)[1], rtol=1e-12, atol=1e-14)
    (plan,) = unheld.plan.graphs.values()
    assert isinstance(plan, torch.fx.GraphModule)  # the traced graph itself: nothing held between calls


def test_what_a_plan_returns_is_never_held_between_calls() -> None:
    """A training step's parameter gradients are the caller's to change: writing into them changes no later call."""
    model, x, g = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())

    def step(params: dict[str, torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        gradients = torch.func.grad(lambda p: fn(p, x, g)[1].square().sum())(params)
        return {**gradients, "weights": params["a.weight"].t() * 2}  # a value of the parameters alone, returned

    fast = lrpfunc.cached(step, model=model)
    params = _params(model)
    expected = step(params, x, g)
    for _ in range(2):
        got = fast(params, x, g)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-14)
            got[key].mul_(0.0)  # the caller writes into what it got
