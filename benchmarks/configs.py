"""Which configurations a run measures: a model, the input it runs on, its thread count and composites.

The ImageNet-style classifiers (``resnet18``, ``resnet50``, ``vgg11``, ``vgg11_bn``) run on
(batch, 3, size, size) images with the sizes and batches of the command line. The other models bring
their own input and ignore ``--sizes`` and ``--batches``:

* ``mlp100``: (1, 16), one thread; variants gradient, epsilon, epsilon_plus;
* ``mobilenet_v2``: (8, 3, 64, 64), the run's threads; variants gradient, epsilon_plus_flat;
* ``transformer``: (8, 64, 128), the run's threads; variants gradient, epsilon.

``mlp100`` measures the per-operation overhead (201 operations on 16 numbers each) on one core: its
groups run with one thread, set for them only and restored afterwards. These three models run the
first-order task only.
"""
from __future__ import annotations

import argparse
import dataclasses

IMAGE_COMPOSITES = ("gradient", "epsilon", "epsilon_plus_flat", "epsilon_gamma_box")
ALL_TASKS = ("first-order", "all-class", "train-step")


@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration.

    Attributes:
        model: a key of ``benchmarks.models.MODELS``.
        input_shape: the shape of ``x``, batch first.
        threads: ``torch.set_num_threads`` for this configuration's groups; None for the run's ``--threads``.
        composites: the first-order variants measured by default (``--composites`` replaces them).
        tasks: the tasks defined for this configuration.
    """

    model: str
    input_shape: tuple[int, ...]
    threads: int | None = None
    composites: tuple[str, ...] = IMAGE_COMPOSITES
    tasks: tuple[str, ...] = ALL_TASKS

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    @property
    def is_image(self) -> bool:
        """A (batch, 3, size, size) image input."""
        return len(self.input_shape) == 4 and self.input_shape[1] == 3 and self.input_shape[2] == self.input_shape[3]

    @property
    def size(self) -> int | None:
        """The image side, or None for a non-image input."""
        return self.input_shape[-1] if self.is_image else None

    @property
    def label(self) -> str:
        """``resnet18 64px b8``, ``transformer 64x128 b8``, ``mlp100 16 b1 1 thread``."""
        shape = f"{self.size}px" if self.is_image else "x".join(map(str, self.input_shape[1:]))
        threads = "" if self.threads is None else f" {self.threads} thread{'s' if self.threads > 1 else ''}"
        return f"{self.model} {shape} b{self.batch}{threads}"

    def with_batch(self, batch: int) -> Config:
        """The same configuration with another batch size."""
        return dataclasses.replace(self, input_shape=(batch, *self.input_shape[1:]))


def image(model: str, size: int, batch: int) -> Config:
    """An ImageNet-style classifier on (batch, 3, size, size), every task and the image composites."""
    return Config(model, (batch, 3, size, size))


# The models with an input of their own (``--sizes`` and ``--batches`` do not apply to them).
FIXED: dict[str, Config] = {
    "mlp100": Config("mlp100", (1, 16), threads=1, composites=("gradient", "epsilon", "epsilon_plus"),
                     tasks=("first-order",)),
    "mobilenet_v2": Config("mobilenet_v2", (8, 3, 64, 64), composites=("gradient", "epsilon_plus_flat"),
                           tasks=("first-order",)),
    "transformer": Config("transformer", (8, 64, 128), composites=("gradient", "epsilon"), tasks=("first-order",)),
}
IMAGE_MODELS = ("resnet18", "vgg11")  # the image models of --sizes/--batches when --models is not given

DEFAULT = [image("resnet18", 64, 8), image("vgg11", 64, 1), image("vgg11", 64, 8), *FIXED.values()]
FULL_EXTRA = [image("resnet18", 224, 1), image("resnet18", 224, 8), image("vgg11", 224, 1), image("vgg11", 224, 8)]
QUICK = [image("resnet18", 64, 8)]
# Without --full (and without explicit --models/--sizes/--batches) the expensive tasks run on part of
# the default list only: VGG-11's all-class loop in Zennit takes ~20 s a call for K=100, and a VGG-11
# training step at batch 8 ~5 s.
DEFAULT_TASK_CONFIGS = {
    "all-class": {image("resnet18", 64, 8)},
    "train-step": {image("resnet18", 64, 8), image("vgg11", 64, 1)},
}


def explicit(args: argparse.Namespace) -> bool:
    """Whether the command line names the configurations (``--models``, ``--sizes`` or ``--batches``)."""
    return bool(args.models or args.sizes or args.batches)


def configurations(args: argparse.Namespace) -> list[Config]:
    """The configurations of a run, in order.

    ``--models``/``--sizes``/``--batches`` replace the default list by the product of the image models,
    sizes (default 64, and 224 with ``--full``) and batches (default 1 and 8), followed by the listed
    models that have their own input (:data:`FIXED`).
    """
    if explicit(args):
        names = args.models or list(IMAGE_MODELS)
        sizes = args.sizes or ([64, 224] if args.full else [64])
        batches = args.batches or [1, 8]
        images = [image(m, s, b) for m in names if m not in FIXED for s in sizes for b in batches]
        return images + [FIXED[m] for m in names if m in FIXED]
    if args.quick:
        return list(QUICK)
    return DEFAULT + (FULL_EXTRA if args.full else [])


def task_runs_on(args: argparse.Namespace, task_name: str, config: Config) -> bool:
    """Whether ``task_name`` is measured on ``config`` in this run."""
    if task_name not in config.tasks:
        return False
    if args.full or args.quick or explicit(args) or task_name not in DEFAULT_TASK_CONFIGS:
        return True
    return config in DEFAULT_TASK_CONFIGS[task_name]
