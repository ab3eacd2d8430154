"""Integrated Gradients, SmoothGrad and Occlusion: Zennit's reference values, their definitions, and
composition with torch.func."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from models import build

import lrpfunc
from lrpfunc import canonizers, composites

DATA = Path(__file__).parent / "data"
DOUBLE = torch.float64


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    return (value - reference).abs().max().item() / (scale if scale > 0 else 1.0)


def _load(name: str) -> dict:
    return torch.load(DATA / name, weights_only=False)


def _tiny(activation: type[torch.nn.Module] = torch.nn.ReLU) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), activation(), torch.nn.Linear(6, 3)).double().eval()


@pytest.fixture(scope="module")
def cnn_case() -> dict:
    data = _load("attr0_cnn_integrated_gradients_epsilon_plus_flat.pt")
    model = build("cnn", data["state_dict"])
    return {"model": model, "params": dict(model.named_parameters()), "x": data["x"], "g": data["grad_output"]}


# ---------------------------------------------------------------- Zennit's reference values


@pytest.mark.parametrize(
    ("name", "composite", "canonizer"),
    [
        (
            "attr0_cnn_integrated_gradients_epsilon_plus_flat.pt",
            composites.epsilon_plus_flat,
            canonizers.merge_batchnorm,
        ),
        ("attr1_cnn_integrated_gradients_none.pt", None, None),
    ],
)
def test_integrated_gradients_equals_zennit(name: str, composite, canonizer) -> None:
    data = _load(name)
    assert data["baseline"] == "zeros"
    assert data["composite"] == ("none" if composite is None else composite.__name__)
    assert data["canonizer"] == ("none" if canonizer is None else canonizer.__name__)
    model = build(data["model"], data["state_dict"])
    fn = lrpfunc.integrated_gradients(
        model,
        None if composite is None else composite(),
        () if canonizer is None else canonizer(),
        n_iter=data["n_iter"],
    )
    output, relevance = fn(dict(model.named_parameters()), data["x"], data["grad_output"])
    assert _relative(relevance, data["relevance"]) < 1e-6
    assert _relative(output, model(data["x"])) < 1e-12
    # the same through the loop
    looped = lrpfunc.integrated_gradients(
        model,
        None if composite is None else composite(),
        () if canonizer is None else canonizer(),
        n_iter=data["n_iter"],
        vectorize=False,
    )
    _, relevance = looped(dict(model.named_parameters()), data["x"], data["grad_output"])
    assert _relative(relevance, data["relevance"]) < 1e-6


def test_occlusion_equals_zennit() -> None:
    data = _load("attr2_cnn_occlusion_none.pt")
    model = build(data["model"], data["state_dict"])
    fn = lrpfunc.occlusion(model, window=data["window"], stride=data["stride"])
    output, relevance = fn(dict(model.named_parameters()), data["x"], data["grad_output"])
    assert _relative(relevance, data["relevance"]) < 1e-6
    assert torch.equal(output, model(data["x"]))


# ---------------------------------------------------------------- Integrated Gradients


def test_integrated_gradients_is_the_riemann_sum(cnn_case: dict) -> None:
    model, params, x, g = (cnn_case[k] for k in ("model", "params", "x", "g"))
    baseline = torch.full_like(x, 0.3)
    plain = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())
    expected = sum(plain(params, baseline + k / 5 * (x - baseline), g)[1] for k in range(1, 6)) / 5 * (x - baseline)
    fn = lrpfunc.integrated_gradients(model, composites.epsilon_plus(), canonizers.merge_batchnorm(), n_iter=5,
                                      baseline=baseline)
    output, relevance = fn(params, x, g)
    assert _relative(relevance, expected) < 1e-12
    assert torch.equal(output, fn(params, x, g)[0])
    # a number or a function give the same baseline
    for other in (0.3, lambda v: torch.full_like(v, 0.3), torch.tensor(0.3, dtype=DOUBLE)):
        fn = lrpfunc.integrated_gradients(model, composites.epsilon_plus(), canonizers.merge_batchnorm(), n_iter=5,
                                          baseline=other)
        assert _relative(fn(params, x, g)[1], expected) < 1e-12


def test_integrated_gradients_is_complete_on_a_linear_model() -> None:
    torch.manual_seed(3)
    model = torch.nn.Linear(7, 2).double()
    params = dict(model.named_parameters())
    x, baseline = torch.randn(4, 7, dtype=DOUBLE), torch.randn(4, 7, dtype=DOUBLE)
    g = torch.randn(4, 2, dtype=DOUBLE)
    _, relevance = lrpfunc.integrated_gradients(model, n_iter=3, baseline=baseline)(params, x, g)
    expected = ((model(x) - model(baseline)) * g).sum(1)
    torch.testing.assert_close(relevance.sum(1), expected, rtol=1e-12, atol=1e-12)


def test_integrated_gradients_n_iter_1_is_gradient_times_input(cnn_case: dict) -> None:
    model, params, x, g = (cnn_case[k] for k in ("model", "params", "x", "g"))
    composite = composites.epsilon_gamma_box(-3.0, 3.0)
    plain = lrpfunc.attribute(model, composite, canonizers.merge_batchnorm())(params, x, g)[1]
    _, relevance = lrpfunc.integrated_gradients(model, composite, canonizers.merge_batchnorm(), n_iter=1)(params, x, g)
    assert _relative(relevance, plain * x) < 1e-12


def test_integrated_gradients_vmap_over_the_batch_equals_the_batched_call(cnn_case: dict) -> None:
    model, params, x, g = (cnn_case[k] for k in ("model", "params", "x", "g"))
    fn = lrpfunc.integrated_gradients(model, composites.epsilon_plus_flat(), canonizers.merge_batchnorm(), n_iter=6)
    batched_out, batched = fn(params, x, g)
    # each sample keeps a batch dimension of one inside vmap: x[:, None] has per-sample shape (1, 3, 8, 8)
    out, per_sample = torch.func.vmap(fn, in_dims=(None, 0, 0))(params, x[:, None], g[:, None])
    assert _relative(per_sample[:, 0], batched) < 1e-12
    assert _relative(out[:, 0], batched_out) < 1e-12


def test_integrated_gradients_chunk_size_gives_the_same(cnn_case: dict) -> None:
    model, params, x, g = (cnn_case[k] for k in ("model", "params", "x", "g"))
    whole = lrpfunc.integrated_gradients(model, composites.epsilon_plus(), n_iter=7)(params, x, g)[1]
    chunked = lrpfunc.integrated_gradients(model, composites.epsilon_plus(), n_iter=7, chunk_size=3)(params, x, g)[1]
    assert _relative(chunked, whole) < 1e-12


def test_integrated_gradients_parameter_gradient_matches_finite_differences() -> None:
    model = _tiny(torch.nn.Tanh)
    params = {name: p.detach() for name, p in model.named_parameters()}
    torch.manual_seed(4)
    x, g = torch.randn(3, 4, dtype=DOUBLE), torch.randn(3, 3, dtype=DOUBLE)
    w = torch.randn(3, 4, dtype=DOUBLE)
    fn = lrpfunc.integrated_gradients(model, composites.epsilon_plus(epsilon=0.1), n_iter=4)

    def loss(p: dict) -> torch.Tensor:
        return (fn(p, x, g)[1] * w).sum()

    grads = torch.func.grad(loss)(params)
    assert set(grads) == set(params)
    direction = {name: torch.randn_like(p) for name, p in params.items()}
    h = 1e-6
    plus = loss({n: p + h * direction[n] for n, p in params.items()})
    minus = loss({n: p - h * direction[n] for n, p in params.items()})
    finite = ((plus - minus) / (2 * h)).item()
    exact = sum((grads[n] * direction[n]).sum() for n in params).item()
    assert exact == pytest.approx(finite, rel=1e-6, abs=1e-9)

    # gradcheck-style: every entry of one weight
    weight = params["0.weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: loss({**params, "0.weight": v}), (weight,), eps=1e-6, atol=1e-7)


def test_integrated_gradients_input_gradient_matches_finite_differences() -> None:
    model = _tiny(torch.nn.Softplus)
    params = dict(model.named_parameters())
    torch.manual_seed(5)
    x, g = torch.randn(2, 4, dtype=DOUBLE, requires_grad=True), torch.randn(2, 3, dtype=DOUBLE)
    fn = lrpfunc.integrated_gradients(model, composites.epsilon_plus(epsilon=0.1), n_iter=3, baseline=0.5)
    assert torch.autograd.gradcheck(lambda v: fn(params, v, g)[1], (x,), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- SmoothGrad


def test_smooth_grad_without_noise_is_the_plain_attribution(cnn_case: dict) -> None:
    model, params, x, g = (cnn_case[k] for k in ("model", "params", "x", "g"))
    composite = composites.epsilon_plus_flat()
    plain_out, plain = lrpfunc.attribute(model, composite, canonizers.merge_batchnorm())(params, x, g)
    for kwargs in ({"noise_level": 0.0, "n_iter": 7}, {"noise_level": 0, "n_iter": 1},
                   {"noise_level": 0.5, "n_iter": 1}):
        out, relevance = lrpfunc.smooth_grad(model, composite, canonizers.merge_batchnorm(), **kwargs)(params, x, g)
        assert torch.equal(relevance, plain)
        assert torch.equal(out, plain_out)


def test_smooth_grad_is_the_mean_over_noisy_inputs(cnn_case: dict) -> None:
    model, params, x, g = (cnn_case[k] for k in ("model", "params", "x", "g"))
    plain = lrpfunc.attribute(model, composites.epsilon_plus())
    fn = lrpfunc.smooth_grad(model, composites.epsilon_plus(), noise_level=0.2, n_iter=4, generator=11)
    noise = torch.randn((3, *x.shape), dtype=DOUBLE, generator=torch.Generator().manual_seed(11))
    sigma = 0.2 * (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True))  # per sample
    points = [x + noise[k] * sigma for k in range(3)] + [x]
    expected = sum(plain(params, point, g)[1] for point in points) / 4
    output, relevance = fn(params, x, g)
    assert _relative(relevance, expected) < 1e-12
    assert _relative(output, model(x)) < 1e-12


def test_smooth_grad_is_reproducible_given_a_generator(cnn_case: dict) -> None:
    model, params, x, g = (cnn_case[k] for k in ("model", "params", "x", "g"))

    def run(generator) -> torch.Tensor:
        return lrpfunc.smooth_grad(model, composites.epsilon_plus(), n_iter=5, generator=generator)(params, x, g)[1]

    same = run(torch.Generator().manual_seed(7)), run(torch.Generator().manual_seed(7))
    assert torch.equal(*same)
    assert not torch.allclose(same[0], run(torch.Generator().manual_seed(8)))
    # an int seed makes the function itself deterministic
    fn = lrpfunc.smooth_grad(model, composites.epsilon_plus(), n_iter=5, generator=7)
    assert torch.equal(fn(params, x, g)[1], fn(params, x, g)[1])
    assert torch.equal(fn(params, x, g)[1], same[0])
    # a Generator advances: a second call draws new noise
    generator = torch.Generator().manual_seed(7)
    fn = lrpfunc.smooth_grad(model, composites.epsilon_plus(), n_iter=5, generator=generator)
    first, second = fn(params, x, g)[1], fn(params, x, g)[1]
    assert torch.equal(first, same[0]) and not torch.allclose(first, second)
    # the global random state when no generator is given
    torch.manual_seed(3)
    first = run(None)
    torch.manual_seed(3)
    assert torch.equal(first, run(None))


def test_smooth_grad_vectorized_equals_looped_and_differentiates(cnn_case: dict) -> None:
    model, params, x, g = (cnn_case[k] for k in ("model", "params", "x", "g"))
    kwargs = {"noise_level": 0.3, "n_iter": 3, "generator": 2}
    fast = lrpfunc.smooth_grad(model, composites.epsilon_plus(), **kwargs)
    slow = lrpfunc.smooth_grad(model, composites.epsilon_plus(), vectorize=False, **kwargs)
    assert _relative(fast(params, x, g)[1], slow(params, x, g)[1]) < 1e-12
    grads = torch.func.grad(lambda p: fast(p, x, g)[1].square().sum())(params)
    assert all(torch.isfinite(v).all() for v in grads.values())
    # under vmap, random draws need vmap's randomness flag
    out = torch.func.vmap(fast, in_dims=(None, 0, 0), randomness="different")(params, x[:, None], g[:, None])
    assert out[1].shape == (2, 1, 3, 8, 8)


# ---------------------------------------------------------------- Occlusion


def _occlusion_reference(model, x, g, window, stride) -> torch.Tensor:
    """Zennit's construction: a root window in the corner, rolled (wrapping) by every offset."""
    root = torch.zeros(x.shape[1:], dtype=torch.bool)
    root[tuple(slice(0, w) for w in window)] = True
    result = torch.zeros_like(x)
    for offset in itertools.product(*(range(0, n, s) for n, s in zip(x.shape[1:], stride))):
        mask = root.roll(offset, tuple(range(root.ndim)))[None]
        score = (model(x * mask) * g).sum(1)
        result += mask * score[:, None, None, None]
    return result


