"""Tests for lrpfunc.text: token colours, display of tokenizer tokens, HTML and PNG token heatmaps."""
from __future__ import annotations

import math
from html.parser import HTMLParser

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFont

from lrpfunc.image import COLORMAPS, colormap, heatmap
from lrpfunc.text import (
    SCHEMES,
    display_tokens,
    save_token_heatmap,
    save_token_heatmap_html,
    token_colors,
    token_heatmap,
    token_heatmap_html,
)

BLACK, WHITE, BLUE, RED = (0, 0, 0), (255, 255, 255), (0, 0, 255), (255, 0, 0)


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table (openai/gpt-2, src/encoder.py), the reference for byte-level tokens."""
    bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
          + list(range(ord('®'), ord('ÿ') + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_ENCODER = gpt2_bytes_to_unicode()


def byte_level(text: str) -> str:
    """The byte-level token spelling of ``text``, as GPT-2 / Llama 3 tokenizers show it."""
    return ''.join(BYTE_ENCODER[byte] for byte in text.encode('utf-8'))


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    """RGB pixels in row-major order."""
    data = image.convert('RGB').tobytes()
    return [tuple(data[i:i + 3]) for i in range(0, len(data), 3)]


class Spans(HTMLParser):
    """Collect every <span>'s attributes and text from an HTML fragment."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[dict[str, str]] = []
        self.rows = 0
        self._open = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == 'span':
            self.spans.append({**{k: v or '' for k, v in attrs}, 'text': ''})
            self._open = True
        if tag == 'div' and 'pre-wrap' in dict(attrs).get('style', ''):
            self.rows += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == 'span':
            self._open = False

    def handle_data(self, data: str) -> None:
        if self._open:
            self.spans[-1]['text'] += data


def parse(fragment: str) -> Spans:
    parser = Spans()
    parser.feed(fragment)
    return parser


def style_colors(span: dict[str, str]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, text) colours of a span's inline style."""
    style = dict(item.strip().split(': ', 1) for item in span['style'].split(';') if item.strip())

    def rgb(code: str) -> tuple[int, int, int]:
        return tuple(int(code[i:i + 2], 16) for i in (1, 3, 5))

    return rgb(style['background-color']), rgb(style['color'])


# ---------------------------------------------------------------- colours

