"""Render token relevance (e.g. of a transformer) as coloured text, as HTML or as a PNG image.

Colours come from :mod:`lrpfunc.image`: the same Zennit colour maps, contrast ``level`` and
normalisation as :func:`lrpfunc.image.heatmap`, so a token and a pixel with the same normalised
relevance get the same colour. Tokens as tokenizers spell them (``tokenizer.convert_ids_to_tokens``)
are cleaned up for display by :func:`display_tokens`.
"""
from __future__ import annotations

import html
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image, ImageDraw, ImageFont

from .image import _checked_palette, _indices, _number  # shared with the image heatmaps, not copied

__all__ = ['SCHEMES', 'display_tokens', 'save_token_heatmap', 'save_token_heatmap_html', 'token_colors',
           'token_heatmap', 'token_heatmap_html', 'generation_heatmap', 'generation_heatmap_html',
           'save_generation_heatmap', 'save_generation_heatmap_html']

RGB = tuple[int, int, int]
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
SCHEMES: tuple[str, ...] = ('auto', 'byte_level', 'sentencepiece', 'wordpiece', 'none')  # display_tokens(scheme=)

_BLACK, _WHITE = (0, 0, 0), (255, 255, 255)
_HTML_NEWLINE = '\u21b5'  # '↵' marks a newline inside a token's box; browsers have the glyph
_PNG_NEWLINE = '\\n'  # Pillow's built-in font has no arrow glyph
_TAB = '    '


# ---------------------------------------------------------------- tokens for display

def _byte_level_alphabet() -> dict[str, int]:
    """Invert GPT-2's ``bytes_to_unicode``: each of its 256 characters back to the byte it stands for.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7f-0xa0, 0xad)
    are shifted to U+0100 .. U+0143 in byte order, so the space 0x20 becomes 'Ġ' and the newline 'Ċ'.
    """
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    shifted = [byte for byte in range(256) if byte not in printable]
    return {**{chr(byte): byte for byte in printable}, **{chr(256 + n): byte for n, byte in enumerate(shifted)}}


_BYTE_OF = _byte_level_alphabet()
_SPECIAL = re.compile(r'<\|[^|\s]+\|>|<[^<>\s]+>|\[[A-Za-z_]+\]')  # <|endoftext|>, <s>, </s>, <pad>, [CLS], [SEP]
_BYTE_FALLBACK = re.compile(r'<0x([0-9A-Fa-f]{2})>')  # SentencePiece byte-fallback tokens, e.g. '<0x0A>'
_WORDPIECE_SPECIAL = re.compile(r'\[[A-Z_]+\]')
_SENTENCEPIECE_SPACE = '\u2581'  # '▁'


def _is_special(token: str) -> bool:
    """Whether ``token`` is a special token such as '<s>', '<|endoftext|>' or '[CLS]' (not '<0x0A>')."""
    return _SPECIAL.fullmatch(token) is not None and _BYTE_FALLBACK.fullmatch(token) is None


def _detect(tokens: list[str]) -> str:
    """Guess the tokenizer family of one sequence from its markers (see :func:`display_tokens`)."""
    words = [token for token in tokens if not _is_special(token)]
    if any(_SENTENCEPIECE_SPACE in token for token in words):
        return 'sentencepiece'
    if any('Ġ' in token or 'Ċ' in token for token in words) and all(char in _BYTE_OF for token in words
                                                                      for char in token):
        return 'byte_level'
    if any(token.startswith('##') and len(token) > 2 for token in words) or \
            any(_WORDPIECE_SPECIAL.fullmatch(token) for token in tokens):
        return 'wordpiece'
    return 'none'


def _from_byte_level(token: str) -> str:
    """Decode a byte-level token as UTF-8; bytes of an incomplete character show escaped."""
    if any(char not in _BYTE_OF for char in token):
        return token  # not byte-level text, e.g. a special token: shown as it is
    return bytes(_BYTE_OF[char] for char in token).decode('utf-8', errors='backslashreplace')


