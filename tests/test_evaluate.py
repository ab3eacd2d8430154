"""Tests for lrpfunc.evaluate: perturbation curves, their areas, ABPC and the dataset loop."""
from __future__ import annotations

import importlib.abc
import itertools
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpfunc.evaluate import EvaluationResult, abpc, area_under_curve, evaluate_dataset, perturbation_curve

Tensor = torch.Tensor
F64 = torch.float64


def linear_score(w: Tensor) -> Callable[[Tensor], Tensor]:
    """``score(b) = sum over non-batch dims of b * w``."""
    return lambda batch: (batch * w).flatten(1).sum(1)


def reference_curve(
    score: Callable[[Tensor], Tensor],
    x: Tensor,
    relevance: Tensor,
    *,
    order: str,
    steps: int,
    feature_dims: tuple[int, ...],
    patch: tuple[int, ...],
    baseline: float | Tensor = 0.0,
) -> Tensor:
    """A plain loop: every sample, every step, every feature set by slicing, one input scored at a time."""
    position_dims = [d for d in range(1, x.ndim) if d not in feature_dims]
    grid = [range(x.shape[d] // p) for d, p in zip(position_dims, patch)]
    blocks = []
    for cell in itertools.product(*grid):
        index = [slice(None)] * (x.ndim - 1)
        for d, p, g in zip(position_dims, patch, cell):
            index[d - 1] = slice(g * p, (g + 1) * p)
        blocks.append(tuple(index))
    full_baseline = torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)
    curve = torch.empty(x.shape[0], steps + 1, dtype=x.dtype)
    for n in range(x.shape[0]):
        block_relevance = [float(relevance[n][block].sum()) for block in blocks]
        sign = -1.0 if order == "most" else 1.0
        ranking = sorted(range(len(blocks)), key=lambda f: sign * block_relevance[f])  # Python's sort is stable
        for k in range(steps + 1):
            perturbed = x[n].clone()
            for f in ranking[: round(k * len(blocks) / steps)]:
                perturbed[blocks[f]] = full_baseline[n][blocks[f]]
            curve[n, k] = score(perturbed[None])[0]
    return curve


def smooth_score(shape: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """A non-linear, non-additive score over inputs of ``shape`` (batch dim excluded)."""
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=generator, dtype=F64)
    v = torch.randn(shape, generator=generator, dtype=F64)
    return lambda batch: torch.tanh((batch * w).flatten(1).sum(1)) + ((batch * v) ** 2).flatten(1).sum(1).sqrt()


# ---------------------------------------------------------------- linear models: optimality and ordering


@pytest.mark.parametrize("steps", [6, 4, 3])
def test_linear_most_first_is_the_brute_force_optimum(steps):
    x, w = torch.randn(3, 6, dtype=F64), torch.randn(6, dtype=F64)
    score = linear_score(w)
    most = perturbation_curve(score, x, x * w, steps=steps)
    least = perturbation_curve(score, x, x * w, order="least", steps=steps)
    for n in range(3):
        for k in range(steps + 1):
            values = []
            for removed in itertools.combinations(range(6), round(k * 6 / steps)):
                perturbed = x[n].clone()
                perturbed[list(removed)] = 0.0
                values.append(float((perturbed * w).sum()))
            assert most[n, k].item() == pytest.approx(min(values), abs=1e-12)
            assert least[n, k].item() == pytest.approx(max(values), abs=1e-12)


def test_linear_curves_are_monotone_for_nonnegative_contributions():
    x, w = torch.rand(4, 3, 4, 4, dtype=F64), torch.rand(3, 4, 4, dtype=F64)
    score = linear_score(w)
    most = perturbation_curve(score, x, x * w, steps=8)
    least = perturbation_curve(score, x, x * w, order="least", steps=8)
    assert (most.diff(dim=1) <= 1e-12).all() and (least.diff(dim=1) <= 1e-12).all()
    assert (most <= least + 1e-12).all()
    assert (most[:, 1:-1] < least[:, 1:-1]).all()  # strictly below in between: the test can fail


def test_least_first_is_most_first_reversed():
    x, w = torch.randn(3, 12, dtype=F64), torch.randn(12, dtype=F64)
    score = linear_score(w)
    most = perturbation_curve(score, x, x * w, steps=4)
    least = perturbation_curve(score, x, x * w, order="least", steps=4)
    assert torch.equal(least, perturbation_curve(score, x, -x * w, order="most", steps=4))
    # with F divisible by steps and baseline 0: least[steps - k] = score(x) - most[k]
    torch.testing.assert_close(least.flip(1), score(x)[:, None] - most, rtol=0, atol=1e-12)


def test_abpc_of_gradient_times_input_beats_random_and_negated_relevance():
    x, w = torch.randn(5, 2, 4, 4, dtype=F64), torch.randn(2, 4, 4, dtype=F64)
    score = linear_score(w)
    best = abpc(score, x, x * w, steps=8)
    random = abpc(score, x, torch.randn_like(x), steps=8)
    negated = abpc(score, x, -x * w, steps=8)
    assert (best > random).all() and (random > negated).all()
    assert (negated < 0).all()
    torch.testing.assert_close(negated, -best, rtol=0, atol=1e-12)


def test_hand_computed_curves_and_areas():
    x, w = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64), torch.ones(4, dtype=F64)
    score = linear_score(w)
    most = perturbation_curve(score, x, x, steps=4)
    least = perturbation_curve(score, x, x, order="least", steps=4)
    assert most.tolist() == [[10.0, 6.0, 3.0, 1.0, 0.0]]
    assert least.tolist() == [[10.0, 9.0, 7.0, 4.0, 0.0]]
    assert area_under_curve(most).tolist() == [3.75]  # (10/2 + 6 + 3 + 1 + 0/2) / 4
    assert area_under_curve(least).tolist() == [6.25]  # (10/2 + 9 + 7 + 4 + 0/2) / 4
    assert abpc(score, x, x, steps=4).tolist() == [2.5]
    assert perturbation_curve(score, x, x, steps=2).tolist() == [[10.0, 3.0, 0.0]]


