"""Every lrpfunc example of the documentation runs, and the site builds without warnings.

Each page's ``python`` code blocks run in order in one namespace per page; blocks fenced ``python peer`` are other
libraries' code (Zennit, Captum, LXT) shown for comparison and are not run. The site build needs the ``docs`` extra
(mkdocs, mkdocstrings) and is skipped without it.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

# examples and pages are what users copy: a heatmap there must take the fast path, without the hint
pytestmark = pytest.mark.filterwarnings("error::lrpfunc.ParamsRequireGradWarning")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
PAGES = sorted(path for path in DOCS.rglob("*.md") if "api" not in path.relative_to(DOCS).parts)


def python_blocks(text: str) -> list[str]:
    """The code of the blocks fenced exactly ``python`` (not ``python peer``, not other languages)."""
    return [code for info, code in FENCE.findall(text) if info.strip() == "python"]


def test_every_page_is_in_the_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        assert page.relative_to(DOCS).as_posix() in config, page


def test_peer_blocks_are_not_collected() -> None:
    text = "```python peer\nimport zennit\n```\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n"
    assert python_blocks(text) == ["x = 1\n"]


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


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason="needs the docs extra (mkdocs, mkdocstrings[python])")
def test_site_builds_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "composites" / "index.html").exists()