def _from_sentencepiece(token: str) -> str:
    """'▁' becomes a space; an ASCII byte-fallback token '<0xNN>' becomes its character."""
    fallback = _BYTE_FALLBACK.fullmatch(token)
    if fallback is not None:
        byte = int(fallback.group(1), 16)
        return chr(byte) if byte < 0x80 else token  # a lone byte of a multi-byte character stays '<0xE4>'
    return token.replace(_SENTENCEPIECE_SPACE, ' ')


def _from_wordpiece(token: str, *, first: bool) -> str:
    """'##x' continues the previous word ('x'); any other token but the first starts a new one (' x')."""
    if _is_special(token) or first:
        return token
    return token[2:] if token.startswith('##') and len(token) > 2 else ' ' + token  # continuation or new word


def display_tokens(tokens: Sequence[str], *, scheme: str = 'auto') -> list[str]:
    r"""Turn tokenizer tokens into the text they stand for, one string per token.

    The subword markers of the common tokenizer families are replaced by the text they encode, so
    ``''.join(display_tokens(tokens))`` reads like the input text:

    * ``'byte_level'`` (GPT-2, RoBERTa, Llama 3, Mistral-Nemo, ...): every character stands for one
      byte (GPT-2's ``bytes_to_unicode``: ``'Ġ'`` is a space, ``'Ċ'`` a newline, ``'Ã©'`` is ``'é'``);
      the bytes are decoded as UTF-8. A token holding only part of a multi-byte character (an emoji or
      CJK character split over two tokens) shows its bytes escaped, e.g. ``'\\xf0\\x9f'``.
    * ``'sentencepiece'`` (Llama 2, T5, XLM-R, Gemma): ``'▁'`` is a space; byte-fallback tokens
      ``'<0x0A>'`` of ASCII bytes become that character (here a newline), others stay as they are.
    * ``'wordpiece'`` (BERT): ``'##ing'`` continues the previous token (``'ing'``); every other token
      starts a new word and gets a leading space, except the first of the sequence.
    * ``'none'``: tokens are returned unchanged.

    Special tokens (``'<s>'``, ``'</s>'``, ``'<pad>'``, ``'<|endoftext|>'``, ``'[CLS]'``, ``'[SEP]'``, ...)
    are kept as they are in every scheme.

    ``scheme='auto'`` detects the family of the whole sequence, in this order: ``'sentencepiece'`` if
    a token contains ``'▁'``; ``'byte_level'`` if a token contains ``'Ġ'`` or ``'Ċ'`` and every
    non-special token is made of the 256 byte characters; ``'wordpiece'`` if a token starts with
    ``'##'`` or is a bracketed special token such as ``'[CLS]'``; otherwise ``'none'``. A sequence
    without these markers (e.g. a single GPT-2 word) is left unchanged: pass the scheme explicitly.

    Args:
        tokens: One sequence of token strings, e.g. ``tokenizer.convert_ids_to_tokens(ids)``.
        scheme: One of :data:`SCHEMES`.

    Returns:
        A new list with one display string per token.

    Raises:
        TypeError: If ``tokens`` is a single ``str`` or holds something other than strings.
        ValueError: If ``scheme`` is unknown.

    Example:
        >>> display_tokens(['Hello', 'Ġwor', 'ld', 'Ċ'])
        ['Hello', ' wor', 'ld', '\n']
        >>> display_tokens(['[CLS]', 'play', '##ing', '[SEP]'])
        ['[CLS]', ' play', 'ing', '[SEP]']
    """
    tokens = _token_list('display_tokens', tokens)
    if scheme not in SCHEMES:
        raise ValueError(f'display_tokens: unknown scheme {scheme!r}; known schemes: {", ".join(SCHEMES)}')
    scheme = _detect(tokens) if scheme == 'auto' else scheme
    if scheme == 'byte_level':
        return [token if _is_special(token) else _from_byte_level(token) for token in tokens]
    if scheme == 'sentencepiece':
        return [token if _is_special(token) else _from_sentencepiece(token) for token in tokens]
    if scheme == 'wordpiece':
        return [_from_wordpiece(token, first=number == 0) for number, token in enumerate(tokens)]
    return list(tokens)


