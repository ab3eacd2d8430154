"""A zoo of small networks written in the style of torchvision's own model code, for architecture tests.

Every model repeats torchvision's module classes, attribute names, attribute assignment order and forward
functions, including what torchvision does in place (``nn.ReLU(inplace=True)``, ``out += identity``,
``result += input``, ``nn.Dropout(p, inplace=True)``, ``F.relu(x, inplace=True)``) and what it does with
functional calls (``F.adaptive_avg_pool2d``, ``F.avg_pool2d``, ``F.max_pool2d``, ``torch.cat``,
``torch.flatten``); only the widths and depths are small, so that the whole zoo runs forward and backward in
float64 in a fraction of a second. Sources followed: ``torchvision/models/{vgg,resnet,densenet,mobilenetv2,
mobilenetv3,efficientnet,convnext,inception}.py``, ``torchvision/ops/misc.py`` (``Conv2dNormActivation``,
``SqueezeExcitation``, ``Permute``), ``torchvision/ops/stochastic_depth.py``, and for ``convnext_fb`` the
``LayerNorm`` of facebookresearch/ConvNeXt (``models/convnext.py``). ResNet and VGG reuse the blocks, the
``_make_layer``, the ``forward`` and ``make_layers`` of ``benchmarks/models.py``.

Initialisation is the zoo's own (:func:`initialize_weights`), not torchvision's: torchvision's fixed
standard deviations (0.01 for the VGG and MobileNet classifiers, 0.02 in ConvNeXt) assume widths in the
hundreds and make these narrow networks' outputs vanish (with them the VGG's logits have a standard deviation
of about 1e-4 and its input gradient 1e-6). Every convolution and linear weight is drawn He-normal over its
fan-in and every bias that exists uniformly from [-0.1, 0.1]; :func:`randomize_norms` then draws every
normalisation parameter at random (BatchNorm weight, bias, running mean and variance; LayerNorm weight and
bias; ConvNeXt layer scales), because with torchvision's (1, 0, 0, 1) every BatchNorm would be an identity
and merging it into the layer before would test nothing.

Example::

    model = build("resnet_basic", seed=0)            # eval mode, float64
    x = example_input("resnet_basic", seed=0)        # (2, 3, 32, 32), float64
    params = dict(model.named_parameters())
    output, pullback = torch.func.vjp(lambda x: torch.func.functional_call(model, params, (x,)), x)
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import models as benchmark_models
from benchmarks.models import BasicBlock, Bottleneck, make_layers

__all__ = [
    "ZOO",
    "ZooEntry",
    "build",
    "example_input",
    "initialize_weights",
    "randomize_norms",
]

NUM_CLASSES = 10
SEGMENTATION_CLASSES = 4
INPUT_SHAPE = (2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------
# torchvision.ops and torchvision.models._utils
# ---------------------------------------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor``, never more than 10% down (``torchvision.models._utils``)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvNormActivation(nn.Sequential):
    """Convolution, optional norm, optional activation (``torchvision.ops.misc.ConvNormActivation``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
        dilation: int = 1,
        inplace: bool | None = True,
        bias: bool | None = None,
        conv_layer: Callable[..., nn.Module] = nn.Conv2d,
    ) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [
            conv_layer(
                in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, groups=groups,
                bias=bias,
            )
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


class Conv2dNormActivation(ConvNormActivation):
    """Conv2d, optional norm, optional activation (``torchvision.ops.misc.Conv2dNormActivation``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
        dilation: int = 1,
        inplace: bool | None = True,
        bias: bool | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, groups, norm_layer, activation_layer,
            dilation, inplace, bias, nn.Conv2d,
        )


class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation block (``torchvision.ops.misc.SqueezeExcitation``).

    Definition: ``y = scale_activation(fc2(activation(fc1(avgpool(x))))) * x``.

    References:
        Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018, https://arxiv.org/abs/1709.01507
    """

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: Callable[..., nn.Module] = nn.ReLU,
        scale_activation: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input)
        return scale * input


class Permute(nn.Module):
    """``torch.permute`` as a module (``torchvision.ops.misc.Permute``)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """Drop whole residual branches at random (``torchvision.ops.stochastic_depth``).

    Returns ``input`` itself (the same tensor object) when not training or when ``p == 0``.

    Raises:
        ValueError: if ``p`` is outside [0, 1] or ``mode`` is neither ``"batch"`` nor ``"row"``.

    References:
        Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016, https://arxiv.org/abs/1603.09382
    """
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input

    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


class StochasticDepth(nn.Module):
    """:func:`stochastic_depth` as a module (``torchvision.ops.StochasticDepth``)."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, mode={self.mode})"


# ---------------------------------------------------------------------------------------------------------
# VGG and ResNet: torchvision's classes from benchmarks/models.py, with the widths made configurable
# ---------------------------------------------------------------------------------------------------------


