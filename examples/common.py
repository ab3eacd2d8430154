"""What the examples share: a synthetic task (a horizontal bar, a vertical bar or a square on noise), a
plain training loop, and the pictures they write (an input as RGB, a grid of pictures).

Not an example itself: ``quickstart.py`` and the others import it (they run from this folder).
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

CLASSES = ("horizontal bar", "vertical bar", "square")


def make_shapes(n: int, generator: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, size, size), their labels (n,) and the object masks (n, size, size), bool."""
    labels = torch.randint(0, len(CLASSES), (n,), generator=generator)
    images = 0.3 * torch.randn(n, 3, size, size, generator=generator)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i, label in enumerate(labels.tolist()):
        if label == 2:
            height = width = int(torch.randint(7, 11, (1,), generator=generator))
        else:
            length = int(torch.randint(14, 22, (1,), generator=generator))
            height, width = (3, length) if label == 0 else (length, 3)
        top = int(torch.randint(0, size - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - width + 1, (1,), generator=generator))
        masks[i, top:top + height, left:left + width] = True
    colors = 0.8 + 0.8 * torch.rand(n, 3, 1, 1, generator=generator)  # a random bright colour per image
    images = images + masks[:, None] * colors
    return images, labels, masks


def shapes_cnn() -> nn.Module:
    """The small CNN of the quickstart: three convolutions (two with BatchNorm), max pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(CLASSES)),
    )


def train(model: nn.Module, steps: int, generator: torch.Generator, *, batch_size: int = 64, lr: float = 3e-3) -> float:
    """Plain supervised training with Adam on fresh batches; leaves ``model`` in eval mode, returns the last loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x, y, _ = make_shapes(batch_size, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def to_image(x: torch.Tensor, low: float | None = None, high: float | None = None) -> Image.Image:
    """An input tensor (3, H, W) as an RGB picture: ``[low, high]`` mapped to black..white (clipped), or
    min-max scaled when no bounds are given."""
    x = x.detach().float()
    if low is None or high is None:
        low, high = x.min().item(), x.max().item()
    x = ((x - low) / max(high - low, 1e-12)).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), "RGB")


def image_grid(rows: list[list[Image.Image]], cell: int = 128, padding: int = 2) -> Image.Image:
    """Paste pictures into a grid (white padding between cells), each resized to ``cell`` x ``cell``."""
    ncols = max(len(row) for row in rows)
    size = (ncols * cell + (ncols - 1) * padding, len(rows) * cell + (len(rows) - 1) * padding)
    grid = Image.new("RGB", size, (255, 255, 255))
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            grid.paste(picture.resize((cell, cell), Image.NEAREST), (c * (cell + padding), r * (cell + padding)))
    return grid


def labelled_grid(rows: list[list[Image.Image]], labels: list[list[str]], cell: int = 128, padding: int = 2,
                  strip: int = 14) -> Image.Image:
    """:func:`image_grid` with a caption above every cell (``labels`` shaped like ``rows``)."""
    from PIL import ImageDraw

    ncols = max(len(row) for row in rows)
    height = cell + strip
    size = (ncols * cell + (ncols - 1) * padding, len(rows) * height + (len(rows) - 1) * padding)
    grid = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (row, captions) in enumerate(zip(rows, labels)):
        for c, (picture, caption) in enumerate(zip(row, captions)):
            left, top = c * (cell + padding), r * (height + padding)
            draw.text((left + 2, top + 1), caption, fill=(0, 0, 0))
            grid.paste(picture.resize((cell, cell), Image.NEAREST), (left, top + strip))
    return grid