def _token_list(func: str, tokens: Any, label: str = 'tokens') -> list[str]:
    """Check that ``tokens`` is a sequence of strings (and not one string); return it as a list."""
    if isinstance(tokens, str):
        raise TypeError(f'{func}: expected {label} to be a sequence of str, got a single str; '
                        'split the text into tokens first, e.g. tokenizer.convert_ids_to_tokens(ids)')
    if not isinstance(tokens, Sequence):
        raise TypeError(f'{func}: expected {label} to be a sequence of str, got {type(tokens).__name__}')
    for number, token in enumerate(tokens):
        if not isinstance(token, str):
            raise TypeError(f'{func}: {label}[{number}] must be a str, got {type(token).__name__}; '
                            'convert token ids with tokenizer.convert_ids_to_tokens(ids)')
    return list(tokens)


# ---------------------------------------------------------------- relevance and colours

def _as_rows(func: str, relevance: Any) -> torch.Tensor:
    """Validate ``relevance``; return it detached on the CPU in float64 as (rows, L)."""
    shapes = '(L,) with one value per token, or (rows, L) for several sequences'
    if not isinstance(relevance, torch.Tensor):
        raise TypeError(f'{func}: expected relevance to be a torch.Tensor of shape {shapes}, '
                        f'got {type(relevance).__name__}')
    if relevance.dim() not in (1, 2):
        raise ValueError(f'{func}: expected relevance of shape {shapes}, '
                         f'got shape {tuple(relevance.shape)} with {relevance.dim()} dimension(s)')
    if relevance.dtype == torch.bool or relevance.is_complex():
        raise TypeError(f'{func}: expected real-valued relevance, got dtype {relevance.dtype}')
    if relevance.numel() == 0:
        raise ValueError(f'{func}: relevance must not be empty, got shape {tuple(relevance.shape)}')
    rows = relevance.detach().to(device='cpu', dtype=torch.float64).reshape(-1, relevance.shape[-1])
    finite = torch.isfinite(rows)
    if not bool(finite.all()):
        row, position = (int(i) for i in (~finite).nonzero()[0])
        where = f'token {position}' if relevance.dim() == 1 else f'row {row}, token {position}'
        raise ValueError(f'{func}: relevance contains non-finite values (nan or inf), the first at {where}; '
                         'replace them first, e.g. with torch.nan_to_num')
    return rows


def _check_flag(func: str, label: str, value: Any) -> None:
    """Check that an on/off option is a bool (not, say, 0 or 'yes')."""
    if not isinstance(value, bool):
        raise TypeError(f'{func}: {label} must be a bool, got {type(value).__name__}')


def _row_colors(func: str, relevance: Any, cmap: str, symmetric: bool, level: float, vmin: float | None,
                vmax: float | None, shared_scale: bool) -> tuple[torch.Tensor, list[list[RGB]]]:
    """Relevance as (rows, L) float64 and each token's colour, normalised as ``lrpfunc.image`` does."""
    _check_flag(func, 'symmetric', symmetric)
    _check_flag(func, 'shared_scale', shared_scale)
    palette = _checked_palette(func, cmap, level)
    rows = _as_rows(func, relevance)
    index = _indices(func, rows[:, None, :], symmetric, vmin, vmax, joint=shared_scale)[:, 0, :]
    colors = palette[index.to(torch.int64)].tolist()
    return rows, [[(r, g, b) for r, g, b in row] for row in colors]


