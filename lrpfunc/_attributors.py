"""Attributors: Integrated Gradients, SmoothGrad and Occlusion as pure functions.

Each factory returns ``fn(params, x, grad_output) -> (output, attribution)``, the signature of
:func:`lrpfunc.attribute`. Integrated Gradients and SmoothGrad average the (optionally modified, i.e. LRP)
gradient of :func:`lrpfunc.attribute` over several inputs; Occlusion needs no gradient at all. The
semantics follow Zennit 0.5.1's attributors (``zennit.attribution``); everything is ordinary torch code
without in-place updates of the arguments, so ``torch.func.grad``, ``vmap`` and ``jacrev`` compose with
the returned functions.

Convention: the first dimension of ``x`` is the batch dimension (SmoothGrad's noise scale and
Occlusion's windows are per sample over the other dimensions).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import optree
import torch

from ._attribute import attribute
from ._checks import check_grad_output, check_params, check_setup
from ._composite import Composite
from ._functionalize import evaluate
from ._model import ModelInfo
from .canonizers import Canonizer

Tensor = torch.Tensor

__all__ = ["integrated_gradients", "smooth_grad", "occlusion"]

AttributionFn = Callable[[Mapping[str, Tensor], Tensor, Any], tuple[Any, Tensor]]
Baseline = Tensor | float | int | Callable[[Tensor], Tensor] | None


def _positive_int(where: str, label: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {label} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{where}: {label} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_x(where: str, x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a tensor with a leading batch dimension, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{where}: x must have a leading batch dimension, got a 0-dimensional tensor")


def _check_chunk_size(where: str, chunk_size: Any) -> int | None:
    return None if chunk_size is None else _positive_int(where, "chunk_size", chunk_size)


def _over_points(
    fn: AttributionFn, vectorize: bool, chunk_size: int | None
) -> Callable[[Mapping[str, Tensor], Tensor, Any], tuple[Any, Tensor]]:
    """``fn`` evaluated at each of a stack of inputs ``points`` (leading dimension), with one
    ``grad_output``; returns the stacked outputs and attributions."""
    if vectorize:
        return torch.func.vmap(fn, in_dims=(None, 0, None), chunk_size=chunk_size)

    def looped(params: Mapping[str, Tensor], points: Tensor, grad_output: Any) -> tuple[Any, Tensor]:
        results = [fn(params, point, grad_output) for point in points.unbind(0)]
        outputs = optree.tree_map(lambda *leaves: torch.stack(leaves), *(r[0] for r in results), none_is_leaf=True)
        return outputs, torch.stack([r[1] for r in results])

    return looped


def _last(tree: Any) -> Any:
    return optree.tree_map(lambda leaf: leaf[-1], tree, none_is_leaf=True)


def _check_baseline_type(where: str, baseline: Baseline) -> None:
    if isinstance(baseline, bool) or not (
        baseline is None or callable(baseline) or isinstance(baseline, (numbers.Real, Tensor))
    ):
        raise TypeError(
            f"{where}: baseline must be None (zeros), a number, a tensor broadcastable to x or a function "
            f"x -> tensor, got {type(baseline).__name__}"
        )


def _baseline(where: str, baseline: Baseline, x: Tensor) -> Tensor:
    """``baseline`` (checked by :func:`_check_baseline_type`) as a tensor of ``x``'s shape."""
    if baseline is None:
        return torch.zeros_like(x)
    if callable(baseline) and not isinstance(baseline, Tensor):
        value = baseline(x)
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: baseline(x) must return a tensor, got {type(value).__name__}")
    else:
        value = baseline if isinstance(baseline, Tensor) else torch.tensor(float(baseline), dtype=x.dtype)
    try:
        shape = torch.broadcast_shapes(value.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"{where}: baseline must be broadcastable to x's shape {tuple(x.shape)}, got shape {tuple(value.shape)}"
        )
    return value.to(dtype=x.dtype, device=x.device).expand_as(x)