@pytest.mark.parametrize('cmap', ['bwr', 'coldnhot', 'seismic', 'gray'])
@pytest.mark.parametrize('symmetric,level', [(True, 1.0), (False, 1.0), (True, 2.5)])
def test_colors_equal_image_heatmap_pixels(cmap, symmetric, level):
    relevance = torch.randn(17, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = pixels(heatmap(relevance[None], cmap=cmap, symmetric=symmetric, level=level))
    assert token_colors(relevance, cmap=cmap, symmetric=symmetric, level=level) == expected


@pytest.mark.parametrize('cmap', COLORMAPS)
def test_extremes_and_zero_get_palette_ends_and_centre(cmap):
    palette = [tuple(c) for c in colormap(cmap).tolist()]
    colors = token_colors(torch.tensor([0.5, -3.0, 0.0, 3.0], dtype=torch.float64), cmap=cmap)
    # the largest |R| maps to the ends; 0 -> 127.5, truncated to 127 as in Zennit and lrpfunc.image
    assert colors[1] == palette[0] and colors[3] == palette[255] and colors[2] == palette[127]
    assert colors[0] == palette[math.floor(255 * (0.5 + 3.0) / 6.0)]


def test_bwr_most_positive_is_red_most_negative_blue():
    assert token_colors(torch.tensor([-2.0, 0.25, 2.0]))[::2] == [BLUE, RED]


def test_level_and_vmin_vmax():
    relevance = torch.tensor([-4.0, -0.5, 0.0, 0.5, 4.0])
    palette = [tuple(c) for c in colormap('bwr', level=2.0).tolist()]
    indices = [p[0] for p in pixels(heatmap(relevance[None], cmap='gray', vmin=-1.0, vmax=1.0))]
    assert indices == [0, 63, 127, 191, 255]  # clipped outside [-1, 1]
    assert token_colors(relevance, level=2.0, vmin=-1.0, vmax=1.0) == [palette[i] for i in indices]


def test_2d_rows_normalised_on_their_own_by_default_or_shared():
    relevance = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    relevance[1] *= 50.0
    per_row = token_colors(relevance)
    assert per_row == [token_colors(row) for row in relevance]
    bound = relevance.abs().max().item()
    assert token_colors(relevance, shared_scale=True) == [token_colors(row, vmin=-bound, vmax=bound)
                                                          for row in relevance]
    assert token_colors(relevance, shared_scale=True) != per_row


def test_constant_and_int_relevance():
    assert token_colors(torch.zeros(3)) == [tuple(colormap('bwr')[127].tolist())] * 3
    assert token_colors(torch.tensor([-2, 0, 2])) == token_colors(torch.tensor([-2.0, 0.0, 2.0]))


def test_relevance_with_grad_history():
    relevance = torch.randn(5, requires_grad=True) * 2
    assert len(token_colors(relevance)) == 5


# ---------------------------------------------------------------- display_tokens

def test_byte_level_gpt2_and_llama3():
    tokens = ['Hello', ',', 'Ġworld', '!', 'Ċ', 'ĠĠ', 'Ġcaf', 'Ã©', 'ĊĊ', 'ĉ', '<|endoftext|>']
    assert display_tokens(tokens) == ['Hello', ',', ' world', '!', '\n', '  ', ' caf', 'é', '\n\n', '\t',
                                      '<|endoftext|>']
    llama3 = ['<|begin_of_text|>', 'The', 'Ġcat', 'Ġsat', '.Ċ', '<|eot_id|>']
    assert display_tokens(llama3) == ['<|begin_of_text|>', 'The', ' cat', ' sat', '.\n', '<|eot_id|>']


def test_byte_level_reference_spelling():
    words = ['Grüße', ' aus', ' 東京', ' naïve', '\r\n', ' \x00']
    assert display_tokens([byte_level(word) for word in words]) == words


def test_byte_level_split_character_shows_its_bytes():
    emoji = '🙂'.encode()  # f0 9f 99 82, split over two tokens
    tokens = ['Ġhi', ''.join(BYTE_ENCODER[b] for b in emoji[:2]), ''.join(BYTE_ENCODER[b] for b in emoji[2:])]
    assert display_tokens(tokens) == [' hi', '\\xf0\\x9f', '\\x99\\x82']


def test_byte_level_keeps_literal_hashes():
    assert display_tokens(['##', 'ĠTitle']) == ['##', ' Title']  # markdown, not a WordPiece continuation


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=8))
def test_byte_level_round_trip(pieces):
    assert display_tokens([byte_level(piece) for piece in pieces], scheme='byte_level') == pieces


def test_sentencepiece_llama2_t5():
    tokens = ['<s>', '▁The', '▁cat', '<0x0A>', '▁s', 'at', '▁', '<0xE4>', '</s>', '<pad>']
    assert display_tokens(tokens) == ['<s>', ' The', ' cat', '\n', ' s', 'at', ' ', '<0xE4>', '</s>', '<pad>']


def test_wordpiece_bert():
    tokens = ['[CLS]', 'the', 'play', '##ing', 'cat', '.', '[SEP]', '[PAD]']
    assert display_tokens(tokens) == ['[CLS]', ' the', ' play', 'ing', ' cat', ' .', '[SEP]', '[PAD]']
    assert display_tokens(['un', '##believ', '##able']) == ['un', 'believ', 'able']


def test_no_markers_unchanged_and_explicit_schemes():
    assert display_tokens(['plain', 'words']) == ['plain', 'words']
    assert display_tokens(['Hello', 'world'], scheme='wordpiece') == ['Hello', ' world']
    assert display_tokens(['caf', 'Ã©'], scheme='byte_level') == ['caf', 'é']
    assert display_tokens(['ĠThe', '▁x'], scheme='none') == ['ĠThe', '▁x']
    assert set(SCHEMES) == {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'none'}