def token_colors(relevance: torch.Tensor, *, cmap: str = 'bwr', symmetric: bool = True, level: float = 1.0,
                 vmin: float | None = None, vmax: float | None = None,
                 shared_scale: bool = False) -> list[RGB] | list[list[RGB]]:
    """Return the colour of every token, as :func:`lrpfunc.image.heatmap` colours pixels.

    Definition: with the range ``[lo, hi]`` (``[-max|R|, max|R|]`` if ``symmetric``, else
    ``[min R, max R]``, overridden by ``vmin``/``vmax``) a token with relevance ``R`` gets entry
    ``floor(255 * clip((R - lo) / (hi - lo), 0, 1))`` of ``colormap(cmap, level=level)``. With the
    symmetric default the largest ``|R|`` lands on an end of the colour map and 0 on entry 127, its
    centre, exactly as in Zennit's ``imgify``.

    Args:
        relevance: Tensor of shape (L,), one value per token, or (rows, L) for several sequences.
            Any real dtype and device; it is detached and moved to the CPU.
        cmap: Colour-map name, one of :data:`lrpfunc.image.COLORMAPS`.
        symmetric: Use the range symmetric around zero (see above).
        level: Zennit's contrast level of the palette (see :func:`lrpfunc.image.colormap`), > 0.
        vmin: Overrides the lower end of the range.
        vmax: Overrides the upper end of the range.
        shared_scale: For 2-D relevance: if False (the default, as in
            :func:`lrpfunc.image.heatmap_grid`) every row is normalised on its own, so row ``i`` gets
            the colours of ``token_colors(relevance[i])``; if True all rows share one range, so
            colours compare across rows.

    Returns:
        A list of ``(r, g, b)`` tuples of ints in 0..255, one per token; for 2-D relevance a list of
        such lists, one per row.

    Raises:
        TypeError: If ``relevance`` is not a real-valued tensor, or a number argument is no number.
        ValueError: On a relevance that is not 1-D or 2-D, empty or non-finite, an unknown ``cmap``,
            ``level <= 0``, non-finite ``vmin``/``vmax`` or ``vmin > vmax``.

    Example:
        >>> token_colors(torch.tensor([-2.0, 0.0, 2.0]))
        [(0, 0, 255), (253, 253, 255), (255, 0, 0)]
    """
    _, colors = _row_colors('token_colors', relevance, cmap, symmetric, level, vmin, vmax, shared_scale)
    return colors[0] if relevance.dim() == 1 else colors


def _text_color(background: RGB) -> RGB:
    """Black or white, whichever contrasts more with ``background``.

    Definition: with the WCAG 2 relative luminance ``Y = 0.2126 R + 0.7152 G + 0.0722 B`` of the
    linearised sRGB channels, black has the higher contrast ratio iff
    ``(Y + 0.05) / 0.05 >= 1.05 / (Y + 0.05)``, i.e. ``Y >= sqrt(0.0525) - 0.05 ~ 0.179``.

    References:
        W3C, Web Content Accessibility Guidelines (WCAG) 2.1, definitions of relative luminance and
        contrast ratio (2018).
    """
    def linear(channel: int) -> float:
        value = channel / 255
        return value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(channel) for channel in background)
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return _BLACK if (luminance + 0.05) ** 2 >= 0.0525 else _WHITE


# ---------------------------------------------------------------- tokens and rows

def _token_rows(func: str, tokens: Any, shape: tuple[int, ...], clean_tokens: bool) -> list[list[str]]:
    """Check ``tokens`` against the relevance shape; return one display list per relevance row.

    For 2-D relevance a single flat sequence of L tokens is shared by all rows (the same text
    attributed for several outputs).
    """
    length = shape[-1]
    nested = isinstance(tokens, Sequence) and not isinstance(tokens, str) and len(tokens) > 0 and \
        all(isinstance(row, Sequence) and not isinstance(row, str) for row in tokens)
    if nested:
        if len(shape) == 1:
            raise ValueError(f'{func}: relevance of shape {shape} is one sequence, but tokens holds '
                             f'{len(tokens)} token sequences; pass a flat sequence of {length} str')
        if len(tokens) != shape[0]:
            raise ValueError(f'{func}: got {len(tokens)} token sequences for relevance of shape {shape}; '
                             f'pass one sequence per row ({shape[0]}), or one flat sequence shared by all rows')
        rows = [_token_list(func, row, f'tokens[{number}]') for number, row in enumerate(tokens)]
    else:
        rows = [_token_list(func, tokens)]
    for number, row in enumerate(rows):
        if len(row) != length:
            which = f'tokens[{number}]' if nested else 'tokens'
            raise ValueError(f'{func}: {which} has {len(row)} tokens but relevance has {length} values per '
                             f'sequence (shape {shape}); pass exactly one relevance value per token')
    texts = [display_tokens(row) if clean_tokens else row for row in rows]
    return texts if nested or len(shape) == 1 else texts * shape[0]


