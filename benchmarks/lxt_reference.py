#!/usr/bin/env python
"""Reference relevances from LXT 2.1 (AttnLRP and CP-LRP) on tiny transformers with random weights.

    /work/lxt-venv/bin/python benchmarks/lxt_reference.py OUTDIR [--cases llama bert ...]
        [--dtypes float32 float64]

Runs in the environment that ``benchmarks/setup_lxt.sh`` creates (LXT 2.1 needs transformers 4.52.x).
Every case builds a tiny HuggingFace model from its config (random weights, fixed seed, eager
attention unless the case says sdpa, eval mode) and computes LXT's relevance exactly as LXT's README
does: ``lxt.efficient.monkey_patch(module)`` before the model is built, ``inputs_embeds`` as a leaf
that requires grad, backward of the target logit, relevance = ``inputs_embeds * inputs_embeds.grad``.

Cases: Llama (eager, sdpa, and LXT's ``cp_LRP`` map), Qwen2, Qwen3, Gemma3, GPT-2 (AttnLRP and
``cp_LRP``), BERT (eager, sdpa), and a ViT. LXT 2.1 supports torchvision's ViT only (its ``cp_LRP`` map
patches ``torch.nn.GELU``, ``LayerNorm`` and ``MultiheadAttention``); torchvision is not available here,
so :class:`TinyVisionTransformer` rebuilds torchvision's structure from those ``torch.nn`` classes. The
ViT runs once with LXT's map alone (``vit_cp``) and once with LXT's ViT recipe, Zennit's Gamma rule on
``Conv2d`` (0.25) and ``Linear`` (0.05) after ``monkey_patch_zennit`` (``vit_cp_gamma``; both values
come from the grid that LXT's ViT example sweeps).

Targets: causal language models explain the largest logit at the last position; BERT explains the
logit of class 0; the ViT explains its largest class logit.

Weights: the model's own initialisation with ``initializer_range=0.2`` (ten times HuggingFace's default,
so that attention is far from uniform and the nonlinearities leave their linear range), then every bias
and every normalisation weight is moved by 0.1 * N(0, 1) (HuggingFace initialises them to 0 and 1, which
would hide mistakes in how biases and norm scales are treated).

Each case runs in a fresh subprocess: LXT's patches are global to a process (several of them patch
``torch.nn.Dropout``, ``torch.nn.LayerNorm`` or ``torch.nn.GELU`` themselves). Each case is saved with
``torch.save`` to ``OUTDIR/<case>-<dtype>.pt`` as a dict:

- ``model_class`` (qualified name of the HuggingFace class, or of :class:`TinyVisionTransformer`),
  ``config`` (``config.to_dict()``), ``state_dict``;
- ``input_ids`` (``None`` for the ViT), ``inputs_embeds`` (the image for the ViT);
- ``target``: ``{"kind": "token" | "class", "position": int | None, "index": int}``; ``logit`` (its value);
- ``logits`` (detached model output);
- ``relevance`` (same shape as ``inputs_embeds``), ``relevance_per_token`` (summed over the hidden
  axis; over the colour axis for the ViT);
- ``conservation`` = ``sum(relevance) / logit``;
- ``input_x_gradient``: the plain gradient times input of the same model before patching;
- ``patch_map`` (``"attnLRP"`` or ``"cp_LRP"``), ``patched`` (what LXT reported to have patched),
  ``zennit_rules`` (ViT only), ``attn_implementation``;
- ``lxt_version``, ``transformers_version``, ``torch_version``, ``torch_dtype``, ``seed``, ``init``.

The script ends with a table of the conservation reached per case and dtype, and a list of model
families LXT 2.1 does not support out of the box.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

SEED = 0
SEQ_LEN = 12
INITIALIZER_RANGE = 0.2
PERTURBATION = 0.1
INIT_NOTE = (f"model init with initializer_range={INITIALIZER_RANGE}, then every bias and normalisation "
             f"weight += {PERTURBATION} * N(0, 1) (torch.Generator seeded with {SEED} + 1)")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --------------------------------------------------------------------------------------------------
# torchvision stand-in
# --------------------------------------------------------------------------------------------------

class _PlaceholderBlock(nn.Module):
    """Stands in for torchvision's ResNet blocks, which Zennit 0.5.1 imports for ``isinstance`` checks."""


