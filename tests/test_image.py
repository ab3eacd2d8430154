"""Tests for lrpfunc.image: Zennit-compatible colour maps and heatmap rendering."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lrpfunc.image import (
    COLORMAPS,
    colorbar,
    colormap,
    heatmap,
    heatmap_grid,
    labelled_grid,
    save_heatmap,
    save_heatmap_grid,
)

# Zennit 0.5.1 CMAPS sources (zennit/image.py), the reference these tests pin against.
ZENNIT_SOURCES = {
    'gray': '000,fff',
    'wred': 'fff,f00',
    'wblue': 'fff,00f',
    'hot': '000,f00,ff0,fff',
    'cold': '000,00f,0ff',
    'coldnhot': '0ff,00f,80:000,f00,ff0,fff',
    'bwr': '00f,80:fff,f00',
    'france': '0055a4,80:fff,ef4135',
    'seismic': '0000d0,80:d0d0d0,d00000',
    'coolio': '00d0d0,80:d0d0d0,d000d0',
    'coleus': '00d000,80:d0d0d0,d000d0',
}
BLUE, WHITE, RED = (0, 0, 255), (255, 255, 255), (255, 0, 0)


def hex_rgb(code: str) -> tuple[int, int, int]:
    code = code.split(':')[-1]
    code = ''.join(c * 2 for c in code) if len(code) == 3 else code
    return tuple(int(code[i:i + 2], 16) for i in (0, 2, 4))


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    """Pixels in row-major order."""
    return [image.getpixel((x, y)) for y in range(image.height) for x in range(image.width)]


def gray_index(relevance: torch.Tensor, **kwargs) -> list[int]:
    """Palette indices chosen by heatmap: the 'gray' palette is the identity."""
    return [p[0] for p in pixels(heatmap(relevance, cmap='gray', **kwargs))]


# ---------------------------------------------------------------- palettes

def test_colormaps_are_zennits():
    assert COLORMAPS == tuple(ZENNIT_SOURCES)


@pytest.mark.parametrize('name', list(ZENNIT_SOURCES))
def test_palette_shape_dtype_and_source_colours(name):
    palette = colormap(name)
    assert palette.shape == (256, 3) and palette.dtype == torch.uint8
    nodes = ZENNIT_SOURCES[name].split(',')
    assert tuple(palette[0].tolist()) == hex_rgb(nodes[0])
    assert tuple(palette[255].tolist()) == hex_rgb(nodes[-1])
    for node in nodes:
        if node.startswith('80:'):  # an explicit anchor at palette index 0x80
            assert tuple(palette[128].tolist()) == hex_rgb(node)


def test_bwr_endpoints_and_middle():
    palette = colormap('bwr')
    assert tuple(palette[0].tolist()) == BLUE
    assert tuple(palette[128].tolist()) == WHITE
    assert tuple(palette[255].tolist()) == RED


def test_bwr_matches_exact_linear_interpolation():
    # anchors 0: blue, 128: white, 255: red; exact rational reference, truncated like Zennit
    expected = []
    for i in range(256):
        if i < 128:
            v = math.floor(Fraction(255 * i, 128))
            expected.append([v, v, 255])
        else:
            v = math.floor(Fraction(255 * (255 - i), 127))
            expected.append([255, v, v])
    assert colormap('bwr').tolist() == expected


def test_coldnhot_unindexed_colours_are_spread_like_zennit():
    # '0ff,00f,80:000,f00,ff0,fff': 00f at int(128/2)=64, f00 at 170, ff0 at 212
    palette = colormap('coldnhot')
    assert tuple(palette[64].tolist()) == (0, 0, 255)
    assert tuple(palette[128].tolist()) == (0, 0, 0)
    # red is reached at 0xaa = 170 (index 170 in the palette maps to position 170.0)
    assert tuple(palette[170].tolist()) == (255, 0, 0)


def test_gray_is_identity():
    assert colormap('gray').tolist() == [[i, i, i] for i in range(256)]


@pytest.mark.parametrize('name,direction', [('gray', 1), ('hot', 1), ('cold', 1), ('wred', -1), ('wblue', -1)])
def test_monotone_palettes(name, direction):
    palette = colormap(name).to(torch.int64) * direction
    assert bool((palette[1:] >= palette[:-1]).all())


def test_colormap_returns_a_copy():
    colormap('bwr')[0] = 7
    assert tuple(colormap('bwr')[0].tolist()) == BLUE


@pytest.mark.parametrize('level', [0.5, 1.5, 2.0])
def test_level_matches_zennit_formula(level):
    # Zennit: entry i takes position clip((level * (2i/255 - 1) + 1) / 2, 0, 1); for 'gray' the colour is
    # 255 * position, truncated. These levels never land on an integer, so the truncation is unambiguous.
    level_q = Fraction(level)
    expected = [min(255, max(0, math.floor(level_q * (i - Fraction(255, 2)) + Fraction(255, 2)))) for i in range(256)]
    assert [row[0] for row in colormap('gray', level=level).tolist()] == expected


def test_level_saturates_or_compresses():
    strong = colormap('bwr', level=2.0)
    assert all(tuple(c) == BLUE for c in strong[:64].tolist())
    assert all(tuple(c) == RED for c in strong[192:].tolist())
    weak = colormap('bwr', level=0.5)
    assert tuple(weak[0].tolist()) != BLUE and tuple(weak[255].tolist()) != RED


def test_heatmap_uses_level_palette():
    relevance = torch.linspace(-1, 1, 16).reshape(4, 4)
    plain = pixels(heatmap(relevance))
    strong = pixels(heatmap(relevance, level=3.0))
    indices = gray_index(relevance)
    palette = colormap('bwr', level=3.0).tolist()
    assert strong == [tuple(palette[i]) for i in indices]
    assert strong != plain


# ---------------------------------------------------------------- normalisation

def test_symmetric_maps_zero_to_middle_and_extremes_to_ends():
    relevance = torch.tensor([[-2.0, 0.0, 2.0, 1.0]])
    # 0 -> 0.5 -> 127.5, truncated to 127 as Zennit's astype(uint8)
    assert gray_index(relevance) == [0, 127, 255, 191]
    palette = colormap('bwr').tolist()
    assert pixels(heatmap(relevance))[:3] == [BLUE, tuple(palette[127]), RED]


def test_unaligned_maps_min_and_max_to_ends():
    relevance = torch.tensor([[1.0, 2.0, 3.0]])
    assert gray_index(relevance, symmetric=False) == [0, 127, 255]


def test_sign_flip_mirrors_palette_index():
    relevance = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    forward, backward = gray_index(relevance), gray_index(-relevance)
    # truncation of 255 * n and 255 * (1 - n): the indices add up to 255, or 254 between integers
    assert all(a + b in (254, 255) for a, b in zip(forward, backward))
    peak = int(relevance.abs().argmax())  # the largest magnitude sits at opposite ends of the palette
    assert {forward[peak], backward[peak]} == {0, 255}


def test_vmin_vmax_override_and_clip():
    relevance = torch.tensor([[-5.0, 0.0, 0.5, 5.0]])
    assert gray_index(relevance, vmin=-1.0, vmax=1.0) == [0, 127, 191, 255]
    assert gray_index(relevance, symmetric=False, vmin=0.0) == [0, 0, 25, 255]


def test_channels_are_summed():
    relevance = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    assert pixels(heatmap(relevance)) == pixels(heatmap(relevance.sum(0)))


@pytest.mark.parametrize('value,symmetric,index', [(0.0, True, 127), (5.0, True, 255), (-5.0, True, 0),
                                                   (5.0, False, 127), (0.0, False, 127)])
def test_constant_maps_do_not_divide_by_zero(value, symmetric, index):
    assert set(gray_index(torch.full((3, 4), value), symmetric=symmetric)) == {index}


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
def test_dtypes(dtype):
    relevance = torch.tensor([[-2, 0, 2]], dtype=dtype)
    assert gray_index(relevance) == [0, 127, 255]


def test_requires_grad_input():
    relevance = torch.randn(4, 4, requires_grad=True) * 2  # non-leaf with grad history
    image = heatmap(relevance)
    assert image.size == (4, 4) and image.mode == 'RGB'


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_input():
    relevance = torch.randn(3, 6, 5)
    assert pixels(heatmap(relevance.cuda())) == pixels(heatmap(relevance))


def test_empty_range_names_the_offending_bounds():
    maps = torch.stack([torch.full((2, 2), -1.0), torch.full((2, 2), 3.0)])
    with pytest.raises(ValueError, match=r'heatmap_grid: empty normalisation range, vmin=3.0 > vmax=2.0'):
        heatmap_grid(maps, symmetric=False, vmax=2.0)


def test_float64_overflow_is_reported():
    with pytest.raises(ValueError, match='heatmap: the normalisation range vmax - vmin overflows float64'):
        heatmap(torch.tensor([[1e308, -1e308]], dtype=torch.float64))


# ---------------------------------------------------------------- grids and files

@pytest.mark.parametrize('count,ncols,padding,expected', [
    (1, None, 2, (8, 6)),
    (4, None, 2, (2 * 8 + 2, 2 * 6 + 2)),
    (5, None, 1, (2 * 8 + 1, 3 * 6 + 2)),  # isqrt(5) = 2 columns, 3 rows
    (5, 5, 0, (5 * 8, 6)),
    (3, 8, 3, (8 * 8 + 7 * 3, 6)),
    (7, 3, 4, (3 * 8 + 2 * 4, 3 * 6 + 2 * 4)),
])
def test_grid_size(count, ncols, padding, expected):
    assert heatmap_grid(torch.randn(count, 2, 6, 8), ncols=ncols, padding=padding).size == expected


def test_grid_cells_padding_and_normalisation():
    maps = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    maps[1] *= 100.0
    grid = heatmap_grid(maps, ncols=2, padding=1, cmap='coldnhot')
    for number in range(3):
        row, col = divmod(number, 2)
        cell = grid.crop((col * 6, row * 5, col * 6 + 5, row * 5 + 4))
        assert pixels(cell) == pixels(heatmap(maps[number], cmap='coldnhot'))
    assert grid.getpixel((5, 0)) == WHITE  # padding column
    assert grid.getpixel((8, 7)) == WHITE  # empty fourth cell

    shared = heatmap_grid(maps, ncols=3, padding=0, shared_scale=True)
    bound = maps.abs().max().item()
    for number in range(3):
        cell = shared.crop((number * 5, 0, number * 5 + 5, 4))
        assert pixels(cell) == pixels(heatmap(maps[number], vmin=-bound, vmax=bound))


def test_png_round_trip(tmp_path):
    relevance = torch.randn(2, 9, 11)
    path = save_heatmap(relevance, tmp_path / 'a' / 'b' / 'map.png', cmap='seismic', level=1.5)
    assert path.is_file()
    with Image.open(path) as loaded:
        assert loaded.format == 'PNG' and loaded.mode == 'RGB' and loaded.size == (11, 9)
        assert pixels(loaded) == pixels(heatmap(relevance, cmap='seismic', level=1.5))

    grid_path = save_heatmap_grid(torch.randn(5, 4, 4), str(tmp_path / 'grid' / 'g.png'), ncols=5, padding=0)
    with Image.open(grid_path) as loaded:
        assert loaded.format == 'PNG' and loaded.size == (20, 4)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize('call,error,message', [
    (lambda: colormap('viridis'), ValueError, r"colormap: unknown colour map 'viridis'; known colour maps: gray, wred"),
    (lambda: heatmap([[1.0]]), TypeError, r'heatmap: expected relevance to be a torch.Tensor .* got list'),
    (lambda: heatmap(torch.ones(1, 2, 3, 4)), ValueError,
     r'heatmap: expected relevance of shape \(H, W\) or \(C, H, W\), got shape \(1, 2, 3, 4\) with 4'),
    (lambda: heatmap(torch.ones(5)), ValueError, r'heatmap: expected relevance of shape .* got shape \(5,\)'),
    (lambda: heatmap_grid(torch.ones(4, 4)), ValueError,
     r'heatmap_grid: expected relevance of shape \(N, H, W\) or \(N, C, H, W\), got shape \(4, 4\)'),
    (lambda: heatmap(torch.ones(2, 2), level=0), ValueError, r'heatmap: level must be > 0, got 0'),
    (lambda: heatmap(torch.ones(2, 2), level=-1.0), ValueError, r'heatmap: level must be > 0, got -1.0'),
    (lambda: heatmap(torch.ones(2, 2), level=math.inf), ValueError,
     r'heatmap: level must be a finite real number, got inf'),
    (lambda: heatmap(torch.ones(2, 2), level='high'), TypeError,
     r'heatmap: level must be a finite real number, got str'),
    (lambda: heatmap(torch.ones(2, 2), cmap='jet'), ValueError, r"heatmap: unknown colour map 'jet'.*bwr"),
    (lambda: heatmap(torch.tensor([[1.0, math.nan]])), ValueError, r'heatmap: relevance contains non-finite'),
    (lambda: heatmap(torch.tensor([[1.0, -math.inf]])), ValueError, r'heatmap: relevance contains non-finite'),
    (lambda: heatmap(torch.ones(0, 3)), ValueError, r'heatmap: relevance must not be empty, got shape \(0, 3\)'),
    (lambda: heatmap(torch.ones(2, 2, dtype=torch.bool)), TypeError, r'heatmap: expected real-valued relevance'),
    (lambda: heatmap(torch.ones(2, 2, dtype=torch.complex64)), TypeError, r'got dtype torch.complex64'),
    (lambda: heatmap(torch.ones(2, 2), vmin=1.0, vmax=0.0), ValueError,
     r'heatmap: empty normalisation range, vmin=1.0 > vmax=0.0'),
    (lambda: heatmap(torch.ones(2, 2), vmax=math.nan), ValueError,
     r'heatmap: vmax must be a finite real number, got nan'),
    (lambda: heatmap(torch.ones(2, 2), vmin='0'), TypeError, r'heatmap: vmin must be a finite real number, got str'),
    (lambda: heatmap_grid(torch.ones(2, 2, 2), ncols=0), ValueError, r'heatmap_grid: ncols must be an int >= 1'),
    (lambda: heatmap_grid(torch.ones(2, 2, 2), ncols=1.5), TypeError,
     r'heatmap_grid: ncols must be an int >= 1, got float'),
    (lambda: heatmap_grid(torch.ones(2, 2, 2), padding=-1), ValueError,
     r'heatmap_grid: padding must be an int >= 0, got -1'),
])
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------- property

@st.composite
def relevance_maps(draw):
    channels = draw(st.sampled_from([None, 1, 3]))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    shape = (height, width) if channels is None else (channels, height, width)
    values = draw(st.one_of(
        st.lists(st.floats(width=32), min_size=math.prod(shape), max_size=math.prod(shape)),
        st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda v: [v] * math.prod(shape)),
    ))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


@settings(max_examples=150, deadline=None)
@given(relevance=relevance_maps(), cmap=st.sampled_from(COLORMAPS), symmetric=st.booleans(),
       level=st.floats(0.05, 8.0))
def test_property_valid_rgb_image_or_clear_error(relevance, cmap, symmetric, level):
    if not bool(torch.isfinite(relevance).all()):
        with pytest.raises(ValueError, match='non-finite'):
            heatmap(relevance, cmap=cmap, symmetric=symmetric, level=level)
        return
    image = heatmap(relevance, cmap=cmap, symmetric=symmetric, level=level)
    assert image.mode == 'RGB' and image.size == (relevance.shape[-1], relevance.shape[-2])
    palette = {tuple(c) for c in colormap(cmap, level=level).tolist()}
    assert set(pixels(image)) <= palette


# --- figures that read on their own: column titles, row labels, a colour bar -------------------------------------

def _dark(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    """How many pixels in ``box`` are dark (text)."""
    region = image.crop(box).convert('L')
    return sum(1 for value in region.tobytes() if value < 128)


def test_labelled_heatmap_grid_keeps_the_cells_and_adds_text_around_them():
    relevance = torch.randn(4, 8, 8, dtype=torch.float64)
    bare = heatmap_grid(relevance, ncols=2, padding=2)
    figure = heatmap_grid(relevance, ncols=2, padding=2, titles=['first', 'second'], row_labels=['one', 'two'])
    assert figure.width > bare.width and figure.height > bare.height
    # the cells sit at the bottom right of the text bands, unchanged
    left = figure.width - bare.width
    top = next(y for y in range(figure.height) if figure.getpixel((left, y)) == bare.getpixel((0, 0))
               and figure.crop((left, y, left + bare.width, y + bare.height)).tobytes() == bare.tobytes())
    assert top > 0
    assert _dark(figure, (left, 0, figure.width, top)) > 10  # titles above
    assert _dark(figure, (0, top, left, figure.height)) > 10  # labels on the left


def test_labelled_grid_without_text_is_the_cells_resized():
    cells = [[heatmap(torch.tensor([[-1.0, 1.0]]))]]
    figure = labelled_grid(cells, cell_size=(4, 2))
    assert figure.size == (4, 2)
    assert figure.getpixel((0, 0)) == BLUE and figure.getpixel((3, 1)) == RED


def test_colorbar_is_red_at_the_top_and_blue_at_the_bottom_with_labels():
    bar = colorbar('bwr', height=100, width=10, labels=('positive', '0', 'negative'))
    column = [bar.getpixel((5, y)) for y in range(bar.height)]
    reds, blues = [y for y, p in enumerate(column) if p == RED], [y for y, p in enumerate(column) if p == BLUE]
    assert reds and blues and max(reds) < min(blues)
    assert bar.width > 10 + 20 and _dark(bar, (12, 0, bar.width, bar.height)) > 10  # the labels
    assert colorbar('bwr', height=7, labels=()).size == (16, 7)


def test_heatmap_grid_colorbar_sits_right_of_the_cells():
    relevance = torch.randn(2, 16, 16, dtype=torch.float64)
    figure = heatmap_grid(relevance, ncols=2, colorbar=True, font_size=10)
    plain = heatmap_grid(relevance, ncols=2)
    assert figure.width > plain.width + 20
    right = figure.crop((plain.width, 0, figure.width, figure.height))
    data = right.tobytes()
    colours = {tuple(data[i:i + 3]) for i in range(0, len(data), 3)}
    assert RED in colours and BLUE in colours


def test_titles_wrap_within_their_column():
    figure = labelled_grid([[heatmap(torch.randn(8, 8))]], titles=['a very long title for a narrow column'],
                           cell_size=64, font_size=10)
    assert figure.width == 64  # wrapped, not widened
    assert figure.height > 64 + 3 * 10  # over several lines


@pytest.mark.parametrize('kwargs, error, message', [
    ({'titles': ['only one']}, ValueError, r"labelled_grid: expected 2 titles \(one per title\)"),
    ({'row_labels': ['a', 'b']}, ValueError, r"labelled_grid: expected 1 row_labels \(one per row\)"),
    ({'titles': 'ab'}, TypeError, r"labelled_grid: titles must be a sequence of str"),
    ({'colorbar': 'nope'}, ValueError, r"labelled_grid: unknown colour map 'nope'"),
    ({'cell_size': 0}, ValueError, r"labelled_grid: cell width must be an int >= 1"),
])
def test_labelled_grid_errors(kwargs, error, message):
    cells = [[heatmap(torch.randn(4, 4)), heatmap(torch.randn(4, 4))]]
    with pytest.raises(error, match=message):
        labelled_grid(cells, **kwargs)


def test_labelled_grid_refuses_what_is_no_picture():
    with pytest.raises(TypeError, match=r"labelled_grid: every cell must be a PIL.Image.Image, got Tensor"):
        labelled_grid([[torch.zeros(4, 4)]])
    with pytest.raises(ValueError, match=r"labelled_grid: expected at least one picture"):
        labelled_grid([[]])
