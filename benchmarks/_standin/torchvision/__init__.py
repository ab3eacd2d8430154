"""Stand-in for torchvision, for the benchmark only (put on ``sys.path`` when no real torchvision imports).

Zennit 0.5.1 imports ``torchvision.models.resnet.BasicBlock`` and ``Bottleneck`` at top level (for its
``ResNetCanonizer``) and nothing else from torchvision. This package provides exactly those names, as
the very classes of ``benchmarks.models``, so that Zennit's ``isinstance`` checks recognise the
benchmark's ResNet blocks.
"""
from . import models

__version__ = "0.0.0+lrpfunc-benchmark-standin"
__all__ = ["models"]
