"""The code blocks of the documentation pages, and the peer/lrpfunc pairs of the migration guides.

Fences (see ``tests/test_docs.py`` for what runs where):

- ```` ```python ```` or ```` ```python title="lrpfunc" ````: lrpfunc code, run in order in one namespace per page;
- ```` ```{.python .peer title="Zennit 0.5.1"} ````: another library's code. Its library is the one of
  ``zennit``, ``captum``, ``lxt`` that it imports. Its pair is the next lrpfunc block of the page; the compared
  values are the names that both blocks bind at top level and that hold tensors on both sides. They agree when
  ``max |peer - lrpfunc| <= tolerance * max |peer|``, with :data:`TOLERANCE` unless the fence gives
  ``tolerance="1e-6"`` (where the peer computes in float32 somewhere; the page says where);
- ```` ```{.python .peer .not-compared ...} ````: run like a peer block, nothing compared (the page says why).

:func:`run_pair` runs one pair in a fresh interpreter (LXT patches transformers' classes for the whole process):
the page's lrpfunc blocks before the peer block, then the lrpfunc block of the pair in a copy of that namespace,
then the peer block in another copy. ``python tests/docpairs.py PAGE INDEX OUT`` is that interpreter's entry point.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
PEERS = ("zennit", "captum", "lxt")
TOLERANCE = 1e-12  # max |peer - lrpfunc| over max |peer|, for each compared name; a peer block may give its own
SETUP_HINT = {
    "zennit": "bash benchmarks/setup_peers.sh /work/peers-venv",
    "captum": "bash benchmarks/setup_peers.sh /work/peers-venv",
    "lxt": "bash benchmarks/setup_lxt.sh /work/lxt-venv",
}


@dataclasses.dataclass(frozen=True)
class Block:
    code: str
    line: int  # of the opening fence, 1-based
    peer: bool = False
    compared: bool = True
    title: str = ""
    tolerance: float = 1e-12


@dataclasses.dataclass(frozen=True)
class Pair:
    page: Path
    index: int  # among the page's peer blocks, 0-based
    peer: Block
    lrpfunc: Block
    prefix: tuple[str, ...]  # the page's lrpfunc blocks before the peer block
    library: str
    names: tuple[str, ...]  # bound at top level by both blocks

    @property
    def id(self) -> str:
        return f"{self.page.stem}:{self.peer.line}"


def _info(info: str) -> tuple[str, set[str], dict[str, str]]:
    """Language, classes and attributes of a fence's info string (``python title="x"`` or ``{.python .peer}``)."""
    info = info.strip()
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', info))
    if info.startswith("{"):
        tokens = re.sub(r'\w+="[^"]*"', " ", info.strip("{}")).split()
        classes = [token[1:] for token in tokens if token.startswith(".")]
        return (classes[0] if classes else ""), set(classes[1:]), attrs
    words = re.sub(r'\w+="[^"]*"', " ", info).split()
    return (words[0] if words else ""), set(words[1:]), attrs  # ``python peer``: a peer block, unrendered


def blocks(text: str) -> list[Block]:
    """The page's Python blocks, lrpfunc and peer, in order."""
    found = []
    for match in FENCE.finditer(text):
        language, classes, attrs = _info(match.group(1))
        if language != "python":
            continue
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(match.group(2), line, "peer" in classes, "not-compared" not in classes,
                           attrs.get("title", ""), float(attrs.get("tolerance", TOLERANCE))))
    return found


def python_blocks(text: str) -> list[str]:
    """The code of the lrpfunc blocks (fenced ``python``, not peer blocks)."""
    return [block.code for block in blocks(text) if not block.peer]


