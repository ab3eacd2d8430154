"""Stand-in for ``torchvision.models.resnet``: re-exports the benchmark's ResNet classes (the same objects)."""
from benchmarks.models import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "conv1x1", "conv3x3"]
