"""What the package index shows: the long description has no link that only works inside the repository, its example
runs, and the version is the same in the metadata, the package and the changelog."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
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
    released = [heading for heading in re.findall(r"^## (\S+)", changelog, re.MULTILINE) if heading != "Unreleased"]
    assert released and released[0] == version


def test_the_source_distribution_carries_what_the_description_promises(tmp_path: Path) -> None:
    """Build the sdist as a release would (``python -m build --sdist``, the installed setuptools) and list it: the
    docs, examples, benchmarks and tests beside the package, every file of those folders that git tracks."""
    pytest.importorskip("build")
    pytest.importorskip("setuptools")  # the build backend, used in place (--no-isolation: no download)
    completed = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    (archive,) = tmp_path.glob("lrpfunc-*.tar.gz")
    with tarfile.open(archive) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert "lrpfunc/py.typed" in members and "DESCRIPTION.md" in members and "CHANGELOG.md" in members
    for folder in ("docs", "examples", "benchmarks", "tests"):
        tracked = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=False)
        files = [name for name in tracked.stdout.splitlines() if (ROOT / name).is_file()]
        if tracked.returncode != 0 or not files:  # not a git checkout: the folder's files on disk
            files = [str(path.relative_to(ROOT)) for path in (ROOT / folder).rglob("*")
                     if path.is_file() and "__pycache__" not in path.parts]
        missing = sorted(set(files) - members)
        assert files and not missing, f"{folder}: the sdist lacks {missing[:5]}"
