#!/usr/bin/env python
"""The migration guides' peer/lrpfunc pairs (docs/migrate-*.md), run side by side: how far apart each pair is.

    PYTHONPATH=. /work/peers-venv/bin/python benchmarks/migration_agreement.py     # Zennit and Captum
    PYTHONPATH=. /work/lxt-venv/bin/python benchmarks/migration_agreement.py       # LXT

Every pair whose library imports in this environment runs as ``tests/test_docs.py`` runs it (``tests/docpairs.py``:
a fresh interpreter, the page's blocks before the pair, then each side in its own copy of that namespace); for every
compared name it prints the largest absolute difference, that over the largest absolute value of the peer's, and the
tolerance the test holds it to.
Pairs whose library is missing, and pairs the page marks as not compared, are listed as such.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import docpairs
import torch


def main() -> None:
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"{'pair (page:line)':<22} {'peer':<15} {'name':<14} {'dtype':<8} {'max abs diff':>12} {'max rel diff':>12} {'tolerance':>9}")
    for page in docpairs.migration_pages():
        for pair in docpairs.pairs(page):
            missing = docpairs.peer_missing(pair.library)
            if missing:
                print(f"{pair.id:<22} {pair.library:<15} skipped: {pair.library} is not installed")
                continue
            result = docpairs.run_pair(pair)
            peer = f"{pair.library} {result['versions'][pair.library]}"
            if not pair.peer.compared:
                print(f"{pair.id:<22} {peer:<15} ran, not compared (see the page)")
                continue
            for name in pair.names:
                if name not in result["peer"] or name not in result["lrpfunc"]:
                    continue
                abs_diff, rel_diff = docpairs.difference(result["peer"][name], result["lrpfunc"][name])
                dtype = str(result["peer"][name].dtype).replace("torch.", "")
                print(f"{pair.id:<22} {peer:<15} {name:<14} {dtype:<8} {abs_diff:>12.1e} {rel_diff:>12.1e} {pair.peer.tolerance:>9.0e}")


if __name__ == "__main__":
    main()
