"""Render relevance tensors as heatmap images with Zennit's colour maps.

Colour maps, palettes, the contrast ``level`` and the normalisation follow Zennit 0.5.1
(``zennit/cmap.py``, ``zennit/image.py``); this is an independent torch + Pillow implementation.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ['COLORMAPS', 'colormap', 'colorbar', 'heatmap', 'heatmap_grid', 'labelled_grid', 'save_heatmap',
           'save_heatmap_grid']

# Zennit's ``CMAPS`` sources: comma-separated hex colours (``rgb`` or ``rrggbb``), each optionally
# prefixed by a hex palette index and ``:`` (``d`` means ``dd``). Colours without an index are spread
# evenly between their indexed neighbours; the first and last default to 0 and 255.
_SOURCES: dict[str, str] = {
    'gray': '000,fff',  # black to white
    'wred': 'fff,f00',  # white to red
    'wblue': 'fff,00f',  # white to blue
    'hot': '000,f00,ff0,fff',  # black to red to yellow to white
    'cold': '000,00f,0ff',  # black to blue to cyan
    'coldnhot': '0ff,00f,80:000,f00,ff0,fff',  # reversed cold + hot, black centre
    'bwr': '00f,80:fff,f00',  # blue to white to red
    'france': '0055a4,80:fff,ef4135',  # blue-white-red of the French flag
    'seismic': '0000d0,80:d0d0d0,d00000',  # bwr with brightness 0xd0
    'coolio': '00d0d0,80:d0d0d0,d000d0',  # cyan to grey to magenta
    'coleus': '00d000,80:d0d0d0,d000d0',  # green to grey to magenta
}
COLORMAPS: tuple[str, ...] = tuple(_SOURCES)  # the names accepted by ``colormap`` and ``cmap=``

_RGB = tuple[int, int, int]


def _anchors(source: str) -> tuple[list[int], list[_RGB]]:
    """Compile a colour-map source into ascending anchor indices (0 .. 256) and their colours."""
    nodes: list[tuple[int | None, _RGB]] = []
    for item in source.split(','):
        key, _, code = (part.strip() for part in item.rpartition(':'))
        code = ''.join(char * 2 for char in code) if len(code) == 3 else code
        key = key * 2 if len(key) == 1 else key
        rgb = (int(code[:2], 16), int(code[2:4], 16), int(code[4:], 16))
        nodes.append((int(key, 16) if key else None, rgb))

    first_index, first_rgb = nodes[0]
    anchors = [(0, first_rgb)] + ([(first_index, first_rgb)] if first_index else [])
    pending: list[_RGB] = []
    for number, (index, rgb) in enumerate(nodes[1:], start=2):
        if index is None and number < len(nodes):
            pending.append(rgb)
            continue
        index = 255 if index is None else index
        start, step = anchors[-1][0], 1.0 / (len(pending) + 1)
        for alpha, color in ((k * step, color) for k, color in enumerate(pending, 1)):
            anchors.append((int(start * (1.0 - alpha) + index * alpha), color))  # truncated, as Zennit
        pending = []
        anchors.append((index, rgb))
    anchors.append((256, anchors[-1][1]))
    return [index for index, _ in anchors], [rgb for _, rgb in anchors]


@cache
def _palette(name: str, level: float) -> torch.Tensor:
    """Zennit's ``ColorMap.palette(level)`` of a built-in colour map as a (256, 3) uint8 tensor."""
    indices, colors = _anchors(_SOURCES[name])
    bounds, rgb = torch.tensor(indices, dtype=torch.float64), torch.tensor(colors, dtype=torch.float64)
    x = torch.arange(256, dtype=torch.float64) * (2.0 / 255) - 1.0  # numpy.linspace(-1, 1, 256), bit for bit
    x[-1] = 1.0
    pos = ((x * level + 1.0) / 2.0).clamp(0.0, 1.0) * 255
    upper = torch.searchsorted(bounds[:-1], pos, right=True)  # piecewise-linear between anchors
    alpha = ((pos - bounds[upper - 1]) / (bounds[upper] - bounds[upper - 1]))[:, None]
    values = (rgb[upper - 1] * (1 - alpha) + rgb[upper] * alpha) / 255.0
    return (values * 255.0).round(decimals=12).clamp(0.0, 255.0).to(torch.uint8)