def test_heatmaps_clean_tokens_by_default():
    relevance = torch.tensor([1.0, -1.0, 0.5])
    assert [s['text'] for s in parse(token_heatmap_html(['Ġa', 'Ġb', 'c'], relevance)).spans] == ['a', 'b', 'c']
    raw = parse(token_heatmap_html(['Ġa', 'Ġb', 'c'], relevance, clean_tokens=False)).spans
    assert [s['text'] for s in raw] == ['Ġa', 'Ġb', 'c']


# ---------------------------------------------------------------- HTML

def test_html_spans_colours_and_tooltips():
    relevance = torch.tensor([-2.0, 0.0, 0.7, 2.0], dtype=torch.float64)
    tokens = ['ĠThe', 'Ġcat', 'Ġsat', '.']
    parsed = parse(token_heatmap_html(tokens, relevance))
    assert len(parsed.spans) == 4 and parsed.rows == 1
    assert [style_colors(s)[0] for s in parsed.spans] == token_colors(relevance)
    assert [s['title'] for s in parsed.spans] == ['-2', '0', '0.7', '2']
    assert [s['text'] for s in parsed.spans] == ['The', 'cat', 'sat', '.']
    # readable text: white on saturated blue, black on near-white and on red (WCAG contrast)
    assert [style_colors(s)[1] for s in parsed.spans] == [WHITE, BLACK, BLACK, BLACK]
    dark = parse(token_heatmap_html(['a', 'b'], torch.tensor([0.0, 1.0]), cmap='coldnhot')).spans
    assert style_colors(dark[0]) == (tuple(colormap('coldnhot')[127].tolist()), WHITE)  # near-black centre


def test_html_without_values_has_no_title_attribute():
    fragment = token_heatmap_html(['a', 'b'], torch.tensor([1.0, 2.0]), show_values=False)
    assert all('title' not in span for span in parse(fragment).spans)
    assert 'title=' not in fragment


def test_html_escapes_token_text_and_title():
    tokens = ['<script>', 'alert(1)', '</script>', '&', '"q"', "'"]
    fragment = token_heatmap_html(tokens, torch.arange(6.0), title='<b>R & "x"</b>', clean_tokens=False)
    assert '<script>' not in fragment and '</script>' not in fragment and '<b>' not in fragment
    assert '&lt;script&gt;' in fragment and '&amp;' in fragment and '&quot;q&quot;' in fragment
    assert [s['text'] for s in parse(fragment).spans] == tokens
    assert '&lt;b&gt;R &amp; &quot;x&quot;&lt;/b&gt;' in fragment


def test_html_whitespace_and_newlines():
    fragment = token_heatmap_html(['Ġa', 'Ċ', 'Ġ', byte_level('b\tc'), byte_level('\x01')], torch.ones(5))
    spans = parse(fragment).spans
    assert [s['text'] for s in spans] == ['a', '↵', ' ', 'b\tc', '\\x01']
    assert '↵</span>\n' in fragment  # the newline token breaks the line (the row is white-space: pre-wrap)
    assert '</span> <span' not in fragment.split('↵')[1]  # a blank-only token's blank is inside its span


def test_html_2d_one_block_per_row_and_shared_tokens():
    relevance = torch.tensor([[1.0, -1.0, 0.0], [0.0, 2.0, -4.0]])
    shared = parse(token_heatmap_html(['a', 'b', 'c'], relevance))
    assert shared.rows == 2 and [s['text'] for s in shared.spans] == ['a', 'b', 'c'] * 2
    assert [style_colors(s)[0] for s in shared.spans] == [c for row in token_colors(relevance) for c in row]
    nested = parse(token_heatmap_html([['a', 'b', 'c'], ['x', 'y', 'z']], relevance, shared_scale=True))
    assert [s['text'] for s in nested.spans] == ['a', 'b', 'c', 'x', 'y', 'z']
    shared_colors = token_colors(relevance, shared_scale=True)
    assert [style_colors(s)[0] for s in nested.spans] == [c for row in shared_colors for c in row]