class VGG(benchmark_models.VGG):
    """torchvision's ``VGG`` with a small classifier; ``forward`` is the benchmark's (torchvision's).

    torchvision hard-codes ``AdaptiveAvgPool2d((7, 7))`` and a 4096-wide classifier; here the pooled size
    and the hidden width are arguments; the layout (Linear, ReLU(True), Dropout, Linear, ReLU(True),
    Dropout, Linear) is torchvision's.
    """

    def __init__(
        self,
        features: nn.Module,
        num_classes: int = 1000,
        *,
        feature_channels: int = 512,
        pooled_size: int = 7,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        nn.Module.__init__(self)  # the parent's constructor hard-codes torchvision's widths
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pooled_size, pooled_size))
        self.classifier = nn.Sequential(
            nn.Linear(feature_channels * pooled_size * pooled_size, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )


class ResNet(benchmark_models.ResNet):
    """torchvision's ``ResNet`` with configurable stem and stage widths.

    ``_make_layer`` and ``forward`` are the benchmark's (torchvision's): stem conv7x7/2, BatchNorm, ReLU,
    ``MaxPool2d(3, 2, 1)``, four stages whose first block downsamples with ``Sequential(conv1x1, BN)``,
    ``AdaptiveAvgPool2d((1, 1))``, ``torch.flatten(x, 1)``, ``fc``.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        stem_width: int = 64,
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        nn.Module.__init__(self)  # the parent's constructor hard-codes torchvision's widths
        norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer

        self.inplanes = stem_width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)


# ---------------------------------------------------------------------------------------------------------
# DenseNet (torchvision.models.densenet)
# ---------------------------------------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3 on the concatenation of all earlier features (torchvision's)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)

        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        return bottleneck_output

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        if isinstance(input, Tensor):
            prev_features = [input]
        else:
            prev_features = input

        bottleneck_output = self.bn_function(prev_features)

        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers, each fed the list of all earlier features (torchvision's)."""

    _version = 2

    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int, drop_rate: float
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
            )
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN, ReLU, conv1x1, ``AvgPool2d(2, 2)`` between dense blocks (torchvision's)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC (torchvision's, without the ``memory_efficient`` checkpointing).

    References:
        Huang et al., "Densely Connected Convolutional Networks", CVPR 2017, https://arxiv.org/abs/1608.06993
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()

        # First convolution
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )

        # Each denseblock
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
            )
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2

        # Final batch norm
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))

        # Linear layer
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision.models.mobilenetv2)
# ---------------------------------------------------------------------------------------------------------


#: ``torchvision.models.mobilenetv2.InvertedResidual`` (pw expand, dw 3x3, pw-linear, ``x + conv(x)``; Sandler et al.,
#: "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018): the benchmarks' copy.
InvertedResidualV2 = benchmark_models.InvertedResidual


class MobileNetV2(nn.Module):
    """torchvision's ``MobileNetV2`` with the stem, the last width and the settings as arguments."""

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        input_channel: int = 32,
        last_channel: int = 1280,
        inverted_residual_setting: list[list[int]],
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        block = InvertedResidualV2
        norm_layer = nn.BatchNorm2d
        self.last_channel = last_channel

        # building first layer
        features: list[nn.Module] = [
            Conv2dNormActivation(3, input_channel, stride=2, norm_layer=norm_layer, activation_layer=nn.ReLU6)
        ]
        # building inverted residual blocks
        for t, c, n, s in inverted_residual_setting:
            output_channel = c
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(block(input_channel, output_channel, stride, expand_ratio=t, norm_layer=norm_layer))
                input_channel = output_channel
        # building last several layers
        features.append(
            Conv2dNormActivation(
                input_channel, self.last_channel, kernel_size=1, norm_layer=norm_layer, activation_layer=nn.ReLU6
            )
        )
        # make it nn.Sequential
        self.features = nn.Sequential(*features)

        # building classifier
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.features(x)
        # Cannot use "squeeze" as batch-size can be 1
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


# ---------------------------------------------------------------------------------------------------------
# MobileNetV3 (torchvision.models.mobilenetv3)
# ---------------------------------------------------------------------------------------------------------


class InvertedResidualConfig:
    """One row of Tables 1 and 2 of the MobileNetV3 paper (torchvision's)."""

    def __init__(
        self,
        input_channels: int,
        kernel: int,
        expanded_channels: int,
        out_channels: int,
        use_se: bool,
        activation: str,
        stride: int,
        dilation: int,
        width_mult: float = 1.0,
    ) -> None:
        self.input_channels = self.adjust_channels(input_channels, width_mult)
        self.kernel = kernel
        self.expanded_channels = self.adjust_channels(expanded_channels, width_mult)
        self.out_channels = self.adjust_channels(out_channels, width_mult)
        self.use_se = use_se
        self.use_hs = activation == "HS"
        self.stride = stride
        self.dilation = dilation

    @staticmethod
    def adjust_channels(channels: int, width_mult: float) -> int:
        return _make_divisible(channels * width_mult, 8)


