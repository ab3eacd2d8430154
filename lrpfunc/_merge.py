"""BatchNorm folding while tracing (``merge_batchnorm``): which layers and operations a BatchNorm folds into, and
the merged parameters and forward of a call with a BatchNorm folded in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import _ruled
from . import ops as _ops
from . import types as _types
from ._interception import MODULE_CALL
from ._record import Ref, RuledCall, tensor_leaves

if TYPE_CHECKING:
    from ._trace import Tracer

Tensor = torch.Tensor


NOT_MERGED = object()


_BATCHNORM_TYPES: dict[type, bool] = {}


def is_batchnorm(module: torch.nn.Module) -> bool:
    """A BatchNorm module, with running statistics as parameters and buffers or (frozen) as buffers only."""
    kind = type(module)
    found = _BATCHNORM_TYPES.get(kind)
    if found is None:
        found = isinstance(module, _types.BatchNorm)
        if not found and isinstance(module, _types.FrozenBatchNorm):
            return True  # decided per module: a frozen BatchNorm is known by its buffers
        _BATCHNORM_TYPES[kind] = found
    return found


#: Linear layers and convolutions: a BatchNorm after them can be merged (subclasses too); their forward is one linear
#: operation with a closed-form transpose when their padding is explicit (these exact types: a subclass may override
#: forward).
MERGEABLE_MODULES = (
    torch.nn.Linear,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
)
TRANSPOSABLE = frozenset(MERGEABLE_MODULES)


def one_linear_operation(call: RuledCall) -> bool:
    """Whether ``call`` (before a BatchNorm is merged into it) is one operation with a transpose, reading the call's
    single input as its first argument and producing its single output."""
    if len(call.inputs) != 1 or not call.nodes:
        return False
    node = call.nodes[0]
    if len(node.inputs) != 1 or node.inputs[0] != call.inputs[0] or type(node.leaves[0]) is not Ref:
        return False
    if node.leaves[0].vid != call.inputs[0] or node.transpose is None:
        return False
    return len(call.nodes) == 1 or call.merged_from is not None




#: Operations a BatchNorm can be merged into (written in a forward, with parameters as weight and bias).
MERGEABLE_OPERATIONS = frozenset(_ops._all("linear conv1d conv2d conv3d"))


class OperationLayer:
    """A linear operation (``F.linear``, ``F.conv2d``) as the layer a BatchNorm is merged into: its weight and bias
    operands, read like a module's."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.weight = params.get("weight")
        self.bias = params.get("bias")


def merge_parameters(tracer: Tracer, call: RuledCall, layer: torch.nn.Module, bn: torch.nn.Module, layer_output: int,
                     layer_nodes: int) -> None:
    """Give ``call`` (a layer and the BatchNorm folded into it) the merged parameters and a forward using them."""
    from .canonizers import merged_layer

    def tensor_of(module: torch.nn.Module, local: str) -> Tensor | None:
        tensor = getattr(module, local, None)
        if not isinstance(tensor, Tensor):
            return None
        vid = tracer.vid(tensor)
        return tracer.lower(vid) if vid is not None else tensor

    statistics = {local: tensor_of(bn, local) for local in ("weight", "bias", "running_mean", "running_var")}
    call.params, call.forward, call.channel_scale = merged_layer(
        layer,
        tensor_of(layer, "weight"),
        tensor_of(layer, "bias"),
        statistics,
        float(getattr(bn, "eps", 1e-5)),
        call.nodes[:layer_nodes],
        call.inputs[:],
        layer_output,
        tracer.low,
        call.param_vids,
    )


# merging while tracing ------------------------------------------------------------------------------------------
def try_merge(tracer: Tracer, bn: torch.nn.Module, module_index: int, index: int, name: str, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
    """Fold the eval-mode BatchNorm ``bn`` into the Linear/Conv call that produced its input, if nothing else has
    read that output. A later read raises :class:`Retry`, and the forward pass runs again without this merge."""
    last = tracer.last_layer
    if last is None or not args or not isinstance(args[0], Tensor) or (id(bn), index) in tracer.skip_merge:
        return NOT_MERGED
    producer, layer, vid, layer_name, transparent = last
    if tracer.vid(args[0]) != vid:
        return NOT_MERGED
    batch_statistics = getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None
    trains = isinstance(bn, _types.BatchNorm) and bn.training and bn.track_running_stats  # frozen ones never do
    if batch_statistics or trains:
        raise ValueError(
            f"merge_batchnorm: {type(bn).__name__} '{name}' runs in training mode (batch statistics), which cannot "
            f"be folded into '{layer_name}'. Call model.eval() first, or attribute without merge_batchnorm."
        )
    tracer.last_layer = None  # a merged BatchNorm is no call site at all
    tracer.stack.append(name)
    try:
        if producer is None:  # a layer without a rule: layer and BatchNorm keep their true gradient together
            tracer.covered += 1
            tracer.transparent_depth += transparent  # a transparent layer's BatchNorm is transparent with it
            try:
                return MODULE_CALL(bn, *args, **kwargs)
            finally:
                tracer.covered -= 1
                tracer.transparent_depth -= transparent
                tracer.merged_interior[vid] = (id(bn), index)  # a later read of the layer's output undoes the merge
        # reopen the layer's call: the BatchNorm runs inside it and its output becomes the call's output
        tracer.steps.remove(producer)
        for out in producer.outputs:
            tracer.cut.discard(out)
            tracer.pending_cut.discard(out)
            tracer.merged_interior[out] = (id(bn), index)
        layer_nodes = len(producer.nodes)
        producer.outputs = []
        producer.merged_from = name
        output = _ruled.run_ruled(tracer, producer, lambda: MODULE_CALL(bn, *args, **kwargs))
        tracer.raw += 1
        try:
            merge_parameters(tracer, producer, layer, bn, vid, layer_nodes)
        finally:
            tracer.raw -= 1
        return _ruled.finish_ruled(tracer, producer, output)
    finally:
        tracer.stack.pop()


def note_mergeable(tracer: Tracer, ruled: RuledCall | None, layer: Any, output: Any, name: str,
                   transparent: bool) -> None:
    """A linear layer (a module, or an operation as :class:`OperationLayer`) produced ``output``: a BatchNorm
    called next on it may be folded into it (:meth:`try_merge`)."""
    outputs = [tracer.vid(leaf) for leaf in tensor_leaves(output)]
    if len(outputs) == 1 and outputs[0] is not None and outputs[0] in tracer.activations:
        tracer.last_layer = (ruled, layer, outputs[0], name, transparent)