def install_torchvision_standin() -> str:
    """Register an in-memory torchvision with only what LXT 2.1 and Zennit 0.5.1 import, unless a real one exists.

    LXT imports ``torchvision.models.vision_transformer`` and reads only its ``nn`` (``torch.nn``, whose
    ``GELU``, ``LayerNorm`` and ``MultiheadAttention`` its ViT patch map patches); Zennit imports
    ``torchvision.models.resnet.BasicBlock`` and ``Bottleneck``.

    Returns:
        A line that says which torchvision is in use.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return "real torchvision"
    package = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    vision_transformer = types.ModuleType("torchvision.models.vision_transformer")
    resnet = types.ModuleType("torchvision.models.resnet")
    vision_transformer.nn = nn
    resnet.BasicBlock = type("BasicBlock", (_PlaceholderBlock,), {})
    resnet.Bottleneck = type("Bottleneck", (_PlaceholderBlock,), {})
    package.__version__ = "0.0.0+lxt-reference-standin"
    package.models = models
    models.vision_transformer = vision_transformer
    models.resnet = resnet
    for module in (package, models, vision_transformer, resnet):
        # A spec, so that importlib.util.find_spec (used by transformers' availability checks) answers;
        # transformers then finds no installed distribution and treats torchvision as unavailable.
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None, is_package=module in (package, models))
        sys.modules[module.__name__] = module
    return "in-memory torchvision stand-in (vision_transformer.nn, resnet placeholders)"


# --------------------------------------------------------------------------------------------------
# a torchvision-style ViT (LXT's ViT patch map targets torchvision's VisionTransformer)
# --------------------------------------------------------------------------------------------------

class TinyEncoderBlock(nn.Module):
    """torchvision's ``EncoderBlock``: pre-norm self-attention and MLP, each with a residual addition."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp_dim, hidden_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class TinyVisionTransformer(nn.Module):
    """torchvision's ``VisionTransformer`` in miniature: patch convolution, class token, learned positions.

    Args:
        image_size: side of the square input image.
        patch_size: side of a square patch (the stride of ``conv_proj``).
        num_layers: encoder blocks.
        num_heads: attention heads.
        hidden_dim: token width.
        mlp_dim: hidden width of the MLP.
        num_classes: logits.
    """

    def __init__(self, image_size: int = 16, patch_size: int = 4, num_layers: int = 2, num_heads: int = 4,
                 hidden_dim: int = 64, mlp_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.config = dict(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                           num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)
        self.patch_size = patch_size
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.randn(1, seq_length, hidden_dim) * 0.02)
        self.layers = nn.Sequential(*[TinyEncoderBlock(num_heads, hidden_dim, mlp_dim) for _ in range(num_layers)])
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.heads = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.ln(self.layers(x))
        return self.heads(x[:, 0])


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One model to explain.

    Attributes:
        name: file stem.
        module: the module LXT patches (``monkey_patch(importlib.import_module(module))``).
        model_class: the class's name in ``module`` (read after patching: LXT replaces BERT's classes).
        config: ``(transformers config class name, keyword arguments)``; ``None`` for the ViT.
        target: ``"last-max"`` (largest logit at the last position), ``"class0"``, ``"max-class"``.
        patch_map: ``"attnLRP"`` (LXT's default for all but the ViT) or ``"cp_LRP"``.
        attn_implementation: ``"eager"`` or ``"sdpa"``.
        zennit_gammas: ``(conv_gamma, linear_gamma)`` for LXT's ViT recipe with Zennit's Gamma rule.
    """

    name: str
    module: str
    model_class: str
    config: tuple[str, dict[str, Any]] | None
    target: str
    patch_map: str = "attnLRP"
    attn_implementation: str = "eager"
    zennit_gammas: tuple[float, float] | None = None


LLAMA = ("LlamaConfig", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             attention_bias=False, mlp_bias=False, hidden_act="silu"))
QWEN2 = ("Qwen2Config", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
QWEN3 = ("Qwen3Config", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64))
GEMMA3 = ("Gemma3TextConfig", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   query_pre_attn_scalar=16, max_position_embeddings=64, sliding_window=8))
GPT2 = ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64))
BERT = ("BertConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64, num_labels=2))

LLAMA_MODULE = "transformers.models.llama.modeling_llama"
GPT2_MODULE = "transformers.models.gpt2.modeling_gpt2"
BERT_MODULE = "transformers.models.bert.modeling_bert"
VIT_MODULE = "torchvision.models.vision_transformer"

CASES = {case.name: case for case in [
    Case("llama", LLAMA_MODULE, "LlamaForCausalLM", LLAMA, "last-max"),
    Case("llama_sdpa", LLAMA_MODULE, "LlamaForCausalLM", LLAMA, "last-max", attn_implementation="sdpa"),
    Case("llama_cp", LLAMA_MODULE, "LlamaForCausalLM", LLAMA, "last-max", patch_map="cp_LRP"),
    Case("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM", QWEN2, "last-max"),
    Case("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM", QWEN3, "last-max"),
    Case("gemma3", "transformers.models.gemma3.modeling_gemma3", "Gemma3ForCausalLM", GEMMA3, "last-max"),
    Case("gpt2", GPT2_MODULE, "GPT2LMHeadModel", GPT2, "last-max"),
    Case("gpt2_cp", GPT2_MODULE, "GPT2LMHeadModel", GPT2, "last-max", patch_map="cp_LRP"),
    Case("bert", BERT_MODULE, "BertForSequenceClassification", BERT, "class0"),
    Case("bert_sdpa", BERT_MODULE, "BertForSequenceClassification", BERT, "class0", attn_implementation="sdpa"),
    Case("vit_cp", VIT_MODULE, "TinyVisionTransformer", None, "max-class", patch_map="cp_LRP"),
    Case("vit_cp_gamma", VIT_MODULE, "TinyVisionTransformer", None, "max-class", patch_map="cp_LRP",
         zennit_gammas=(0.25, 0.05)),
]}
DEFAULT_CASES = list(CASES)

# Model families of transformers 4.52 that LXT 2.1's get_default_map is asked about (and refuses).
UNSUPPORTED_PROBES = {
    "mistral": "transformers.models.mistral.modeling_mistral",
    "hf-vit": "transformers.models.vit.modeling_vit",
    "t5": "transformers.models.t5.modeling_t5",
}


def build_config(spec: tuple[str, dict[str, Any]], attn_implementation: str) -> Any:
    """The transformers config of a case, with the shared initializer range and attention implementation."""
    import transformers

    name, kwargs = spec
    return getattr(transformers, name)(**kwargs, initializer_range=INITIALIZER_RANGE,
                                       attn_implementation=attn_implementation)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or an RMSNorm class of transformers (``*RMSNorm``)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


@torch.no_grad()
def perturb_trivial_parameters(model: nn.Module, seed: int) -> None:
    """Move every bias and every normalisation weight by ``PERTURBATION * N(0, 1)`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name.endswith("bias") or (is_norm(module) and name == "weight"):
                param.add_(PERTURBATION * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def make_model(case: Case, module: types.ModuleType, dtype: torch.dtype) -> nn.Module:
    """Build the case's model from ``module`` with the fixed seed, in float32, then cast to ``dtype``."""
    torch.manual_seed(SEED)
    if case.config is None:
        model = TinyVisionTransformer()
    else:
        model = getattr(module, case.model_class)(build_config(case.config, case.attn_implementation))
    perturb_trivial_parameters(model, SEED + 1)
    model = model.to(dtype).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def make_inputs(case: Case, model: nn.Module, dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
    """``(input_ids, inputs_embeds)``: random token ids through the model's input embedding, or an image."""
    generator = torch.Generator().manual_seed(SEED + 2)
    if case.config is None:
        return None, torch.randn(1, 3, 16, 16, generator=generator).to(dtype)
    vocab_size = model.config.vocab_size
    input_ids = torch.randint(vocab_size, (1, SEQ_LEN), generator=generator)
    with torch.no_grad():
        inputs_embeds = model.get_input_embeddings()(input_ids)
    return input_ids, inputs_embeds.detach().clone()


def forward_logits(case: Case, model: nn.Module, inputs_embeds: Tensor) -> Tensor:
    if case.config is None:
        return model(inputs_embeds)
    kwargs = {"use_cache": False} if case.target == "last-max" else {}
    return model(inputs_embeds=inputs_embeds, **kwargs).logits


def choose_target(case: Case, logits: Tensor) -> dict[str, Any]:
    if case.target == "last-max":
        position = logits.shape[1] - 1
        return {"kind": "token", "position": position, "index": int(logits[0, position].argmax())}
    if case.target == "class0":
        return {"kind": "class", "position": None, "index": 0}
    return {"kind": "class", "position": None, "index": int(logits[0].argmax())}


def target_logit(logits: Tensor, target: dict[str, Any]) -> Tensor:
    if target["position"] is None:
        return logits[0, target["index"]]
    return logits[0, target["position"], target["index"]]


def explain(case: Case, model: nn.Module, inputs_embeds: Tensor,
            target: dict[str, Any] | None) -> tuple[Tensor, dict[str, Any], Tensor, Tensor]:
    """LXT's recipe: ``(logits, target, logit, inputs_embeds * inputs_embeds.grad)``."""
    leaf = inputs_embeds.detach().clone().requires_grad_(True)
    logits = forward_logits(case, model, leaf)
    target = choose_target(case, logits) if target is None else target
    logit = target_logit(logits, target)
    logit.backward()
    return logits.detach(), target, logit.detach(), (leaf * leaf.grad).detach()


def patch_map_for(case: Case, module: types.ModuleType) -> dict[Any, Any] | None:
    """``None`` where the case uses LXT's default map of ``module``; LXT's named map of the family otherwise."""
    from lxt.efficient.models import get_default_map

    family_name = "vit_torch" if case.config is None else case.module.rsplit("modeling_", 1)[-1]
    chosen = getattr(importlib.import_module(f"lxt.efficient.models.{family_name}"), case.patch_map)
    return None if chosen is get_default_map(module) else chosen


def qualified_name(case: Case) -> str:
    if case.config is None:
        return f"benchmarks.lxt_reference.{case.model_class}"
    return f"{case.module}.{case.model_class}"


@dataclasses.dataclass
class Plain:
    """The unpatched model of one dtype and what it gives: computed before LXT patches anything."""

    model: nn.Module
    input_ids: Tensor | None
    inputs_embeds: Tensor
    logits: Tensor
    target: dict[str, Any]
    input_x_gradient: Tensor


def apply_lxt(case: Case, module: types.ModuleType) -> list[str]:
    """``monkey_patch`` the case's module (and Zennit, for the Gamma recipe); return what LXT reported."""
    from lxt.efficient import monkey_patch, monkey_patch_zennit

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        monkey_patch(module, patch_map=patch_map_for(case, module), verbose=True)
        if case.zennit_gammas is not None:
            monkey_patch_zennit(verbose=True)
    return [line.removeprefix("Patched ").strip() for line in printed.getvalue().splitlines() if line.strip()]


def explain_with_lxt(case: Case, model: nn.Module, plain: Plain) -> tuple[Tensor, Tensor, Tensor, dict | None]:
    """LXT's relevance on the patched model; with Zennit's Gamma rules registered for the ViT recipe."""
    if case.zennit_gammas is None:
        logits, _, logit, relevance = explain(case, model, plain.inputs_embeds, plain.target)
        return logits, logit, relevance, None
    import zennit.rules as z_rules
    from zennit.composites import LayerMapComposite

    conv_gamma, linear_gamma = case.zennit_gammas
    composite = LayerMapComposite([(nn.Conv2d, z_rules.Gamma(conv_gamma)), (nn.Linear, z_rules.Gamma(linear_gamma))])
    composite.register(model)
    try:
        logits, _, logit, relevance = explain(case, model, plain.inputs_embeds, plain.target)
    finally:
        composite.remove()
    rules = {"Conv2d": f"zennit.rules.Gamma({conv_gamma})", "Linear": f"zennit.rules.Gamma({linear_gamma})"}
    return logits, logit, relevance, rules


def run_case(case: Case, dtype_names: list[str], outdir: Path) -> list[dict[str, Any]]:
    """Compute and save the references of one case in every dtype; return their summary rows."""
    standin = install_torchvision_standin()
    import transformers

    torch.set_num_threads(1)
    module = importlib.import_module(case.module)

    # The plain input x gradient of the unpatched models (same weights, same inputs), before patching.
    plains = {}
    for dtype_name in dtype_names:
        model = make_model(case, module, DTYPES[dtype_name])
        input_ids, inputs_embeds = make_inputs(case, model, DTYPES[dtype_name])
        logits, target, _, input_x_gradient = explain(case, model, inputs_embeds, None)
        plains[dtype_name] = Plain(model, input_ids, inputs_embeds, logits, target, input_x_gradient)

    patched = apply_lxt(case, module)
    rows = []
    for dtype_name, plain in plains.items():
        model = make_model(case, module, DTYPES[dtype_name])  # built after patching, as LXT's README does
        model.load_state_dict(plain.model.state_dict())
        logits, logit, relevance, zennit_rules = explain_with_lxt(case, model, plain)
        conservation = float(relevance.sum() / logit)
        record = {
            "model_class": qualified_name(case),
            "config": model.config if case.config is None else model.config.to_dict(),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "input_ids": plain.input_ids,
            "inputs_embeds": plain.inputs_embeds,
            "target": plain.target,
            "logit": float(logit),
            "logits": logits,
            "relevance": relevance,
            "relevance_per_token": relevance.sum(1 if case.config is None else -1),
            "conservation": conservation,
            "input_x_gradient": plain.input_x_gradient,
            "patch_map": case.patch_map,
            "patched": patched,
            "zennit_rules": zennit_rules,
            "attn_implementation": case.attn_implementation,
            "lxt_version": importlib.metadata.version("lxt"),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "torch_dtype": dtype_name,
            "seed": SEED,
            "init": INIT_NOTE,
            "torchvision": standin,
        }
        path = outdir / f"{case.name}-{dtype_name}.pt"
        torch.save(record, path)
        rows.append({
            "case": case.name, "dtype": dtype_name, "patch_map": case.patch_map, "attn": case.attn_implementation,
            "target": plain.target, "logit": float(logit), "sum_relevance": float(relevance.sum()),
            "conservation": conservation, "ixg_conservation": float(plain.input_x_gradient.sum() / logit),
            "logits_vs_unpatched": float((logits - plain.logits).abs().max()),
            "relevance_finite": bool(torch.isfinite(relevance).all()), "patched": patched, "path": str(path),
        })
    return rows


def probe_unsupported() -> dict[str, str]:
    """What LXT 2.1's ``get_default_map`` says of model families outside its default map."""
    install_torchvision_standin()
    from lxt.efficient.models import get_default_map

    answers = {}
    for name, module_name in UNSUPPORTED_PROBES.items():
        try:
            get_default_map(importlib.import_module(module_name))
            answers[name] = "supported"
        except ValueError as exc:
            answers[name] = f"not supported: {str(exc).split(' Supported models')[0]}"
        except ImportError as exc:
            answers[name] = f"not importable ({exc})"
    return answers


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------

def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'case':<14}{'dtype':<9}{'map':<8}{'attn':<6}{'target':<16}{'logit':>11}{'sum R':>11}"
              f"{'R/logit':>9}{'IxG/logit':>11}{'|dlogits|':>11}")
    lines = [header, "-" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['case']:<14}{row['dtype']:<9}error: {row['error']}")
            continue
        t = row["target"]
        target = f"{t['kind']} {t['index']}" + ("" if t["position"] is None else f" @{t['position']}")
        lines.append(f"{row['case']:<14}{row['dtype']:<9}{row['patch_map']:<8}{row['attn']:<6}{target:<16}"
                     f"{row['logit']:>11.5f}{row['sum_relevance']:>11.5f}{row['conservation']:>9.4f}"
                     f"{row['ixg_conservation']:>11.4f}{row['logits_vs_unpatched']:>11.1e}")
    return "\n".join(lines)


ROW_MARKER = "LXT-REFERENCE-ROW "


def run_worker(case: str, dtypes: list[str], outdir: Path) -> list[dict[str, Any]]:
    """Run one case in a fresh interpreter (LXT's patches are process-global)."""
    command = [sys.executable, str(Path(__file__).resolve()), str(outdir), "--worker", case, "--dtypes", *dtypes]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    rows = [json.loads(line[len(ROW_MARKER):]) for line in done.stdout.splitlines() if line.startswith(ROW_MARKER)]
    if rows:
        return rows
    tail = (done.stderr or done.stdout).strip().splitlines()
    error = tail[-1][:200] if tail else f"exit {done.returncode}"
    return [{"case": case, "dtype": dtype, "error": error} for dtype in dtypes]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=DEFAULT_CASES)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--worker", choices=DEFAULT_CASES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        for row in run_case(CASES[args.worker], args.dtypes, args.outdir):
            print(ROW_MARKER + json.dumps(row))
        return 0
    rows = []
    for case in args.cases:
        for row in run_worker(case, args.dtypes, args.outdir):
            rows.append(row)
            status = row.get("error") or f"R/logit {row['conservation']:.4f}"
            print(f"  {case:<14}{row['dtype']:<9}{status}", flush=True)
    print()
    print(format_table(rows))
    print()
    print("patched by LXT per case:")
    for row in rows:
        if "patched" in row and row["dtype"] == args.dtypes[0]:
            print(f"  {row['case']:<14}{', '.join(row['patched'])}")
    print()
    print("model families outside LXT 2.1's default map:")
    for name, answer in probe_unsupported().items():
        print(f"  {name:<8}{answer}")
    (args.outdir / "summary.json").write_text(json.dumps(rows, indent=1))
    bad = [row for row in rows if "error" in row or not row.get("relevance_finite", False)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
