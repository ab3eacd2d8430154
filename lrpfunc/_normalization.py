"""Normalisations with their statistics held at recorded values (the LRP treatment of normalisation).

Each function takes the *recorded* input of the normalisation first, then the arguments of the torch function it
stands for. The divisor (standard deviation, root mean square, norm) is computed from the recorded input, so it is
a constant for the rule's local Jacobian, while the centring (``x - mean(x)``) and the affine scale and shift
act on the given input: the result is affine in the input, and at the recorded input it equals the original.
Computed at the caller's level, the held divisor still depends on the model's input through the recorded forward
pass, so outer derivatives of an attribution are exact.

References:
    Ali et al. (2022), XAI for Transformers: Better Explanations through Conservative Propagation, ICML.
    Achtibat et al. (2024), AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers, ICML.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["HELD"]


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _variance(x: Tensor, dims: int | tuple[int, ...]) -> Tensor:
    """The biased variance over ``dims``; zeros of the reduced shape for an empty ``x`` (an empty batch), where
    ``Tensor.var`` warns."""
    if x.numel() == 0:
        return x.sum(dims, keepdim=True)
    return x.var(dims, unbiased=False, keepdim=True)


def layer_norm(recorded: Tensor, input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,  # noqa: A002
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    std = (_variance(recorded, dims) + eps).sqrt()
    y = (input - input.mean(dims, keepdim=True)) / std
    return _affine(y, weight, bias, tuple(normalized_shape))


def rms_norm(recorded: Tensor, input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,  # noqa: A002
             eps: float | None = None) -> Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(recorded.dtype).eps if eps is None else eps
    rms = (recorded.square().mean(dims, keepdim=True) + eps).sqrt()
    return _affine(input / rms, weight, None, tuple(normalized_shape))


def group_norm(recorded: Tensor, input: Tensor, num_groups: int, weight: Tensor | None = None,  # noqa: A002
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    n, c = input.shape[:2]
    per_group = math.prod(input.shape[1:]) // num_groups  # not -1: it cannot be inferred for an empty batch
    grouped = input.reshape(n, num_groups, per_group)
    std = (_variance(recorded.reshape(n, num_groups, per_group), -1) + eps).sqrt()
    y = ((grouped - grouped.mean(-1, keepdim=True)) / std).reshape(input.shape)
    return _affine(y, weight, bias, (1, c) + (1,) * (input.ndim - 2))


def batch_norm(recorded: Tensor, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,  # noqa: A002
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5) -> Tensor:
    shape = (1, input.shape[1]) + (1,) * (input.ndim - 2)
    if not training and running_mean is not None and running_var is not None:
        y = (input - running_mean.reshape(shape)) / (running_var.reshape(shape) + eps).sqrt()
    else:
        dims = (0,) + tuple(range(2, input.ndim))
        std = (_variance(recorded, dims) + eps).sqrt()
        y = (input - input.mean(dims, keepdim=True)) / std
    return _affine(y, weight, bias, shape)


def instance_norm(recorded: Tensor, input: Tensor, running_mean: Tensor | None = None,  # noqa: A002
                  running_var: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
                  use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    shape = (1, input.shape[1]) + (1,) * (input.ndim - 2)
    if not use_input_stats and running_mean is not None and running_var is not None:
        y = (input - running_mean.reshape(shape)) / (running_var.reshape(shape) + eps).sqrt()
    else:
        dims = tuple(range(2, input.ndim))
        std = (_variance(recorded, dims) + eps).sqrt()
        y = (input - input.mean(dims, keepdim=True)) / std
    return _affine(y, weight, bias, shape)


def normalize(recorded: Tensor, input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12,  # noqa: A002
              out: Any = None) -> Tensor:
    return input / recorded.norm(p, dim, keepdim=True).clamp_min(eps)


#: The held version of each normalisation function the tracer may record (keyed by the function it ran).
HELD: dict[Callable[..., Any], Callable[..., Tensor]] = {
    F.layer_norm: layer_norm,
    torch.layer_norm: layer_norm,
    F.group_norm: group_norm,
    torch.group_norm: group_norm,
    F.batch_norm: batch_norm,
    torch.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
    torch.instance_norm: instance_norm,
    F.normalize: normalize,
}
if hasattr(F, "rms_norm"):
    HELD[F.rms_norm] = rms_norm
if hasattr(torch, "rms_norm"):
    HELD[torch.rms_norm] = rms_norm
