"""Canonizers: pure rewrites of the recorded function, never of the user's module.

A canonizer has two optional parts, both of which see only lrpfunc's own per-call record:

* ``replace_op(func)``: called for every torch function the forward pass runs; return a replacement
  function to run (and record) instead, or ``None`` to keep it. This changes the forward pass on purpose
  (:func:`softplus` replaces ReLU by softplus).
* ``rewrite(record)``: called once after the forward pass to restructure the record without changing
  its output: fold one call into another (:func:`merge_batchnorm`) or label operations so that
  composites can give them rules (:func:`resnet` labels residual sums :class:`lrpfunc.types.Sum`).

Writing your own: subclass :class:`Canonizer` as a frozen dataclass and override ``replace_op``::

    @dataclasses.dataclass(frozen=True)
    class TanhAsHardtanh(lrpfunc.canonizers.Canonizer):
        def replace_op(self, func):
            if func in (torch.tanh, torch.Tensor.tanh, torch.nn.functional.tanh):
                return lambda x, *args, **kwargs: torch.nn.functional.hardtanh(x)
            return None

The record's parameters are the caller's parameters, so merged parameters are differentiable functions
of the original ones: gradients w.r.t. ``params`` reach the original convolution and BatchNorm tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optree
import torch
import torch.nn.functional as F

from . import types as _types
from ._record import LazyParams, OpNode, Record, Ref, Span

Tensor = torch.Tensor

__all__ = ["Canonizer", "merge_batchnorm", "resnet", "softplus", "MergeBatchNorm", "ResNet", "Softplus"]


class Canonizer:
    """Base class of canonizers; both methods do nothing by default."""

    def replace_op(self, func: Callable[..., Any]) -> Callable[..., Any] | None:
        """A function to run instead of ``func`` (same arguments), or ``None`` to keep ``func``."""
        return None

    def rewrite(self, record: Record) -> None:
        """Restructure the ``record`` of one forward pass in place (it belongs to this call only)."""
        return None


def _arguments(record: Record, node: OpNode) -> tuple[tuple[Any, ...], dict[str, Any]]:
    leaves = [record.tensors[leaf.vid] if type(leaf) is Ref else leaf for leaf in node.leaves]
    return optree.tree_unflatten(node.spec, leaves)


_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)
_MERGEABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _producer(record: Record, vid: int) -> Span | None:
    """The innermost live Linear/Conv call whose single output is ``vid`` and whose last operation made it."""
    for span in reversed(record.spans):
        if (
            not span.removed
            and isinstance(span.module, _MERGEABLE)
            and span.outputs == (vid,)
            and span.nodes
            and vid in record.nodes[span.nodes[-1]].outputs
        ):
            return span
    return None


def _replay_fixed(record: Record, span: Span) -> Callable[[tuple[Tensor, ...], Mapping[str, Tensor]], Tensor]:
    """Replay of ``span`` as it is now (before it is merged), returning its single output."""
    nodes = [record.nodes[i] for i in span.nodes]
    inputs, params, (output,) = span.inputs, dict(span.params), span.outputs
    tensors = record.tensors  # not the record: span.forward must not close a reference cycle through it

    def forward(values: tuple[Tensor, ...], new_params: Mapping[str, Tensor]) -> Tensor:
        env: dict[int, Tensor] = dict(zip(inputs, values))
        for local, value in new_params.items():
            if local in params:
                env[params[local]] = value
        for node in nodes:
            node.bind_outputs(node.replay(env, tensors), env)
        return env[output]

    return forward


@dataclass(frozen=True)
class MergeBatchNorm(Canonizer):
    """See :func:`merge_batchnorm`."""

    def rewrite(self, record: Record) -> None:
        consumers = record.consumers()
        for bn in record.spans:
            if bn.removed or not isinstance(bn.module, _types.BatchNorm):
                continue
            # the batch_norm call; training mode also runs a static num_batches_tracked update
            active = [index for index in bn.nodes if record.nodes[index].pullback is not None]
            if len(active) != 1 or len(bn.inputs) != 1 or len(bn.outputs) != 1:
                continue
            node = record.nodes[active[0]]
            if node.func is not F.batch_norm:
                continue
            args, kwargs = _arguments(record, node)
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            (vid,) = bn.inputs
            layer = _producer(record, vid)
            if layer is None or consumers.get(vid) != active:
                continue
            if arguments["training"]:
                raise ValueError(
                    f"merge_batchnorm: {type(bn.module).__name__} '{bn.name}' runs in training mode (batch "
                    f"statistics), which cannot be folded into '{layer.name}'. Call model.eval() first, or "
                    f"attribute without merge_batchnorm."
                )
            self._merge(record, layer, bn, arguments)

    @staticmethod
    def _merge(record: Record, layer: Span, bn: Span, arguments: Mapping[str, Any]) -> None:
        weight = record.tensors[layer.params["weight"]]
        bias = record.tensors[layer.params["bias"]] if "bias" in layer.params else None

        def merged() -> dict[str, Tensor]:
            mean, var, eps = arguments["running_mean"], arguments["running_var"], arguments["eps"]
            scale = (var + eps) ** -0.5
            if arguments["weight"] is not None:
                scale = arguments["weight"] * scale
            merged_bias = (-mean if bias is None else bias - mean) * scale
            if arguments["bias"] is not None:
                merged_bias = merged_bias + arguments["bias"]
            return {"weight": weight * scale.reshape(-1, *([1] * (weight.ndim - 1))), "bias": merged_bias}

        original = _replay_fixed(record, layer)
        has_bias = bias is not None

        def forward(inputs: tuple[Tensor, ...], params: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
            if has_bias:
                return (original(inputs, {"weight": params["weight"], "bias": params["bias"]}),)
            output = original(inputs, {"weight": params["weight"]})
            channel_bias = params["bias"]
            if output.ndim > 2:
                channel_bias = channel_bias.reshape(-1, *([1] * (output.ndim - 2)))
            return (output + channel_bias,)

        layer.nodes = layer.nodes + bn.nodes
        layer.outputs = bn.outputs
        layer.forward = forward
        bn.removed = True
        for index in bn.nodes:
            node = record.nodes[index]
            node.spans = tuple(layer.sid if sid == bn.sid else sid for sid in node.spans)
        record.params_override[layer.sid] = LazyParams(("weight", "bias"), merged)


def merge_batchnorm() -> MergeBatchNorm:
    """Fold each eval-mode BatchNorm into the Linear/Conv call right before it in execution order.

    Definition:
        For ``y = BN(W x + b)`` with running mean ``mu``, variance ``v``, ``eps``, scale ``g`` and shift ``beta``:
        ``W' = W * g / sqrt(v + eps)`` (per output channel) and ``b' = (b - mu) * g / sqrt(v + eps) + beta``.
        The rule of the layer then sees ``W'``, ``b'`` and the BatchNorm's output; the BatchNorm is no call
        site of its own. The forward output is the model's own (unchanged), and ``W'``, ``b'`` are
        differentiable functions of the original parameters.

    A BatchNorm is merged when its input is the single output of a Linear or Conv1d/2d/3d call and nothing
    else reads that output.

    Raises:
        ValueError: At attribution time, for a BatchNorm in training mode that would be merged.
    """
    return MergeBatchNorm()


_ADD_FUNCS = {"add"}


@dataclass(frozen=True)
class ResNet(Canonizer):
    """See :func:`resnet`."""

    def rewrite(self, record: Record) -> None:
        MergeBatchNorm().rewrite(record)
        for node in record.nodes:
            if node.name in _ADD_FUNCS and len(node.inputs) == 2 and len(node.outputs) == 1:
                first, second = (record.tensors[vid] for vid in node.inputs)
                alpha = _arguments(record, node)[1].get("alpha", 1)
                if first.shape == second.shape and alpha == 1:
                    node.label = _types.Sum


def resnet() -> ResNet:
    """ResNet canonizer: :func:`merge_batchnorm`, and every sum of two activations of the same shape (the
    residual ``out += identity``) labelled :class:`lrpfunc.types.Sum`, which the LRP composites propagate
    with :func:`lrpfunc.rules.norm`: ``R_a = a R / s(a + b)``, ``R_b = b R / s(a + b)``. This matches Zennit's
    ``ResNetCanonizer`` on torchvision-layout blocks, without importing torchvision.
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