def test_area_under_curve_trapezoid_on_unit_interval():
    curves = torch.tensor([[1.0, 0.5, 0.0], [2.0, 2.0, 2.0], [0.0, 1.0, 0.0]], dtype=F64)
    assert area_under_curve(curves).tolist() == [0.5, 2.0, 0.5]
    assert area_under_curve(torch.tensor([3.0, 1.0])).item() == 2.0
    assert area_under_curve(curves[None]).shape == (1, 3)


@pytest.mark.parametrize(
    ("features", "steps", "counts"),
    [
        (5, 2, [0, 2, 5]),  # 2.5 -> 2
        (5, 4, [0, 1, 2, 4, 5]),  # 1.25, 2.5, 3.75
        (3, 2, [0, 2, 3]),  # 1.5 -> 2
        (4, 10, [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]),  # more steps than features: 0.4, 0.8, 1.2, 1.6, 2.0, 2.4, ...
        (5, 10, [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5]),  # halves to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4, 4.5 -> 4
    ],
)
def test_step_k_removes_round_k_f_over_steps_features(features, steps, counts):
    assert counts == [round(k * features / steps) for k in range(steps + 1)]
    x = torch.ones(2, features, dtype=F64)
    removed = perturbation_curve(lambda b: (b == 0).sum(1).to(F64), x, torch.randn_like(x), steps=steps)
    assert removed.tolist() == [counts, counts]


def test_ties_are_broken_by_feature_index():
    x = torch.ones(1, 4, dtype=F64)
    w = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=F64)  # the score spells out which features are gone
    score = linear_score(w)
    assert perturbation_curve(score, x, torch.zeros_like(x), steps=4).tolist() == [[15.0, 14.0, 12.0, 8.0, 0.0]]
    assert perturbation_curve(score, x, torch.zeros_like(x), order="least", steps=4).tolist() == [
        [15.0, 14.0, 12.0, 8.0, 0.0]
    ]
    relevance = torch.tensor([[1.0, 2.0, 1.0, 2.0]], dtype=F64)
    assert perturbation_curve(score, x, relevance, steps=4).tolist() == [[15.0, 13.0, 5.0, 4.0, 0.0]]  # 1, 3, 0, 2
    assert perturbation_curve(score, x, relevance, order="least", steps=4).tolist() == [
        [15.0, 14.0, 10.0, 8.0, 0.0]  # 0, 2, 1, 3
    ]


# ---------------------------------------------------------------- features: patches, positions, against a loop


