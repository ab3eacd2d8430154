"""What the package index shows: the long description has no link that only works inside the repository, its example
runs, and the version is the same in the metadata, the package and the changelog."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lrpfunc

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def _setting(name: str) -> str:
    found = re.search(rf'^{name} = "([^"]+)"', PYPROJECT, re.MULTILINE)
    assert found, f"pyproject.toml has no {name}"
    return found.group(1)


def test_the_long_description_links_only_to_absolute_urls() -> None:
    text = (ROOT / _setting("readme")).read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)", text) + re.findall(r'<img[^>]*src="([^"]+)"', text)
    relative = [target for target in targets if not re.match(r"https?://", target)]
    assert not relative, f"the package index cannot resolve these relative links: {relative}"


def test_the_long_description_example_runs() -> None:
    text = (ROOT / _setting("readme")).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    runnable = [block for block in blocks if "import" in block]
    assert runnable
    namespace: dict[str, object] = {}
    for block in runnable:
        exec(compile(block, "long description", "exec"), namespace)  # noqa: S102 - the package's own example
    relevance, output = namespace["relevance"], namespace["output"]
    assert isinstance(relevance, torch.Tensor) and isinstance(output, torch.Tensor)
    assert relevance.shape == (4, 3, 32, 32)


def test_one_version_in_metadata_package_and_changelog() -> None:
    version = _setting("version")
    assert lrpfunc.__version__ == version
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    newest = re.search(r"^## (\S+)", changelog, re.MULTILINE)
    assert newest is not None and newest.group(1) == version


@pytest.mark.parametrize("folder", ["docs", "examples", "benchmarks", "tests"])
def test_the_source_distribution_carries_what_the_description_promises(folder: str) -> None:
    manifest = (ROOT / "MANIFEST.in").read_text(encoding="utf-8")
    assert re.search(rf"^graft {folder}$", manifest, re.MULTILINE)
    assert (ROOT / folder).is_dir()
