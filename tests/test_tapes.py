"""The three tapes give identical results: plain autograd (the first-order fast path), one functorch grad level (the
exact path, private API) and per-operation torch.func.vjp (the public fallback); and the private API they rely on
behaves as the engine expects."""

from __future__ import annotations

import importlib

import pytest
import torch
import zoo
from models import TinyResNet, cnn, randomize_batchnorms
from torch import nn

import lrpfunc
from lrpfunc import _functorch, _tape, canonizers, composites

D = torch.float64
TAPES = ("autograd", "level", "vjp")
COMPOSITES = {
    "none": lambda: None,
    "epsilon_plus_flat": composites.epsilon_plus_flat,
    "epsilon_alpha2_beta1": composites.epsilon_alpha2_beta1,
    "epsilon_gamma_box": lambda: composites.epsilon_gamma_box(-3.0, 3.0),
    "guided_backprop": composites.guided_backprop,
}


def _models() -> dict[str, tuple[nn.Module, torch.Tensor, tuple]]:
    torch.manual_seed(0)
    small_cnn = cnn().to(D).eval()
    randomize_batchnorms(small_cnn)
    resnet = TinyResNet().to(D).eval()
    randomize_batchnorms(resnet)
    return {
        "cnn": (small_cnn, torch.randn(2, 3, 8, 8, dtype=D), (canonizers.merge_batchnorm(),)),
        "resnet": (resnet, torch.randn(2, 3, 8, 8, dtype=D), ()),
        "mobilenet_v3": (zoo.build("mobilenet_v3"), zoo.example_input("mobilenet_v3"), (canonizers.merge_batchnorm(),)),
        "convnext": (zoo.build("convnext"), zoo.example_input("convnext"), ()),
    }


MODELS = _models()


