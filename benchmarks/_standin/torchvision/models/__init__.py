"""Stand-in for ``torchvision.models``: only the ResNet blocks, see ``torchvision/__init__.py``."""
from . import resnet

__all__ = ["resnet"]