@dataclass(frozen=True)
class _Piece:
    """A token laid out for display: uncoloured leading whitespace, the boxed body, line breaks after."""

    lead: str
    body: str
    breaks: int


def _piece(text: str, newline: str) -> _Piece:
    """Split a display string into leading whitespace, visible body and the line breaks after it.

    Newlines (``\\r\\n``, ``\\r``, ``\\n``) show as ``newline`` in the body, and each breaks the line
    after the token; other control characters show escaped (``\\x00``). A token of blanks only keeps them
    as its body, so its colour stays visible.
    """
    text = text.replace('\r\n', '\n').replace('\r', '\n')
    text = ''.join(f'\\x{ord(char):02x}' if unicodedata.category(char) == 'Cc' and char not in '\n\t' else char
                   for char in text)
    rest = text.lstrip(' \t')
    lead = text[:len(text) - len(rest)]
    if not rest:
        return _Piece('', lead, 0)
    return _Piece(lead, rest.replace('\n', newline), rest.count('\n'))


def _prepare(func: str, tokens: Any, relevance: Any, cmap: str, symmetric: bool, level: float,
             vmin: float | None, vmax: float | None, shared_scale: bool,
             clean_tokens: bool) -> tuple[list[list[str]], torch.Tensor, list[list[RGB]]]:
    """Validate the common arguments; return display texts, relevance (rows, L) and colours per row."""
    _check_flag(func, 'clean_tokens', clean_tokens)
    rows, colors = _row_colors(func, relevance, cmap, symmetric, level, vmin, vmax, shared_scale)
    texts = _token_rows(func, tokens, tuple(relevance.shape), clean_tokens)
    return texts, rows, colors


# ---------------------------------------------------------------- HTML

def _hex(color: RGB) -> str:
    """CSS colour '#rrggbb' of an RGB triple."""
    return '#{:02x}{:02x}{:02x}'.format(*color)


_CONTAINER_STYLE = ("font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; font-size: 16px; "
                    'line-height: 2; color: #000; background: #fff; padding: 0.5em')
_ROW_STYLE = 'white-space: pre-wrap; overflow-wrap: anywhere; margin: 0 0 0.75em 0'
_TITLE_STYLE = 'font-weight: bold; margin-bottom: 0.5em'
_TOKEN_STYLE = 'border-radius: 0.25em; padding: 0.15em 0.1em; margin: 0 1px'