def test_save_html_document(tmp_path):
    path = save_token_heatmap_html([byte_level(' naïve'), byte_level(' 東京')], torch.tensor([1.0, -1.0]),
                                   tmp_path / 'a' / 'b.html', title='T')
    text = path.read_text(encoding='utf-8')
    assert text.startswith('<!DOCTYPE html>') and '<meta charset="utf-8">' in text and '<title>T</title>' in text
    assert [s['text'] for s in parse(text).spans] == ['naïve', '東京']


# ---------------------------------------------------------------- PNG

SENTENCE = ['ĠThe', 'Ġquick', 'Ġbrown', 'Ġfox', 'Ġjump', 's', 'Ġover', 'Ġthe', 'Ġlazy', 'Ġdog', '.']


def test_png_written_with_expected_properties(tmp_path):
    relevance = torch.linspace(-1.0, 1.0, len(SENTENCE))
    path = save_token_heatmap(SENTENCE, relevance, tmp_path / 'x' / 'tokens.png', width=640, title='fox')
    assert path.is_file()
    with Image.open(path) as loaded:
        assert loaded.format == 'PNG' and loaded.mode == 'RGB' and loaded.width == 640
        assert 20 < loaded.height < 200
        assert pixels(loaded) == pixels(token_heatmap(SENTENCE, relevance, width=640, title='fox'))
        assert loaded.getpixel((0, 0)) == WHITE  # margin


def test_png_has_the_colour_of_a_strongly_positive_token():
    relevance = torch.zeros(len(SENTENCE))
    relevance[3] = 5.0
    colors = set(pixels(token_heatmap(SENTENCE, relevance)))
    assert RED in colors and BLUE not in colors
    assert tuple(colormap('bwr')[127].tolist()) in colors  # the zero-relevance boxes
    flipped = set(pixels(token_heatmap(SENTENCE, -relevance)))
    assert BLUE in flipped and RED not in flipped
    assert (0, 255, 255) in set(pixels(token_heatmap(SENTENCE, -relevance, cmap='coldnhot')))


def test_png_wraps_into_more_lines_when_narrower():
    relevance = torch.randn(len(SENTENCE))
    wide, narrow = token_heatmap(SENTENCE, relevance, width=1000), token_heatmap(SENTENCE, relevance, width=150)
    assert narrow.width == 150 and wide.width == 1000
    assert narrow.height > 2 * wide.height
    assert token_heatmap(SENTENCE, relevance, font_size=32, width=1000).height > wide.height


def test_png_newline_token_breaks_the_line():
    one_line = token_heatmap(['Ġa', 'Ġb'], torch.ones(2), width=400)
    two_lines = token_heatmap(['Ġa', 'Ċ', 'Ġb'], torch.ones(3), width=400)
    assert two_lines.height > one_line.height


def test_png_widens_for_a_token_longer_than_the_width():
    image = token_heatmap(['x' * 60], torch.ones(1), width=100)
    assert image.width > 100


def test_png_2d_stacks_blocks():
    one = token_heatmap(SENTENCE[:3], torch.ones(3), width=800)
    three = token_heatmap(SENTENCE[:3], torch.ones(3, 3), width=800)
    assert three.height > 2 * one.height