@pytest.mark.parametrize("order", ["most", "least"])
@pytest.mark.parametrize(("patch", "patch_sizes"), [(None, (1, 1)), (2, (2, 2)), ((2, 3), (2, 3)), ((4, 6), (4, 6))])
def test_image_patches_match_a_reference_loop(order, patch, patch_sizes):
    x = torch.randn(2, 3, 4, 6, dtype=F64)
    relevance = torch.randn_like(x)
    score = smooth_score((3, 4, 6))
    curve = perturbation_curve(score, x, relevance, order=order, steps=5, patch=patch, baseline=0.3)
    expected = reference_curve(
        score, x, relevance, order=order, steps=5, feature_dims=(1,), patch=patch_sizes, baseline=0.3
    )
    torch.testing.assert_close(curve, expected, rtol=0, atol=1e-12)


def test_patch_relevance_sums_channels_and_pixels():
    x = torch.ones(1, 2, 4, 4, dtype=F64)
    relevance = torch.zeros_like(x)
    relevance[0, 1, 3, 0] = 1.0  # one pixel of one channel: its patch (row 1, column 0 of a 2 x 2 grid) goes first
    curve = perturbation_curve(lambda b: b.flatten(1).sum(1), x, relevance, steps=4, patch=2)
    assert curve.tolist() == [[32.0, 24.0, 16.0, 8.0, 0.0]]
    first = perturbation_curve(lambda b: b[:, :, 2:, :2].sum((1, 2, 3)), x, relevance, steps=4, patch=2)
    assert first[0, 1].item() == 0.0  # the whole bottom-left patch, both channels, is gone after one step


@pytest.mark.parametrize("order", ["most", "least"])
@pytest.mark.parametrize(("patch", "patch_sizes"), [(None, (1,)), (2, (2,)), (6, (6,))])
def test_sequence_positions_match_a_reference_loop(order, patch, patch_sizes):
    x = torch.randn(3, 6, 4, dtype=F64)
    relevance = torch.randn_like(x)
    score = smooth_score((6, 4))
    curve = perturbation_curve(score, x, relevance, order=order, steps=4, patch=patch)
    expected = reference_curve(score, x, relevance, order=order, steps=4, feature_dims=(2,), patch=patch_sizes)
    torch.testing.assert_close(curve, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "feature_dims", "patch", "resolved_dims", "patch_sizes"),
    [
        ((2, 3, 8), 1, 2, (1,), (2,)),  # channels-first signal (N, C, L): C is one feature
        ((2, 4, 6, 3), -1, (2, 3), (3,), (2, 3)),  # channels-last image (N, H, W, C)
        ((2, 5), None, None, (), (1,)),  # tabular: every entry
        ((2, 3, 2, 4, 4), None, (1, 2, 2), (1,), (1, 2, 2)),  # volume (N, C, D, H, W)
        ((2, 3, 4, 4), (1, 2), 2, (1, 2), (2,)),  # whole rows across channels, two at a time
    ],
)
def test_feature_dims_match_a_reference_loop(shape, feature_dims, patch, resolved_dims, patch_sizes):
    x = torch.randn(shape, dtype=F64)
    relevance = torch.randn_like(x)
    score = smooth_score(shape[1:])
    curve = perturbation_curve(score, x, relevance, steps=3, patch=patch, feature_dims=feature_dims)
    expected = reference_curve(
        score, x, relevance, order="most", steps=3, feature_dims=resolved_dims, patch=patch_sizes
    )
    torch.testing.assert_close(curve, expected, rtol=0, atol=1e-12)


