"""Every lrpfunc example of the documentation runs, the migration guides' pairs agree, and the site builds.

Each page's lrpfunc blocks (fenced ``python``, optionally with a ``title="lrpfunc"``) run in order in one namespace
per page. Blocks fenced ``{.python .peer title="Zennit 0.5.1"}`` are another library's code (Zennit, Captum, LXT;
the one the block imports) and never run there.

The migration guides (``docs/migrate-*.md``) pair every peer block with the next lrpfunc block. The convention:

- the plain blocks before a pair are its shared setup (model, input, seeded): both sides see the page's namespace
  as those blocks leave it, each in its own copy, so a peer block imports what it uses itself;
- both blocks of a pair end by binding the same names to their results (``output, relevance = ...``); the compared
  values are the names that both bind at top level and that hold tensors on both sides;
- they agree when ``max |peer - lrpfunc| <= tolerance * max |peer|`` for every compared name, with a tolerance of
  1e-12 (float64 on both sides) unless the fence gives its own, ``tolerance="1e-6"``, where the peer or the model
  computes in float32 somewhere (the page says where);
- a pair that is not meant to agree (SmoothGrad's noise) has ``.not-compared`` in the peer fence: both sides run,
  nothing is compared, and the page says why.

``test_migration_pair_agrees`` runs each pair in a fresh interpreter (``tests/docpairs.py``; LXT patches
transformers' classes for the whole process) when the peer is installed, and skips with the reason and the setup
script otherwise (CI installs the test extra only). The peers' environments come from
``benchmarks/setup_peers.sh`` (Zennit, Captum) and ``benchmarks/setup_lxt.sh`` (LXT);
``benchmarks/migration_agreement.py`` prints the measured differences. The site build needs the ``docs`` extra
(mkdocs, mkdocstrings) and is skipped without it.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import docpairs
import pytest

# examples and pages are what users copy: a heatmap there must take the fast path, without the hint
pytestmark = pytest.mark.filterwarnings("error::lrpfunc.ParamsRequireGradWarning")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(path for path in DOCS.rglob("*.md") if "api" not in path.relative_to(DOCS).parts)


python_blocks = docpairs.python_blocks
PAIRS = [pair for page in docpairs.migration_pages() for pair in docpairs.pairs(page)]


def test_every_page_is_in_the_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        assert page.relative_to(DOCS).as_posix() in config, page


def test_peer_blocks_are_not_collected() -> None:
    text = ("```python peer\nimport zennit\n```\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n\n"
            '```{.python .peer title="Captum 0.9"}\nimport captum\n```\n\n```python title="lrpfunc"\ny = 2\n```\n')
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


def test_pairs_compare_the_names_both_sides_bind() -> None:
    peer = docpairs.Block("from zennit.attribution import Gradient\nwith Gradient() as a:\n    output, relevance = a(x)\n", 1)
    ours = docpairs.Block("import lrpfunc\noutput, relevance = fn(params, x, g)\nextra = 1\n", 5)
    assert docpairs.bound_names(peer.code) & docpairs.bound_names(ours.code) == {"output", "relevance"}
    assert docpairs.imported_peer(peer.code) == "zennit"


def test_every_migration_guide_has_compared_pairs() -> None:
    for page in docpairs.migration_pages():
        compared = [pair for pair in PAIRS if pair.page == page and pair.peer.compared]
        assert compared and all(pair.names for pair in compared), page


@pytest.mark.parametrize("page", PAGES, ids=[page.stem for page in PAGES])
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = page.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    if not blocks:
        pytest.skip("no lrpfunc code on this page")
    if any(re.search(r"^import transformers", block, re.MULTILINE) for block in blocks):
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # whatever an example writes lands here
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(blocks):
        code = compile(block, f"{page.relative_to(ROOT)} (python block {number + 1})", "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own examples


@pytest.mark.parametrize("pair", PAIRS, ids=[pair.id for pair in PAIRS])
def test_migration_pair_agrees(pair: docpairs.Pair) -> None:
    missing = docpairs.peer_missing(pair.library)
    if missing:
        pytest.skip(f"comparison with {pair.library} skipped: {missing}")
    result = docpairs.run_pair(pair)
    assert Path(result["lrpfunc_file"]).resolve().is_relative_to(ROOT), result["lrpfunc_file"]
    if not pair.peer.compared:
        return  # both sides ran; the page says why they are not meant to agree
    compared = [name for name in pair.names if name in result["peer"] and name in result["lrpfunc"]]
    assert compared, f"{pair.id}: the two blocks bind no common name that holds a tensor on both sides"
    for name in compared:
        abs_diff, rel_diff = docpairs.difference(result["peer"][name], result["lrpfunc"][name])
        assert rel_diff <= pair.peer.tolerance, (
            f"{pair.id}: {name} differs from {pair.library}'s by {abs_diff:.2e} (max abs), {rel_diff:.2e} relative to "
            f"its largest value; tolerance {pair.peer.tolerance:g}"
        )


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason="needs the docs extra (mkdocs, mkdocstrings[python])")
def test_site_builds_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "composites" / "index.html").exists()