class InvertedResidualV3(nn.Module):
    """``torchvision.models.mobilenetv3.InvertedResidual``: expand, depthwise, optional SE, project.

    References:
        Howard et al., "Searching for MobileNetV3", ICCV 2019, https://arxiv.org/abs/1905.02244
    """

    def __init__(
        self,
        cnf: InvertedResidualConfig,
        norm_layer: Callable[..., nn.Module],
        se_layer: Callable[..., nn.Module] = partial(SqueezeExcitation, scale_activation=nn.Hardsigmoid),
    ) -> None:
        super().__init__()
        if not (1 <= cnf.stride <= 2):
            raise ValueError("illegal stride value")

        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels

        layers: list[nn.Module] = []
        activation_layer = nn.Hardswish if cnf.use_hs else nn.ReLU

        # expand
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(
                Conv2dNormActivation(
                    cnf.input_channels,
                    cnf.expanded_channels,
                    kernel_size=1,
                    norm_layer=norm_layer,
                    activation_layer=activation_layer,
                )
            )

        # depthwise
        stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(
            Conv2dNormActivation(
                cnf.expanded_channels,
                cnf.expanded_channels,
                kernel_size=cnf.kernel,
                stride=stride,
                dilation=cnf.dilation,
                groups=cnf.expanded_channels,
                norm_layer=norm_layer,
                activation_layer=activation_layer,
            )
        )
        if cnf.use_se:
            squeeze_channels = _make_divisible(cnf.expanded_channels // 4, 8)
            layers.append(se_layer(cnf.expanded_channels, squeeze_channels))

        # project
        layers.append(
            Conv2dNormActivation(
                cnf.expanded_channels, cnf.out_channels, kernel_size=1, norm_layer=norm_layer, activation_layer=None
            )
        )

        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels
        self._is_cn = cnf.stride > 1

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    """torchvision's ``MobileNetV3`` (BatchNorm eps 0.001, Hardswish stem and head)."""

    def __init__(
        self,
        inverted_residual_setting: list[InvertedResidualConfig],
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        block = InvertedResidualV3
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)

        layers: list[nn.Module] = []

        # building first layer
        firstconv_output_channels = inverted_residual_setting[0].input_channels
        layers.append(
            Conv2dNormActivation(
                3,
                firstconv_output_channels,
                kernel_size=3,
                stride=2,
                norm_layer=norm_layer,
                activation_layer=nn.Hardswish,
            )
        )

        # building inverted residual blocks
        for cnf in inverted_residual_setting:
            layers.append(block(cnf, norm_layer))

        # building last several layers
        lastconv_input_channels = inverted_residual_setting[-1].out_channels
        lastconv_output_channels = 6 * lastconv_input_channels
        layers.append(
            Conv2dNormActivation(
                lastconv_input_channels,
                lastconv_output_channels,
                kernel_size=1,
                norm_layer=norm_layer,
                activation_layer=nn.Hardswish,
            )
        )

        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_output_channels, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.features(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)

        x = self.classifier(x)

        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


# ---------------------------------------------------------------------------------------------------------
# EfficientNet (torchvision.models.efficientnet)
# ---------------------------------------------------------------------------------------------------------


class MBConvConfig:
    """One stage of Table 1 of the EfficientNet paper (torchvision's, width and depth multipliers 1)."""

    def __init__(
        self, expand_ratio: float, kernel: int, stride: int, input_channels: int, out_channels: int, num_layers: int
    ) -> None:
        self.expand_ratio = expand_ratio
        self.kernel = kernel
        self.stride = stride
        self.input_channels = input_channels
        self.out_channels = out_channels
        self.num_layers = num_layers

    @staticmethod
    def adjust_channels(channels: int, width_mult: float, min_value: int | None = None) -> int:
        return _make_divisible(channels * width_mult, 8, min_value)


class MBConv(nn.Module):
    """Mobile inverted bottleneck with SiLU and SE, stochastic depth on the residual (torchvision's).

    References:
        Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019,
        https://arxiv.org/abs/1905.11946
    """

    def __init__(
        self,
        cnf: MBConvConfig,
        stochastic_depth_prob: float,
        norm_layer: Callable[..., nn.Module],
        se_layer: Callable[..., nn.Module] = SqueezeExcitation,
    ) -> None:
        super().__init__()

        if not (1 <= cnf.stride <= 2):
            raise ValueError("illegal stride value")

        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels

        layers: list[nn.Module] = []
        activation_layer = nn.SiLU

        # expand
        expanded_channels = cnf.adjust_channels(cnf.input_channels, cnf.expand_ratio)
        if expanded_channels != cnf.input_channels:
            layers.append(
                Conv2dNormActivation(
                    cnf.input_channels,
                    expanded_channels,
                    kernel_size=1,
                    norm_layer=norm_layer,
                    activation_layer=activation_layer,
                )
            )

        # depthwise
        layers.append(
            Conv2dNormActivation(
                expanded_channels,
                expanded_channels,
                kernel_size=cnf.kernel,
                stride=cnf.stride,
                groups=expanded_channels,
                norm_layer=norm_layer,
                activation_layer=activation_layer,
            )
        )

        # squeeze and excitation
        squeeze_channels = max(1, cnf.input_channels // 4)
        layers.append(se_layer(expanded_channels, squeeze_channels, activation=partial(nn.SiLU, inplace=True)))

        # project
        layers.append(
            Conv2dNormActivation(
                expanded_channels, cnf.out_channels, kernel_size=1, norm_layer=norm_layer, activation_layer=None
            )
        )

        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cnf.out_channels

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class EfficientNet(nn.Module):
    """torchvision's ``EfficientNet`` (v1 layout: MBConv stages, 4x head conv, Dropout(inplace) + Linear)."""

    def __init__(
        self,
        inverted_residual_setting: list[MBConvConfig],
        dropout: float,
        stochastic_depth_prob: float = 0.2,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        block = MBConv
        norm_layer = nn.BatchNorm2d

        layers: list[nn.Module] = []

        # building first layer
        firstconv_output_channels = inverted_residual_setting[0].input_channels
        layers.append(
            Conv2dNormActivation(
                3, firstconv_output_channels, kernel_size=3, stride=2, norm_layer=norm_layer, activation_layer=nn.SiLU
            )
        )

        # building inverted residual blocks
        total_stage_blocks = sum(cnf.num_layers for cnf in inverted_residual_setting)
        stage_block_id = 0
        for cnf in inverted_residual_setting:
            stage: list[nn.Module] = []
            for _ in range(cnf.num_layers):
                # copy to avoid modifications. shallow copy is enough
                block_cnf = copy.copy(cnf)

                # overwrite info if not the first conv in the stage
                if stage:
                    block_cnf.input_channels = block_cnf.out_channels
                    block_cnf.stride = 1

                # adjust stochastic depth probability based on the depth of the stage block
                sd_prob = stochastic_depth_prob * float(stage_block_id) / total_stage_blocks

                stage.append(block(block_cnf, sd_prob, norm_layer))
                stage_block_id += 1

            layers.append(nn.Sequential(*stage))

        # building last several layers
        lastconv_input_channels = inverted_residual_setting[-1].out_channels
        lastconv_output_channels = 4 * lastconv_input_channels
        layers.append(
            Conv2dNormActivation(
                lastconv_input_channels,
                lastconv_output_channels,
                kernel_size=1,
                norm_layer=norm_layer,
                activation_layer=nn.SiLU,
            )
        )

        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(lastconv_output_channels, num_classes),
        )

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.features(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)

        x = self.classifier(x)

        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


# ---------------------------------------------------------------------------------------------------------
# ConvNeXt (torchvision.models.convnext) and the facebookresearch channels-first LayerNorm
# ---------------------------------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor by permuting to NHWC (torchvision's ``LayerNorm2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class LayerNorm(nn.Module):
    """The ``LayerNorm`` of facebookresearch/ConvNeXt, written out by hand for ``channels_first``.

    Definition (``channels_first``, over dimension 1 of NCHW): ``u = mean_c x``, ``s = mean_c (x - u)^2``,
    ``y = weight[c] * (x - u) / sqrt(s + eps) + bias[c]``; ``channels_last`` calls ``F.layer_norm``.

    Raises:
        NotImplementedError: if ``data_format`` is neither ``"channels_last"`` nor ``"channels_first"``.

    References:
        Liu et al., "A ConvNet for the 2020s", CVPR 2022, https://arxiv.org/abs/2201.03545
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        if self.data_format not in ["channels_last", "channels_first"]:
            raise NotImplementedError
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: Tensor) -> Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x


class CNBlock(nn.Module):
    """dw7x7, Permute, LayerNorm, Linear, GELU, Linear, Permute, layer scale, stochastic depth, residual.

    torchvision's ``CNBlock``: ``result = layer_scale * block(input)``, ``result += input``.
    """

    def __init__(
        self,
        dim: int,
        layer_scale: float,
        stochastic_depth_prob: float,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            norm_layer(dim),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class CNBlockConfig:
    """One stage of Section 3 of the ConvNeXt paper (torchvision's)."""

    def __init__(self, input_channels: int, out_channels: int | None, num_layers: int) -> None:
        self.input_channels = input_channels
        self.out_channels = out_channels
        self.num_layers = num_layers


class ConvNeXt(nn.Module):
    """torchvision's ``ConvNeXt``: patchify stem, CNBlock stages, norm + conv2x2/2 downsampling, norm head."""

    def __init__(
        self,
        block_setting: list[CNBlockConfig],
        stochastic_depth_prob: float = 0.0,
        layer_scale: float = 1e-6,
        num_classes: int = 1000,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        block = CNBlock

        if norm_layer is None:
            norm_layer = partial(LayerNorm2d, eps=1e-6)

        layers: list[nn.Module] = []

        # Stem
        firstconv_output_channels = block_setting[0].input_channels
        layers.append(
            Conv2dNormActivation(
                3,
                firstconv_output_channels,
                kernel_size=4,
                stride=4,
                padding=0,
                norm_layer=norm_layer,
                activation_layer=None,
                bias=True,
            )
        )

        total_stage_blocks = sum(cnf.num_layers for cnf in block_setting)
        stage_block_id = 0
        for cnf in block_setting:
            # Bottlenecks
            stage: list[nn.Module] = []
            for _ in range(cnf.num_layers):
                # adjust stochastic depth probability based on the depth of the stage block
                sd_prob = stochastic_depth_prob * stage_block_id / (total_stage_blocks - 1.0)
                stage.append(block(cnf.input_channels, layer_scale, sd_prob))
                stage_block_id += 1
            layers.append(nn.Sequential(*stage))
            if cnf.out_channels is not None:
                # Downsampling
                layers.append(
                    nn.Sequential(
                        norm_layer(cnf.input_channels),
                        nn.Conv2d(cnf.input_channels, cnf.out_channels, kernel_size=2, stride=2),
                    )
                )

        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

        lastblock = block_setting[-1]
        lastconv_output_channels = (
            lastblock.out_channels if lastblock.out_channels is not None else lastblock.input_channels
        )
        self.classifier = nn.Sequential(
            norm_layer(lastconv_output_channels), nn.Flatten(1), nn.Linear(lastconv_output_channels, num_classes)
        )

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = self.classifier(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


# ---------------------------------------------------------------------------------------------------------
# Inception v3 (torchvision.models.inception), channel counts divided by ``width_divisor``
# ---------------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias), ``BatchNorm2d(eps=0.001)``, ``F.relu(x, inplace=True)`` (torchvision's)."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class InceptionA(nn.Module):
    """1x1, 5x5, double 3x3 and avg-pool branches, ``torch.cat`` (torchvision's, widths / ``width_divisor``)."""

    def __init__(
        self,
        in_channels: int,
        pool_features: int,
        conv_block: Callable[..., nn.Module] | None = None,
        *,
        width_divisor: int = 1,
    ) -> None:
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        c64, c48, c96 = 64 // width_divisor, 48 // width_divisor, 96 // width_divisor
        self.branch1x1 = conv_block(in_channels, c64, kernel_size=1)

        self.branch5x5_1 = conv_block(in_channels, c48, kernel_size=1)
        self.branch5x5_2 = conv_block(c48, c64, kernel_size=5, padding=2)

        self.branch3x3dbl_1 = conv_block(in_channels, c64, kernel_size=1)
        self.branch3x3dbl_2 = conv_block(c64, c96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = conv_block(c96, c96, kernel_size=3, padding=1)

        self.branch_pool = conv_block(in_channels, pool_features, kernel_size=1)

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch1x1 = self.branch1x1(x)

        branch5x5 = self.branch5x5_1(x)
        branch5x5 = self.branch5x5_2(branch5x5)

        branch3x3dbl = self.branch3x3dbl_1(x)
        branch3x3dbl = self.branch3x3dbl_2(branch3x3dbl)
        branch3x3dbl = self.branch3x3dbl_3(branch3x3dbl)

        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)

        outputs = [branch1x1, branch5x5, branch3x3dbl, branch_pool]
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        outputs = self._forward(x)
        return torch.cat(outputs, 1)


class InceptionB(nn.Module):
    """Grid reduction: 3x3/2, double 3x3 ending /2, ``F.max_pool2d`` branches (torchvision's)."""

    def __init__(
        self, in_channels: int, conv_block: Callable[..., nn.Module] | None = None, *, width_divisor: int = 1
    ) -> None:
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        c384, c64, c96 = 384 // width_divisor, 64 // width_divisor, 96 // width_divisor
        self.branch3x3 = conv_block(in_channels, c384, kernel_size=3, stride=2)

        self.branch3x3dbl_1 = conv_block(in_channels, c64, kernel_size=1)
        self.branch3x3dbl_2 = conv_block(c64, c96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = conv_block(c96, c96, kernel_size=3, stride=2)

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch3x3 = self.branch3x3(x)

        branch3x3dbl = self.branch3x3dbl_1(x)
        branch3x3dbl = self.branch3x3dbl_2(branch3x3dbl)
        branch3x3dbl = self.branch3x3dbl_3(branch3x3dbl)

        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)

        outputs = [branch3x3, branch3x3dbl, branch_pool]
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        outputs = self._forward(x)
        return torch.cat(outputs, 1)


class InceptionC(nn.Module):
    """Factorised 7x7 branches (1x7 and 7x1 convolutions) and an avg-pool branch (torchvision's)."""

    def __init__(
        self,
        in_channels: int,
        channels_7x7: int,
        conv_block: Callable[..., nn.Module] | None = None,
        *,
        width_divisor: int = 1,
    ) -> None:
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        c192 = 192 // width_divisor
        self.branch1x1 = conv_block(in_channels, c192, kernel_size=1)

        c7 = channels_7x7
        self.branch7x7_1 = conv_block(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = conv_block(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = conv_block(c7, c192, kernel_size=(7, 1), padding=(3, 0))

        self.branch7x7dbl_1 = conv_block(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = conv_block(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv_block(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv_block(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv_block(c7, c192, kernel_size=(1, 7), padding=(0, 3))

        self.branch_pool = conv_block(in_channels, c192, kernel_size=1)

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch1x1 = self.branch1x1(x)

        branch7x7 = self.branch7x7_1(x)
        branch7x7 = self.branch7x7_2(branch7x7)
        branch7x7 = self.branch7x7_3(branch7x7)

        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)

        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)

        outputs = [branch1x1, branch7x7, branch7x7dbl, branch_pool]
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        outputs = self._forward(x)
        return torch.cat(outputs, 1)


class InceptionE(nn.Module):
    """Expanded filter bank: 1x3 and 3x1 branches concatenated inside the block (torchvision's)."""

    def __init__(
        self, in_channels: int, conv_block: Callable[..., nn.Module] | None = None, *, width_divisor: int = 1
    ) -> None:
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        c320, c384, c448, c192 = (c // width_divisor for c in (320, 384, 448, 192))
        self.branch1x1 = conv_block(in_channels, c320, kernel_size=1)

        self.branch3x3_1 = conv_block(in_channels, c384, kernel_size=1)
        self.branch3x3_2a = conv_block(c384, c384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = conv_block(c384, c384, kernel_size=(3, 1), padding=(1, 0))

        self.branch3x3dbl_1 = conv_block(in_channels, c448, kernel_size=1)
        self.branch3x3dbl_2 = conv_block(c448, c384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = conv_block(c384, c384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv_block(c384, c384, kernel_size=(3, 1), padding=(1, 0))

        self.branch_pool = conv_block(in_channels, c192, kernel_size=1)

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch1x1 = self.branch1x1(x)

        branch3x3 = self.branch3x3_1(x)
        branch3x3_parts = [
            self.branch3x3_2a(branch3x3),
            self.branch3x3_2b(branch3x3),
        ]
        branch3x3 = torch.cat(branch3x3_parts, 1)

        branch3x3dbl = self.branch3x3dbl_1(x)
        branch3x3dbl = self.branch3x3dbl_2(branch3x3dbl)
        branch3x3dbl_parts = [
            self.branch3x3dbl_3a(branch3x3dbl),
            self.branch3x3dbl_3b(branch3x3dbl),
        ]
        branch3x3dbl = torch.cat(branch3x3dbl_parts, 1)

        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)

        outputs = [branch1x1, branch3x3, branch3x3dbl, branch_pool]
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        outputs = self._forward(x)
        return torch.cat(outputs, 1)


class Inception3(nn.Module):
    """A short Inception v3 for 32x32 inputs: torchvision's stem up to ``maxpool1``, then
    ``Mixed_5b``/``Mixed_5c`` (InceptionA), ``Mixed_6a`` (InceptionB), ``Mixed_6b`` (InceptionC),
    ``Mixed_7b`` (InceptionE), ``AdaptiveAvgPool2d``, ``Dropout``, ``torch.flatten``, ``fc``.

    torchvision's attribute names and forward order; no auxiliary head and no ``transform_input`` (both
    are off in eval mode with torchvision's defaults for a model built without weights).

    References:
        Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016,
        https://arxiv.org/abs/1512.00567
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, *, width_divisor: int = 16) -> None:
        super().__init__()
        conv_block = BasicConv2d
        d = width_divisor
        self.Conv2d_1a_3x3 = conv_block(3, 8, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv_block(8, 8, kernel_size=3)
        self.Conv2d_2b_3x3 = conv_block(8, 16, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(16, pool_features=32 // d, width_divisor=d)
        mixed_5b_channels = (64 + 64 + 96 + 32) // d
        self.Mixed_5c = InceptionA(mixed_5b_channels, pool_features=64 // d, width_divisor=d)
        mixed_5c_channels = (64 + 64 + 96 + 64) // d
        self.Mixed_6a = InceptionB(mixed_5c_channels, width_divisor=d)
        mixed_6a_channels = (384 + 96) // d + mixed_5c_channels
        self.Mixed_6b = InceptionC(mixed_6a_channels, channels_7x7=128 // d, width_divisor=d)
        mixed_6b_channels = 4 * 192 // d
        self.Mixed_7b = InceptionE(mixed_6b_channels, width_divisor=d)
        mixed_7b_channels = (320 + 2 * 384 + 2 * 384 + 192) // d
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(mixed_7b_channels, num_classes)

    def _forward(self, x: Tensor) -> Tensor:
        # N x 3 x 32 x 32
        x = self.Conv2d_1a_3x3(x)
        # N x 8 x 15 x 15
        x = self.Conv2d_2a_3x3(x)
        # N x 8 x 13 x 13
        x = self.Conv2d_2b_3x3(x)
        # N x 16 x 13 x 13
        x = self.maxpool1(x)
        # N x 16 x 6 x 6
        x = self.Mixed_5b(x)
        # N x 16 x 6 x 6
        x = self.Mixed_5c(x)
        # N x 18 x 6 x 6
        x = self.Mixed_6a(x)
        # N x 48 x 2 x 2
        x = self.Mixed_6b(x)
        # N x 48 x 2 x 2
        x = self.Mixed_7b(x)
        # N x 128 x 2 x 2
        # Adaptive average pooling
        x = self.avgpool(x)
        # N x 128 x 1 x 1
        x = self.dropout(x)
        x = torch.flatten(x, 1)
        # N x 128
        x = self.fc(x)
        # N x num_classes
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)


# ---------------------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------------------


class DoubleConv(nn.Sequential):
    """(Conv3x3, BatchNorm2d, ReLU(inplace=True)) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """``ConvTranspose2d(2, stride 2)`` directly followed by ``BatchNorm2d`` and ReLU, skip concatenation,
    then :class:`DoubleConv`: ``conv(cat([skip, up(x)], dim=1))``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2),
            nn.BatchNorm2d(in_channels // 2),
            nn.ReLU(inplace=True),
        )
        self.conv = DoubleConv(skip_channels + in_channels // 2, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = self.up(x)
        x = torch.cat([skip, up], dim=1)
        return self.conv(x)


class UNet(nn.Module):
    """A small U-Net: two ``MaxPool2d`` downsamplings, two transposed-convolution upsamplings, 1x1 head.

    Returns a segmentation map ``(N, num_classes, H, W)``.

    References:
        Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015,
        https://arxiv.org/abs/1505.04597
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, widths: Sequence[int] = (64, 128, 256)) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.inc = DoubleConv(in_channels, w0)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(w0, w1))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(w1, w2))
        self.up1 = Up(w2, w1, w1)
        self.up2 = Up(w1, w0, w0)
        self.outc = nn.Conv2d(w0, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x = self.up1(x3, x2)
        x = self.up2(x, x1)
        return self.outc(x)


# ---------------------------------------------------------------------------------------------------------
# Randomised norms and the registry
# ---------------------------------------------------------------------------------------------------------


def initialize_weights(model: nn.Module) -> None:
    """Draw every convolution and linear layer of ``model`` at random, in place, from the global RNG.

    Weights ~ N(0, 2 / fan_in) (He et al. 2015, ``nn.init.kaiming_normal_(mode="fan_in")``), which keeps
    activations of order one through these narrow networks; biases, where a layer has one, ~ U(-0.1, 0.1).

    Args:
        model: the model whose ``nn.Conv2d``, ``nn.ConvTranspose2d`` and ``nn.Linear`` layers are overwritten.

    References:
        He et al., "Delving Deep into Rectifiers", ICCV 2015, https://arxiv.org/abs/1502.01852
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1)


def randomize_norms(model: nn.Module) -> None:
    """Draw every normalisation parameter of ``model`` at random, in place, from the global RNG.

    BatchNorm (the distributions of ``tests/models.randomize_batchnorms``): weight ~ U(0.5, 1.5),
    bias ~ U(-0.5, 0.5), running_mean ~ U(-0.3, 0.3), running_var ~ U(0.5, 2). LayerNorm (``nn.LayerNorm``,
    :class:`LayerNorm2d`, :class:`LayerNorm`): weight ~ U(0.5, 1.5), bias ~ U(-0.5, 0.5). ConvNeXt layer
    scale (:class:`CNBlock`): U(0.5, 1.5).

    Args:
        model: the model whose norms are overwritten.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
            elif isinstance(module, (nn.LayerNorm, LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
            elif isinstance(module, CNBlock):
                module.layer_scale.uniform_(0.5, 1.5)


def _vgg_bn() -> nn.Module:
    features = make_layers([8, "M", 16, "M", 16, 16, "M"], batch_norm=True)
    return VGG(features, NUM_CLASSES, feature_channels=16, pooled_size=2, hidden=32)


def _resnet_basic() -> nn.Module:
    return ResNet(BasicBlock, [2, 1, 1, 1], NUM_CLASSES, stem_width=4, widths=(4, 8, 8, 16))


def _resnet_bottleneck() -> nn.Module:
    return ResNet(Bottleneck, [2, 1, 1, 1], NUM_CLASSES, stem_width=4, widths=(2, 4, 4, 4))


def _densenet() -> nn.Module:
    return DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, drop_rate=0.1, num_classes=NUM_CLASSES
    )


def _mobilenet_v2() -> nn.Module:
    setting = [
        # t, c, n, s
        [1, 8, 1, 1],
        [4, 16, 2, 2],
        [4, 24, 1, 2],
    ]
    return MobileNetV2(NUM_CLASSES, input_channel=8, last_channel=64, inverted_residual_setting=setting)


def _mobilenet_v3() -> nn.Module:
    bneck_conf = InvertedResidualConfig
    setting = [
        bneck_conf(8, 3, 8, 8, True, "RE", 2, 1),
        bneck_conf(8, 3, 24, 8, False, "RE", 1, 1),
        bneck_conf(8, 5, 24, 16, True, "HS", 2, 1),
        bneck_conf(16, 5, 48, 16, True, "HS", 1, 1),
    ]
    return MobileNetV3(setting, last_channel=32, num_classes=NUM_CLASSES)


def _efficientnet() -> nn.Module:
    setting = [
        MBConvConfig(1, 3, 1, 8, 8, 1),
        MBConvConfig(4, 3, 2, 8, 16, 2),
        MBConvConfig(4, 5, 2, 16, 24, 1),
    ]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=NUM_CLASSES)


_CONVNEXT_SETTING = [CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)]


def _convnext() -> nn.Module:
    return ConvNeXt(_CONVNEXT_SETTING, stochastic_depth_prob=0.1, num_classes=NUM_CLASSES)


def _convnext_fb() -> nn.Module:
    channels_first = partial(LayerNorm, eps=1e-6, data_format="channels_first")
    return ConvNeXt(_CONVNEXT_SETTING, stochastic_depth_prob=0.1, num_classes=NUM_CLASSES, norm_layer=channels_first)


def _inception() -> nn.Module:
    return Inception3(NUM_CLASSES, width_divisor=16)


def _unet() -> nn.Module:
    return UNet(3, SEGMENTATION_CLASSES, widths=(4, 8, 16))


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: its constructor, the input shape it is tested with, and what it exercises.

    Attributes:
        build: returns the model in eval mode, float64, with randomised norms (seeded by :func:`build`).
        input_shape: the shape of :func:`example_input`.
        output_shape: the shape of the model's output for that input.
        notes: one line: which torchvision features it exercises.
    """

    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    notes: str


def _finished(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``factory``, then :func:`initialize_weights`, :func:`randomize_norms`, float64 and eval mode.

    Draws from the global RNG as it stands (:func:`build` seeds it).
    """

    def build_model() -> nn.Module:
        model = factory().to(torch.float64)
        initialize_weights(model)
        randomize_norms(model)
        return model.eval()

    build_model.__name__ = factory.__name__.lstrip("_")
    return build_model


_CLASSES = (INPUT_SHAPE[0], NUM_CLASSES)

ZOO: dict[str, ZooEntry] = {
    "vgg_bn": ZooEntry(
        _finished(_vgg_bn), INPUT_SHAPE, _CLASSES,
        "make_layers(batch_norm=True): Conv-BN-ReLU(inplace); MaxPool2d; AdaptiveAvgPool2d; torch.flatten; "
        "Linear-ReLU(True)-Dropout classifier",
    ),
    "resnet_basic": ZooEntry(
        _finished(_resnet_basic), INPUT_SHAPE, _CLASSES,
        "BasicBlock: one ReLU(inplace) used twice, out += identity, downsample Sequential(conv1x1, BN) and "
        "identity skips; conv7x7/2 + MaxPool2d stem; AdaptiveAvgPool2d; torch.flatten",
    ),
    "resnet_bottleneck": ZooEntry(
        _finished(_resnet_bottleneck), INPUT_SHAPE, _CLASSES,
        "Bottleneck (expansion 4): shared ReLU(inplace) used three times, out += identity, stride-1 and "
        "stride-2 downsamples and identity skips; MaxPool2d stem",
    ),
    "densenet": ZooEntry(
        _finished(_densenet), INPUT_SHAPE, _CLASSES,
        "_DenseLayer bn_function torch.cat(inputs, 1) then BN (a BatchNorm after a concatenation, not a conv), "
        "F.dropout, _DenseBlock(ModuleDict), _Transition AvgPool2d, F.relu(inplace), F.adaptive_avg_pool2d",
    ),
    "mobilenet_v2": ZooEntry(
        _finished(_mobilenet_v2), INPUT_SHAPE, _CLASSES,
        "Conv2dNormActivation(ReLU6 inplace); depthwise conv (groups=channels); x + self.conv(x); "
        "pw-linear Conv-BN; nn.functional.adaptive_avg_pool2d; Dropout + Linear",
    ),
    "mobilenet_v3": ZooEntry(
        _finished(_mobilenet_v3), INPUT_SHAPE, _CLASSES,
        "SqueezeExcitation (scale * input, ReLU, Hardsigmoid); Hardswish and ReLU (inplace); depthwise conv; "
        "result += input; classifier Linear-Hardswish(inplace)-Dropout(inplace)-Linear",
    ),
    "efficientnet": ZooEntry(
        _finished(_efficientnet), INPUT_SHAPE, _CLASSES,
        "MBConv: SiLU (inplace), SqueezeExcitation (SiLU inplace, Sigmoid), StochasticDepth (identity in eval), "
        "result += input; depthwise 3x3 and 5x5; Dropout(inplace) + Linear",
    ),
    "convnext": ZooEntry(
        _finished(_convnext), INPUT_SHAPE, _CLASSES,
        "CNBlock: dw7x7, Permute, nn.LayerNorm, Linear, GELU, Linear, Permute, layer_scale * block, "
        "StochasticDepth, result += input; LayerNorm2d (permute, F.layer_norm) in stem, downsampling and head",
    ),
    "convnext_fb": ZooEntry(
        _finished(_convnext_fb), INPUT_SHAPE, _CLASSES,
        "convnext with facebookresearch's hand-written channels_first LayerNorm (mean, pow, sqrt, "
        "weight[:, None, None] * x + bias) instead of LayerNorm2d",
    ),
    "inception": ZooEntry(
        _finished(_inception), INPUT_SHAPE, _CLASSES,
        "BasicConv2d (conv, BN eps 1e-3, F.relu inplace); InceptionA/B/C/E: F.avg_pool2d, F.max_pool2d, "
        "torch.cat of branches and of nested branches, 1x7/7x1 and 1x3/3x1 convs; Dropout; torch.flatten",
    ),
    "unet": ZooEntry(
        _finished(_unet), INPUT_SHAPE, (INPUT_SHAPE[0], SEGMENTATION_CLASSES, *INPUT_SHAPE[2:]),
        "Conv-BN-ReLU(inplace) x2; MaxPool2d; ConvTranspose2d directly followed by BatchNorm2d; "
        "torch.cat([skip, up], dim=1); 1x1 conv head; segmentation output (N, K, H, W)",
    ),
}


def _entry(function: str, name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"{function}({name!r}): unknown zoo model; expected one of {sorted(ZOO)}") from None


def build(name: str, seed: int = 0) -> nn.Module:
    """Build the zoo model ``name`` deterministically: the same ``seed`` gives the same parameters.

    The global RNG state is left as it was.

    Args:
        name: a key of :data:`ZOO`.
        seed: seeds the initialisation and the randomised norms.

    Returns:
        The model in eval mode, in float64.

    Raises:
        ValueError: if ``name`` is not in :data:`ZOO`.
    """
    entry = _entry("build", name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.build()


def example_input(name: str, seed: int = 0) -> Tensor:
    """A standard-normal float64 input of the zoo model's ``input_shape``, drawn from its own generator.

    Args:
        name: a key of :data:`ZOO`.
        seed: seeds the generator.

    Returns:
        A tensor of shape ``ZOO[name].input_shape``.

    Raises:
        ValueError: if ``name`` is not in :data:`ZOO`.
    """
    entry = _entry("example_input", name)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(entry.input_shape, generator=generator, dtype=torch.float64)


def without_biases(model: nn.Module) -> nn.Module:
    """Zero every bias of ``model`` in place (layer biases, BatchNorm and LayerNorm shifts and running means): the
    model is then a composition of homogeneous maps, on which rules that conserve relevance conserve it exactly."""
    with torch.no_grad():
        for name, tensor in (*model.named_parameters(), *model.named_buffers()):
            if name.rsplit(".", 1)[-1] in ("bias", "running_mean"):
                tensor.zero_()
    return model


def target_of(name: str, output: Tensor) -> Tensor:
    """The ``grad_output`` the tests start from: the one-hot of the predicted class for a classifier; for the
    segmentation map of ``unet``, the output's own positive part in class 0 (relevance only where the model put
    evidence, as LRP starts from ``f(x)``)."""
    if output.ndim == 2:
        return torch.nn.functional.one_hot(output.argmax(1), output.shape[1]).to(output.dtype)
    target = torch.zeros_like(output)
    target[:, 0] = output[:, 0].clamp(min=0)
    return target
