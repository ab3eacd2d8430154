"""Concept-conditional heatmaps (CRP): which channels of a layer carry a decision, and where each one looks.

The user story: a heatmap says where the evidence for a class lies; you also want to know which learned
features (channels of an intermediate layer) carry that evidence, and what each of them responds to in the
image. Concept Relevance Propagation (Achtibat et al. 2023) answers with conditional heatmaps: the relevance at
the layer, masked to one channel, propagated on to the input. This script

1. trains the quickstart's small CNN (with BatchNorm, merged by a canonizer) on the synthetic shapes task;
2. builds ``fn = lrpfunc.attribute_layers(model, composite, layers=[LAYER])``, which also returns the
   relevance arriving at the layer's output and takes masks there as an argument;
3. for each test image: ranks the layer's channels by their relevance for the predicted class, and computes the
   conditional heatmaps of the top channels with **one** ``torch.func.vmap`` over one-hot channel masks (one
   forward pass for all of them, instead of one per channel);
4. checks that the heatmaps of all channels add up to the full heatmap (relevance is linear in the relevance at
   the layer) and that vmap equals a loop over the masks;
5. writes ``concepts.png``: one row per image, the input, the full heatmap, then the top channels' heatmaps,
   each on its own colour scale, captioned with the channel and its share of the relevance at the layer.

Run it with ``python examples/concepts.py [OUT]`` (default ``./out/concepts``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lrpfunc
from lrpfunc import canonizers, composites
from lrpfunc.image import heatmap
from common import CLASSES, labelled_grid, make_shapes, shapes_cnn, to_image, train

LAYER = "8"  # the third convolution: 32 channels on an 8x8 grid


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "concepts"), help="output folder")
    parser.add_argument("--fast", action="store_true", help="train briefly (for tests)")
    parser.add_argument("--samples", type=int, default=4, help="rows of the grid")
    parser.add_argument("--top", type=int, default=5, help="channels shown per image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = shapes_cnn()
    train(model, steps=80 if fast else 150, generator=generator)
    x_test, y_test, _ = make_shapes(256, generator)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()

    params = {name: value.detach() for name, value in model.named_parameters()}
    fn = lrpfunc.attribute_layers(model, composites.epsilon_plus_flat(), layers=[LAYER],
                                  canonizers=canonizers.merge_batchnorm())
    x = x_test[: args.samples]
    with torch.no_grad():
        predicted = model(x).argmax(1)
    channels = 32
    one_hot = torch.eye(channels)[:, None, :, None, None]  # (32, 1, 32, 1, 1): one mask per channel

    rows, captions, report = [], [], []
    sum_error = vmap_vs_loop = 0.0
    vmap_seconds = loop_seconds = 0.0
    for i in range(len(x)):
        xi, seed = x[i : i + 1], torch.eye(len(CLASSES))[predicted[i : i + 1]]
        _, full, at = fn(params, xi, seed)
        per_channel = at[LAYER][0].sum((1, 2))  # the relevance of each channel at the layer
        top = per_channel.topk(args.top).indices

        def concept(mask: torch.Tensor) -> torch.Tensor:
            return fn(params, xi, seed, {LAYER: mask})[1][0].sum(0)  # (H, W), colour channels summed

        start = time.perf_counter()
        maps = torch.func.vmap(concept)(one_hot)  # every channel from one forward pass
        vmap_seconds += time.perf_counter() - start
        start = time.perf_counter()
        loop = torch.stack([concept(mask) for mask in one_hot[top]])
        loop_seconds += (time.perf_counter() - start) * channels / args.top
        vmap_vs_loop = max(vmap_vs_loop, ((maps[top] - loop).abs().max() / loop.abs().max()).item())
        sum_error = max(sum_error, ((maps.sum(0) - full[0].sum(0)).abs().max() / full.abs().max()).item())

        total = per_channel.sum()
        shares = [(per_channel[c] / total).item() for c in top.tolist()]
        # each map on its own colour scale (the caption gives its share of the whole)
        rows.append([to_image(xi[0]), heatmap(full[0].sum(0))] + [heatmap(maps[c]) for c in top.tolist()])
        captions.append([CLASSES[int(predicted[i])], "all channels"]
                        + [f"ch {c}: {share:.0%}" for c, share in zip(top.tolist(), shares)])
        report.append({"class": CLASSES[int(predicted[i])], "channels": top.tolist(), "shares": shares})

    grid = labelled_grid(rows, captions)
    path = out / "concepts.png"
    grid.save(path)
    result = {
        "path": str(path),
        "grid_size": grid.size,
        "test_accuracy": accuracy,
        "images": report,
        "sum_of_concepts_vs_heatmap": sum_error,
        "vmap_vs_loop": vmap_vs_loop,
        "vmap_seconds": vmap_seconds,
        "loop_seconds_estimated": loop_seconds,
    }
    print(f"test accuracy {accuracy:.3f}; layer {LAYER!r}, {channels} channels, top {args.top} shown per image")
    for row in report:
        shares = ", ".join(f"{c} ({s:.0%})" for c, s in zip(row["channels"], row["shares"]))
        print(f"  {row['class']:15s} channels {shares}")
    print(f"all {channels} conditional heatmaps add up to the heatmap: max rel. difference {sum_error:.1e}")
    print(f"vmap over the masks equals the loop: max rel. difference {vmap_vs_loop:.1e}; "
          f"{vmap_seconds:.2f} s for every channel of every image, a loop would take ~{loop_seconds:.2f} s")
    print(f"wrote {path} ({grid.size[0]}x{grid.size[1]} pixels)")
    return result


if __name__ == "__main__":
    main()
