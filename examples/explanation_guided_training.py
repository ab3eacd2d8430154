"""Explanation-guided training: make a classifier right for the right reasons (Ross et al., 2017).

The user story: your training data contain a shortcut. Here every training image of class 0 (a
horizontal bar) has a red 3x3 patch in its top-left corner and every image of class 1 (a vertical bar)
a blue one. A CNN trained with plain cross-entropy learns the patch, not the bar: it fails when the
patch colour is flipped at test time. You know where the shortcut is (the decoy mask), so you penalise
the explanation there while training:

    loss = cross_entropy(output, y) + lam * mean_i sum_{mask} relevance_i^2

where ``output, relevance = fn(params, x, one_hot(y))`` comes from one ``lrpfunc.attribute`` call and the
penalty's gradient w.r.t. the parameters is an exact second-order derivative through lrpfunc
(``loss.backward()`` works because lrpfunc is plain differentiable torch code; ``torch.optim`` does the
rest). Three models are trained on the same data:

* ``plain``: cross-entropy only;
* ``gradient_penalty``: the penalty on the input gradient (``lrpfunc.attribute(model)``, no composite), the
  "right for the right reasons" loss of Ross et al.;
* ``lrp_penalty``: the same penalty on LRP relevance (``composites.epsilon_plus()``). It drives the
  relevance on the decoy down as well, yet the network keeps using the decoy: relevance of the form
  "input times modified gradient" is zero on zero-valued inputs and does not see what biases absorb, so
  the network learns to hide the shortcut from it. Penalise gradients, check with LRP.

Reported per model: accuracy on the training distribution, on decoy-free and on decoy-flipped test
images, and the share of absolute gradient and LRP (epsilon_plus_flat) relevance on the decoy.
Heatmaps (input | gradient | LRP) are written as ``before.png`` (plain), ``after.png`` (gradient
penalty) and ``after_lrp_penalty.png``.

Run it with ``python examples/explanation_guided_training.py [OUT]`` (default
``./out/explanation_guided_training``).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import nn

import lrpfunc
from lrpfunc import composites
from lrpfunc.image import heatmap
from common import image_grid, to_image

SIZE = 16
PATCH = 3  # the decoy patch is PATCH x PATCH in the top-left corner


def decoy_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., :PATCH, :PATCH] = 1.0
    return mask


def make_data(n: int, generator: torch.Generator, decoy: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, 16, 16) of a faint horizontal (class 0) or vertical (class 1) bar in noise.

    ``decoy``: ``"train"`` puts a red (class 0) or blue (class 1) patch in the corner, ``"flipped"`` the
    colour of the other class, ``"none"`` leaves the noise there.
    """
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = 0.4 * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    for i, label in enumerate(labels.tolist()):
        length = int(torch.randint(6, 10, (1,), generator=generator))
        height, width = (2, length) if label == 0 else (length, 2)
        top = int(torch.randint(PATCH + 1, SIZE - height + 1, (1,), generator=generator))
        left = int(torch.randint(PATCH + 1, SIZE - width + 1, (1,), generator=generator))
        images[i, :, top:top + height, left:left + width] += 0.7
    if decoy != "none":
        colour_of = labels if decoy == "train" else 1 - labels
        colours = torch.zeros(n, 3)
        colours[torch.arange(n), 2 * colour_of] = 1.5  # red for class 0, blue for class 1
        mask = decoy_mask()
        images = images * (1 - mask) + mask * colours[:, :, None, None]
    return images, labels


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (SIZE // 4) ** 2, 2),
    )


PENALTIES = {"none": None, "gradient": None, "lrp": composites.epsilon_plus()}  # name -> composite


def train(penalty: str, lam: float, steps: int, seed: int) -> nn.Module:
    """Train a fresh model; ``penalty`` is ``"none"``, ``"gradient"`` or ``"lrp"`` (see ``PENALTIES``)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    explain = lrpfunc.attribute(model, PENALTIES[penalty])
    # the loss is differentiated through the relevance (loss.backward()), so the parameters require grad on purpose
    warnings.filterwarnings("ignore", category=lrpfunc.ParamsRequireGradWarning)
    mask = decoy_mask()
    for _ in range(steps):
        x, y = make_data(64, generator)
        params = dict(model.named_parameters())
        # one call gives the output (= model(x)) and the relevance of the true class
        output, relevance = explain(params, x, torch.eye(2)[y])
        loss = nn.functional.cross_entropy(output, y)
        if penalty != "none":
            loss = loss + lam * (relevance * mask).square().sum((1, 2, 3)).mean()
        optimizer.zero_grad()
        loss.backward()  # differentiates through the relevance: exact second order
        optimizer.step()
    return model.eval()


def evaluate(model: nn.Module, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed + 1000)
    result = {}
    for decoy in ("train", "none", "flipped"):
        x, y = make_data(500, generator, decoy)
        with torch.no_grad():
            result[f"accuracy_{decoy}"] = (model(x).argmax(1) == y).float().mean().item()
    x, y = make_data(200, generator, "train")
    params = {name: p.detach() for name, p in model.named_parameters()}
    mask = decoy_mask()
    for name, composite in (("gradient", None), ("lrp", composites.epsilon_plus_flat())):
        relevance = lrpfunc.attribute(model, composite)(params, x, torch.eye(2)[y])[1].detach().abs()
        result[f"{name}_share_on_decoy"] = ((relevance * mask).sum() / relevance.sum()).item()
    return result


def save_heatmaps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, path: Path, scale: int = 8) -> None:
    """Rows: images; columns: input, gradient, LRP epsilon_plus_flat (both for the true class)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    maps = [lrpfunc.attribute(model, composite)(params, x, torch.eye(2)[y])[1].detach()
            for composite in (None, composites.epsilon_plus_flat())]
    rows = [[to_image(x[row])] + [heatmap(relevance[row]) for relevance in maps] for row in range(len(x))]
    image_grid(rows, cell=SIZE * scale).save(path)


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "explanation_guided_training"))
    parser.add_argument("--fast", action="store_true", help="fewer training steps (for tests)")
    parser.add_argument("--lam", type=float, default=100.0, help="weight of the explanation penalty")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 150 if fast else 400

    models = {
        "plain": train("none", 0.0, steps, args.seed),
        "gradient_penalty": train("gradient", args.lam, steps, args.seed),
        "lrp_penalty": train("lrp", args.lam, steps, args.seed),
    }
    result = {name: evaluate(model, args.seed) for name, model in models.items()}

    x, y = make_data(4, torch.Generator().manual_seed(args.seed + 2000), "train")
    pictures = {"plain": "before.png", "gradient_penalty": "after.png", "lrp_penalty": "after_lrp_penalty.png"}
    for name, file in pictures.items():
        save_heatmaps(models[name], x, y, out / file)
    result["pictures"] = [str(out / file) for file in pictures.values()]
    result["steps"] = steps
    result["decoy_area"] = decoy_mask().mean().item()

    print(f"{steps} steps each; the decoy covers {result['decoy_area']:.1%} of each image")
    print(f"{'model':18s} {'acc train':>9s} {'acc no decoy':>12s} {'acc flipped':>11s} "
          f"{'grad on decoy':>13s} {'LRP on decoy':>12s}")
    for name in models:
        r = result[name]
        print(f"{name:18s} {r['accuracy_train']:9.3f} {r['accuracy_none']:12.3f} {r['accuracy_flipped']:11.3f} "
              f"{r['gradient_share_on_decoy']:13.1%} {r['lrp_share_on_decoy']:12.1%}")
    print(f"wrote {', '.join(result['pictures'])}")
    return result


if __name__ == "__main__":
    main()
