"""Canonizers: pure rewrites of the recorded function, never of the user's module.

A canonizer acts on lrpfunc's own record of one forward pass:

* ``replace_op(func)``: called for every torch function the forward pass runs; return a replacement function to
  run (and record) instead, or ``None`` to keep it. Canonizers are applied in order: each one is offered what the
  ones before it returned, so ``[softplus(10), another]`` lets ``another`` see (and replace) the softplus. This
  changes the forward pass on purpose (:func:`softplus` replaces ReLU by softplus).
* ``merges_batchnorm``: fold each eval-mode BatchNorm into the Linear/Conv call right before it
  (:func:`merge_batchnorm`); the merged parameters are differentiable functions of the original ones.
* ``labels_sums``: label sums of two same-shaped activations :class:`lrpfunc.types.Sum`, as Zennit's
  ``ResNetCanonizer`` does (:func:`resnet`). The LRP composites give every sum of activations the sum rule by its
  operation class anyway (:class:`lrpfunc.ops.Sum`); the label is for composites that match it.
* ``rewrite(trace)``: called once after each forward pass with the private record of that pass, to inspect it.

Writing your own: subclass :class:`Canonizer` as a frozen dataclass and override ``replace_op``::

    @dataclasses.dataclass(frozen=True)
    class TanhAsHardtanh(lrpfunc.canonizers.Canonizer):
        def replace_op(self, func):
            if func in (torch.tanh, torch.Tensor.tanh, torch.nn.functional.tanh):
                return lambda x, *args, **kwargs: torch.nn.functional.hardtanh(x)
            return None

The record's parameters are the caller's parameters, so merged parameters are differentiable functions of the
original ones: gradients w.r.t. ``params`` reach the original convolution and BatchNorm tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ._lazy import LazyParams

Tensor = torch.Tensor

__all__ = ["Canonizer", "merge_batchnorm", "resnet", "softplus", "MergeBatchNorm", "ResNet", "Softplus"]


class Canonizer:
    """Base class of canonizers; by default a canonizer changes nothing."""

    #: Fold eval-mode BatchNorm into the layer before it while tracing.
    merges_batchnorm: bool = False
    #: Label sums of two same-shaped activations :class:`lrpfunc.types.Sum`.
    labels_sums: bool = False

    def replace_op(self, func: Callable[..., Any]) -> Callable[..., Any] | None:
        """A function to run instead of ``func`` (same arguments), or ``None`` to keep ``func``."""
        return None

    def rewrite(self, trace: Any) -> None:
        """Called with the record of each forward pass (it belongs to that call only); for inspection."""
        return None


def _scale_weight(layer: torch.nn.Module, weight: Tensor, scale: Tensor) -> Tensor:
    """``weight`` with each output channel multiplied by ``scale`` (transposed convolutions keep their output
    channels in dimension 1, per group)."""
    if isinstance(layer, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
        groups = layer.groups
        inputs, per_group = weight.shape[0], weight.shape[1]
        kernel = weight.shape[2:]
        grouped = weight.reshape(groups, inputs // groups, per_group, *kernel)
        factor = scale.reshape(groups, 1, per_group, *([1] * len(kernel)))
        return (grouped * factor).reshape(weight.shape)
    return weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))


def merged_layer(
    layer: torch.nn.Module,
    weight: Tensor | None,
    bias: Tensor | None,
    statistics: Mapping[str, Tensor | None],
    eps: float,
    nodes: Sequence[Any],
    inputs: Sequence[int],
    layer_output: int,
    recorded: Mapping[int, Tensor],
    param_vids: Mapping[str, int],
) -> tuple[LazyParams, Callable[..., tuple[Tensor, ...]], Callable[[], Tensor]]:
    """Merged parameters of ``layer`` followed by a BatchNorm, the forward of the merged call, and the BatchNorm's
    scale per output channel (``g / sqrt(v + eps)``; the pullback of the merged call needs only that).

    Definition:
        For ``y = BN(W x + b)`` with running mean ``mu``, variance ``v``, ``eps``, scale ``g`` and shift ``beta``:
        ``W' = W * g / sqrt(v + eps)`` (per output channel) and ``b' = (b - mu) * g / sqrt(v + eps) + beta``.
    """
    if weight is None:
        raise ValueError(f"merge_batchnorm: {type(layer).__name__} has no weight to fold a BatchNorm into")

    def channel_scale() -> Tensor:
        var = statistics["running_var"]
        assert var is not None
        scale = (var + eps) ** -0.5
        return scale if statistics["weight"] is None else statistics["weight"] * scale

    def merged(name: str) -> Tensor:
        scale = channel_scale()
        if name == "weight":
            return _scale_weight(layer, weight, scale)
        mean = statistics["running_mean"]
        assert mean is not None
        merged_bias = (-mean if bias is None else bias - mean) * scale
        if statistics["bias"] is not None:
            merged_bias = merged_bias + statistics["bias"]
        return merged_bias

    layer_nodes, layer_inputs = tuple(nodes), tuple(inputs)
    weight_vid, bias_vid = param_vids.get("weight"), param_vids.get("bias")

    def forward(values: tuple[Tensor, ...], params: Mapping[str, Tensor],
                hold_statistics: bool = False) -> tuple[Tensor, ...]:
        env: dict[int, Tensor] = dict(zip(layer_inputs, values))
        if weight_vid is not None:
            env[weight_vid] = params["weight"]
        if bias_vid is not None:
            env[bias_vid] = params["bias"]
        for node in layer_nodes:
            node.bind(node.replay(env, recorded), env)
        output = env[layer_output]
        if bias_vid is None:
            output = output + params["bias"].reshape(-1, *([1] * (output.ndim - 2)))
        return (output,)

    return LazyParams(("weight", "bias"), merged, cache=False), forward, channel_scale


@dataclass(frozen=True)
class MergeBatchNorm(Canonizer):
    """See :func:`merge_batchnorm`."""

    merges_batchnorm = True


def merge_batchnorm() -> MergeBatchNorm:
    """Fold each eval-mode BatchNorm into the Linear/Conv/ConvTranspose call right before it in execution order.

    Definition:
        For ``y = BN(W x + b)`` with running mean ``mu``, variance ``v``, ``eps``, scale ``g`` and shift ``beta``:
        ``W' = W * g / sqrt(v + eps)`` (per output channel) and ``b' = (b - mu) * g / sqrt(v + eps) + beta``.
        The rule of the layer then sees ``W'``, ``b'`` and the BatchNorm's output; the BatchNorm is no call site
        of its own. The forward output is the model's own (unchanged), and ``W'``, ``b'`` are differentiable
        functions of the original parameters.

    A BatchNorm is merged when its input is the single output of a Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d
    call and nothing else reads that output. Buffers-only BatchNorms (torchvision's ``FrozenBatchNorm2d``, found
    by :data:`lrpfunc.types.FrozenBatchNorm`) are merged from their buffers.

    Raises:
        ValueError: At attribution time, for a BatchNorm in training mode that would be merged.
    """
    return MergeBatchNorm()


@dataclass(frozen=True)
class ResNet(Canonizer):
    """See :func:`resnet`."""

    merges_batchnorm = True
    labels_sums = True


def resnet() -> ResNet:
    """ResNet canonizer: :func:`merge_batchnorm`, and every sum of two activations of the same shape (the residual
    ``out += identity``) labelled :class:`lrpfunc.types.Sum`, which the LRP composites propagate with
    :func:`lrpfunc.rules.norm`: ``R_a = a R / s(a + b)``, ``R_b = b R / s(a + b)``. This matches Zennit's
    ``ResNetCanonizer`` on torchvision-layout blocks, without importing torchvision. The LRP composites give every
    sum of activations this rule by its operation class even without the canonizer.
    """
    return ResNet()


_RELUS: frozenset[Any] = frozenset({F.relu, torch.relu, Tensor.relu, torch.nn.functional.relu})


@dataclass(frozen=True)
class Softplus(Canonizer):
    """See :func:`softplus`."""

    beta: float = 10.0

    def replace_op(self, func: Callable[..., Any]) -> Callable[..., Any] | None:
        if func in _RELUS:
            beta = self.beta

            def softplus_instead(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # noqa: A002
                return F.softplus(input, beta=beta)

            return softplus_instead
        return None


def softplus(beta: float = 10.0) -> Softplus:
    """Compute every ReLU as ``softplus(x; beta) = log(1 + exp(beta x)) / beta``.

    This changes the model's output on purpose: second derivatives through ReLU are zero almost
    everywhere, through softplus they are not (Dombrowski et al. 2019, Explanations can be manipulated and
    geometry is to blame, NeurIPS). ``beta = 10`` keeps the output close to the ReLU model's.
    """
    if not beta > 0:
        raise ValueError(f"softplus: beta must be positive, got {beta}")
    return Softplus(float(beta))
