"""Faithfulness of attributions: perturbation curves (pixel flipping, region perturbation) and ABPC.

An attribution is faithful to a model when removing the features it marks as most relevant destroys the
model's score fast, and removing the least relevant ones barely changes it. This module measures both
curves for any ``score`` function and any attribution, in plain torch (on the device of the inputs,
without gradients, never writing to its arguments).

Features:
    ``x`` has a leading batch dimension. ``feature_dims`` names the dimensions that are summed into one
    feature (default: the channels of ``(N, C, H, W)`` images and ``(N, C, D, H, W)`` volumes, the
    embedding of ``(N, L, D)`` sequences, nothing for ``(N, D)`` tables). The other non-batch dimensions
    are the *position* dimensions; ``patch`` tiles them into blocks (``patch x patch`` regions of an
    image). One feature is one block of positions across all ``feature_dims``; its relevance is the sum
    of the relevance of its elements, and removing it sets all its elements to the baseline.

Definition:
    With ``F`` features sorted by relevance (descending for ``order="most"``, ascending for ``"least"``;
    ties keep their index order), step ``k = 0 .. steps`` removes the first ``c_k = round(k F / steps)``
    features (Python's ``round``: halves to even) and the curve is ``score(x with those removed)``. Step 0
    is the unperturbed input, step ``steps`` the all-baseline input. The area under a curve is the
    trapezoid rule on the nominal axis ``k / steps`` in ``[0, 1]``::

        AUC = (1 / steps) * sum_{k=0}^{steps-1} (curve_k + curve_{k+1}) / 2
        ABPC = AUC(least relevant first) - AUC(most relevant first)

References:
    W. Samek, A. Binder, G. Montavon, S. Lapuschkin, K.-R. Müller. Evaluating the visualization of what
    a deep neural network has learned. IEEE TNNLS 28(11), 2017 (pixel flipping, region perturbation).
    K. Schulz, L. Sixt, F. Tombari, T. Landgraf. Restricting the flow: information bottlenecks for
    attribution. ICLR 2020 (the degradation test with most- and least-relevant-first curves).
    S. Blücher, J. Vielhaben, N. Strodthoff. Decoupling pixel flipping and occlusion strategy for
    consistent XAI benchmarks. TMLR 2024 (the area between the perturbation curves).

Example:
    >>> import torch
    >>> from lrpfunc.evaluate import perturbation_curve, area_under_curve, abpc
    >>> w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    >>> score = lambda batch: (batch * w).sum(1)
    >>> x = torch.ones(1, 4)
    >>> perturbation_curve(score, x, x * w, steps=4)
    tensor([[10.,  6.,  3.,  1.,  0.]])
    >>> area_under_curve(perturbation_curve(score, x, x * w, order="least", steps=4))
    tensor([6.2500])
    >>> abpc(score, x, x * w, steps=4)
    tensor([2.5000])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch

Tensor = torch.Tensor

__all__ = ["perturbation_curve", "area_under_curve", "abpc", "evaluate_dataset", "EvaluationResult"]

Score = Callable[[Tensor], Tensor]
FeatureDims = int | Sequence[int] | None
Patch = int | tuple[int, ...] | None
Order = Literal["most", "least"]
_ScoreAt = Callable[[Tensor, Tensor], Tensor]  # (perturbed inputs, their sample indices) -> (B,) scores
_ORDERS: tuple[Literal["most", "least"], ...] = ("most", "least")


@dataclass(frozen=True)
class _Layout:
    """How the non-batch dimensions of ``x`` split into features.

    ``feature_dims`` are summed into one feature; ``position_dims`` (the other non-batch dims, ascending)
    are tiled by ``patch`` into a ``grid`` of blocks; there are ``prod(grid)`` features.
    """

    shape: tuple[int, ...]
    feature_dims: tuple[int, ...]
    position_dims: tuple[int, ...]
    patch: tuple[int, ...]

    @property
    def position_sizes(self) -> tuple[int, ...]:
        return tuple(self.shape[dim] for dim in self.position_dims)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(size // patch for size, patch in zip(self.position_sizes, self.patch))

    @property
    def num_features(self) -> int:
        return math.prod(self.grid)


def _positive_int(where: str, label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {label} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{where}: {label} must be an int >= 1, got {value}")
    return int(value)


def _default_feature_dims(ndim: int) -> tuple[int, ...]:
    if ndim >= 4:
        return (1,)  # channels of (N, C, H, W) images and (N, C, D, H, W) volumes
    if ndim == 3:
        return (2,)  # embedding of (N, L, D) sequences
    return ()  # (N, D): every entry is a feature


def _layout(where: str, shape: tuple[int, ...], feature_dims: FeatureDims, patch: Patch) -> _Layout:
    """Check ``feature_dims`` and ``patch`` against ``x``'s shape and resolve the defaults."""
    ndim = len(shape)
    if feature_dims is None:
        dims = _default_feature_dims(ndim)
    else:
        given: Any = (feature_dims,) if isinstance(feature_dims, numbers.Integral) else feature_dims  # checked below
        try:
            raw = tuple(given)
        except TypeError:
            raw = None
        if raw is None or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in raw):
            raise TypeError(f"{where}: feature_dims must be None, an int or a sequence of ints, got {feature_dims!r}")
        dims = tuple(int(d) % ndim if -ndim <= d < ndim else int(d) for d in raw)
        if any(not 1 <= d < ndim for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(
                f"{where}: feature_dims must name distinct non-batch dims of x (1 .. {ndim - 1} or negative), "
                f"got {feature_dims!r} for x of shape {shape}"
            )
        dims = tuple(sorted(dims))
    position_dims = tuple(d for d in range(1, ndim) if d not in dims)
    if patch is None:
        patches = (1,) * len(position_dims)
    elif isinstance(patch, (tuple, list)):
        if len(patch) != len(position_dims):
            raise ValueError(
                f"{where}: patch must have one size per position dim {position_dims} of x (shape {shape}, "
                f"feature_dims {dims}), got {patch!r}"
            )
        patches = tuple(_positive_int(where, "each patch size", p) for p in patch)
    else:
        patches = (_positive_int(where, "patch", patch),) * len(position_dims)
    sizes = tuple(shape[d] for d in position_dims)
    if any(size % p for size, p in zip(sizes, patches)):
        raise ValueError(
            f"{where}: patch {patch!r} does not divide the size {sizes} of x's position dims {position_dims} "
            f"(x of shape {shape}); crop or pad x, or choose a patch size that divides it"
        )
    return _Layout(shape, dims, position_dims, patches)


def _feature_relevance(relevance: Tensor, layout: _Layout) -> Tensor:
    """``(N, F)``: the relevance of each feature, the sum over its elements, in row-major block order."""
    positions = relevance.sum(dim=layout.feature_dims) if layout.feature_dims else relevance
    blocked = positions.reshape(
        positions.shape[0], *(n for g, p in zip(layout.grid, layout.patch) for n in (g, p))
    )
    summed = blocked.sum(dim=tuple(range(2, blocked.ndim, 2))) if layout.patch else blocked
    return summed.reshape(relevance.shape[0], layout.num_features)


def _feature_mask(removed: Tensor, layout: _Layout) -> Tensor:
    """Expand ``(B, F)`` flags per feature to a mask broadcastable to ``(B, *x.shape[1:])``."""
    rows = removed.shape[0]
    blocks = removed.reshape(rows, *(n for g in layout.grid for n in (g, 1)))
    spread = blocks.expand(rows, *(n for g, p in zip(layout.grid, layout.patch) for n in (g, p)))
    mask_shape = [1 if d in layout.feature_dims else layout.shape[d] for d in range(1, len(layout.shape))]
    return spread.reshape(rows, *mask_shape)


def _removal_counts(num_features: int, steps: int) -> list[int]:
    """``round(k * F / steps)`` for ``k = 0 .. steps``, exactly (halves to even)."""
    return [round(Fraction(k * num_features, steps)) for k in range(steps + 1)]


def _check_x_relevance(where: str, x: Any, relevance: Any, relevance_label: str = "relevance") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a tensor with a leading batch dimension, got {type(x).__name__}")
    if x.ndim < 2 or x.numel() == 0:
        raise ValueError(
            f"{where}: x must be a non-empty tensor with a batch dimension and at least one more, "
            f"got shape {tuple(x.shape)}"
        )
    if not isinstance(relevance, Tensor):
        raise TypeError(
            f"{where}: {relevance_label} must be a tensor of the shape of x, got {type(relevance).__name__}"
        )
    if relevance.shape != x.shape:
        raise ValueError(
            f"{where}: {relevance_label} must have the shape of x {tuple(x.shape)}, got {tuple(relevance.shape)}"
        )
    if relevance.is_complex() or not bool(torch.isfinite(relevance).all()):
        raise ValueError(f"{where}: {relevance_label} must be real and finite (no NaN or inf) to be sorted")


def _baseline(where: str, baseline: Any, x: Tensor) -> Tensor:
    """``baseline`` as a tensor on ``x``'s device and dtype, with ``x.ndim`` dims (or zero dims)."""
    if isinstance(baseline, bool) or not isinstance(baseline, (numbers.Real, Tensor)):
        raise TypeError(
            f"{where}: baseline must be a number or a tensor broadcastable to x, got {type(baseline).__name__}"
        )
    if not isinstance(baseline, Tensor):
        return torch.tensor(float(baseline), dtype=x.dtype, device=x.device)
    try:
        shape = torch.broadcast_shapes(baseline.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"{where}: baseline must be broadcastable to x's shape {tuple(x.shape)}, got shape {tuple(baseline.shape)}"
        )
    value = baseline.detach().to(dtype=x.dtype, device=x.device)
    return value.reshape((1,) * (x.ndim - value.ndim) + tuple(value.shape))


def _check_scores(where: str, score_label: str, scores: Any, rows: int) -> Tensor:
    shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
    if not isinstance(scores, Tensor) or scores.shape != (rows,):
        raise ValueError(
            f"{where}: {score_label} must return one score per input, expected shape (B,) = ({rows},) "
            f"for a batch of B = {rows} perturbed inputs, got {shape}"
        )
    return scores


def _check_options(where: str, steps: Any, batch_size: Any) -> tuple[int, int | None]:
    steps = _positive_int(where, "steps", steps)
    batch_size = None if batch_size is None else _positive_int(where, "batch_size", batch_size)
    return steps, batch_size


def _curve(
    where: str,
    score_label: str,
    score_at: _ScoreAt,
    x: Tensor,
    relevance: Tensor,
    *,
    order: Order,
    steps: int,
    patch: Patch,
    feature_dims: FeatureDims,
    baseline: float | Tensor,
    batch_size: int | None,
) -> Tensor:
    """:func:`perturbation_curve` for a score that also receives the sample index of each input."""
    if order not in _ORDERS:
        raise ValueError(f"{where}: order must be 'most' or 'least', got {order!r}")
    steps, batch_size = _check_options(where, steps, batch_size)
    layout = _layout(where, tuple(x.shape), feature_dims, patch)
    base = _baseline(where, baseline, x)
    per_sample_base = base.ndim > 0 and base.shape[0] > 1
    with torch.no_grad():
        ranked = _feature_relevance(relevance.detach().to(x.device), layout)
        by_relevance = torch.argsort(ranked, dim=1, descending=order == "most", stable=True)
        rank = torch.argsort(by_relevance, dim=1)  # rank[n, f]: position of feature f in the removal order
        counts = torch.tensor(_removal_counts(layout.num_features, steps), device=x.device)
        total, chunk = x.shape[0] * (steps + 1), batch_size or x.shape[0] * (steps + 1)
        scores = []
        for start in range(0, total, chunk):
            row = torch.arange(start, min(start + chunk, total), device=x.device)  # row = sample * (steps + 1) + step
            sample, step = row // (steps + 1), row % (steps + 1)
            removed = rank[sample] < counts[step, None]
            inputs = torch.where(_feature_mask(removed, layout), base[sample] if per_sample_base else base, x[sample])
            scores.append(_check_scores(where, score_label, score_at(inputs, sample), row.shape[0]))
        return torch.cat(scores).reshape(x.shape[0], steps + 1)


def perturbation_curve(
    score: Score,
    x: Tensor,
    relevance: Tensor,
    *,
    order: Order = "most",
    steps: int = 16,
    patch: Patch = None,
    feature_dims: FeatureDims = None,
    baseline: float | Tensor = 0.0,
    batch_size: int | None = None,
) -> Tensor:
    """The score of each input as its features are removed in the order of their relevance.

    Definition:
        The features of ``x`` (see ``feature_dims`` and ``patch``) are sorted by their relevance, the sum of
        ``relevance`` over their elements: descending for ``order="most"``, ascending for ``"least"``, ties
        in index order (a stable sort). With ``F`` features, step ``k = 0 .. steps`` sets the first
        ``round(k F / steps)`` of them (Python's ``round``, halves to even) to ``baseline``, and::

            curve[n, k] = score(x_n with the first round(k F / steps) features set to the baseline)

        so ``curve[:, 0]`` is the score of ``x`` and ``curve[:, steps]`` the score of the all-baseline input.
        When ``steps > F`` some steps remove the same number of features. All ``N * (steps + 1)`` inputs are
        built with tensor operations (flattened as ``n * (steps + 1) + k``) and scored ``batch_size`` at a
        time under ``torch.no_grad()``; neither ``x`` nor ``relevance`` is written to.

    Args:
        score: ``batch (B, *x.shape[1:]) -> (B,)`` scores, e.g. ``lambda b: model(b)[:, target]`` for one
            class, or the logit of each sample's class (see :func:`evaluate_dataset` for per-sample targets).
        x: ``(N, ...)`` a batch of inputs.
        relevance: The attribution of ``x``, of ``x``'s shape.
        order: ``"most"`` (most relevant first, Samek et al.'s MoRF) or ``"least"`` (least relevant first).
        steps: Number of perturbation steps, ``>= 1``; the curve has ``steps + 1`` points.
        patch: Block size over the position dims (the non-batch dims not in ``feature_dims``): ``None`` for
            single positions, an int for the same size in every position dim (``patch x patch`` regions of
            an image), or a tuple with one size per position dim. Each size must divide its dim.
        feature_dims: The dims of ``x`` whose entries form one feature together (their relevance is summed,
            they are removed together). ``None`` picks ``(1,)`` for ``x.ndim >= 4`` (channels of
            ``(N, C, H, W)`` images), ``(2,)`` for ``x.ndim == 3`` (embeddings of ``(N, L, D)`` token
            sequences), and ``()`` for ``x.ndim == 2`` (each entry is a feature). Give ``1`` for
            channels-first signals ``(N, C, L)``, or ``-1`` for channels-last images ``(N, H, W, C)``.
        baseline: The value that replaces removed features: a number, or a tensor broadcastable to ``x``
            (e.g. the per-channel mean of shape ``(C, 1, 1)``; one of shape ``(N, ...)`` is per sample).
        batch_size: How many perturbed inputs go through ``score`` at once; ``None`` for all at once.

    Returns:
        ``(N, steps + 1)``: the scores at steps ``0 .. steps``, in the dtype and on the device ``score`` returns.

    Raises:
        ValueError: If ``relevance`` does not have ``x``'s shape or is not finite, ``order`` is unknown,
            ``steps`` or ``batch_size`` is below 1, ``feature_dims`` names the batch dim or a dim twice,
            ``patch`` does not divide the position dims (or has the wrong length), ``baseline`` is not
            broadcastable to ``x``, or ``score`` does not return shape ``(B,)``.
        TypeError: If an argument has the wrong type.

    References:
        W. Samek et al. Evaluating the visualization of what a deep neural network has learned. IEEE TNNLS
        28(11), 2017.

    Example:
        >>> w = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> perturbation_curve(lambda b: (b * w).sum(1), torch.ones(1, 4), w[None], steps=2)
        tensor([[10.,  3.,  0.]])
    """
    where = "perturbation_curve"
    if not callable(score):
        raise TypeError(f"{where}: score must be callable batch -> (B,) scores, got {type(score).__name__}")
    _check_x_relevance(where, x, relevance)
    return _curve(
        where, "score", lambda inputs, _: score(inputs), x, relevance, order=order, steps=steps, patch=patch,
        feature_dims=feature_dims, baseline=baseline, batch_size=batch_size,
    )


def area_under_curve(curve: Tensor) -> Tensor:
    """The area under perturbation curves by the trapezoid rule on ``[0, 1]``.

    Definition:
        For a curve with ``steps + 1`` points at ``k / steps``::

            AUC = (1 / steps) * sum_{k=0}^{steps-1} (curve_k + curve_{k+1}) / 2

    Args:
        curve: ``(..., steps + 1)`` floating-point curves, e.g. ``(N, steps + 1)`` from
            :func:`perturbation_curve`; at least two points.

    Returns:
        ``curve.shape[:-1]``, e.g. ``(N,)``.

    Raises:
        TypeError: If ``curve`` is not a floating-point tensor.
        ValueError: If ``curve`` has no dimension or fewer than two points.

    Example:
        >>> area_under_curve(torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]))
        tensor([0.5000, 1.0000])
    """
    if not isinstance(curve, Tensor) or not curve.is_floating_point():
        kind = f"dtype {curve.dtype}" if isinstance(curve, Tensor) else type(curve).__name__
        raise TypeError(f"area_under_curve: curve must be a floating-point tensor, got {kind}")
    if curve.ndim < 1 or curve.shape[-1] < 2:
        raise ValueError(
            f"area_under_curve: curve must have shape (..., steps + 1) with at least 2 points, got {tuple(curve.shape)}"
        )
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[-1] - 1), dim=-1)


