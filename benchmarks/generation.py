#!/usr/bin/env python
"""Explaining every token of a generation: ``attribute_generation`` against a loop of ``attribute_tokens`` calls.

    python benchmarks/generation.py [--tokens 32] [--prompt 32] [--rounds 5] [--threads 2]
        [--out benchmarks/generation.txt]

The model: ``LlamaForCausalLM`` from a config with hidden size 256, 4 layers, 8 heads (4 key/value heads), vocabulary
1000, random weights (seed 0), float32, eager attention, batch 1. A prompt of ``--prompt`` random tokens; the model
generates ``--tokens`` tokens greedily.

- ``attribute_generation``: ``lrpfunc.hf.attribute_generation(model, attnlrp())(prompt, N)``: the greedy ids, then
  every generated token explained from one forward pass (``vmap`` over the N seeds);
- ``loop``: the same greedy ids (generated the same way), then ``attribute_tokens(model, attnlrp())`` once per
  generated token (``target=`` the token, ``position=`` where it was predicted): N forward passes and sweeps;
- ``generate``: the greedy generation alone (both include it).

Both give the same relevance (checked here to 1e-4 in float32). Medians of interleaved rounds in one process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32, help="generated tokens (default 32)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = p.parse_args(argv)

    import torch
    import transformers

    import lrpfunc.hf
    from lrpfunc import composites
    from lrpfunc.hf import _greedy

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                      attn_implementation="eager", bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    prompt = torch.randint(1000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    count = args.tokens
    generation = lrpfunc.hf.attribute_generation(model, composites.attnlrp())
    tokens = lrpfunc.hf.attribute_tokens(model, composites.attnlrp())

    def at_once() -> torch.Tensor:
        return generation(prompt, count).relevance

    def loop() -> torch.Tensor:
        sequences, _ = _greedy(model, None, prompt, None, count, True)
        rows = []
        for n in range(count):
            result = tokens(sequences, target=sequences[:, args.prompt + n], position=args.prompt - 1 + n)
            row = result.tokens.clone()
            row[:, args.prompt + n:] = 0
            rows.append(row)
        return torch.stack(rows, 1)

    def generate() -> torch.Tensor:
        return _greedy(model, None, prompt, None, count, True)[0]

    difference = (at_once() - loop()).abs().max().item()
    calls = {"attribute_generation": at_once, "loop": loop, "generate": generate}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    lines = [
        f"llama h256 L4 heads 8/4 V1000, eager, float32, batch 1, threads {args.threads}; prompt {args.prompt} tokens, "
        f"{count} generated; attnlrp(); medians of {args.rounds} interleaved rounds",
        f"torch {torch.__version__}  transformers {transformers.__version__}",
        "",
        f"  {'call':<22}{'median s':>10}{'/ loop':>10}",
        *(f"  {name:<22}{median[name]:>10.3f}{median[name] / median['loop']:>10.3f}" for name in calls),
        "",
        f"attribute_generation vs the loop, max |difference| of the relevance: {difference:.2e}",
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