@pytest.mark.parametrize("composite", list(COMPOSITES))
@pytest.mark.parametrize("model", list(MODELS))
def test_first_order_is_the_same_on_every_tape(model: str, composite: str) -> None:
    module, x, canonizer_list = MODELS[model]
    params = {k: v.detach() for k, v in module.named_parameters()}
    grad_output = torch.randn_like(module(x))
    fn = lrpfunc.attribute(module, COMPOSITES[composite](), canonizer_list)
    results = {}
    for tape in TAPES:
        with _tape.forced(tape):
            results[tape] = fn(params, x, grad_output)
    for tape in TAPES[1:]:
        torch.testing.assert_close(results[tape][0], results["autograd"][0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(results[tape][1], results["autograd"][1], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("model", ["cnn", "resnet"])
def test_derivatives_are_the_same_on_the_exact_tapes(model: str) -> None:
    module, x, canonizer_list = MODELS[model]
    params = {k: v.detach() for k, v in module.named_parameters()}
    grad_output = torch.randn_like(module(x))
    weight = torch.randn_like(x)
    fn = lrpfunc.attribute(module, composites.epsilon_plus_flat(), canonizer_list)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return (fn(p, x, grad_output)[1] * weight).sum()

    results = {}
    for tape in ("level", "vjp"):
        with _tape.forced(tape):
            results[tape] = torch.func.grad(loss, argnums=(0, 1))(params, x)
    level, vjp = results["level"], results["vjp"]
    torch.testing.assert_close(level[1], vjp[1], rtol=1e-10, atol=1e-12)
    for name in params:
        torch.testing.assert_close(level[0][name], vjp[0][name], rtol=1e-10, atol=1e-12)


def test_the_fast_path_is_taken_only_when_nothing_outside_differentiates() -> None:
    assert isinstance(_tape.choose_tape([torch.zeros(2)]), _tape.AutogradTape)
    assert isinstance(_tape.choose_tape([torch.zeros(2, requires_grad=True)]), _tape.LevelTape)
    with torch.no_grad():
        assert isinstance(_tape.choose_tape([torch.zeros(2, requires_grad=True)]), _tape.AutogradTape)
    seen = []
    torch.func.vmap(lambda t: seen.append(type(_tape.choose_tape([t]))) or t)(torch.zeros(3, 2))
    assert seen == [_tape.LevelTape]
    with _tape.forced("vjp"):
        assert isinstance(_tape.choose_tape([torch.zeros(2, requires_grad=True)]), _tape.VjpTape)


# ----------------------------------------------------------------------------------------------------------------
# the private functorch API behind lrpfunc/_functorch.py: if torch changes it, these fail first and loudly
# ----------------------------------------------------------------------------------------------------------------


def test_private_functorch_api_is_available() -> None:
    assert _functorch.AVAILABLE, f"lrpfunc/_functorch.py cannot use this torch: {_functorch.UNAVAILABLE_REASON}"


def _wrap_that_does_not_wrap(tensor: torch.Tensor, level: int) -> torch.Tensor:
    return tensor


@pytest.mark.parametrize("change", ["removed", "changed"])
def test_a_changed_private_api_falls_back_to_the_public_tape(monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """A torch whose private building block is gone or behaves differently: the import-time self-check turns the
    level tape off (instead of failing at import or computing wrong results) and the per-op vjp tape gives the same
    derivatives as the level tape did."""
    module, x, canonizer_list = MODELS["cnn"]
    params = {k: v.detach() for k, v in module.named_parameters()}
    grad_output = torch.randn_like(module(x))
    weight = torch.randn_like(x)
    fn = lrpfunc.attribute(module, composites.epsilon_plus_flat(), canonizer_list)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (fn(params, x, grad_output)[1] * weight).sum()

    with _tape.forced("level"):
        reference = torch.func.grad(loss)(x)
    if change == "removed":
        monkeypatch.delattr(torch._C._functorch, "_wrap_for_grad")
    else:
        monkeypatch.setattr(torch._C._functorch, "_wrap_for_grad", _wrap_that_does_not_wrap)
    try:
        importlib.reload(_functorch)
        assert not _functorch.AVAILABLE
        assert _functorch.UNAVAILABLE_REASON
        assert isinstance(_tape.choose_tape([x]), _tape.VjpTape)
        with _tape.forced("level"):
            fallback = torch.func.grad(loss)(x)
        torch.testing.assert_close(fallback, reference, rtol=1e-10, atol=1e-12)
    finally:
        monkeypatch.undo()
        importlib.reload(_functorch)
    assert _functorch.AVAILABLE, _functorch.UNAVAILABLE_REASON


def test_one_grad_level_for_a_whole_computation_behaves_like_vjp() -> None:
    """Open a level, wrap, mark differentiable, compute, close the level, then pull back with autograd.grad on the
    dead wrappers: exactly torch.func.vjp, including derivatives of the result at the caller's level."""
    torch.manual_seed(1)
    weight = torch.randn(3, 3, dtype=D)

    def by_level(x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
        level = _functorch.open_level()
        try:
            with torch.enable_grad():
                wrapped = _functorch.make_differentiable(_functorch.wrap(x, level))
                assert _functorch.level_of(wrapped) == level
                assert _functorch.unwrap(wrapped, level) is x
                output = torch.tanh(wrapped @ weight)
        finally:
            _functorch.close_level()
        (grad,) = torch.autograd.grad(output, wrapped, cotangent, create_graph=torch.is_grad_enabled())
        return grad

    def by_vjp(x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
        return torch.func.vjp(lambda x: torch.tanh(x @ weight), x)[1](cotangent)[0]

    x, cotangent = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    torch.testing.assert_close(by_level(x, cotangent), by_vjp(x, cotangent), rtol=0, atol=0)
    second = torch.func.grad(lambda x: by_level(x, cotangent).square().sum())(x)
    reference = torch.func.grad(lambda x: by_vjp(x, cotangent).square().sum())(x)
    torch.testing.assert_close(second, reference, rtol=1e-14, atol=1e-14)
    batched = torch.func.vmap(by_level, in_dims=(None, 0))(x, torch.stack([cotangent, 2 * cotangent]))
    torch.testing.assert_close(batched[1], 2 * batched[0], rtol=1e-14, atol=1e-14)


def test_popped_level_computes_at_the_callers_level() -> None:
    x = torch.randn(3, dtype=D)
    level = _functorch.open_level()
    try:
        with torch.enable_grad():
            assert _functorch.level_of(torch.relu(x)) == level  # inside a level, results are wrapped at it
            with _functorch.popped_level():
                outside = torch.relu(x)
            assert _functorch.level_of(outside) is None
            assert _functorch.transforms_active()
    finally:
        _functorch.close_level()
    assert not _functorch.transforms_active()
    assert not _functorch.values_only() or not torch.is_grad_enabled()
    with torch.no_grad():
        assert _functorch.values_only()