def _number(func: str, label: str, value: Any, *, integer: bool = False, minimum: int | None = None) -> Any:
    """Check that ``value`` is a finite real number, or an int of at least ``minimum``."""
    kind = f'an int >= {minimum}' if integer else 'a finite real number'
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f'{func}: {label} must be {kind}, got {type(value).__name__}')
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise ValueError(f'{func}: {label} must be {kind}, got {value!r}')
    return value


def _checked_palette(func: str, cmap: str, level: float) -> torch.Tensor:
    if not isinstance(cmap, str) or cmap not in _SOURCES:
        raise ValueError(f'{func}: unknown colour map {cmap!r}; known colour maps: {", ".join(COLORMAPS)}')
    if _number(func, 'level', level) <= 0:
        raise ValueError(f'{func}: level must be > 0, got {level!r}')
    return _palette(cmap, float(level))


def colormap(name: str, *, level: float = 1.0) -> torch.Tensor:
    """Return the 256-entry RGB palette of a Zennit colour map.

    Args:
        name: One of :data:`COLORMAPS`, e.g. ``'bwr'``, ``'coldnhot'``, ``'gray'``.
        level: Zennit's contrast level: entry ``i`` takes the map's colour at
            ``clip((level * (2 * i / 255 - 1) + 1) / 2, 0, 1)``, so ``level > 1`` saturates
            earlier towards both ends and ``level < 1`` uses only the centre of the map.

    Returns:
        A new ``(256, 3)`` tensor of dtype ``torch.uint8``.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the known names) or ``level``
            is not finite and > 0.
        TypeError: If ``level`` is not a real number.

    Example:
        >>> colormap('bwr')[[0, 128, 255]].tolist()
        [[0, 0, 255], [255, 255, 255], [255, 0, 0]]
    """
    return _checked_palette('colormap', name, level).clone()


def _as_maps(func: str, relevance: Any, batched: bool) -> torch.Tensor:
    """Validate ``relevance``; return it detached on the CPU as (N, H, W), channels summed."""
    shapes = '(N, H, W) or (N, C, H, W)' if batched else '(H, W) or (C, H, W)'
    if not isinstance(relevance, torch.Tensor):
        raise TypeError(f'{func}: expected relevance to be a torch.Tensor of shape {shapes}, '
                        f'got {type(relevance).__name__}')
    rank = 3 if batched else 2
    if relevance.dim() not in (rank, rank + 1):
        raise ValueError(f'{func}: expected relevance of shape {shapes}, '
                         f'got shape {tuple(relevance.shape)} with {relevance.dim()} dimension(s)')
    if relevance.dtype == torch.bool or relevance.is_complex():
        raise TypeError(f'{func}: expected real-valued relevance, got dtype {relevance.dtype}')
    if relevance.numel() == 0:
        raise ValueError(f'{func}: relevance must not be empty, got shape {tuple(relevance.shape)}')
    # computed in float64: float32 inputs may differ from Zennit (float32 arithmetic) by one palette
    # index where rounding straddles an index boundary (a few pixels per million)
    maps = relevance.detach().to(device='cpu', dtype=torch.float64)
    maps = maps.sum(dim=-3) if relevance.dim() == rank + 1 else maps  # sum over channels, as usual in LRP
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f'{func}: relevance contains non-finite values (nan or inf); '
                         'replace them first, e.g. with torch.nan_to_num')
    return maps if batched else maps[None]