def abpc(
    score: Score,
    x: Tensor,
    relevance: Tensor,
    *,
    steps: int = 16,
    patch: Patch = None,
    feature_dims: FeatureDims = None,
    baseline: float | Tensor = 0.0,
    batch_size: int | None = None,
) -> Tensor:
    """The area between the least- and the most-relevant-first perturbation curves, per sample.

    Definition:
        ``ABPC = AUC(perturbation_curve(order="least")) - AUC(perturbation_curve(order="most"))``, with the
        AUC of :func:`area_under_curve`. Higher is more faithful: the score falls fast when the most
        relevant features go, and slowly when the least relevant go. Negating the relevance negates the
        ABPC when no two features tie.

    Args:
        score, x, relevance, steps, patch, feature_dims, baseline, batch_size: As for
            :func:`perturbation_curve`.

    Returns:
        ``(N,)``: the ABPC of each sample.

    Raises:
        ValueError, TypeError: As :func:`perturbation_curve`.

    References:
        K. Schulz et al. Restricting the flow: information bottlenecks for attribution. ICLR 2020.
        S. Blücher et al. Decoupling pixel flipping and occlusion strategy for consistent XAI benchmarks.
        TMLR 2024.

    Example:
        >>> w = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> abpc(lambda b: (b * w).sum(1), torch.ones(1, 4), w[None], steps=4)
        tensor([2.5000])
    """
    options: dict[str, Any] = dict(
        steps=steps, patch=patch, feature_dims=feature_dims, baseline=baseline, batch_size=batch_size
    )
    least = perturbation_curve(score, x, relevance, order="least", **options)
    most = perturbation_curve(score, x, relevance, order="most", **options)
    return area_under_curve(least) - area_under_curve(most)


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """Perturbation curves and their areas, averaged over the samples of a dataset.

    Attributes:
        curve_most: ``(steps + 1,)`` the mean most-relevant-first curve.
        curve_least: ``(steps + 1,)`` the mean least-relevant-first curve.
        auc_most: The mean area under the most-relevant-first curves (lower is more faithful).
        auc_least: The mean area under the least-relevant-first curves (higher is more faithful).
        abpc: The mean ABPC, ``auc_least - auc_most`` (higher is more faithful).
        abpc_per_sample: ``(num_samples,)`` the ABPC of every sample, in the order of the data.
    """

    curve_most: Tensor
    curve_least: Tensor
    auc_most: float
    auc_least: float
    abpc: float
    abpc_per_sample: Tensor

    @property
    def num_samples(self) -> int:
        """The number of samples evaluated."""
        return self.abpc_per_sample.shape[0]


