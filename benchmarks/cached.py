#!/usr/bin/env python
"""Eager, cached and compiled attribution against the plain gradient, side by side in one process.

    python benchmarks/cached.py [--rounds 20] [--no-compile] [--out benchmarks/cached.txt]

Cases: the overhead-bound MLP (100 x (Linear(16, 16), ReLU), batch 1, one thread) with no rules and with
``epsilon_plus``; ResNet-18 (``benchmarks/models.py``) 64x64 batch 8 with EpsilonPlusFlat and the resnet canonizer (two
threads). Columns: the plain input gradient (``torch.autograd.grad``), ``lrpfunc.attribute`` (eager),
``lrpfunc.cached`` and ``lrpfunc.compile`` (inductor, default options), each a median over interleaved rounds, as a
ratio to the plain gradient; the compile time is reported apart. Relevance of the cached and compiled functions is
checked against the eager one first.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)
sys.path.insert(0, str(ROOT))


def _case(name: str) -> tuple[Any, ...]:
    import torch

    import lrpfunc
    from benchmarks.models import build, deep_mlp

    if name.startswith("mlp100"):
        torch.set_num_threads(1)
        model = deep_mlp().eval()
        x, grad_output = torch.randn(1, 16), torch.eye(4)[[1]]
        composite = None if name.endswith("no rules") else lrpfunc.composites.epsilon_plus()
        canonizers: tuple[Any, ...] = ()
    else:
        torch.set_num_threads(2)
        model = build("resnet18", num_classes=1000).eval()
        x, grad_output = torch.randn(8, 3, 64, 64), torch.eye(1000)[[3] * 8]
        composite, canonizers = lrpfunc.composites.epsilon_plus_flat(), (lrpfunc.canonizers.resnet(),)
    return model, x, grad_output, lrpfunc.attribute(model, composite, canonizers)


def measure(name: str, rounds: int, compile_too: bool) -> str:
    import torch

    import lrpfunc

    model, x, grad_output, fn = _case(name)
    params = {key: value.detach() for key, value in model.named_parameters()}

    def plain() -> Any:
        leaf = x.clone().requires_grad_()
        return torch.autograd.grad(model(leaf), leaf, grad_output)[0]

    calls: dict[str, Callable[[], Any]] = {"plain": plain, "eager": lambda: fn(params, x, grad_output)}
    cached = lrpfunc.cached(fn)
    calls["cached"] = lambda: cached(params, x, grad_output)
    compile_seconds = None
    if compile_too:
        compiled = lrpfunc.compile(fn)
        start = time.perf_counter()
        compiled(params, x, grad_output)
        compile_seconds = time.perf_counter() - start
        calls["compiled"] = lambda: compiled(params, x, grad_output)
    expected = fn(params, x, grad_output)[1]
    errors = {key: (call()[1] - expected).abs().max().item() for key, call in calls.items() if key != "plain"}
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            begin = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - begin)
    median = {key: statistics.median(values) for key, values in times.items()}
    cells = "".join(f"{median[key] / median['plain']:>10.2f}x" for key in calls)
    extra = f"   compile {compile_seconds:.1f} s" if compile_seconds is not None else ""
    worst = max(errors.values())
    return f"  {name:<36}{median['plain'] * 1e3:>9.2f} ms{cells}{extra}   max |R - eager| {worst:.1e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip lrpfunc.compile (inductor takes about a minute)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)  # torch's own, importing its compiler

    import torch

    names = ["mlp100, no rules", "mlp100, epsilon_plus", "resnet18 64px b8, EpsilonPlusFlat"]
    header = (f"  {'case':<36}{'plain time':>12}" + "".join(f"{key:>11}" for key in ["plain", "eager", "cached"])
              + ("" if args.no_compile else f"{'compiled':>11}"))
    lines = [f"torch {torch.__version__}, CPU; medians of {args.rounds} interleaved rounds, ratios to the plain input "
             f"gradient", header]
    for name in names:
        line = measure(name, args.rounds, not args.no_compile and not name.startswith("resnet"))
        print(line, flush=True)
        lines.append(line)
    lines.append("(ResNet-18 is not compiled here: inductor takes minutes on two cores)")
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