def integrated_gradients(
    model: torch.nn.Module,
    composite: Composite | None = None,
    canonizers: Sequence[Canonizer] | Canonizer = (),
    *,
    n_iter: int = 20,
    baseline: Baseline = None,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> AttributionFn:
    """Integrated Gradients (of the modified gradient when a composite is given), as Zennit computes it.

    Definition:
        With ``b`` the baseline and ``alpha_k = k / n_iter`` for ``k = 1 .. n_iter`` (the right Riemann sum)::

            attribution = mean_k( g(b + alpha_k (x - b)) ) * (x - b)

        where ``g(z)`` is the relevance of ``lrpfunc.attribute(model, composite, canonizers)`` at input ``z``
        with the same ``grad_output`` (the plain gradient ``vjp(model)(grad_output)`` without composite).
        ``output`` is ``model(x)``: the last path point is ``x`` itself.

    Args:
        model, composite, canonizers: As for :func:`lrpfunc.attribute`.
        n_iter: Number of path points, ``>= 1``.
        baseline: ``None`` (zeros, Zennit's default), a number, a tensor broadcastable to ``x``, or a
            function ``x -> baseline``.
        vectorize: Evaluate the path points in one ``torch.func.vmap`` call (default); ``False`` loops
            over them (for models that do not support ``vmap``).
        chunk_size: Passed to ``torch.func.vmap`` to bound memory (at most this many points at once).

    Returns:
        ``fn(params, x, grad_output) -> (output, attribution)``; ``x`` is a floating-point tensor,
        ``attribution`` has its shape.

    References:
        Sundararajan et al. (2017), Axiomatic attribution for deep networks, ICML.

    Example:
        >>> fn = integrated_gradients(model, composites.epsilon_plus(), n_iter=16)
        >>> output, attribution = fn(dict(model.named_parameters()), x, torch.eye(10)[labels])
    """
    where = f"integrated_gradients({type(model).__name__})"
    canonizers = check_setup(where, model, composite, canonizers)
    n_iter = _positive_int(where, "n_iter", n_iter)
    chunk_size = _check_chunk_size(where, chunk_size)
    _check_baseline_type(where, baseline)
    gradient = _over_points(attribute(model, composite, canonizers), vectorize, chunk_size)

    def attribution(params: Mapping[str, Tensor], x: Tensor, grad_output: Any) -> tuple[Any, Tensor]:
        _check_x(where, x)
        base = _baseline(where, baseline, x)
        difference = x - base
        alphas = torch.arange(1, n_iter, dtype=x.dtype, device=x.device) / n_iter
        steps = base + alphas.reshape(-1, *([1] * x.ndim)) * difference
        points = torch.cat([steps, x.unsqueeze(0)])  # alpha = 1 is x itself, exactly
        outputs, gradients = gradient(params, points, grad_output)
        return _last(outputs), gradients.mean(0) * difference

    return attribution


def smooth_grad(
    model: torch.nn.Module,
    composite: Composite | None = None,
    canonizers: Sequence[Canonizer] | Canonizer = (),
    *,
    noise_level: float = 0.1,
    n_iter: int = 20,
    generator: torch.Generator | int | None = None,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> AttributionFn:
    """SmoothGrad (of the modified gradient when a composite is given), as Zennit computes it.

    Definition:
        Per sample ``i`` (dimension 0 of ``x``), ``sigma_i = noise_level * (max x_i - min x_i)`` over all
        other dimensions. With ``eps_1 .. eps_{n_iter - 1}`` drawn from ``N(0, sigma_i^2)`` elementwise and
        ``eps_{n_iter} = 0`` (as Zennit: ``n_iter = 1`` is the plain attribution)::

            attribution = mean_k g(x + eps_k)

        where ``g`` is the relevance of ``lrpfunc.attribute(model, composite, canonizers)`` with the same
        ``grad_output``. ``output`` is ``model(x)``. ``noise_level = 0`` returns exactly the plain attribution
        (computed once). The noise is a fixed sample: ``sigma`` is not differentiated.

    Args:
        model, composite, canonizers: As for :func:`lrpfunc.attribute`.
        noise_level: ``sigma / (x_max - x_min)``, ``>= 0``.
        n_iter: Number of inputs averaged, ``>= 1``.
        generator: A ``torch.Generator`` (each call draws from it and advances it), an ``int`` seed (each
            call uses a fresh generator with that seed, so the function is deterministic), or ``None`` for
            torch's global random state. Under ``torch.func.vmap`` pass ``randomness='different'`` or
            ``'same'`` to ``vmap``.
        vectorize, chunk_size: As for :func:`integrated_gradients`.

    Returns:
        ``fn(params, x, grad_output) -> (output, attribution)``.

    References:
        Smilkov et al. (2017), SmoothGrad: removing noise by adding noise, arXiv:1706.03825.
    """
    where = f"smooth_grad({type(model).__name__})"
    canonizers = check_setup(where, model, composite, canonizers)
    n_iter = _positive_int(where, "n_iter", n_iter)
    chunk_size = _check_chunk_size(where, chunk_size)
    if isinstance(noise_level, bool) or not isinstance(noise_level, numbers.Real):
        raise TypeError(f"{where}: noise_level must be a real number >= 0, got {type(noise_level).__name__}")
    if not (math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(f"{where}: noise_level must be a finite number >= 0, got {noise_level}")
    noise_level = float(noise_level)
    if not (generator is None or isinstance(generator, torch.Generator)) and (
        isinstance(generator, bool) or not isinstance(generator, numbers.Integral)
    ):
        raise TypeError(
            f"{where}: generator must be None, a torch.Generator or an int seed, got {type(generator).__name__}"
        )
    plain = attribute(model, composite, canonizers)
    gradient = _over_points(plain, vectorize, chunk_size)

    def noise(x: Tensor) -> Tensor:
        shape = (n_iter - 1, *x.shape)
        if generator is None:
            return torch.randn(shape, dtype=x.dtype, device=x.device)
        source = generator
        if not isinstance(source, torch.Generator):
            source = torch.Generator(device=x.device).manual_seed(int(generator))
        return torch.randn(shape, dtype=x.dtype, device=source.device, generator=source).to(x.device)

    def attribution(params: Mapping[str, Tensor], x: Tensor, grad_output: Any) -> tuple[Any, Tensor]:
        _check_x(where, x)
        if x.ndim < 2:
            raise ValueError(
                f"{where}: x must have a batch dimension and at least one more (the noise scale is the range "
                f"of each sample), got shape {tuple(x.shape)}"
            )
        if noise_level == 0 or n_iter == 1:
            return plain(params, x, grad_output)
        value = x.detach()
        dims = tuple(range(1, x.ndim))
        sigma = noise_level * (value.amax(dims, keepdim=True) - value.amin(dims, keepdim=True))
        points = torch.cat([x + noise(x) * sigma, x.unsqueeze(0)])  # the last point is x: output = model(x)
        outputs, gradients = gradient(params, points, grad_output)
        return _last(outputs), gradients.mean(0)

    return attribution


def _resolve(where: str, label: str, value: Any, sizes: tuple[int, ...], fill: tuple[int, ...]) -> tuple[int, ...]:
    """Per non-batch dimension sizes: an int for all (clipped to each size), or a tuple for the last dims
    (the leading ones take ``fill``)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, tuple, list)):
        raise TypeError(f"{where}: {label} must be a positive int or a tuple of positive ints, got {value!r}")
    if isinstance(value, numbers.Integral):
        return tuple(min(int(value), size) for size in sizes)
    value = tuple(value)
    if len(value) > len(sizes):
        raise ValueError(
            f"{where}: {label} {value} has {len(value)} entries but x has only {len(sizes)} non-batch "
            f"dimension(s) (shape {(None, *sizes)} without the batch size); the batch dimension is never occluded"
        )
    given = tuple(min(int(v), size) for v, size in zip(value, sizes[len(sizes) - len(value):]))
    return fill[: len(sizes) - len(value)] + given


def _check_window(where: str, label: str, value: Any) -> None:
    entries = (value,) if not isinstance(value, (tuple, list)) else tuple(value)
    if isinstance(value, (tuple, list)) and not entries:
        raise ValueError(f"{where}: {label} must not be an empty tuple")
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, numbers.Integral):
            raise TypeError(f"{where}: {label} must be a positive int or a tuple of positive ints, got {value!r}")
        if entry < 1:
            raise ValueError(f"{where}: {label} must be a positive int or a tuple of positive ints, got {value!r}")


def _default_occlusion(x: Tensor, mask: Tensor) -> Tensor:
    return x * mask


def _check_grad_output(where: str, output: Any, grad_output: Any, batch: int) -> list[Tensor]:
    """The leaves of ``grad_output``, checked against the model's output, which must keep x's batch size."""
    for out in optree.tree_leaves(output, none_is_leaf=True):
        if not isinstance(out, Tensor) or out.ndim < 1 or out.shape[0] != batch:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{where}: the model's output must keep x's batch dimension {batch}, got {got}")
    return check_grad_output(where, output, grad_output)


def _window_masks(x: Tensor, windows: tuple[int, ...], strides: tuple[int, ...]) -> Iterator[Tensor]:
    """One mask of ``x``'s shape and dtype per window position (1 inside, 0 outside), in Zennit's order:
    a window at offset ``o`` covers ``(o + arange(w)) % n`` in each non-batch dimension."""
    lines = []
    for size, width, step in zip(x.shape[1:], windows, strides):
        positions = torch.arange(size, device=x.device)
        lines.append([(((positions - offset) % size) < width).to(x.dtype) for offset in range(0, size, step)])
    ndim = len(lines)
    for combination in itertools.product(*lines):
        mask = combination[0].reshape(-1, *([1] * (ndim - 1)))
        for dim, line in enumerate(combination[1:], start=1):
            mask = mask * line.reshape(-1, *([1] * (ndim - 1 - dim)))
        yield mask.unsqueeze(0).expand_as(x)


def occlusion(
    model: torch.nn.Module,
    *,
    window: int | tuple[int, ...] = 8,
    stride: int | tuple[int, ...] = 8,
    occlusion_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> AttributionFn:
    """Occlusion analysis with Zennit's defaults: keep one window, occlude the rest, score the output.

    Definition:
        The windows slide over the non-batch dimensions of ``x``. A window of size ``w_d`` starts at the
        offsets ``0, s_d, 2 s_d, ...`` below the size ``n_d`` of each dimension ``d`` (stride ``s_d``) and wraps
        around at the end (as Zennit's ``roll``) when ``w_d`` does not fit. For each window with mask ``m``
        (1 inside, 0 outside, of ``x``'s shape and dtype)::

            score_i = sum over non-batch dims of model(occlusion_fn(x, m))_i * grad_output_i
            attribution += m * score_i

        ``occlusion_fn`` defaults to ``x * m``: everything outside the window is set to zero.
        ``output`` is ``model(x)``. The attribution is differentiable w.r.t. ``params`` and ``x``.

    Args:
        model: Any ``torch.nn.Module``; its parameters are substituted, never written.
        window: An int is the window size in every non-batch dimension, clipped to its size (so an
            image's channel dimension is covered whole); a tuple gives the sizes of the last
            ``len(window)`` dimensions, the others are covered whole.
        stride: As ``window``; dimensions a tuple leaves out take the window's size there.
        occlusion_fn: ``(x, mask) -> occluded x`` of ``x``'s shape.

    Returns:
        ``fn(params, x, grad_output) -> (output, attribution)``; ``grad_output`` has the structure and
        shapes of ``model(x)``.
    """
    where = f"occlusion({type(model).__name__})"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"occlusion: model must be a torch.nn.Module, got {type(model).__name__}")
    _check_window(where, "window", window)
    _check_window(where, "stride", stride)
    if occlusion_fn is None:
        occlusion_fn = _default_occlusion
    elif not callable(occlusion_fn):
        raise TypeError(
            f"{where}: occlusion_fn must be callable (x, mask) -> tensor, got {type(occlusion_fn).__name__}"
        )

    def attribution(params: Mapping[str, Tensor], x: Tensor, grad_output: Any) -> tuple[Any, Tensor]:
        info = ModelInfo(model)

        def run(params: Mapping[str, Tensor], x: Tensor) -> Any:
            return evaluate(model, params, x, info)

        check_params(where, info, model, params)
        _check_x(where, x)
        if x.ndim < 2:
            raise ValueError(
                f"{where}: x must have a batch dimension and at least one more, got shape {tuple(x.shape)}"
            )
        output = run(params, x)
        grad_leaves = _check_grad_output(where, output, grad_output, x.shape[0])
        sizes = tuple(x.shape[1:])
        windows = _resolve(where, "window", window, sizes, sizes)
        strides = _resolve(where, "stride", stride, sizes, windows)
        result = torch.zeros_like(x)
        for mask in _window_masks(x, windows, strides):
            occluded = occlusion_fn(x, mask)
            if not isinstance(occluded, Tensor) or occluded.shape != x.shape:
                got = tuple(occluded.shape) if isinstance(occluded, Tensor) else type(occluded).__name__
                raise ValueError(
                    f"{where}: occlusion_fn(x, mask) must return a tensor of x's shape {tuple(x.shape)}, got {got}"
                )
            scored = optree.tree_leaves(run(params, occluded), none_is_leaf=True)
            score = sum((out * grad).reshape(out.shape[0], -1).sum(1) for out, grad in zip(scored, grad_leaves))
            result = result + mask * score.reshape(-1, *([1] * len(sizes)))
        return output, result

    return attribution