def _indices(func: str, maps: torch.Tensor, symmetric: bool, vmin: float | None, vmax: float | None,
             joint: bool) -> torch.Tensor:
    """Normalise (N, H, W) maps as Zennit's ``imgify`` does and quantise them to palette indices."""
    for label, value in (('vmin', vmin), ('vmax', vmax)):
        if value is not None:
            _number(func, label, value)
    dims = (0, 1, 2) if joint else (1, 2)
    if symmetric:  # zero sits in the middle of the palette; the largest magnitude at an end
        hi = maps.abs().amax(dim=dims, keepdim=True)
        lo = -hi
    else:  # the minimum gets the first colour and the maximum the last one
        lo, hi = maps.amin(dim=dims, keepdim=True), maps.amax(dim=dims, keepdim=True)
    lo = lo if vmin is None else torch.full_like(lo, vmin)
    hi = hi if vmax is None else torch.full_like(hi, vmax)
    span = hi - lo
    if bool((span < 0).any()):
        bad = span < 0
        raise ValueError(f'{func}: empty normalisation range, vmin={lo[bad][0].item()!r} > vmax={hi[bad][0].item()!r}')
    if not bool(torch.isfinite(span).all()):
        raise ValueError(f'{func}: the normalisation range vmax - vmin overflows float64; rescale the relevance')
    # a zero-width range (e.g. a constant map) sends values below/at/above it to the first/middle/last colour
    step = (torch.sign(maps - lo) + 1) / 2
    scaled = torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, 1.0), step)
    return (scaled * 255).clamp(0, 255).to(torch.uint8)  # truncates, as Zennit's astype(uint8)


def _render(index: torch.Tensor, palette: torch.Tensor) -> Image.Image:
    """Turn an (H, W) uint8 index map into an RGB image through the palette."""
    height, width = index.shape
    image = Image.frombytes('P', (width, height), bytes(index.flatten().tolist()))
    image.putpalette(bytes(palette.flatten().tolist()))
    return image.convert('RGB')