def token_heatmap_html(tokens: Sequence[str] | Sequence[Sequence[str]], relevance: torch.Tensor, *,
                       cmap: str = 'bwr', symmetric: bool = True, level: float = 1.0,
                       vmin: float | None = None, vmax: float | None = None, shared_scale: bool = False,
                       title: str | None = None, show_values: bool = True, clean_tokens: bool = True) -> str:
    """Render tokens coloured by their relevance as a self-contained HTML fragment.

    The fragment is a ``<div>`` with inline styles only (no scripts, no external files), ready for
    ``IPython.display.HTML`` or a web page; :func:`save_token_heatmap_html` wraps it in a document.
    Every token is one ``<span>`` with the token's colour (see :func:`token_colors`) as background
    and black or white text, whichever contrasts more (WCAG 2 relative luminance); all text is
    HTML-escaped. Leading blanks of a token stay outside its span as a word gap; a newline shows as
    ``↵`` in the span and breaks the line after it; blank-only tokens are coloured blanks.
    A 2-D relevance renders one block (``<div>``) per row.

    Args:
        tokens: The tokens, e.g. ``tokenizer.convert_ids_to_tokens(ids)``: a sequence of L strings,
            or for 2-D relevance one sequence per row (or one shared by all rows).
        relevance: Tensor of shape (L,) or (rows, L).
        cmap, symmetric, level, vmin, vmax, shared_scale: As for :func:`token_colors`.
        title: Optional heading above the tokens.
        show_values: Put each token's relevance (4 significant digits) in its ``title`` attribute,
            shown as a tooltip.
        clean_tokens: Pass the tokens through :func:`display_tokens` (auto-detected scheme); with
            False they are shown as given.

    Returns:
        The HTML fragment as a string.

    Raises:
        TypeError: As :func:`token_colors`, or if ``tokens`` is not a sequence of str.
        ValueError: As :func:`token_colors`, or if the number of tokens differs from the relevance length.

    Example:
        >>> token_heatmap_html(['Ġthe', 'Ġcat'], torch.tensor([0.2, -1.0])).count('<span')
        2
    """
    func = 'token_heatmap_html'
    _check_flag(func, 'show_values', show_values)
    texts, rows, colors = _prepare(func, tokens, relevance, cmap, symmetric, level, vmin, vmax, shared_scale,
                                   clean_tokens)
    blocks = []
    for row_texts, row_values, row_colors in zip(texts, rows.tolist(), colors, strict=True):
        spans = []
        for text, value, color in zip(row_texts, row_values, row_colors, strict=True):
            piece = _piece(text, _HTML_NEWLINE)
            tooltip = f' title="{value + 0.0:.4g}"' if show_values else ''  # + 0.0: no '-0'
            style = f'background-color: {_hex(color)}; color: {_hex(_text_color(color))}; {_TOKEN_STYLE}'
            spans.append(f'{html.escape(piece.lead)}<span style="{style}"{tooltip}>{html.escape(piece.body)}</span>'
                         + '\n' * piece.breaks)
        blocks.append(f'<div style="{_ROW_STYLE}">{"".join(spans)}</div>')
    heading = [] if title is None else [f'<div style="{_TITLE_STYLE}">{html.escape(str(title))}</div>']
    return '\n'.join([f'<div class="lrpfunc-token-heatmap" style="{_CONTAINER_STYLE}">', *heading, *blocks, '</div>'])


