"""The architectures of the reference cases (tests/data/README.md), written out without torchvision.

The ResNet block is torchvision's BasicBlock as the benchmarks write it out (one ReLU module used twice,
``out += identity`` in place)."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.models import BasicBlock


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(16, 5),
    )


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layers = nn.Sequential(
            BasicBlock(8, 8),
            BasicBlock(8, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


BUILDERS = {"mlp": mlp, "cnn": cnn, "resnet": TinyResNet}


def build(name: str, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    model = BUILDERS[name]().double().eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def randomize_batchnorm(bn: nn.Module) -> None:
    """Give one BatchNorm non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)


def randomize_batchnorms(model: nn.Module) -> None:
    """Give every BatchNorm2d non-trivial statistics and affine parameters, so merging them is tested."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            randomize_batchnorm(module)
