"""The matrix of a generation's attribution (:class:`lrpfunc.hf.GenerationAttribution`) as a heatmap: one row per
generated token, one column per token it may depend on, as PNG (Pillow) or as HTML."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from .image import _checked_palette, _colorbar, _indices, _number
from .text import RGB, _check_flag, _default_font, _drawable, _hex, _text_color, _token_list, display_tokens

__all__ = ["generation_heatmap", "generation_heatmap_html", "save_generation_heatmap", "save_generation_heatmap_html"]

_FUNCTIONS = ("generation_heatmap", "generation_heatmap_html")
_BLANK: RGB = (255, 255, 255)
_GRID: RGB = (225, 225, 225)


def _matrix(func: str, tokens: Any, relevance: Any, prompt_length: int | None, row_tokens: Any, causal: bool,
            clean_tokens: bool) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
    """Column labels, row labels, the relevance ``(N, C)`` as float64 and the mask of cells that hold relevance."""
    if not isinstance(relevance, torch.Tensor) or relevance.is_complex() or relevance.dtype == torch.bool:
        raise TypeError(f"{func}: relevance must be a real tensor (N, C), got {type(relevance).__name__}")
    if relevance.ndim == 3 and relevance.shape[0] == 1:
        relevance = relevance[0]  # one sequence of a batch (B = 1)
    if relevance.ndim != 2 or relevance.numel() == 0:
        raise ValueError(f"{func}: relevance must be (N, C): one row per generated token, got {tuple(relevance.shape)}"
                         f"; give result.relevance[b] for sequence b")
    values = relevance.detach().to("cpu", torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError(f"{func}: relevance has non-finite values")
    count, width = values.shape
    _check_flag(func, "causal", causal)
    _check_flag(func, "clean_tokens", clean_tokens)
    columns = _token_list(func, tokens)
    if len(columns) != width:
        raise ValueError(f"{func}: {len(columns)} tokens for {width} columns of relevance")
    if row_tokens is None or causal:
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or not 0 <= prompt_length <= width:
            raise ValueError(f"{func}: prompt_length must be an int in [0, {width}] (result.prompt_length), got "
                             f"{prompt_length!r}")
    rows = _token_list(func, row_tokens, "row_tokens") if row_tokens is not None else columns[prompt_length:]
    if len(rows) < count:
        raise ValueError(f"{func}: {len(rows)} row tokens for {count} rows of relevance")
    rows = rows[:count]
    if causal:
        assert prompt_length is not None
        # row n explains the token at prompt_length + n: only the tokens before it can hold relevance
        mask = torch.arange(width)[None] < (prompt_length + torch.arange(count))[:, None]
    else:
        mask = torch.ones(count, width, dtype=torch.bool)
    if clean_tokens:
        both = display_tokens(columns + rows)
        columns, rows = both[:width], both[width:]
    return columns, rows, values, mask


def _colors(func: str, values: torch.Tensor, mask: torch.Tensor, cmap: str, level: float, symmetric: bool,
            shared_scale: bool) -> list[list[RGB | None]]:
    """The colour of every cell (``None`` where it holds no relevance), each row normalised on its own unless
    ``shared_scale``."""
    _check_flag(func, "symmetric", symmetric)
    _check_flag(func, "shared_scale", shared_scale)
    palette = _checked_palette(func, cmap, level)
    index = _indices(func, torch.where(mask, values, 0.0)[:, None, :], symmetric, None, None,
                     joint=shared_scale)[:, 0, :]
    colors = palette[index.to(torch.int64)].tolist()
    return [[(r, g, b) if keep else None for (r, g, b), keep in zip(row, row_mask, strict=True)]
            for row, row_mask in zip(colors, mask.tolist(), strict=True)]


def generation_heatmap(tokens: Sequence[str], relevance: torch.Tensor, *, prompt_length: int | None = None,
                       row_tokens: Sequence[str] | None = None, causal: bool = True, cmap: str = "bwr",
                       symmetric: bool = True, level: float = 1.0, shared_scale: bool = False, cell: int = 18,
                       font_size: int = 12, title: str | None = None, colorbar: bool = True,
                       clean_tokens: bool = True) -> Image.Image:
    """Draw the attribution of a generation as a matrix: generated tokens as rows, the tokens they depend on as columns.

    Each cell is coloured as :func:`lrpfunc.text.token_colors` colours a token (``cmap`` at ``level``, symmetric
    around zero by default), each row normalised on its own unless ``shared_scale``; with ``causal`` (a decoder-only
    generation) the cells from the row's own position on hold no relevance and stay blank. Column labels run
    vertically above the matrix, row labels left of it; a colour bar (``positive``, ``0``, ``negative``) on the right.

    Args:
        tokens: The column tokens: ``tokenizer.convert_ids_to_tokens(result.sequences[b])`` for a decoder-only model,
            the prompt's tokens for an encoder-decoder's ``relevance``, the decoder's for its ``decoder_relevance``.
        relevance: ``(N, C)`` (or ``(1, N, C)``): ``result.relevance[b]`` of :func:`lrpfunc.hf.attribute_generation`.
        prompt_length: ``result.prompt_length`` (needed with ``causal`` or without ``row_tokens``): row ``n`` explains
            the token at ``prompt_length + n``.
        row_tokens: The generated tokens labelling the rows; default ``tokens[prompt_length:]``.
        causal: Blank the cells at and after each row's own position (``False`` for an encoder's tokens, which every
            generated token may read).
        cmap, symmetric, level, shared_scale: As for :func:`lrpfunc.text.token_colors`.
        cell: The side of a cell in pixels.
        font_size: Size of the labels in pixels (Pillow's built-in font; see :func:`lrpfunc.text.token_heatmap`).
        title: Optional line of text above the matrix.
        colorbar: Draw the colour bar.
        clean_tokens: Pass the tokens through :func:`lrpfunc.text.display_tokens`.

    Returns:
        An RGB ``PIL.Image.Image`` on a white background.

    Raises:
        TypeError: On a relevance that is not a real tensor, tokens that are not strings, or a flag that is not a bool.
        ValueError: On a relevance that is not ``(N, C)`` or not finite, token counts that do not match, a missing or
            out-of-range ``prompt_length``, or bad colour, ``cell`` or ``font_size`` arguments.

    Example:
        >>> result = explain(input_ids, 8)  # lrpfunc.hf.attribute_generation(model, composites.attnlrp())
        >>> tokens = tokenizer.convert_ids_to_tokens(result.sequences[0])
        >>> generation_heatmap(tokens, result.relevance[0], prompt_length=result.prompt_length).save("map.png")
    """
    func = _FUNCTIONS[0]
    _number(func, "cell", cell, integer=True, minimum=4)
    _number(func, "font_size", font_size, integer=True, minimum=1)
    _check_flag(func, "colorbar", colorbar)
    columns, rows, values, mask = _matrix(func, tokens, relevance, prompt_length, row_tokens, causal, clean_tokens)
    colors = _colors(func, values, mask, cmap, level, symmetric, shared_scale)
    font = _default_font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def extent(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), _drawable(text, font), font=font)
        return round(right - left), round(bottom - top)

    pad = max(2, font_size // 3)
    label_width = max(extent(text)[0] for text in rows) + 2 * pad
    column_height = max(extent(text)[0] for text in columns) + 2 * pad
    title_height = extent(title)[1] + 2 * pad if title else 0
    grid_width, grid_height = cell * len(columns), cell * len(rows)
    bar_width = 0
    bar = None
    if colorbar:
        bar = _colorbar(_checked_palette(func, cmap, level), max(grid_height, 3 * cell), max(4, cell // 2),
                        ["positive", "0", "negative"], font)
        bar_width = bar.width + 2 * pad
    body = max(grid_height, bar.height if bar is not None else 0)
    size = (pad + label_width + grid_width + bar_width + pad, title_height + column_height + body + 2 * pad)
    image = Image.new("RGB", (max(size[0], extent(title)[0] + 2 * pad if title else 0), size[1]), _BLANK)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((pad, pad), _drawable(title, font), font=font, fill=(0, 0, 0))
    left, top = pad + label_width, title_height + column_height
    for index, text in enumerate(columns):  # vertical labels: drawn on their own image, turned by 90 degrees
        w, h = extent(text)
        label = Image.new("RGB", (w + 2, h + pad), _BLANK)
        ImageDraw.Draw(label).text((0, 0), _drawable(text, font), font=font, fill=(0, 0, 0))
        turned = label.rotate(90, expand=True)
        image.paste(turned, (left + index * cell + (cell - turned.width) // 2, top - pad - turned.height))
    for index, text in enumerate(rows):
        w, h = extent(text)
        draw.text((left - pad - w, top + index * cell + (cell - h) // 2 - 1), _drawable(text, font), font=font,
                  fill=(0, 0, 0))
    for r, row in enumerate(colors):
        for c, color in enumerate(row):
            box = (left + c * cell, top + r * cell, left + (c + 1) * cell - 1, top + (r + 1) * cell - 1)
            draw.rectangle(box, fill=color if color is not None else _BLANK, outline=_GRID)
    if bar is not None:
        image.paste(bar, (left + grid_width + pad, top))
    return image


def generation_heatmap_html(tokens: Sequence[str], relevance: torch.Tensor, *, prompt_length: int | None = None,
                            row_tokens: Sequence[str] | None = None, causal: bool = True, cmap: str = "bwr",
                            symmetric: bool = True, level: float = 1.0, shared_scale: bool = False,
                            title: str | None = None, show_values: bool = True, clean_tokens: bool = True) -> str:
    """The matrix of :func:`generation_heatmap` as a self-contained HTML ``<table>`` (inline styles, escaped text):
    a header row of the column tokens, one row per generated token, each cell coloured, blank cells empty, every
    value in the cell's ``title`` tooltip with ``show_values``.

    Args:
        tokens, relevance, prompt_length, row_tokens, causal: As for :func:`generation_heatmap`.
        cmap, symmetric, level, shared_scale, title, clean_tokens: As for :func:`generation_heatmap`.
        show_values: Put each cell's relevance (4 significant digits) in its tooltip.

    Returns:
        The HTML fragment as a string.

    Raises:
        TypeError, ValueError: As :func:`generation_heatmap`.
    """
    func = _FUNCTIONS[1]
    _check_flag(func, "show_values", show_values)
    columns, rows, values, mask = _matrix(func, tokens, relevance, prompt_length, row_tokens, causal, clean_tokens)
    colors = _colors(func, values, mask, cmap, level, symmetric, shared_scale)
    cell_style = "width: 1.4em; height: 1.4em; padding: 0; border: 1px solid #e1e1e1"
    head = "".join(f'<th style="writing-mode: vertical-rl; font-weight: normal; padding: 2px">{html.escape(text)}</th>'
                   for text in columns)
    lines = ['<div class="lrpfunc-generation-heatmap" style="font-family: sans-serif; font-size: 12px">']
    if title is not None:
        lines.append(f'<div style="font-weight: bold; margin-bottom: 0.5em">{html.escape(str(title))}</div>')
    lines.append(f'<table style="border-collapse: collapse"><tr><th></th>{head}</tr>')
    for text, row, row_values in zip(rows, colors, values.tolist(), strict=True):
        cells = []
        for color, value in zip(row, row_values, strict=True):
            if color is None:
                cells.append(f'<td style="{cell_style}"></td>')
                continue
            tip = f' title="{value + 0.0:.4g}"' if show_values else ""
            cells.append(f'<td style="{cell_style}; background-color: {_hex(color)}; color: '
                         f'{_hex(_text_color(color))}"{tip}></td>')
        lines.append(f'<tr><th style="text-align: right; font-weight: normal; padding-right: 4px">'
                     f'{html.escape(text)}</th>{"".join(cells)}</tr>')
    lines += ["</table>", "</div>"]
    return "\n".join(lines)


def save_generation_heatmap(tokens: Sequence[str], relevance: torch.Tensor, path: str | os.PathLike[str],
                            **kwargs: Any) -> Path:
    """Write :func:`generation_heatmap` to ``path`` as PNG (parent folders created); returns the path."""
    target = Path(path)
    image = generation_heatmap(tokens, relevance, **kwargs)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, format="PNG")
    return target


def save_generation_heatmap_html(tokens: Sequence[str], relevance: torch.Tensor, path: str | os.PathLike[str],
                                 **kwargs: Any) -> Path:
    """Write :func:`generation_heatmap_html` as a UTF-8 HTML document (parent folders created); returns the path."""
    fragment = generation_heatmap_html(tokens, relevance, **kwargs)
    title = html.escape(str(kwargs.get("title") or "Generation relevance"))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
                      f'</head>\n<body style="margin: 1em">\n{fragment}\n</body>\n</html>\n', encoding="utf-8")
    return target