def save_token_heatmap_html(tokens: Sequence[str] | Sequence[Sequence[str]], relevance: torch.Tensor,
                            path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``token_heatmap_html(tokens, relevance, **kwargs)`` as a UTF-8 HTML document.

    Args:
        tokens, relevance: As for :func:`token_heatmap_html`.
        path: Destination file; parent folders are created.
        **kwargs: Keyword arguments of :func:`token_heatmap_html`.

    Returns:
        The path written, as a ``pathlib.Path``.

    Raises:
        TypeError, ValueError: As :func:`token_heatmap_html`.

    Example:
        >>> save_token_heatmap_html(['Ġa', 'Ġb'], torch.tensor([1.0, -1.0]), 'out/tokens.html')  # doctest: +SKIP
    """
    fragment = token_heatmap_html(tokens, relevance, **kwargs)
    title = html.escape(str(kwargs.get('title') or 'Token relevance'))
    document = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
                f'</head>\n<body style="margin: 1em; background: #fff">\n{fragment}\n</body>\n</html>\n')
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(document, encoding='utf-8')
    return target


# ---------------------------------------------------------------- PNG

@lru_cache(maxsize=8)
def _default_font(size: int) -> Font:
    """Pillow's built-in font at ``size`` px (Pillow >= 10.1 with FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 has no size; no FreeType: no scalable font
        return ImageFont.load_default()


def _drawable(text: str, font: Font) -> str:
    """``text`` with the characters a bitmap font cannot encode (beyond Latin-1) replaced by '?'."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text  # missing glyphs are drawn as the font's placeholder box
    return text.encode('latin-1', errors='replace').decode('latin-1')


@dataclass(frozen=True)
class _Box:
    """One token's box in the image: corners, text, fill colour and text colour."""

    left: int
    top: int
    right: int
    bottom: int
    text: str
    fill: RGB
    ink: RGB


@dataclass(frozen=True)
class _Layout:
    """Where everything goes: image size, the optional title's position and the token boxes."""

    size: tuple[int, int]
    title_at: tuple[int, int] | None
    title: str
    boxes: list[_Box]
    text_offset: tuple[int, int]  # from a box's top-left corner to its text's drawing origin


def _layout(texts: list[list[str]], colors: list[list[RGB]], font: Font, font_size: int, width: int,
            title: str | None) -> _Layout:
    """Lay tokens out left to right, wrapping at ``width``; one block of lines per relevance row."""
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))

    def length(text: str) -> int:
        return round(measure.textlength(_drawable(text.replace('\t', _TAB), font), font=font))

    # integers from an integer origin (Pillow annotates floats for a float one)
    _, ink_top, _, ink_bottom = cast("tuple[int, int, int, int]", measure.textbbox((0, 0), 'Hgjy|', font=font))
    pad_x, pad_y = max(2, font_size // 5), max(2, font_size // 6)
    gap, line_gap, margin = max(2, font_size // 8), max(3, font_size // 3), max(4, font_size // 2)
    box_height = ink_bottom - ink_top + 2 * pad_y
    line_height = box_height + line_gap
    min_body = max(3, font_size // 3)  # a blank-only token still shows its colour
    word_gap = font_size // 2  # at least this much before a token with leading blanks; boxes are `gap` apart

    y, title_at, widest = margin, None, 0
    if title is not None:
        title_at, widest = (margin, y), length(title)
        y += line_height + line_gap
    boxes: list[_Box] = []
    for row_texts, row_colors in zip(texts, colors, strict=True):
        x = margin
        for text, color in zip(row_texts, row_colors, strict=True):
            piece = _piece(text, _PNG_NEWLINE)
            box_width = max(length(piece.body), min_body) + 2 * pad_x
            lead = max(length(piece.lead), word_gap) if piece.lead and x > margin else 0
            if x > margin and x + lead + box_width > width - margin:
                x, y, lead = margin, y + line_height, 0
            x += lead
            boxes.append(_Box(x, y, x + box_width, y + box_height, piece.body.replace('\t', _TAB), color,
                              _text_color(color)))
            widest = max(widest, box_width)
            x += box_width + gap
            for _ in range(piece.breaks):
                x, y = margin, y + line_height
        if x > margin:
            y += line_height
        y += line_gap + box_height // 2  # between the blocks of 2-D relevance
    bottom = max([box.bottom for box in boxes] + ([] if title_at is None else [title_at[1] + box_height]))
    size = (max(width, widest + 2 * margin), bottom + margin)
    return _Layout(size, title_at, '' if title is None else title, boxes, (pad_x, pad_y - ink_top))


def token_heatmap(tokens: Sequence[str] | Sequence[Sequence[str]], relevance: torch.Tensor, *,
                  cmap: str = 'bwr', symmetric: bool = True, level: float = 1.0, vmin: float | None = None,
                  vmax: float | None = None, shared_scale: bool = False, title: str | None = None,
                  width: int = 800, font_size: int = 16, font: Font | None = None,
                  clean_tokens: bool = True) -> Image.Image:
    """Render tokens coloured by their relevance as an RGB image.

    Tokens are laid out left to right on rounded boxes in their colour (see :func:`token_colors`)
    with a small gap, in black or white text (whichever contrasts more), wrapping to a new line
    before a box would cross the right margin. A token's leading blanks become a word gap before its
    box (dropped at the start of a line); a newline shows as ``\\n`` in the box and breaks the line
    after it; blank-only tokens are narrow coloured boxes. A 2-D relevance renders one block of lines
    per row, separated by a gap.

    Pillow's built-in font (``ImageFont.load_default(size=font_size)``, Aileron Regular, with
    Pillow >= 10.1 and FreeType; the fixed-size bitmap font otherwise) covers ASCII and a few
    symbols only: other characters (accents, CJK, emoji) are drawn as the font's placeholder box, or
    as ``?`` with the bitmap font; the boxes and colours are unaffected. For full Unicode pass a
    ``font`` such as ``ImageFont.truetype('DejaVuSans.ttf', 16)``, or use :func:`token_heatmap_html`.

    Args:
        tokens: The tokens, e.g. ``tokenizer.convert_ids_to_tokens(ids)``: a sequence of L strings,
            or for 2-D relevance one sequence per row (or one shared by all rows).
        relevance: Tensor of shape (L,) or (rows, L).
        cmap, symmetric, level, vmin, vmax, shared_scale: As for :func:`token_colors`.
        title: Optional line of black text above the tokens.
        width: Image width in pixels. The image is wider only if the title or a single token box
            does not fit; its height follows from the number of lines.
        font_size: Font size in pixels of the built-in font (ignored if ``font`` is given).
        font: A Pillow font to use instead of the built-in one.
        clean_tokens: Pass the tokens through :func:`display_tokens` (auto-detected scheme); with
            False they are shown as given.

    Returns:
        An RGB ``PIL.Image.Image`` on a white background.

    Raises:
        TypeError: As :func:`token_heatmap_html`, or if ``width``/``font_size`` is not an int.
        ValueError: As :func:`token_heatmap_html`, or if ``width``/``font_size`` is < 1.

    Example:
        >>> token_heatmap(['ĠThe', 'Ġcat', 'Ġsat'], torch.tensor([0.1, 1.0, -0.5]), width=300).size[0]
        300
    """
    func = 'token_heatmap'
    _number(func, 'width', width, integer=True, minimum=1)
    _number(func, 'font_size', font_size, integer=True, minimum=1)
    texts, _, colors = _prepare(func, tokens, relevance, cmap, symmetric, level, vmin, vmax, shared_scale,
                                clean_tokens)
    font = _default_font(font_size) if font is None else font
    layout = _layout(texts, colors, font, font_size, width, title)
    image = Image.new('RGB', layout.size, _WHITE)
    draw = ImageDraw.Draw(image)
    if layout.title_at is not None:
        draw.text(layout.title_at, _drawable(layout.title, font), font=font, fill=_BLACK)
    radius = max(1, font_size // 4)
    dx, dy = layout.text_offset
    for box in layout.boxes:
        draw.rounded_rectangle((box.left, box.top, box.right - 1, box.bottom - 1), radius=radius, fill=box.fill)
        draw.text((box.left + dx, box.top + dy), _drawable(box.text, font), font=font, fill=box.ink)
    return image


def save_token_heatmap(tokens: Sequence[str] | Sequence[Sequence[str]], relevance: torch.Tensor,
                       path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``token_heatmap(tokens, relevance, **kwargs)`` to ``path`` as PNG, creating parent folders.

    Args:
        tokens, relevance: As for :func:`token_heatmap`.
        path: Destination file, written as PNG whatever its suffix.
        **kwargs: Keyword arguments of :func:`token_heatmap`.

    Returns:
        The path written, as a ``pathlib.Path``.

    Raises:
        TypeError, ValueError: As :func:`token_heatmap`.

    Example:
        >>> save_token_heatmap(['Ġa', 'Ġb'], torch.tensor([1.0, -1.0]), 'out/tokens.png')  # doctest: +SKIP
    """
    target = Path(path)
    image = token_heatmap(tokens, relevance, **kwargs)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, format='PNG')
    return target


# the matrix of a generation (its own module, built on the helpers above)
from ._generation_map import (  # noqa: E402
    generation_heatmap,
    generation_heatmap_html,
    save_generation_heatmap,
    save_generation_heatmap_html,
)