def test_channels_last_equals_channels_first():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    relevance, w = torch.randn_like(x), torch.randn(3, 4, 4, dtype=F64)
    first = perturbation_curve(linear_score(w), x, relevance, steps=4, patch=2)
    last = perturbation_curve(
        linear_score(w.permute(1, 2, 0)), x.permute(0, 2, 3, 1), relevance.permute(0, 2, 3, 1),
        steps=4, patch=2, feature_dims=-1,
    )
    torch.testing.assert_close(first, last, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- batching, baselines, purity


def test_chunked_scoring_equals_one_batch_and_a_loop_over_steps():
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    relevance = torch.randn_like(x)
    score = smooth_score((2, 4, 4))
    sizes: list[int] = []

    def recording(batch: Tensor) -> Tensor:
        sizes.append(batch.shape[0])
        return score(batch)

    whole = perturbation_curve(recording, x, relevance, steps=6, patch=2)
    assert sizes == [3 * 7]
    loop = reference_curve(score, x, relevance, order="most", steps=6, feature_dims=(1,), patch=(2, 2))
    torch.testing.assert_close(whole, loop, rtol=0, atol=1e-12)
    for batch_size in (1, 4, 7, 20, 21, 100):
        sizes.clear()
        chunked = perturbation_curve(recording, x, relevance, steps=6, patch=2, batch_size=batch_size)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
        assert max(sizes) == min(batch_size, 21) and sum(sizes) == 21


def test_tensor_baseline_is_honoured():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    relevance = torch.randn_like(x)
    score = smooth_score((3, 4, 4))
    channel_mean = x.mean(dim=(0, 2, 3))[:, None, None]  # (C, 1, 1)
    curve = perturbation_curve(score, x, relevance, steps=4, patch=2, baseline=channel_mean)
    expected = reference_curve(
        score, x, relevance, order="most", steps=4, feature_dims=(1,), patch=(2, 2), baseline=channel_mean
    )
    torch.testing.assert_close(curve, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(curve[:, -1], score(channel_mean.expand_as(x)), rtol=0, atol=1e-12)
    per_sample = torch.randn_like(x)  # (N, ...): each sample its own baseline
    curve = perturbation_curve(score, x, relevance, steps=4, patch=2, baseline=per_sample)
    expected = reference_curve(
        score, x, relevance, order="most", steps=4, feature_dims=(1,), patch=(2, 2), baseline=per_sample
    )
    torch.testing.assert_close(curve, expected, rtol=0, atol=1e-12)


def test_inputs_are_not_modified_and_no_gradient_is_recorded():
    x = torch.randn(2, 3, 4, 4, dtype=F64, requires_grad=True)
    relevance, baseline = torch.randn(2, 3, 4, 4, dtype=F64, requires_grad=True), torch.randn(3, 1, 1, dtype=F64)
    copies = [t.detach().clone() for t in (x, relevance, baseline)]
    grad_enabled: list[bool] = []

    def vandal(batch: Tensor) -> Tensor:  # writes into what it is given
        grad_enabled.append(torch.is_grad_enabled())
        result = batch.flatten(1).sum(1)
        batch.zero_()
        return result

    curve = perturbation_curve(vandal, x, relevance, steps=3, patch=2, baseline=baseline, batch_size=5)
    abpc(vandal, x, relevance, steps=3, baseline=baseline)
    evaluate_dataset(lambda b, t: vandal(b), lambda x, t: relevance, [(x, torch.zeros(2))], progress=False, steps=3)
    for tensor, copy in zip((x, relevance, baseline), copies):
        assert torch.equal(tensor.detach(), copy)
    assert not curve.requires_grad and grad_enabled and not any(grad_enabled)
    assert torch.is_grad_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_device_of_x():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    relevance, w = torch.randn_like(x), torch.randn(3, 4, 4, dtype=F64)
    cpu = perturbation_curve(linear_score(w), x, relevance, steps=4, patch=2, baseline=x.mean(0), batch_size=3)
    cuda = perturbation_curve(
        linear_score(w.cuda()), x.cuda(), relevance.cuda(), steps=4, patch=2, baseline=x.mean(0).cuda(), batch_size=3
    )
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(3, 6), (2, 5, 3), (2, 2, 4, 6)]),
    steps=st.integers(1, 9),
    order=st.sampled_from(["most", "least"]),
    baseline=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_curve_starts_at_the_score_and_ends_at_the_baseline_score(shape, steps, order, baseline, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=F64)
    w = torch.randn(shape[1:], generator=generator, dtype=F64)
    relevance = torch.randn(shape, generator=generator, dtype=F64)
    score = linear_score(w)
    curve = perturbation_curve(score, x, relevance, order=order, steps=steps, baseline=baseline, batch_size=4)
    assert curve.shape == (shape[0], steps + 1)
    torch.testing.assert_close(curve[:, 0], score(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(curve[:, -1], score(torch.full_like(x, baseline)), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- evaluate_dataset


def classifier() -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """A linear 3-class model on (2, 4, 4) images: target-logit score and gradient-times-input attribution."""
    weight = torch.randn(3, 2, 4, 4, dtype=F64)
    score_fn = lambda batch, target: (batch * weight[target]).flatten(1).sum(1)  # noqa: E731
    attribution_fn = lambda x, target: x * weight[target]  # noqa: E731
    return score_fn, attribution_fn


def per_sample_reference(score_fn, attribution_fn, data, **options) -> tuple[Tensor, Tensor]:
    """Most- and least-first curves of every sample, one sample at a time with its target fixed."""
    curves: dict[str, list[Tensor]] = {"most": [], "least": []}
    for x, target in data:
        relevance = attribution_fn(x, target)
        for n in range(len(x)):
            score = lambda b, t=target[n]: score_fn(b, t.expand(len(b)))  # noqa: E731
            for order in curves:
                sample, sample_relevance = x[n : n + 1], relevance[n : n + 1]
                curves[order].append(perturbation_curve(score, sample, sample_relevance, order=order, **options))
    return torch.cat(curves["most"]), torch.cat(curves["least"])


@pytest.mark.parametrize("progress", [True, False])
def test_evaluate_dataset_equals_the_sample_average(progress, capsys):
    score_fn, attribution_fn = classifier()
    data = [(torch.randn(n, 2, 4, 4, dtype=F64), torch.randint(0, 3, (n,))) for n in (3, 1, 4)]
    result = evaluate_dataset(score_fn, attribution_fn, data, progress=progress, steps=4, patch=2, batch_size=5)
    assert isinstance(result, EvaluationResult) and result.num_samples == 8
    most, least = per_sample_reference(score_fn, attribution_fn, data, steps=4, patch=2)
    per_sample = area_under_curve(least) - area_under_curve(most)
    torch.testing.assert_close(result.curve_most, most.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.curve_least, least.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.abpc_per_sample, per_sample, rtol=0, atol=1e-12)
    assert result.auc_most == pytest.approx(float(area_under_curve(most).mean()), abs=1e-12)
    assert result.auc_least == pytest.approx(float(area_under_curve(least).mean()), abs=1e-12)
    assert result.abpc == pytest.approx(float(per_sample.mean()), abs=1e-12)
    assert result.abpc == pytest.approx(result.auc_least - result.auc_most, abs=1e-12)
    batch_means = [float(per_sample[a:b].mean()) for a, b in ((0, 3), (3, 4), (4, 8))]
    assert result.abpc != pytest.approx(sum(batch_means) / 3, abs=1e-9)  # averaged over samples, not batches
    assert ("evaluate_dataset" in capsys.readouterr().err) is progress


def test_evaluate_dataset_result_is_frozen():
    score_fn, attribution_fn = classifier()
    result = evaluate_dataset(
        score_fn, attribution_fn, [(torch.randn(2, 2, 4, 4, dtype=F64), torch.tensor([0, 2]))], progress=False
    )
    with pytest.raises(AttributeError):
        result.abpc = 0.0  # type: ignore[misc]
    assert result.curve_most.shape == (17,)


class _RecordTqdmImports(importlib.abc.MetaPathFinder):
    """Records, and refuses, every import of tqdm (as if it were not installed)."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == "tqdm":
            self.attempts.append(fullname)
            raise ImportError(f"No module named {fullname!r}")
        return None


def test_progress_false_never_imports_tqdm_and_a_missing_tqdm_means_no_bar(monkeypatch, capsys):
    for name in [name for name in sys.modules if name.split(".")[0] == "tqdm"]:
        monkeypatch.delitem(sys.modules, name)
    finder = _RecordTqdmImports()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    score_fn, attribution_fn = classifier()
    data = [(torch.randn(2, 2, 4, 4, dtype=F64), torch.tensor([1, 0]))]
    quiet = evaluate_dataset(score_fn, attribution_fn, data, progress=False, steps=4)
    assert finder.attempts == []
    without_tqdm = evaluate_dataset(score_fn, attribution_fn, data, progress=True, steps=4)
    assert finder.attempts == ["tqdm"]  # it tried, failed, and went on silently
    assert capsys.readouterr().err == ""
    assert torch.equal(quiet.abpc_per_sample, without_tqdm.abpc_per_sample)


def test_evaluate_dataset_takes_any_iterable_once():
    score_fn, attribution_fn = classifier()
    batches = [(torch.randn(2, 2, 4, 4, dtype=F64), torch.tensor([1, 2])) for _ in range(2)]
    from_generator = evaluate_dataset(score_fn, attribution_fn, (b for b in batches), steps=4)
    from_list = evaluate_dataset(score_fn, attribution_fn, batches, progress=False, steps=4)
    assert torch.equal(from_generator.abpc_per_sample, from_list.abpc_per_sample)


# ---------------------------------------------------------------- errors


def test_error_messages():
    x, w = torch.randn(3, 2, 6, 6), torch.randn(2, 6, 6)
    score = linear_score(w)
    with pytest.raises(
        ValueError, match=r"^perturbation_curve: relevance must have the shape of x \(3, 2, 6, 6\), got \(3, 2, 6\)$"
    ):
        perturbation_curve(score, x, x[..., 0])
    with pytest.raises(ValueError, match=r"^perturbation_curve: order must be 'most' or 'least', got 'middle'$"):
        perturbation_curve(score, x, x, order="middle")
    with pytest.raises(ValueError, match=r"^perturbation_curve: steps must be an int >= 1, got 0$"):
        perturbation_curve(score, x, x, steps=0)
    with pytest.raises(TypeError, match=r"^perturbation_curve: steps must be an int >= 1, got 2.0 \(float\)$"):
        perturbation_curve(score, x, x, steps=2.0)
    with pytest.raises(ValueError, match=r"patch 4 does not divide the size \(6, 6\) of x's position dims \(2, 3\)"):
        perturbation_curve(score, x, x, patch=4)
    with pytest.raises(ValueError, match=r"patch must have one size per position dim \(2, 3\).*got \(2,\)"):
        perturbation_curve(score, x, x, patch=(2,))
    with pytest.raises(
        ValueError,
        match=r"^perturbation_curve: score must return one score per input, expected shape \(B,\) = \(21,\) "
        r"for a batch of B = 21 perturbed inputs, got \(21, 1\)$"
    ):
        perturbation_curve(lambda b: score(b)[:, None], x, x, steps=6)
    with pytest.raises(ValueError, match=r"expected shape \(B,\) = \(4,\) .*got float"):
        perturbation_curve(lambda b: 1.0, x, x, steps=6, batch_size=4)
    with pytest.raises(ValueError, match=r"feature_dims must name distinct non-batch dims of x .*got 0"):
        perturbation_curve(score, x, x, feature_dims=0)
    with pytest.raises(ValueError, match=r"feature_dims .*got \(1, -3\)"):
        perturbation_curve(score, x, x, feature_dims=(1, -3))
    with pytest.raises(
        ValueError, match=r"baseline must be broadcastable to x's shape \(3, 2, 6, 6\), got shape \(2, 6"
    ):
        perturbation_curve(score, x, x, baseline=torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        perturbation_curve(score, x, x, batch_size=0)
    with pytest.raises(ValueError, match=r"relevance must be real and finite"):
        perturbation_curve(score, x, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match=r"x must be a non-empty tensor with a batch dimension .*got shape \(6,\)"):
        perturbation_curve(score, x[0, 0, 0], x[0, 0, 0])
    with pytest.raises(TypeError, match=r"^area_under_curve: curve must be a floating-point tensor, got dtype torch"):
        area_under_curve(torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match=r"area_under_curve: .*at least 2 points, got \(3, 1\)"):
        area_under_curve(torch.zeros(3, 1))


def test_evaluate_dataset_error_messages():
    score_fn, attribution_fn = classifier()
    x, target = torch.randn(2, 2, 4, 4, dtype=F64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"^evaluate_dataset: data yielded no batches$"):
        evaluate_dataset(score_fn, attribution_fn, [], progress=False)
    wide = torch.randn(2, 2, 4, 6, dtype=F64)  # the second batch: cropping to 4 columns no longer keeps the shape
    with pytest.raises(
        ValueError,
        match=r"evaluate_dataset \(batch 1\): attribution_fn\(x, target\) must have the shape of x \(2, 2, 4, 6\), "
        r"got \(2, 2, 4, 4\)",
    ):
        evaluate_dataset(score_fn, lambda x, t: x[..., :4], [(x, target), (wide, target)], progress=False)
    with pytest.raises(
        ValueError, match=r"^evaluate_dataset: score_fn must return one score per input, expected shape \("
    ):
        evaluate_dataset(lambda b, t: b.sum(), attribution_fn, [(x, target)], progress=False)
    with pytest.raises(
        ValueError,
        match=r"^evaluate_dataset: batch 0 must be a pair of tensors \(x, target\) with the same first dim, "
        r"got x \(2, 2, 4, 4\), target \(3,\)$",
    ):
        evaluate_dataset(score_fn, attribution_fn, [(x, torch.tensor([0, 1, 2]))], progress=False)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'order'"):
        evaluate_dataset(score_fn, attribution_fn, [(x, target)], progress=False, order="most")  # type: ignore