def bound_names(code: str) -> set[str]:
    """The names a block binds at top level (assignments, ``for``/``with`` targets, imports, definitions)."""
    names: set[str] = set()

    def targets(node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                names.add(sub.id)

    for node in ast.parse(code).body:
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                targets(target)
        elif isinstance(node, (ast.For, ast.With)):
            for target in [node.target] if isinstance(node, ast.For) else [i.optional_vars for i in node.items]:
                if target is not None:
                    targets(target)
            names |= bound_names(ast.unparse(ast.Module(body=node.body, type_ignores=[])))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def imported_peer(code: str) -> str:
    """The library of :data:`PEERS` that a peer block imports."""
    for node in ast.walk(ast.parse(code)):
        modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for module in modules:
            if module.split(".")[0] in PEERS:
                return module.split(".")[0]
    raise ValueError(f"a peer block imports none of {PEERS}:\n{code}")


def pairs(page: Path) -> list[Pair]:
    found = []
    page_blocks = blocks(page.read_text(encoding="utf-8"))
    for position, block in enumerate(page_blocks):
        if not block.peer:
            continue
        following = [b for b in page_blocks[position + 1:] if not b.peer]
        if not following:
            raise ValueError(f"{page.name}:{block.line}: a peer block without an lrpfunc block after it")
        prefix = tuple(b.code for b in page_blocks[:position] if not b.peer)
        names = bound_names(block.code) & bound_names(following[0].code) if block.compared else set()
        found.append(Pair(page, len(found), block, following[0], prefix, imported_peer(block.code), tuple(sorted(names))))
    return found


def migration_pages() -> list[Path]:
    return sorted(DOCS.glob("migrate-*.md"))


def peer_missing(library: str) -> str | None:
    """Why the peer cannot run here, or ``None`` (installed; whether it imports is the pair's run to find out)."""
    if importlib.util.find_spec(library) is None:
        return (f"{library} is not installed in this environment (create an environment that has it: "
                f"{SETUP_HINT[library]})")
    return None


def run_pair(pair: Pair, timeout: float = 600) -> dict[str, Any]:
    """Run ``pair`` in a fresh interpreter of this environment; the tensors each side bound, and versions."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pair.pt"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), str(pair.page), str(pair.index), str(out)],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{pair.id} ({pair.library}) failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
        return torch.load(out, weights_only=False)


def difference(peer: Any, ours: Any) -> tuple[float, float]:
    """``max |peer - ours|`` and that over ``max |peer|``, in float64."""
    peer, ours = peer.detach().double(), ours.detach().double()
    if peer.shape != ours.shape:
        raise AssertionError(f"shapes differ: peer {tuple(peer.shape)}, lrpfunc {tuple(ours.shape)}")
    abs_diff = float((peer - ours).abs().max()) if peer.numel() else 0.0
    scale = float(peer.abs().max()) if peer.numel() else 0.0
    return abs_diff, abs_diff / scale if scale else abs_diff


def _standin(library: str) -> None:
    """torchvision for Zennit 0.5.1 and LXT 2.1 when no real one imports (the peers' environments have none)."""
    if library == "zennit":
        from benchmarks.peers import ensure_torchvision

        ensure_torchvision()
    elif library == "lxt":
        from benchmarks.lxt_reference import install_torchvision_standin

        install_torchvision_standin()


def _main(page: str, index: str, out: str) -> None:
    import warnings

    import torch

    sys.path.insert(0, str(ROOT))
    import lrpfunc

    warnings.simplefilter("error", lrpfunc.ParamsRequireGradWarning)  # as tests/test_docs.py
    pair = pairs(Path(page))[int(index)]
    namespace: dict[str, Any] = {"__name__": f"docs_{pair.page.stem}"}
    for number, code in enumerate(pair.prefix):
        exec(compile(code, f"{pair.page.name} (python block {number + 1})", "exec"), namespace)  # noqa: S102
    ours = dict(namespace)
    exec(compile(pair.lrpfunc.code, f"{pair.page.name}:{pair.lrpfunc.line} (lrpfunc)", "exec"), ours)  # noqa: S102
    _standin(pair.library)
    theirs = dict(namespace)
    exec(compile(pair.peer.code, f"{pair.page.name}:{pair.peer.line} ({pair.library})", "exec"), theirs)  # noqa: S102
    library = importlib.import_module(pair.library)
    version = getattr(library, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version(pair.library)
    tensors = {side: {name: ns[name].detach().cpu() for name in pair.names if isinstance(ns.get(name), torch.Tensor)}
               for side, ns in (("peer", theirs), ("lrpfunc", ours))}
    torch.save({**tensors, "versions": {pair.library: version, "torch": torch.__version__},
                "lrpfunc_file": lrpfunc.__file__}, out)


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # tests/ holds no package the blocks import
    _main(*sys.argv[1:4])