@pytest.mark.parametrize(
    ("window", "stride", "full_window", "full_stride"),
    [
        (3, 2, (3, 3, 3), (2, 2, 2)),  # overlapping windows that wrap around at the border
        (8, 8, (3, 8, 8), (3, 8, 8)),  # Zennit's default: one window of everything
        ((2, 5), (3,), (3, 2, 5), (3, 2, 3)),  # tuples act on the last dims
        (5, 1, (3, 5, 5), (1, 1, 1)),
    ],
)
def test_occlusion_places_windows_like_zennit(cnn_case: dict, window, stride, full_window, full_stride) -> None:
    model, params, x, g = (cnn_case[k] for k in ("model", "params", "x", "g"))
    fn = lrpfunc.occlusion(model, window=window, stride=stride)
    _, relevance = fn(params, x, g)
    with torch.no_grad():
        expected = _occlusion_reference(model, x, g, full_window, full_stride)
    assert _relative(relevance, expected) < 1e-12


def test_occlusion_custom_fn_and_derivatives(cnn_case: dict) -> None:
    model, params, x, g = (cnn_case[k] for k in ("model", "params", "x", "g"))
    # occluding inside the window instead (mask inverted), filled with 0.5
    fn = lrpfunc.occlusion(model, window=4, stride=4, occlusion_fn=lambda v, m: v * (1 - m) + 0.5 * m)
    _, relevance = fn(params, x, g)
    expected = torch.zeros_like(x)
    for i, j in itertools.product((0, 4), (0, 4)):
        mask = torch.zeros_like(x)
        mask[:, :, i:i + 4, j:j + 4] = 1
        with torch.no_grad():
            expected += mask * (model(x * (1 - mask) + 0.5 * mask) * g).sum(1)[:, None, None, None]
    assert _relative(relevance, expected) < 1e-12
    grads = torch.func.grad(lambda p: fn(p, x, g)[1].sum())(params)
    assert set(grads) == set(params)
    per_sample = torch.func.vmap(fn, in_dims=(None, 0, 0))(params, x[:, None], g[:, None])[1]
    assert _relative(per_sample[:, 0], relevance) < 1e-12