def _progress_bar(data: Iterable[Any], progress: bool) -> Any:
    """A tqdm bar over ``data`` when asked for and tqdm is importable, else ``None``; imports tqdm lazily."""
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(data, desc="evaluate_dataset", unit="batch")


def _checked_batch(where: str, index: int, batch: Any) -> tuple[Tensor, Tensor]:
    """``batch`` as ``(x, target)``: two tensors with the same first dim."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"{where}: batch {index} must be a pair (x, target), got {type(batch).__name__}")
    x, target = batch
    if not (isinstance(x, Tensor) and isinstance(target, Tensor) and x.ndim and target.ndim and len(x) == len(target)):
        described = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (x, target)]
        raise ValueError(
            f"{where}: batch {index} must be a pair of tensors (x, target) with the same first dim, "
            f"got x {described[0]}, target {described[1]}"
        )
    return x, target


def evaluate_dataset(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    attribution_fn: Callable[[Tensor, Tensor], Tensor],
    data: Iterable[tuple[Tensor, Tensor]],
    *,
    progress: bool = True,
    steps: int = 16,
    patch: Patch = None,
    feature_dims: FeatureDims = None,
    baseline: float | Tensor = 0.0,
    batch_size: int | None = None,
) -> EvaluationResult:
    """Most- and least-relevant-first perturbation curves and ABPC of an attribution method over a dataset.

    Definition:
        For every batch ``(x, target)`` of ``data``: ``relevance = attribution_fn(x, target)`` (called as is,
        gradients allowed), then the curves of :func:`perturbation_curve` in both orders with the score
        ``score_fn(inputs, target[sample])``, where ``sample`` is the index in ``x`` of each perturbed input
        (the target repeated for each of its ``steps + 1`` copies). The curves, areas and ABPC are averaged
        over all samples (not over batches).

    Args:
        score_fn: ``(inputs (B, ...), target (B, ...)) -> (B,)`` scores, e.g.
            ``lambda b, t: model(b).gather(1, t[:, None])[:, 0]`` for the logit of class ``t``.
        attribution_fn: ``(x, target) -> relevance`` of ``x``'s shape, e.g.
            ``lambda x, t: fn(params, x, one_hot(t, 10).to(x))[1]`` with ``fn = lrpfunc.attribute(...)``.
        data: An iterable of ``(x, target)`` batches; ``target`` is a tensor whose first dim is the batch
            (class indices, one-hot rows, anything ``score_fn`` understands). A ``DataLoader`` works.
        progress: Show a ``tqdm`` progress bar (per batch, with the running mean ABPC) when tqdm is
            installed; without tqdm there is silently no bar. ``False`` never imports tqdm.
        steps, patch, feature_dims, baseline, batch_size: As for :func:`perturbation_curve`; ``baseline``
            must be broadcastable to every batch.

    Returns:
        An :class:`EvaluationResult`; its tensors are on the device of the scores.

    Raises:
        ValueError: If ``data`` yields no batch, a batch is not a pair of tensors with the same first dim,
            ``attribution_fn`` returns a tensor of another shape, or as :func:`perturbation_curve` (naming
            ``score_fn``).
        TypeError: If an argument has the wrong type.

    Example:
        >>> w = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> data = [(torch.ones(2, 4), torch.zeros(2)), (torch.ones(1, 4), torch.zeros(1))]
        >>> result = evaluate_dataset(lambda b, t: (b * w).sum(1), lambda x, t: x * w, data, steps=4,
        ...                           progress=False)
        >>> result.abpc, result.curve_most.tolist()
        (2.5, [10.0, 6.0, 3.0, 1.0, 0.0])
    """
    where = "evaluate_dataset"
    for label, fn in (("score_fn", score_fn), ("attribution_fn", attribution_fn)):
        if not callable(fn):
            raise TypeError(f"{where}: {label} must be callable, got {type(fn).__name__}")
    steps, batch_size = _check_options(where, steps, batch_size)
    options: dict[str, Any] = dict(
        steps=steps, patch=patch, feature_dims=feature_dims, baseline=baseline, batch_size=batch_size
    )
    curves: dict[str, list[Tensor]] = {order: [] for order in _ORDERS}
    samples_seen, abpc_sum = 0, 0.0
    bar = _progress_bar(data, progress)
    try:
        for index, batch in enumerate(data if bar is None else bar):
            x, target = _checked_batch(where, index, batch)
            relevance = attribution_fn(x, target)
            _check_x_relevance(f"{where} (batch {index})", x, relevance, "attribution_fn(x, target)")

            def score_at(inputs: Tensor, sample: Tensor, target: Tensor = target) -> Tensor:
                return score_fn(inputs, target[sample.to(target.device)])

            for order in _ORDERS:
                curves[order].append(_curve(where, "score_fn", score_at, x, relevance, order=order, **options))
            if bar is not None:
                batch_abpc = area_under_curve(curves["least"][-1]) - area_under_curve(curves["most"][-1])
                samples_seen, abpc_sum = samples_seen + len(x), abpc_sum + float(batch_abpc.sum())
                bar.set_postfix(abpc=f"{abpc_sum / samples_seen:.4g}")
    finally:
        if bar is not None:
            bar.close()
    if not curves["most"]:
        raise ValueError(f"{where}: data yielded no batches")
    most, least = torch.cat(curves["most"]), torch.cat(curves["least"])
    auc_most, auc_least = area_under_curve(most), area_under_curve(least)
    per_sample = auc_least - auc_most
    return EvaluationResult(
        curve_most=most.mean(0),
        curve_least=least.mean(0),
        auc_most=float(auc_most.mean()),
        auc_least=float(auc_least.mean()),
        abpc=float(per_sample.mean()),
        abpc_per_sample=per_sample,
    )
