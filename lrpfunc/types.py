"""Groups of module types used by composites, and labels for functional operations.

Module groups are plain tuples usable with :func:`isinstance` and in composite entries. Operation labels
are classes that canonizers attach to recorded operations (a residual ``out += identity`` becomes a
:class:`Sum`), so that composites can map them to rules like module types. Modules whose class is only known by
its name or structure (HuggingFace's ``LlamaRMSNorm``, a hand-written channels-first ``LayerNorm``,
torchvision's ``FrozenBatchNorm2d``) are matched by *duck types* made with :func:`duck`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "duck",
    "DuckType",
    "Sum",
    "ReLU",
    "ActivationLike",
    "Normalization",
    "LayerNormLike",
    "RMSNormLike",
    "FrozenBatchNorm",
    "Convolution",
    "Linear",
    "Dense",
    "BatchNorm",
    "AvgPool",
    "MaxPool",
    "Activation",
    "RotaryEmbedding",
]


class DuckType(type):
    """Metaclass of duck types: ``isinstance(module, T)`` asks ``T.accepts(module)``."""

    def __instancecheck__(cls, instance: object) -> bool:
        return bool(cls.accepts(instance))  # type: ignore[attr-defined]

    def __subclasscheck__(cls, subclass: type) -> bool:
        return subclass is cls


def duck(
    name: str,
    *,
    class_name: str | None = None,
    has: Sequence[str] = (),
    lacks: Sequence[str] = (),
    where: Callable[[nn.Module], bool] | None = None,
) -> type:
    """A type that modules match by their class name or structure rather than their class.

    Args:
        name: The duck type's own name (shown in errors and tables).
        class_name: A regular expression that the name of the module's class (or of one of its base classes)
            must match with :func:`re.search`, e.g. ``r"RMSNorm$"``.
        has: Attribute names the module must have (parameters, buffers or plain attributes).
        lacks: Attribute names the module must not have.
        where: Any further predicate on the module.

    Returns:
        A class usable in composite entries and with :func:`isinstance`.

    Example:
        >>> RMSNormLike = duck("RMSNormLike", class_name=r"RMSNorm$", has=["weight"])
        >>> composites.layer_map([(RMSNormLike, rules.normalization())])
    """
    pattern = re.compile(class_name) if class_name is not None else None

    def accepts(module: object) -> bool:
        if not isinstance(module, nn.Module):
            return False
        if pattern is not None and not any(pattern.search(base.__name__) for base in type(module).__mro__):
            return False
        if any(not hasattr(module, attribute) for attribute in has):
            return False
        if any(hasattr(module, attribute) for attribute in lacks):
            return False
        return where is None or bool(where(module))

    doc = f"Duck type {name}: {class_name or ''} {list(has)}"
    return DuckType(name, (), {"accepts": staticmethod(accepts), "__doc__": doc})


class Sum:
    """Label of an element-wise sum of activations, e.g. the residual ``out += identity`` of a ResNet block.

    :func:`lrpfunc.canonizers.resnet` attaches it to residual additions; the LRP composites map it to
    :func:`lrpfunc.rules.norm`, as Zennit's ``ResNetCanonizer`` and its ``Sum`` layer do.
    """


#: Convolutions, transposed included.
Convolution: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: Fully connected layers.
Dense: tuple[type[nn.Module], ...] = (nn.Linear,)
#: Every layer with a weight applied linearly to its input (Zennit's ``Linear`` type).
Linear: tuple[type[nn.Module], ...] = Dense + Convolution
#: Batch normalisation layers.
BatchNorm: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Average pooling, adaptive included.
AvgPool: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
#: Max pooling, adaptive included.
MaxPool: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
#: Element-wise activation modules written by hand, matched by name: HuggingFace's ``transformers.activations``
#: (``NewGELUActivation``, ``GELUActivation``, ``QuickGELUActivation``, ``SiLUActivation``, ``GELUTanh``, ...), which
#: have no submodules (torchvision's ``Conv2dNormActivation`` is a block, not an activation).
ActivationLike = duck(
    "ActivationLike",
    class_name=r"(Activation|GELU|GELUTanh)$",
    where=lambda module: next(iter(module.children()), None) is None,
)

#: Element-wise activations (Zennit's ``Activation`` type, and hand-written ones found by :data:`ActivationLike`).
Activation: tuple[type[nn.Module], ...] = (
    nn.ELU,
    nn.Hardshrink,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.LogSigmoid,
    nn.PReLU,
    nn.ReLU,
    nn.ReLU6,
    nn.RReLU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.Sigmoid,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softshrink,
    nn.Softsign,
    nn.Tanh,
    nn.Tanhshrink,
    nn.Threshold,
    ActivationLike,
)

#: ReLU as a module or a function (``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place variants).
ReLU: tuple[type | Callable[..., Any], ...] = (
    nn.ReLU, F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_
)

#: A LayerNorm written by hand (the facebookresearch ConvNeXt ``LayerNorm`` with ``data_format``, and any module
#: whose class name ends in ``LayerNorm``, e.g. T5's), matched by name.
LayerNormLike = duck("LayerNormLike", class_name=r"LayerNorm(2d)?$")
#: An RMSNorm written by hand (HuggingFace's ``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``MistralRMSNorm``,
#: ``GemmaRMSNorm`` with its ``(1 + weight)``), matched by name.
RMSNormLike = duck("RMSNormLike", class_name=r"RMSNorm$")
#: A rotary position embedding module that computes the ``(cos, sin)`` tables of RoPE (HuggingFace's
#: ``LlamaRotaryEmbedding``, ``Qwen2RotaryEmbedding``, ``GPTNeoXRotaryEmbedding``, ...), matched by name.
RotaryEmbedding = duck("RotaryEmbedding", class_name=r"Rotary(Positional)?Embeddings?$")
#: Normalisation modules: LayerNorm, GroupNorm, RMSNorm (torch's and hand-written ones), instance norm.
Normalization: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
    LayerNormLike,
    RMSNormLike,
)
#: A BatchNorm whose statistics and affine parameters are all buffers (torchvision's ``FrozenBatchNorm2d``).
FrozenBatchNorm = (
    duck(
        "FrozenBatchNorm",
        class_name=r"BatchNorm",
        has=["weight", "bias", "running_mean", "running_var"],
        where=lambda module: not isinstance(module, nn.modules.batchnorm._NormBase)
        and not any(True for _ in module.parameters(recurse=False)),
    ),
)