# ---------------------------------------------------------------- errors


IG, SG, OCC = lrpfunc.integrated_gradients, lrpfunc.smooth_grad, lrpfunc.occlusion
POSITIVE = "must be a positive int or a tuple of positive ints"


@pytest.mark.parametrize(
    ("factory", "kwargs", "error", "pattern"),
    [
        (IG, {"n_iter": 0}, ValueError, r"integrated_gradients\(Sequential\): n_iter must be an int >= 1, got 0"),
        (IG, {"n_iter": 2.5}, TypeError, r"integrated_gradients\(Sequential\): n_iter must be an int >= 1, got 2\.5 "
                                         r"\(float\)"),
        (IG, {"baseline": "zeros"}, TypeError, r"integrated_gradients\(Sequential\): baseline must be None .* got str"),
        (IG, {"chunk_size": 0}, ValueError, r"chunk_size must be an int >= 1, got 0"),
        (SG, {"n_iter": -1}, ValueError, r"smooth_grad\(Sequential\): n_iter must be an int >= 1, got -1"),
        (SG, {"noise_level": -0.1}, ValueError, r"smooth_grad\(Sequential\): noise_level must be a finite number >= 0, "
                                                r"got -0\.1"),
        (SG, {"noise_level": float("nan")}, ValueError, r"noise_level must be a finite number >= 0, got nan"),
        (SG, {"noise_level": "0.1"}, TypeError, r"noise_level must be a real number >= 0, got str"),
        (SG, {"generator": "seed"}, TypeError, r"generator must be None, a torch\.Generator or an int seed, got str"),
        (OCC, {"window": 0}, ValueError, rf"occlusion\(Sequential\): window {POSITIVE}, got 0"),
        (OCC, {"stride": (2, -1)}, ValueError, rf"occlusion\(Sequential\): stride {POSITIVE}, got \(2, -1\)"),
        (OCC, {"window": 2.0}, TypeError, rf"window {POSITIVE}, got 2\.0"),
        (OCC, {"window": ()}, ValueError, r"window must not be an empty tuple"),
        (OCC, {"occlusion_fn": 3}, TypeError, r"occlusion_fn must be callable \(x, mask\) -> tensor, got int"),
    ],
)
def test_bad_arguments_are_named(factory, kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        factory(_tiny(), **kwargs)


def test_bad_model_and_composite_are_named() -> None:
    with pytest.raises(TypeError, match=r"integrated_gradients\(str\).*model must be a torch\.nn\.Module, got str"):
        lrpfunc.integrated_gradients("model")
    with pytest.raises(TypeError, match=r"smooth_grad\(Sequential\).*composite must be None or a composite.*got str"):
        lrpfunc.smooth_grad(_tiny(), "epsilon")
    with pytest.raises(TypeError, match=r"occlusion: model must be a torch\.nn\.Module, got int"):
        lrpfunc.occlusion(3)


def test_bad_call_arguments_are_named() -> None:
    model = _tiny()
    params = dict(model.named_parameters())
    x, g = torch.randn(2, 4, dtype=DOUBLE), torch.zeros(2, 3, dtype=DOUBLE)
    ig = lrpfunc.integrated_gradients(model, n_iter=2)
    with pytest.raises(ValueError, match=re.escape("integrated_gradients(Sequential): baseline must be broadcastable "
                                                   "to x's shape (2, 4), got shape (3,)")):
        lrpfunc.integrated_gradients(model, baseline=torch.zeros(3))(params, x, g)
    with pytest.raises(TypeError, match=r"integrated_gradients\(Sequential\): x must be a tensor .* got list"):
        ig(params, [x], g)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch\.int64"):
        ig(params, torch.ones(2, 4, dtype=torch.long), g)
    with pytest.raises(ValueError, match=re.escape("grad_output must have the output's shape (2, 3), got (2, 5)")):
        ig(params, x, torch.zeros(2, 5, dtype=DOUBLE))
    message = ("smooth_grad(Sequential): x must have a batch dimension and at least one more (the noise scale is "
               "the range of each sample), got shape (4,)")
    with pytest.raises(ValueError, match=re.escape(message)):
        lrpfunc.smooth_grad(model)(params, x[0], g[0])
    occ = lrpfunc.occlusion(model, window=2)
    with pytest.raises(ValueError, match=re.escape("occlusion(Sequential): grad_output must have the output's shape "
                                                   "(2, 3), got (2, 5)")):
        occ(params, x, torch.zeros(2, 5, dtype=DOUBLE))
    with pytest.raises(ValueError, match=r"occlusion\(Sequential\): window \(1, 2\) has 2 entries but x has only 1 "
                                         r"non-batch dimension"):
        lrpfunc.occlusion(model, window=(1, 2))(params, x, g)
    with pytest.raises(ValueError, match=r"params has names that are neither parameters nor buffers of Sequential: "
                                         r"'nope'"):
        occ({"nope": torch.zeros(1)}, x, g)
    with pytest.raises(ValueError, match=re.escape("occlusion_fn(x, mask) must return a tensor of x's shape (2, 4), "
                                                   "got (2,)")):
        lrpfunc.occlusion(model, occlusion_fn=lambda v, m: v.sum(1))(params, x, g)
