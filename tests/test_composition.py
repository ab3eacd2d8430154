"""The torch.func composition ladder: vmap, jacrev, jacfwd, hessian and vmap(grad) applied to the
attribution function, each compared with an independent computation (batched call, Python loops over
one-hot seeds or samples, reverse-over-reverse, plain autograd)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from models import TinyResNet, cnn, mlp, randomize_batchnorms
from torch import nn
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import lrpfunc
from lrpfunc import canonizers, composites, rules, types

with warnings.catch_warnings():
    # torch scripts its forward-mode decompositions when jacfwd/jvp is first used and warns that
    # torch.jit.script is deprecated (a torch-internal warning, a DeprecationWarning up to torch 2.13 and a
    # FutureWarning from 2.14 on; pytest turns warnings into errors)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401

D = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


@dataclass
class Setup:
    model: nn.Module
    fn: Callable
    params: dict
    x: torch.Tensor
    grad_output: torch.Tensor
    weight: torch.Tensor  # a fixed weight for scalar functions sum(relevance * weight)

    @property
    def classes(self) -> int:
        return self.grad_output.shape[1]


def _mlp() -> Setup:
    torch.manual_seed(10)
    model = mlp().to(D).eval()
    composite = composites.layer_map([(types.Activation, rules.passthrough()), (types.Linear, rules.epsilon())])
    x = torch.randn(3, 12, dtype=D)
    return Setup(model, lrpfunc.attribute(model, composite), dict(model.named_parameters()), x,
                 torch.randn(3, 5, dtype=D), torch.randn_like(x))


def _cnn() -> Setup:
    torch.manual_seed(11)
    model = cnn().to(D).eval()
    randomize_batchnorms(model)
    fn = lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.merge_batchnorm())
    x = torch.randn(3, 3, 4, 4, dtype=D)
    return Setup(model, fn, dict(model.named_parameters()), x, torch.randn(3, 5, dtype=D), torch.randn_like(x))


def _resnet() -> Setup:
    torch.manual_seed(12)
    model = TinyResNet().to(D).eval()
    randomize_batchnorms(model)
    fn = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.resnet())
    x = torch.randn(3, 3, 4, 4, dtype=D)
    return Setup(model, fn, dict(model.named_parameters()), x, torch.randn(3, 5, dtype=D), torch.randn_like(x))


@pytest.fixture(scope="module", params=[_mlp, _cnn, _resnet], ids=["mlp-epsilon", "cnn-epsilon_plus_flat-merge", "resnet-epsilon_plus-resnet"])
def setup(request: pytest.FixtureRequest) -> Setup:
    return request.param()


def test_setup_is_not_the_plain_gradient(setup: Setup) -> None:
    _, relevance = setup.fn(setup.params, setup.x, setup.grad_output)
    (gradient,) = torch.func.vjp(setup.model, setup.x)[1](setup.grad_output)
    assert (relevance - gradient).abs().max() > 1e-3


def test_vmap_over_samples_equals_batched_call(setup: Setup) -> None:
    output, relevance = setup.fn(setup.params, setup.x, setup.grad_output)
    v_output, v_relevance = vmap(setup.fn, in_dims=(None, 0, 0))(
        setup.params, setup.x.unsqueeze(1), setup.grad_output.unsqueeze(1)
    )
    assert v_output.shape == (len(setup.x), 1, setup.classes)
    assert v_relevance.shape == setup.x.unsqueeze(1).shape
    torch.testing.assert_close(v_output.squeeze(1), output, **TIGHT)
    torch.testing.assert_close(v_relevance.squeeze(1), relevance, **TIGHT)


def test_vmap_with_shared_grad_output(setup: Setup) -> None:
    seed = setup.grad_output[:1]
    _, relevance = setup.fn(setup.params, setup.x, seed.expand_as(setup.grad_output))
    _, v_relevance = vmap(setup.fn, in_dims=(None, 0, None))(setup.params, setup.x.unsqueeze(1), seed)
    torch.testing.assert_close(v_relevance.squeeze(1), relevance, **TIGHT)


def test_jacrev_over_grad_output_gives_every_class_map(setup: Setup) -> None:
    n, classes = setup.grad_output.shape
    jacobian = jacrev(lambda g: setup.fn(setup.params, setup.x, g)[1])(setup.grad_output)
    assert jacobian.shape == (*setup.x.shape, n, classes)
    for c in range(classes):
        one_hot = torch.zeros_like(setup.grad_output)
        one_hot[:, c] = 1.0
        _, class_map = setup.fn(setup.params, setup.x, one_hot)
        torch.testing.assert_close(jacobian[..., c].sum(-1), class_map, **TIGHT)
        for i in range(n):
            # the map of sample i for class c is the (i, c) column; other samples' seeds do not reach it
            torch.testing.assert_close(jacobian[i][..., i, c], class_map[i], **TIGHT)
            others = [j for j in range(n) if j != i]
            assert jacobian[i][..., others, c].abs().max() == 0
    # the relevance is linear in grad_output: contracting the Jacobian with any seed gives it back
    _, relevance = setup.fn(setup.params, setup.x, setup.grad_output)
    contracted = (jacobian * setup.grad_output).flatten(-2).sum(-1)
    torch.testing.assert_close(contracted, relevance, **TIGHT)


def test_jacfwd_equals_jacrev_wrt_input(setup: Setup) -> None:
    projection = torch.randn(setup.x[0].numel(), 3, dtype=D, generator=torch.Generator().manual_seed(0))

    def per_sample_sums(x: torch.Tensor) -> torch.Tensor:
        return setup.fn(setup.params, x, setup.grad_output)[1].flatten(1).sum(1)

    def projected(x: torch.Tensor) -> torch.Tensor:
        return (setup.fn(setup.params, x, setup.grad_output)[1] * setup.weight).flatten(1) @ projection

    for f in (per_sample_sums, projected):
        reverse = jacrev(f)(setup.x)
        forward = jacfwd(f)(setup.x)
        assert reverse.abs().max() > 0
        torch.testing.assert_close(forward, reverse, **TIGHT)


def test_jacfwd_equals_jacrev_wrt_grad_output(setup: Setup) -> None:
    def f(g: torch.Tensor) -> torch.Tensor:
        return setup.fn(setup.params, setup.x, g)[1].flatten(1).sum(1)

    torch.testing.assert_close(jacfwd(f)(setup.grad_output), jacrev(f)(setup.grad_output), **TIGHT)


def test_hessian_wrt_input(setup: Setup) -> None:
    x = setup.x[:2]
    grad_output, weight = setup.grad_output[:2], setup.weight[:2]

    def f(x: torch.Tensor) -> torch.Tensor:
        return (setup.fn(setup.params, x, grad_output)[1] * weight).sum()

    n = x.numel()
    h = hessian(f)(x).reshape(n, n)
    assert h.abs().max() > 1e-6  # the attribution is not piecewise linear in x (the rules' denominators)
    # reverse-over-reverse is a different path than hessian's forward-over-reverse
    torch.testing.assert_close(h, jacrev(jacrev(f))(x).reshape(n, n), **TIGHT)
    torch.testing.assert_close(h, jacfwd(jacrev(f))(x).reshape(n, n), **TIGHT)
    # a Hessian of a scalar function is symmetric
    torch.testing.assert_close(h, h.T, rtol=1e-9, atol=1e-9 * h.abs().max().item())
    # the samples are independent: no cross-sample second derivatives
    per = n // 2
    assert h[:per, per:].abs().max() == 0 and h[per:, :per].abs().max() == 0
    # the gradient is its first derivative (checked against grad, not against the Hessian machinery)
    first = grad(f)(x)
    direction = torch.randn_like(x)
    step = 1e-6
    finite = (grad(f)(x + step * direction) - grad(f)(x - step * direction)) / (2 * step)
    torch.testing.assert_close((h @ direction.flatten()).reshape_as(x), finite, rtol=1e-5, atol=1e-7)
    assert first.shape == x.shape


def test_vmap_grad_wrt_params_equals_loop(setup: Setup) -> None:
    def loss(params, x, g, w):
        return (setup.fn(params, x[None], g[None])[1] * w[None]).sum()

    batched = vmap(grad(loss), in_dims=(None, 0, 0, 0))(setup.params, setup.x, setup.grad_output, setup.weight)
    assert set(batched) == set(setup.params)
    leaves = {name: p.detach().clone().requires_grad_() for name, p in setup.params.items()}
    names = list(leaves)
    for i in range(len(setup.x)):
        value = loss(leaves, setup.x[i], setup.grad_output[i], setup.weight[i])
        grads = torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True)
        for name, expected in zip(names, grads):
            expected = torch.zeros_like(leaves[name]) if expected is None else expected
            torch.testing.assert_close(batched[name][i], expected, **TIGHT)
    assert any(batched[name].abs().max() > 0 for name in names)


def test_vmap_grad_wrt_input_equals_loop(setup: Setup) -> None:
    def loss(x, g, w):
        return (setup.fn(setup.params, x[None], g[None])[1] * w[None]).sum()

    batched = vmap(grad(loss))(setup.x, setup.grad_output, setup.weight)
    for i in range(len(setup.x)):
        xi = setup.x[i].clone().requires_grad_()
        (expected,) = torch.autograd.grad(loss(xi, setup.grad_output[i], setup.weight[i]), xi)
        torch.testing.assert_close(batched[i], expected, **TIGHT)
    # per-sample gradients of the batched loss are the same numbers
    whole = grad(lambda x: (setup.fn(setup.params, x, setup.grad_output)[1] * setup.weight).sum())(setup.x)
    torch.testing.assert_close(batched, whole, **TIGHT)


def test_vmap_of_jacrev_over_grad_output_gives_per_sample_class_maps(setup: Setup) -> None:
    """vmap(jacrev(.)) over samples: every class map of every sample in one call."""
    per_sample = vmap(
        jacrev(lambda x, g: setup.fn(setup.params, x[None], g[None])[1][0], argnums=1), in_dims=(0, 0)
    )(setup.x, setup.grad_output)
    assert per_sample.shape == (*setup.x.shape, setup.classes)
    for c in range(setup.classes):
        one_hot = torch.zeros_like(setup.grad_output)
        one_hot[:, c] = 1.0
        torch.testing.assert_close(per_sample[..., c], setup.fn(setup.params, setup.x, one_hot)[1], **TIGHT)
