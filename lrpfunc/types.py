"""Groups of module types used by composites, and labels for functional operations.

Module groups are plain tuples usable with :func:`isinstance` and in composite entries. Operation labels
are classes that canonizers attach to recorded operations (a residual ``out += identity`` becomes a
:class:`Sum`), so that composites can map them to rules like module types.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = [
    "Sum",
    "Convolution",
    "Linear",
    "Dense",
    "BatchNorm",
    "AvgPool",
    "MaxPool",
    "Activation",
]


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
#: Element-wise activations (Zennit's ``Activation`` type).
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
)