def heatmap(relevance: torch.Tensor, *, cmap: str = 'bwr', symmetric: bool = True, level: float = 1.0,
            vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """Render a relevance map as an RGB heatmap.

    Args:
        relevance: Tensor of shape (H, W) or (C, H, W), channels are summed. Any real dtype and
            device; it is detached and moved to the CPU.
        cmap: Colour-map name, one of :data:`COLORMAPS`.
        symmetric: If True the range is ``[-max|r|, max|r|]``, so 0 lands in the middle of the
            colour map (palette index 127, as in Zennit); otherwise it is ``[min r, max r]``.
        level: Zennit's contrast level of the palette (see :func:`colormap`), > 0.
        vmin: Overrides the lower end of the range.
        vmax: Overrides the upper end of the range.

    Returns:
        An RGB ``PIL.Image.Image`` of size (W, H).

    Raises:
        TypeError: If ``relevance`` is not a real-valued tensor, or a number argument is no number.
        ValueError: On a wrong rank, empty or non-finite relevance, an unknown ``cmap``,
            ``level <= 0``, non-finite ``vmin``/``vmax``, ``vmin > vmax`` or a range overflowing float64.

    Example:
        >>> heatmap(torch.tensor([[-1.0, 0.0, 1.0]])).getpixel((2, 0))
        (255, 0, 0)
    """
    palette = _checked_palette('heatmap', cmap, level)
    maps = _as_maps('heatmap', relevance, batched=False)
    return _render(_indices('heatmap', maps, symmetric, vmin, vmax, joint=True)[0], palette)


def heatmap_grid(relevance: torch.Tensor, *, ncols: int | None = None, padding: int = 2,
                 shared_scale: bool = False, cmap: str = 'bwr', symmetric: bool = True, level: float = 1.0,
                 vmin: float | None = None, vmax: float | None = None, titles: Sequence[str] | None = None,
                 row_labels: Sequence[str] | None = None, colorbar: bool = False,
                 colorbar_labels: Sequence[str] | None = None, cell_size: int | None = None,
                 font_size: int | None = None) -> Image.Image:
    """Render a batch of relevance maps as a grid of heatmaps, filled row by row.

    Args:
        relevance: Tensor of shape (N, H, W) or (N, C, H, W), channels are summed.
        ncols: Number of columns, by default ``isqrt(N)`` as in Zennit's ``gridify``;
            there are ``ceil(N / ncols)`` rows.
        padding: White pixels between neighbouring cells (none around the border): the grid
            is ``ncols * W + (ncols - 1) * padding`` pixels wide. Empty cells are white too.
        shared_scale: If False every map is normalised on its own, if True all jointly.
        cmap, symmetric, level, vmin, vmax: As for :func:`heatmap`.
        titles, row_labels, colorbar, colorbar_labels, cell_size, font_size: As for :func:`labelled_grid`
            (one title per column, one label per row; ``colorbar=True`` shows ``cmap`` at ``level``). With
            none of them the grid is the bare cells; ``colorbar_labels`` default to ``positive``, ``0``,
            ``negative`` when ``symmetric``, else ``max``, ``min``.

    Returns:
        An RGB ``PIL.Image.Image``.

    Raises:
        TypeError: As :func:`heatmap`, or if ``ncols``/``padding`` is not an int.
        ValueError: As :func:`heatmap`, or if ``ncols < 1`` or ``padding < 0``, or as :func:`labelled_grid`.

    Example:
        >>> heatmap_grid(torch.randn(5, 3, 8, 8), padding=1).size  # 2 columns, 3 rows
        (17, 26)
        >>> heatmap_grid(torch.randn(2, 8, 8), ncols=2, titles=['a', 'b'], colorbar=True).width > 18
        True
    """
    palette = _checked_palette('heatmap_grid', cmap, level)
    maps = _as_maps('heatmap_grid', relevance, batched=True)
    count, height, width = maps.shape
    if ncols is None:
        ncols = math.isqrt(count)
    _number('heatmap_grid', 'ncols', ncols, integer=True, minimum=1)
    _number('heatmap_grid', 'padding', padding, integer=True, minimum=0)
    nrows = -(-count // ncols)
    indices = _indices('heatmap_grid', maps, symmetric, vmin, vmax, joint=shared_scale)
    if titles is not None or row_labels is not None or colorbar or cell_size is not None:
        cells = [_render(index, palette) for index in indices]
        rows = [cells[start:start + ncols] for start in range(0, count, ncols)]
        labels = colorbar_labels if colorbar_labels is not None else (
            ('positive', '0', 'negative') if symmetric else ('max', 'min'))
        return _labelled_grid('heatmap_grid', rows, titles=titles, row_labels=row_labels,
                              colorbar=cmap if colorbar else None, colorbar_labels=labels, level=level,
                              cell_size=cell_size, padding=padding, font_size=font_size)
    size = (ncols * width + (ncols - 1) * padding, nrows * height + (nrows - 1) * padding)
    grid = Image.new('RGB', size, (255, 255, 255))
    for number, index in enumerate(indices):
        row, col = divmod(number, ncols)
        grid.paste(_render(index, palette), (col * (width + padding), row * (height + padding)))
    return grid


def _font(size: int) -> Any:
    """Pillow's built-in font at ``size`` pixels (a scalable one from Pillow 10.1, else the fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_size(text: str, font: Any) -> tuple[int, int]:
    """Width and height of ``text`` (lines split at newlines) in ``font``."""
    if not text:
        return 0, 0
    box = ImageDraw.Draw(Image.new('RGB', (1, 1))).multiline_textbbox((0, 0), text, font=font, spacing=2)
    # integers from an integer origin (Pillow annotates floats for a float one)
    left, top, right, bottom = cast("tuple[int, int, int, int]", box)
    return right - min(left, 0), bottom - min(top, 0)


def _wrap(text: str, font: Any, width: int) -> str:
    """``text`` with line breaks between words so that each line fits ``width`` pixels where it can."""
    lines: list[str] = []
    for paragraph in text.split('\n'):
        line = ''
        for word in paragraph.split(' '):
            for piece, joint in _pieces(word, font, width):
                candidate = f'{line}{joint}{piece}' if line else piece
                if line and _text_size(candidate, font)[0] > width:
                    lines.append(line)
                    line = piece
                else:
                    line = candidate
        lines.append(line)
    return '\n'.join(lines)


def _pieces(word: str, font: Any, width: int) -> list[tuple[str, str]]:
    """A word as (piece, what joins it to the previous one): whole, or after its underscores if it is too wide."""
    if _text_size(word, font)[0] <= width or '_' not in word.strip('_'):
        return [(word, ' ')]
    parts = word.split('_')
    return [(part + ('_' if number < len(parts) - 1 else ''), ' ' if number == 0 else '')
            for number, part in enumerate(parts)]


def _texts(func: str, label: str, values: Sequence[str] | None, count: int | None) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str) or not all(isinstance(value, str) for value in values):
        raise TypeError(f'{func}: {label} must be a sequence of str, got {values!r}')
    if count is not None and len(values) != count:
        raise ValueError(f'{func}: expected {count} {label} (one per {label[:-1].split("_")[0]}), '
                         f'got {len(values)}: {list(values)!r}')
    return list(values)


def colorbar(cmap: str = 'bwr', *, level: float = 1.0, height: int = 256, width: int = 16,
             labels: Sequence[str] = ('positive', '0', 'negative'), font_size: int = 14) -> Image.Image:
    """A vertical colour bar of a colour map, its last colour at the top, with labels beside it.

    Args:
        cmap: Colour-map name, one of :data:`COLORMAPS`.
        level: Contrast level of the palette (see :func:`colormap`), as used for the heatmaps.
        height: Height of the bar in pixels (>= 2).
        width: Width of the bar in pixels (>= 1).
        labels: Texts from top to bottom, spread evenly along the bar (the first at the top, the last at the
            bottom); for the symmetric heatmaps of :func:`heatmap` the top is the largest positive value, the
            middle zero and the bottom the most negative value.
        font_size: Text height in pixels.

    Returns:
        An RGB ``PIL.Image.Image``, white around the bar.

    Example:
        >>> bar = colorbar('bwr', height=64, labels=())  # no labels: the bar alone, 16 x 64 pixels
        >>> bar.getpixel((8, 0)), bar.getpixel((8, 63))  # red at the top, blue at the bottom
        ((255, 0, 0), (0, 0, 255))
    """
    palette = _checked_palette('colorbar', cmap, level)
    _number('colorbar', 'height', height, integer=True, minimum=2)
    _number('colorbar', 'width', width, integer=True, minimum=1)
    _number('colorbar', 'font_size', font_size, integer=True, minimum=1)
    texts = _texts('colorbar', 'labels', labels, None) or []
    return _colorbar(palette, height, width, texts, _font(font_size))


def _colorbar(palette: torch.Tensor, height: int, width: int, labels: Sequence[str], font: Any) -> Image.Image:
    """The bar (top: palette entry 255) with a tick and a label per entry of ``labels``."""
    steps = torch.linspace(255, 0, height).round().to(torch.uint8)
    bar = _render(steps[:, None].expand(height, width).contiguous(), palette)
    tick, gap = (max(3, width // 3), max(2, width // 4)) if labels else (0, 0)
    label_width = max((_text_size(text, font)[0] for text in labels), default=0)
    label_height = max((_text_size(text, font)[1] for text in labels), default=0)
    pad = label_height // 2 + 1 if labels else 0  # room for the first and last label to centre on the ends
    image = Image.new('RGB', (width + tick + gap + label_width, height + 2 * pad), (255, 255, 255))
    image.paste(bar, (0, pad))
    draw = ImageDraw.Draw(image)
    for number, text in enumerate(labels):
        y = pad + round(number * (height - 1) / max(len(labels) - 1, 1))
        draw.line([(width, y), (width + tick - 1, y)], fill=(0, 0, 0))
        text_height = _text_size(text, font)[1]
        draw.multiline_text((width + tick + gap, y - text_height // 2), text, fill=(0, 0, 0), font=font, spacing=2)
    return image


def labelled_grid(rows: Sequence[Sequence[Image.Image]], *, titles: Sequence[str] | None = None,
                  row_labels: Sequence[str] | None = None, colorbar: str | None = None,
                  colorbar_labels: Sequence[str] = ('positive', '0', 'negative'), level: float = 1.0,
                  cell_size: int | tuple[int, int] | None = None, padding: int = 2,
                  font_size: int | None = None) -> Image.Image:
    """Pictures in a grid with column titles, row labels and a colour bar: a figure that reads on its own.

    Args:
        rows: Rows of pictures (inputs, :func:`heatmap` s, anything Pillow opens); a row may be shorter than the
            longest, its last cells stay white.
        titles: One title per column, written above it (wrapped at spaces to the column's width).
        row_labels: One label per row, written left of it.
        colorbar: A colour-map name: its bar is drawn right of the grid, as tall as the grid, its last colour
            at the top (for :func:`heatmap` with ``cmap='bwr'``: red, the largest positive relevance).
        colorbar_labels: Texts along the bar from top to bottom (see :func:`colorbar`).
        level: Contrast level of the colour bar's palette, as for the heatmaps.
        cell_size: Every picture resized (nearest neighbour) to this size, an int for squares or
            ``(width, height)``; by default the size of the first picture.
        padding: White pixels between neighbouring cells.
        font_size: Text height in pixels; by default a ninth of the cell height, at least 10.

    Returns:
        An RGB ``PIL.Image.Image`` on white.

    Raises:
        TypeError: If a cell is not a ``PIL.Image.Image``, or titles/labels are not sequences of str.
        ValueError: If there are no pictures, titles or labels do not match the columns or rows, an unknown
            colour map, or a size below 1.

    Example:
        >>> cells = [[heatmap(torch.randn(8, 8)), heatmap(torch.randn(8, 8))]]
        >>> figure = labelled_grid(cells, titles=['first', 'second'], row_labels=['x'], colorbar='bwr',
        ...                        cell_size=64)
        >>> figure.width > 2 * 64 and figure.height > 64
        True
    """
    return _labelled_grid('labelled_grid', rows, titles=titles, row_labels=row_labels, colorbar=colorbar,
                          colorbar_labels=colorbar_labels, level=level, cell_size=cell_size, padding=padding,
                          font_size=font_size)


def _labelled_grid(func: str, rows: Sequence[Sequence[Image.Image]], *, titles: Sequence[str] | None,
                   row_labels: Sequence[str] | None, colorbar: str | None, colorbar_labels: Sequence[str],
                   level: float, cell_size: int | tuple[int, int] | None, padding: int,
                   font_size: int | None) -> Image.Image:
    rows = [list(row) for row in rows]
    cells = [cell for row in rows for cell in row]
    if not cells:
        raise ValueError(f'{func}: expected at least one picture, got {len(rows)} empty row(s)')
    for cell in cells:
        if not isinstance(cell, Image.Image):
            raise TypeError(f'{func}: every cell must be a PIL.Image.Image, got {type(cell).__name__}')
    ncols, nrows = max(len(row) for row in rows), len(rows)
    titles = _texts(func, 'titles', titles, ncols)
    row_labels = _texts(func, 'row_labels', row_labels, nrows)
    _number(func, 'padding', padding, integer=True, minimum=0)
    width, height = (cell_size, cell_size) if isinstance(cell_size, int) else (cell_size or cells[0].size)
    _number(func, 'cell width', width, integer=True, minimum=1)
    _number(func, 'cell height', height, integer=True, minimum=1)
    size = max(10, height // 9) if font_size is None else _number(func, 'font_size', font_size, integer=True,
                                                                   minimum=1)
    font, margin = _font(size), max(2, size // 2)
    bar = None
    if colorbar is not None:
        palette = _checked_palette(func, colorbar, level)
        bar_height = nrows * height + (nrows - 1) * padding
        bar = _colorbar(palette, bar_height, max(8, size), _texts(func, 'colorbar_labels', colorbar_labels, None)
                        or [], font)

    wrapped = [_wrap(title, font, width) for title in titles] if titles else []
    top = max((_text_size(text, font)[1] for text in wrapped), default=0) + 2 * margin if titles else 0
    left = max((_text_size(text, font)[0] for text in row_labels), default=0) + 2 * margin if row_labels else 0
    grid_width, grid_height = ncols * width + (ncols - 1) * padding, nrows * height + (nrows - 1) * padding
    bar_pad = (bar.height - grid_height) // 2 if bar is not None else 0
    total_width = left + grid_width + (2 * margin + bar.width + margin if bar is not None else 0)
    total_height = top + grid_height + max(bar_pad, 0) + (margin if titles or bar is not None else 0)
    figure = Image.new('RGB', (total_width, total_height), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            picture = cell.convert('RGB')
            picture = picture if picture.size == (width, height) else picture.resize(
                (width, height), Image.NEAREST  # type: ignore[attr-defined]  # Pillow sets its constants with setattr
            )
            figure.paste(picture, (left + c * (width + padding), top + r * (height + padding)))
    for c, text in enumerate(wrapped):
        text_width, text_height = _text_size(text, font)
        x = left + c * (width + padding) + (width - text_width) // 2
        draw.multiline_text((x, top - margin - text_height), text, fill=(0, 0, 0), font=font, spacing=2,
                            align='center')
    for r, text in enumerate(row_labels or []):
        text_width, text_height = _text_size(text, font)
        y = top + r * (height + padding) + (height - text_height) // 2
        draw.multiline_text((left - margin - text_width, y), text, fill=(0, 0, 0), font=font, spacing=2,
                            align='right')
    if bar is not None:
        figure.paste(bar, (left + grid_width + 2 * margin, top - bar_pad))
    return figure


def _save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, format='PNG')
    return target


def save_heatmap(relevance: torch.Tensor, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``heatmap(relevance, **kwargs)`` to ``path`` as PNG, creating parent folders.

    Args:
        relevance: As for :func:`heatmap`.
        path: Destination file, written as PNG whatever its suffix.
        **kwargs: Keyword arguments of :func:`heatmap`.

    Returns:
        The path written, as a ``pathlib.Path``.

    Raises:
        TypeError, ValueError: As :func:`heatmap`.

    Example:
        >>> save_heatmap(torch.randn(8, 8), 'out/heatmap.png', cmap='coldnhot')  # doctest: +SKIP
    """
    return _save_png(heatmap(relevance, **kwargs), path)


def save_heatmap_grid(relevance: torch.Tensor, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``heatmap_grid(relevance, **kwargs)`` to ``path`` as PNG, creating parent folders.

    Args:
        relevance: As for :func:`heatmap_grid`.
        path: Destination file, written as PNG whatever its suffix.
        **kwargs: Keyword arguments of :func:`heatmap_grid`.

    Returns:
        The path written, as a ``pathlib.Path``.

    Raises:
        TypeError, ValueError: As :func:`heatmap_grid`.

    Example:
        >>> save_heatmap_grid(torch.randn(4, 8, 8), 'out/grid.png', ncols=4)  # doctest: +SKIP
    """
    return _save_png(heatmap_grid(relevance, **kwargs), path)
