#!/usr/bin/env bash
# Creates the virtual environment that runs the benchmark against its peers (Zennit, Captum).
#
#   bash benchmarks/setup_peers.sh [VENV]        (default VENV: /work/peers-venv)
#
# torch is pinned to the CPU wheel 2.13.0 and installed first; every peer is installed either with
# --no-deps or under a constraint that pins torch, so that no wider torch requirement can pull the
# CUDA wheels. torchvision is never installed: Zennit 0.5.1 imports it at top level, and the benchmark
# provides a stand-in (benchmarks/_standin/torchvision) when the real one is missing.
set -euo pipefail

VENV=${1:-/work/peers-venv}
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "$TORCH" > "$constraints"

# 1. torch first (the CPU wheel).
$PIP install "$TORCH"
# 2. Zennit without its dependencies (it asks for torchvision), then what it needs besides torch/torchvision.
$PIP install --no-deps zennit==0.5.1
$PIP install -c "$constraints" click numpy Pillow
# 3. Captum with its dependencies (matplotlib, numpy, packaging, tqdm), torch held at the pinned version.
$PIP install -c "$constraints" captum==0.9.0
# 4. What the benchmark and lrpfunc use, and what runs the migration guides' comparisons (tests/test_docs.py).
$PIP install -c "$constraints" optree psutil pytest hypothesis

"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("torch", torch.__version__, "cuda", torch.version.cuda)
PY
