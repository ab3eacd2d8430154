#!/usr/bin/env bash
# Creates the virtual environment that runs LXT 2.1 (AttnLRP / CP-LRP for transformers), the reference
# for lrpfunc's transformer composites.
#
#   bash benchmarks/setup_lxt.sh [VENV]        (default VENV: /work/lxt-venv)
#
# LXT 2.1 runs only with transformers 4.52.x (5.x breaks its import). torch is pinned to the CPU wheel
# 2.13.0 and installed first; every other package is installed either with --no-deps or under a
# constraint that pins torch, so that no wider torch requirement can pull the CUDA wheels.
#
# LXT declares accelerate, bitsandbytes, open_clip_torch, matplotlib, tabulate and zennit as
# dependencies (open_clip_torch would pull torchvision); its efficient API (lxt.efficient) imports only
# torch, transformers, torchvision.models.vision_transformer (for its ViT patch map) and, optionally,
# zennit. So LXT goes in with --no-deps, plus tabulate (imported by lxt.explicit), and Zennit 0.5.1 for
# LXT's ViT recipe, also with --no-deps (it asks for torchvision), plus the Pillow it imports.
# torchvision is never installed: the scripts that import LXT register a minimal in-memory stand-in
# (torchvision.models.vision_transformer exposing torch.nn; torchvision.models.resnet with two
# placeholder classes for Zennit) when no real torchvision imports. pip then reports that lxt and
# zennit miss some declared dependencies; that is expected.
set -euo pipefail

VENV=${1:-/work/lxt-venv}
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "$TORCH" > "$constraints"

# 1. torch first (the CPU wheel).
$PIP install "$TORCH"
# 2. transformers 4.52.4 (its dependencies do not include torch; the constraint holds it anyway).
$PIP install -c "$constraints" transformers==4.52.4
# 3. LXT and Zennit without their dependencies, then what they import besides torch/torchvision.
$PIP install --no-deps lxt==2.1 zennit==0.5.1
$PIP install -c "$constraints" tabulate Pillow
# 4. What the scripts and lrpfunc (imported from the checkout) use, and what runs the migration guides'
#    comparisons (tests/test_docs.py).
$PIP install -c "$constraints" optree psutil numpy pytest hypothesis

"$VENV/bin/python" - <<'PY'
import torch
import transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert transformers.__version__ == "4.52.4", transformers.__version__
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
PY
