#!/usr/bin/env python
"""Concept-conditional heatmaps (CRP): 64 channel conditions from one forward pass, against the alternatives.

    /work/peers-venv/bin/python benchmarks/concepts.py [--model vgg11] [--layer features.8] [--size 64]
        [--conditions 64] [--budget 20] [--threads 2]

For one input and its predicted class, the heatmap of each of ``--conditions`` channels of ``--layer`` (the
relevance at that layer masked to the channel, propagated to the input; ``epsilon_plus_flat``). Timed side by
side, in interleaved rounds (``benchmarks.run.time_group``):

- ``loop``: ``lrpfunc.attribute_layers`` called once per condition (a forward pass each);
- ``vmap``: ``torch.func.vmap`` of the same function over the stacked masks (one forward pass);
- ``repeat``: lrpfunc with the input repeated once per condition and one mask per sample (zennit-crp's approach);
- ``zennit-repeat``: what zennit-crp does with Zennit 0.5.1 (zennit-crp itself needs zennit<=0.4.6 and torch<2):
  the input repeated once per condition, the composite's hooks registered once, a tensor hook on the layer's
  output that multiplies the relevance by each sample's mask, one backward pass.

All four give the same heatmaps (checked before timing, float32, against ``loop``). Printed: median times, each
over ``loop``'s, and the peak memory of one call.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks import models, peers as peers_mod  # noqa: E402
from benchmarks.run import keep_freed_memory, peak_memory, time_group, wait_quiet  # noqa: E402


def build_calls(args: argparse.Namespace, peers: peers_mod.Peers) -> tuple[dict[str, Callable[[], Tensor]], str]:
    import lrpfunc

    model = models.build(args.model)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).clamp_(-3, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        logits = model(x)
    target = int(logits.argmax())
    seed = torch.zeros_like(logits)
    seed[0, target] = 1.0
    canonizers = (lrpfunc.canonizers.merge_batchnorm(),) if any(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()
    ) else ()
    fn = lrpfunc.attribute_layers(model, lrpfunc.composites.epsilon_plus_flat(), layers=[args.layer],
                                  canonizers=canonizers)
    with torch.no_grad():
        _, _, at = fn(params, x, seed)
    channels = at[args.layer].shape[1]
    top = at[args.layer][0].flatten(1).sum(1).topk(min(args.conditions, channels)).indices
    masks = torch.zeros(len(top), 1, channels, 1, 1)
    masks[torch.arange(len(top)), 0, top] = 1.0
    per_sample = masks[:, 0]  # (K, C, 1, 1): one mask per repeated input
    k = len(top)

    def loop() -> Tensor:
        with torch.no_grad():
            return torch.stack([fn(params, x, seed, {args.layer: mask})[1][0] for mask in masks])

    batched = torch.func.vmap(lambda mask: fn(params, x, seed, {args.layer: mask})[1][0])

    def vmap() -> Tensor:
        with torch.no_grad():
            return batched(masks)

    def repeat() -> Tensor:
        with torch.no_grad():
            return fn(params, x.expand(k, -1, -1, -1), seed.expand(k, -1), {args.layer: per_sample})[1]

    calls: dict[str, Callable[[], Tensor]] = {"loop": loop, "vmap": vmap, "repeat": repeat}
    note = f"{args.model} {args.size}px, layer {args.layer} ({channels} channels), {k} conditions, class {target}"
    if peers.zennit is not None:
        calls["zennit-repeat"] = zennit_repeat(peers.zennit, args, model, x, seed, per_sample)
    return calls, note


def zennit_repeat(zennit: Any, args: argparse.Namespace, model: torch.nn.Module, x: Tensor, seed: Tensor,
                  masks: Tensor) -> Callable[[], Tensor]:
    """zennit-crp's conditional attribution with Zennit 0.5.1: repeated input, a mask hook on the layer's output."""
    import copy

    model = copy.deepcopy(model)
    canonizers = [zennit.torchvision.VGGCanonizer()] if any(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()
    ) else []
    composite = zennit.composites.EpsilonPlusFlat(canonizers=canonizers)
    layer = dict(model.named_modules())[args.layer]
    k = masks.shape[0]

    def mask_output(module: torch.nn.Module, inputs: Any, output: Tensor) -> None:
        output.register_hook(lambda grad: grad * masks)

    context = composite.context(model)
    modified = context.__enter__()
    layer.register_forward_hook(mask_output)

    def call() -> Tensor:
        inputs = x.expand(k, -1, -1, -1).detach().requires_grad_()
        output = modified(inputs)
        (grad,) = torch.autograd.grad(output, inputs, seed.expand(k, -1))
        return grad

    return call


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg11", choices=sorted(models.MODELS))
    p.add_argument("--layer", default="features.8", help="module name (default features.8: VGG-11's 4th convolution, 256 channels)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--conditions", type=int, default=64)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(keep_freed_memory())
    peers = peers_mod.load()
    calls, note = build_calls(args, peers)
    print(f"{note}; torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    if peers.zennit is None:
        print(f"zennit: not available ({peers.why.get('zennit', '?')})")
    reference = calls["loop"]()
    for name, call in calls.items():
        err = ((call() - reference).norm() / reference.norm()).item()
        print(f"  {name:<14} equals loop: rel. err {err:.1e}")
    waited = wait_quiet(10.0)
    times = time_group(calls, warmup=1, repeats=args.repeats, min_repeats=3, budget_s=args.budget, sync=lambda: None)
    memory = {name: None if args.no_memory else peak_memory(call, torch.device("cpu"))[0] for name, call in calls.items()}
    base = statistics.median(times["loop"])
    print(f"  {'impl':<14}{'median ms':>11}{'/ loop':>8}{'rounds':>8}{'peak MiB':>10}   (waited {waited:.0f} s for quiet)")
    for name, values in times.items():
        med = statistics.median(values)
        mem = "-" if memory[name] is None else f"{memory[name] / 2**20:.1f}"
        print(f"  {name:<14}{med * 1e3:>11.1f}{med / base:>8.2f}{len(values):>8}{mem:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
