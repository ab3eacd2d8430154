#!/usr/bin/env python
"""lrpfunc's AttnLRP and CP-LRP against the relevance LXT 2.1 computed (``benchmarks/lxt_reference.py``).

    python benchmarks/lxt_agreement.py REFDIR [CASE-DTYPE ...]

Runs in any environment with lrpfunc and transformers (4.52.x or 5.x): no LXT needed. For every saved case
(default: every ``*.pt`` in ``REFDIR``) it rebuilds the model from the saved class, config and weights, seeds the
target logit with its value (LRP's convention, as LXT's ``logit.backward()`` times the input), computes lrpfunc's
relevance of the input embeddings with ``composites.attnlrp()`` (``cp_lrp()`` for the ``_cp`` cases; for the ViT
with gamma, LXT's recipe: Gamma 0.25 on convolutions, 0.05 on linear layers) and prints the relative L2 error
against LXT's, the largest per-token error relative to the largest per-token relevance, and the conservation
``sum R / logit`` of both.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lrpfunc  # noqa: E402
import lrpfunc.hf  # noqa: E402
from lrpfunc import composites, rules, types  # noqa: E402


def _vision_transformer_class() -> type[nn.Module]:
    """``TinyVisionTransformer`` of ``lxt_reference.py``, without importing LXT or torchvision."""
    source = (ROOT / "benchmarks" / "lxt_reference.py").read_text()
    start = source.index("class TinyEncoderBlock")
    end = source.index("@dataclasses.dataclass(frozen=True)\nclass Case")
    namespace: dict[str, Any] = {}
    exec("import math\nimport torch\nfrom torch import Tensor, nn\n" + source[start:end], namespace)  # noqa: S102
    return namespace["TinyVisionTransformer"]


class _Logits(nn.Module):
    """``model(pixel_values=x)`` of the ViT as a module of its input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build(saved: dict[str, Any]) -> tuple[nn.Module, torch.dtype]:
    dtype = torch.float64 if saved["torch_dtype"] == "float64" else torch.float32
    module_name, class_name = saved["model_class"].rsplit(".", 1)
    if class_name == "TinyVisionTransformer":
        model = _vision_transformer_class()(**saved["config"])
        model.load_state_dict(saved["state_dict"])
        return _Logits(model.to(dtype).eval()), dtype
    model_class = getattr(importlib.import_module(module_name), class_name)
    config = model_class.config_class.from_dict(saved["config"])
    config._attn_implementation = saved["attn_implementation"]
    model = model_class(config).to(dtype).eval()
    model.load_state_dict(saved["state_dict"], strict=False)
    return lrpfunc.hf.FromEmbeddings(model), dtype


def composite_for(name: str) -> Any:
    if "gamma" in name:
        return composites.cp_lrp(layer_map=[(types.Convolution, rules.gamma(0.25)), (types.Dense, rules.gamma(0.05))])
    return composites.cp_lrp() if "_cp" in name else composites.attnlrp()


def compare(path: Path) -> str:
    saved = torch.load(path, weights_only=False)
    model, dtype = build(saved)
    x = saved["inputs_embeds"].to(dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        logits = model(x)
        seed = torch.zeros_like(logits)
        target = saved["target"]
        if logits.ndim == 3:
            seed[0, target["position"], target["index"]] = 1.0
        else:
            seed[0, target["index"]] = 1.0
        logit = (logits * seed).sum()
        _, relevance = lrpfunc.attribute(model, composite_for(path.stem))(params, x, seed * logit)
    reference = saved["relevance"].to(dtype)
    error = ((relevance - reference).norm() / reference.norm()).item()
    dims = tuple(range(2, x.ndim)) if x.ndim > 3 else (-1,)
    tokens, reference_tokens = relevance.sum(dims), reference.sum(dims)
    token_error = ((tokens - reference_tokens).abs().max() / reference_tokens.abs().max()).item()
    return (f"{path.stem:22s} rel. L2 error {error:.1e}  per token {token_error:.1e}  "
            f"sum R / logit: lrpfunc {(relevance.sum() / logit).item():.6f}, LXT {saved['conservation']:.6f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    folder = Path(argv[0])
    names = argv[1:] or sorted(path.stem for path in folder.glob("*.pt"))
    import transformers

    print(f"lrpfunc {lrpfunc.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    for name in names:
        print(compare(folder / f"{name}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
