#!/usr/bin/env python
"""Peak memory of AttnLRP on a 110M-parameter Llama: lrpfunc (and its memory mode), LXT 2.1 and the plain gradient.

    /work/lxt-venv/bin/python benchmarks/llama_memory.py [--tokens 1024 2048]
        [--impls gradient lxt lrpfunc lrpfunc-recompute]
        [--threads 2] [--out benchmarks/llama_memory.txt]

Runs in the environment that ``benchmarks/setup_lxt.sh`` creates (LXT 2.1 needs transformers 4.52.x);
lrpfunc is imported from the checkout, so all three run the same model on the same transformers.

The model: ``LlamaForCausalLM`` from a ``LlamaConfig`` with hidden 1024, 4 layers, 16 heads, 4 key/value
heads (GQA), intermediate 2816, vocabulary 32000, untied embeddings (110M parameters), random weights
(``benchmarks.lxt_timing.build``: seed 0, biases and norm weights perturbed), float32, eval mode, eager
attention, batch 1. The target is the largest logit at the last position.

- ``gradient``: ``inputs_embeds`` as a leaf that requires grad (parameters do not), backward of the
  target logit, ``inputs_embeds * grad``;
- ``lxt``: the same after ``lxt.efficient.monkey_patch(transformers.models.llama.modeling_llama)``
  (LXT's AttnLRP, efficient API, as its README does it);
- ``lrpfunc``: ``lrpfunc.attribute(lrpfunc.hf.FromEmbeddings(model), composites.attnlrp())`` called under
  ``torch.no_grad()`` with a one-hot seed at the target (built once, outside the measured call);
- ``lrpfunc-recompute``: the same with ``lrpfunc.hf.recompute_layers(model, attnlrp())``, the memory mode (each
  decoder layer recomputed when the sweep reaches it); its time is also measured against the plain gradient's in
  the same process (medians of 3 interleaved rounds).

Each measurement runs in a fresh ``python`` process (LXT's patches are global to a process, and one
measurement's allocator state must not carry over into another's): ``benchmarks.run.peak_memory``, the
peak of the live bytes torch's CPU allocator handed out during one call (torch.profiler with
``profile_memory``), above what was live before it (the model's weights and the input are not counted).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)
sys.path.insert(0, str(ROOT))

LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=4096, attention_bias=False, mlp_bias=False,
             tie_word_embeddings=False)
IMPLS = ("gradient", "lxt", "lrpfunc")
#: The memory mode (``lrpfunc.hf.recompute_layers``), measured when asked for.
RECOMPUTE = "lrpfunc-recompute"


def measure(impl: str, tokens: int, threads: int) -> dict[str, Any]:
    """Build the model, set up ``impl`` and measure the peak memory of one call (in this process)."""
    import torch

    from benchmarks.lxt_reference import install_torchvision_standin

    torch.set_num_threads(threads)
    install_torchvision_standin()
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    if impl == "lxt":
        from lxt.efficient import monkey_patch

        monkey_patch(modeling_llama, verbose=False)
    from benchmarks.lxt_timing import build, lrpfunc_call, one_hot_at
    from benchmarks.run import peak_memory

    model = build(modeling_llama.LlamaForCausalLM, LlamaConfig(**LLAMA, attn_implementation="eager"))
    parameters = sum(p.numel() for p in model.parameters())
    input_ids = torch.randint(LLAMA["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        token = int(model(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax())

    def gradient() -> Any:
        leaf = embeds.detach().requires_grad_(True)
        logit = model(inputs_embeds=leaf, use_cache=False).logits[0, -1, token]
        (grad,) = torch.autograd.grad(logit, leaf)
        return leaf * grad

    if impl in ("lrpfunc", RECOMPUTE):
        class _Off:  # lrpfunc runs on the unpatched model: nothing to switch
            def set(self, patched: bool) -> None:
                pass

        call = lrpfunc_call(model, embeds, one_hot_at((0, -1, token)), _Off(),  # type: ignore[arg-type]
                            recompute=impl == RECOMPUTE)
    else:
        call = gradient
    start = time.perf_counter()
    peak, retained = peak_memory(call, torch.device("cpu"))
    seconds = time.perf_counter() - start
    # time against the plain gradient in this process, interleaved (LXT's patches change the gradient: not for lxt)
    ratio = None
    if impl != "lxt" and impl != "gradient":
        times: dict[str, list[float]] = {"call": [], "gradient": []}
        for _ in range(3):
            for name, run in (("call", call), ("gradient", gradient)):
                begin = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - begin)
        ratio = sorted(times["call"])[1] / sorted(times["gradient"])[1]
    return {"impl": impl, "tokens": tokens, "peak": peak, "retained": retained, "parameters": parameters,
            "seconds": seconds, "time_ratio": ratio}


def run_one(impl: str, tokens: int, threads: int) -> dict[str, Any]:
    """:func:`measure` in a fresh process of this interpreter."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, str(tokens), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"llama_memory: {impl} at {tokens} tokens failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]], impls: list[str], tokens: list[int]) -> list[str]:
    mib = 2**20
    width = {impl: max(16, len(impl) + 6) for impl in impls}
    lines = [f"  {'tokens':>6}" + "".join(f"{impl + ' MiB':>{width[impl]}}" for impl in impls)
             + (f"{'lrpfunc/lxt':>13}{'lrpfunc/grad':>14}{'lxt/grad':>10}" if set(IMPLS) <= set(impls) else "")
             + (f"{'recompute/grad':>15}{'time/grad':>15}" if RECOMPUTE in impls and "gradient" in impls else "")]
    for count in tokens:
        row = {r["impl"]: r["peak"] for r in results if r["tokens"] == count}
        line = f"  {count:>6}" + "".join(f"{row[impl] / mib:>{width[impl]}.0f}" for impl in impls)
        if set(IMPLS) <= set(impls):
            line += (f"{row['lrpfunc'] / row['lxt']:>13.2f}{row['lrpfunc'] / row['gradient']:>14.2f}"
                     f"{row['lxt'] / row['gradient']:>10.2f}")
        if RECOMPUTE in impls and "gradient" in impls:
            ratio = next(r["time_ratio"] for r in results if r["tokens"] == count and r["impl"] == RECOMPUTE)
            line += f"{row[RECOMPUTE] / row['gradient']:>15.2f}{ratio:>15.2f}"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 2048])
    p.add_argument("--impls", nargs="+", default=[*IMPLS, RECOMPUTE], choices=[*IMPLS, RECOMPUTE])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args.threads)))
        return 0
    from importlib.metadata import version

    import torch
    import transformers

    lines = [f"llama h{LLAMA['hidden_size']} L{LLAMA['num_hidden_layers']} heads {LLAMA['num_attention_heads']}/"
             f"{LLAMA['num_key_value_heads']} ff{LLAMA['intermediate_size']} V{LLAMA['vocab_size']} (untied), eager "
             f"attention, float32, batch 1, threads {args.threads}",
             f"lxt {version('lxt')}  transformers {transformers.__version__}  torch {torch.__version__}",
             "peak: live bytes of torch's CPU allocator during one call above those before it "
             "(benchmarks.run.peak_memory), each measurement in a fresh process"]
    print("\n".join(lines), flush=True)
    results = []
    for count in args.tokens:
        for impl in args.impls:
            result = run_one(impl, count, args.threads)
            results.append(result)
            timing = (f", {result['time_ratio']:.2f}x the plain gradient's time"
                      if result.get("time_ratio") is not None else "")
            print(f"  {impl} at {count} tokens: {result['peak'] / 2**20:.0f} MiB peak, "
                  f"{result['retained'] / 2**20:.0f} MiB retained ({result['parameters'] / 1e6:.0f}M parameters, "
                  f"{result['seconds']:.0f} s{timing})", flush=True)
    lines += ["", *table(results, args.impls, args.tokens)]
    print("\n".join(lines[-(len(args.tokens) + 1):]))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
