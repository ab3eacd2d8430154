"""The heatmap of a generation's attribution matrix (PNG and HTML)."""

from __future__ import annotations

import pytest
import torch

from lrpfunc import text

TOKENS = ["ĠThe", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", "Ġand", "Ġslept"]


def _relevance(rows: int = 3, columns: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(rows, columns)


def test_png_cells_follow_the_relevance_and_the_causal_blank() -> None:
    cell, pad = 20, 4  # pad: a third of the default font size (12)
    relevance = _relevance()
    image = text.generation_heatmap(TOKENS, relevance, prompt_length=5, cell=cell, colorbar=False)
    assert text.generation_heatmap(TOKENS, relevance, prompt_length=5, cell=cell, colorbar=False,
                                   title="t").height > image.height  # the title takes a line
    width, height = image.size
    left, bottom = width - 2 * pad - 8 * cell, height - 2 * pad  # the grid's corner (no colour bar)
    blank = torch.arange(8)[None] >= (5 + torch.arange(3))[:, None]  # row n explains token 5 + n
    expected = text.token_colors(torch.where(blank, 0.0, relevance))  # each row normalised on its own
    for row in range(3):
        y = bottom - (3 - row) * cell + cell // 2
        for column in range(8):
            pixel = image.getpixel((left + column * cell + cell // 2, y))
            assert pixel == ((255, 255, 255) if blank[row, column] else expected[row][column]), (row, column)


def test_rows_are_normalised_alone_or_together() -> None:
    relevance = torch.tensor([[1.0, -1.0, 0.0], [10.0, -10.0, 0.0]])
    alone = text.generation_heatmap_html(["a", "b", "c"], relevance, row_tokens=["x", "y"], causal=False)
    shared = text.generation_heatmap_html(["a", "b", "c"], relevance, row_tokens=["x", "y"], causal=False,
                                          shared_scale=True)
    assert alone.count("background-color: #ff0000") == 2  # each row's maximum is the end of the map
    assert shared.count("background-color: #ff0000") == 1


def test_html_escapes_tokens_and_leaves_blank_cells_empty() -> None:
    fragment = text.generation_heatmap_html(["<b>", "&", "c", "d"], torch.ones(2, 4), prompt_length=2,
                                            clean_tokens=False, title="<t>")
    assert "&lt;b&gt;" in fragment and "&amp;" in fragment and "&lt;t&gt;" in fragment
    assert fragment.count("<td") == 8 and fragment.count("background-color") == 2 + 3
    assert fragment.count('title="1"') == 5


def test_an_encoder_side_matrix_has_no_blank_cells(tmp_path) -> None:
    path = text.save_generation_heatmap(["a", "b", "c"], torch.randn(2, 3), tmp_path / "m.png",
                                        row_tokens=["x", "y"], causal=False)
    assert path.exists() and path.stat().st_size > 0
    page = text.save_generation_heatmap_html(["a", "b", "c"], torch.randn(2, 3), tmp_path / "m.html",
                                             row_tokens=["x", "y"], causal=False)
    assert page.read_text().count("background-color") == 6


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(tokens=TOKENS, relevance=torch.randn(8)), ValueError, r"generation_heatmap: relevance must be \(N, C\)"),
    (dict(tokens=TOKENS[:5], relevance=torch.randn(3, 8), prompt_length=5), ValueError,
     r"generation_heatmap: 5 tokens for 8 columns of relevance"),
    (dict(tokens=TOKENS, relevance=torch.randn(3, 8)), ValueError,
     r"generation_heatmap: prompt_length must be an int in \[0, 8\] \(result.prompt_length\), got None"),
    (dict(tokens=TOKENS, relevance=torch.randn(3, 8), prompt_length=7), ValueError,
     r"generation_heatmap: 1 row tokens for 3 rows of relevance"),
    (dict(tokens="The cat", relevance=torch.randn(3, 8), prompt_length=5), TypeError,
     r"generation_heatmap: expected tokens to be a sequence of str, got a single str"),
    (dict(tokens=TOKENS, relevance=torch.full((3, 8), float("nan")), prompt_length=5), ValueError,
     r"generation_heatmap: relevance has non-finite values"),
])
def test_errors(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        text.generation_heatmap(**kwargs)