@pytest.mark.parametrize('font', [None, 'bitmap'])
def test_png_non_ascii_tokens_do_not_crash(font):
    if font == 'bitmap':  # the fixed bitmap font (Latin-1 only) that Pillow < 10.1 or no FreeType falls back to
        font = ImageFont.load_default_imagefont() if hasattr(ImageFont, 'load_default_imagefont') else None
        if font is None:
            pytest.skip('needs Pillow >= 10.1')
    tokens = [' 東京', ' naïve', ' 🙂', ' \u200b', '<s>', '\x00', 'x\u0301']  # display text, combining accent
    relevance = torch.tensor([1.0, -1.0, 0.5, 0.0, 0.2, -0.2, 0.1])
    image = token_heatmap(tokens, relevance, font=font, title='Grüße 東京', clean_tokens=False)
    assert image.mode == 'RGB' and RED in set(pixels(image))


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize('call,error,message', [
    (lambda: token_heatmap_html(['a', 'b'], torch.ones(3)), ValueError,
     r'token_heatmap_html: tokens has 2 tokens but relevance has 3 values per sequence \(shape \(3,\)\)'),
    (lambda: token_heatmap(['a', 'b', 'c'], torch.ones(2, 2)), ValueError,
     r'token_heatmap: tokens has 3 tokens but relevance has 2 values per sequence \(shape \(2, 2\)\)'),
    (lambda: token_heatmap_html([['a'], ['b', 'c']], torch.ones(2, 1)), ValueError,
     r'token_heatmap_html: tokens\[1\] has 2 tokens but relevance has 1 values'),
    (lambda: token_heatmap_html([['a'], ['b'], ['c']], torch.ones(2, 1)), ValueError,
     r'token_heatmap_html: got 3 token sequences for relevance of shape \(2, 1\)'),
    (lambda: token_heatmap_html([['a'], ['b']], torch.ones(2)), ValueError,
     r'relevance of shape \(2,\) is one sequence, but tokens holds 2 token sequences'),
    (lambda: token_heatmap_html('ab', torch.ones(2)), TypeError,
     r'token_heatmap_html: expected tokens to be a sequence of str, got a single str'),
    (lambda: token_heatmap_html([101, 102], torch.ones(2)), TypeError,
     r'token_heatmap_html: tokens\[0\] must be a str, got int; convert token ids'),
    (lambda: display_tokens(['a', None]), TypeError, r'display_tokens: tokens\[1\] must be a str, got NoneType'),
    (lambda: display_tokens(['a'], scheme='bpe'), ValueError, r"display_tokens: unknown scheme 'bpe'; known"),
    (lambda: token_colors(torch.ones(2, 2, 2)), ValueError,
     r'token_colors: expected relevance of shape \(L,\) with one value per token, or \(rows, L\) .*got shape '
     r'\(2, 2, 2\) with 3 dimension'),
    (lambda: token_heatmap(['a'], torch.tensor(1.0)), ValueError, r'token_heatmap: expected relevance of shape'),
    (lambda: token_colors([1.0, 2.0]), TypeError, r'token_colors: expected relevance to be a torch.Tensor .* got list'),
    (lambda: token_colors(torch.ones(0)), ValueError, r'token_colors: relevance must not be empty, got shape \(0,\)'),
    (lambda: token_colors(torch.ones(2, dtype=torch.bool)), TypeError, r'token_colors: expected real-valued'),
    (lambda: token_colors(torch.tensor([1.0, math.nan])), ValueError,
     r'token_colors: relevance contains non-finite values \(nan or inf\), the first at token 1'),
    (lambda: token_heatmap_html(['a', 'b'], torch.tensor([[1.0, 1.0], [math.inf, 0.0]])), ValueError,
     r'token_heatmap_html: relevance contains non-finite values .* at row 1, token 0'),
    (lambda: token_colors(torch.ones(2), cmap='viridis'), ValueError,
     r"token_colors: unknown colour map 'viridis'; known colour maps: gray, wred"),
    (lambda: token_heatmap(['a'], torch.ones(1), cmap='jet'), ValueError, r"token_heatmap: unknown colour map 'jet'"),
    (lambda: token_heatmap_html(['a'], torch.ones(1), level=0), ValueError,
     r'token_heatmap_html: level must be > 0, got 0'),
    (lambda: token_colors(torch.ones(2), vmin=1.0, vmax=0.0), ValueError,
     r'token_colors: empty normalisation range, vmin=1.0 > vmax=0.0'),
    (lambda: token_colors(torch.ones(2), symmetric='yes'), TypeError, r'token_colors: symmetric must be a bool'),
    (lambda: token_heatmap_html(['a'], torch.ones(1), show_values=1), TypeError,
     r'token_heatmap_html: show_values must be a bool, got int'),
    (lambda: token_heatmap(['a'], torch.ones(1), width=0), ValueError, r'token_heatmap: width must be an int >= 1'),
    (lambda: token_heatmap(['a'], torch.ones(1), font_size=12.5), TypeError,
     r'token_heatmap: font_size must be an int >= 1, got float'),
])
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
