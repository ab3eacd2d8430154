#!/usr/bin/env python
"""Benchmark lrpfunc against the plain gradient, Zennit 0.5.1 and Captum's LRP, side by side.

    /work/peers-venv/bin/python benchmarks/run.py [--quick] [--full] [--device cuda] [--check]
        [--models ...] [--out results.json] [--markdown results.md] [--plot [PATH]]

For every configuration (``benchmarks/configs.py``: a model, its input and thread count) and every
task (``benchmarks/cases.py``) the implementations are set up once, each on its own deep copy of the
model, warmed up, and then called in interleaved rounds (one call of each per round) so that the
machine's drift hits all of them alike; the tables show the ratio of each median to the task's floor
(the plain gradient) and lrpfunc's median over Zennit's, the medians, and the peak memory of a further
call, for every row. Peers that do not import are reported and skipped.

Timing: medians of the timed rounds; a ratio is the median of an implementation over the median of
the task's floor measured in the same rounds. The cell is marked '~' when the interquartile range of
either exceeds 25% of its median, or when the kernel's CPU pressure (``/proc/pressure/cpu``, share of
time some task waited for a core, 10 s average) exceeded 25% at the start or end of the group: other
processes competed for the cores (``--wait-quiet`` waits for a quiet machine before each group).
By default glibc's malloc is told to keep freed memory (mallopt: fixed 32 MiB mmap threshold, no
trimming), so that a call does not pay for page faults on memory the previous call gave back to the
kernel, which is expensive and erratic in small VMs; ``--no-mallopt`` turns that off.

Peak memory: on CPU, the peak of the live bytes that torch's CPU allocator handed out during one
call (the second of two in one profiling session, so that frees of the first call's tensors are
seen; the garbage collector runs between them), from the allocation/free events that
``torch.profiler`` records with ``profile_memory=True``, above what was live before the call; tensors
only, no Python objects and no allocator caching. Bytes still live after the call (its result
deleted) are reported as "kept": tensors left in reference cycles until the garbage collector runs,
or caches. On CUDA, ``torch.cuda.max_memory_allocated`` during the call minus ``memory_allocated``
before it.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)  # ``import models`` would load a second copy of benchmarks.models
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import cases, checks, configs, models, peers as peers_mod, report  # noqa: E402
from benchmarks.cases import NotApplicable, Setup, Task, Unsupported  # noqa: E402

NOISY_IQR = 0.25
CONTENDED_PRESSURE = 25.0  # percent: /proc/pressure/cpu "some avg10" above this = other work competed
MEMORY_CPU = ("peak live bytes from torch's CPU allocator during one call (torch.profiler "
              "profile_memory alloc/free events; gc.collect() before), above the bytes live before the call")
MEMORY_CUDA = "torch.cuda.max_memory_allocated during one call, above memory_allocated before it"


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------

def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def keep_freed_memory() -> str:
    """mallopt(M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=1 GiB) on glibc; returns what was done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
        return "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB" if ok else "mallopt refused"
    except (OSError, AttributeError) as exc:
        return f"mallopt not available ({exc})"


@contextlib.contextmanager
def quiet_stderr() -> Any:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines); Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_pressure() -> float | None:
    """The kernel's 10-second CPU pressure (percent of time some task waited for a CPU), if available."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def peak_memory(call: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """(peak, retained): bytes allocated by torch during one call above those live before it, at the
    peak and after the call (its result deleted: memory left in reference cycles or caches).

    The garbage collector runs before the measured call, so that tensors which an earlier call left
    in reference cycles are not freed inside the measured window (that would lower its peak).
    """
    if device.type == "cuda":
        call()
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = call()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile, record_function

    # Two calls in one profiling session: the second one's frees of what the first allocated are seen,
    # so the live count is exact inside the second call's window (marked by a user annotation).
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
        del result
        gc.collect()
        with record_function("benchmark-measured-call"):
            result = call()
            del result
    events = prof.profiler.kineto_results.events()
    (window,) = [e for e in events if e.name() == "benchmark-measured-call"]
    memory = sorted((e for e in events if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in memory:
        if window.start_ns() <= e.start_ns() <= window.end_ns():
            live += e.nbytes()
            peak = max(peak, live)
    return peak, live


def time_group(calls: dict[str, Callable[[], Any]], *, warmup: int, repeats: int, min_repeats: int,
               budget_s: float, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Interleaved rounds: each round calls every implementation once, in a rotating order."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
            sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for round_ in range(repeats):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            result = calls[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
            del result
        if round_ + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return times


@contextlib.contextmanager
def num_threads(threads: int | None) -> Any:
    """``torch.set_num_threads(threads)`` inside the block (nothing for None); the previous count after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _status(exc: BaseException) -> str:
    if isinstance(exc, NotApplicable):
        return f"n/a: {exc}" if str(exc) else "n/a"
    if isinstance(exc, Unsupported):
        return f"unsupported: {exc}"
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return f"error: {text[:240]}"


def wait_quiet(max_s: float) -> float:
    """Sleep (up to max_s) until the CPU pressure is below CONTENDED_PRESSURE; return the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_s and (cpu_pressure() or 0.0) > CONTENDED_PRESSURE:
        time.sleep(1.0)
    return time.perf_counter() - start


def run_group(task: Task, setup: Setup, variant: Any, peers: peers_mod.Peers, args: argparse.Namespace,
              device: torch.device) -> list[dict[str, Any]]:
    """Set up every implementation of one (task, config, variant), time them together, measure memory.

    The configuration's own thread count (``mlp100``: 1) holds for the whole group, memory included.
    """
    with num_threads(setup.threads):
        return _run_group(task, setup, variant, peers, args, device)


def _run_group(task: Task, setup: Setup, variant: Any, peers: peers_mod.Peers, args: argparse.Namespace,
               device: torch.device) -> list[dict[str, Any]]:
    config = setup.single().label if task.per_input else setup.label
    base = {"task": task.name, "config": config, "variant": variant}
    results: dict[str, dict[str, Any]] = {}
    calls: dict[str, Callable[[], Any]] = {}
    contexts = []
    sync = synchronizer(device)
    try:
        first_calls_s = 0.0
        for impl, factory in task.impls.items():
            row = {**base, "impl": impl, "status": "ok", "median_s": None, "times_s": [], "iqr_rel": None,
                   "peak_bytes": None, "retained_bytes": None, "ratio": None, "noisy": False,
                   "threads": torch.get_num_threads(),
                   "note": cases.value_note(task.name, impl, setup)}
            results[impl] = row
            ctx = factory(setup, variant, peers)
            try:
                call = ctx.__enter__()
                contexts.append(ctx)
                t0 = time.perf_counter()
                call()  # first call outside the timing: a failure is reported, not timed
                sync()
                row["first_call_s"] = time.perf_counter() - t0  # a compiled implementation compiles here
                first_calls_s += row["first_call_s"]
                calls[impl] = call
            except Exception as exc:
                row["status"] = _status(exc)
                if args.verbose and row["status"].startswith("error"):
                    traceback.print_exc()
        # The first calls warmed up; further warm-up rounds only where a round is cheap.
        warmup = args.warmup if first_calls_s < args.budget / 4 else 0
        load_before, pressure_before = os.getloadavg()[0], cpu_pressure()
        times = time_group(calls, warmup=warmup, repeats=args.repeats, min_repeats=min(3, args.repeats),
                           budget_s=args.budget, sync=sync)
        for impl, ts in times.items():
            row = results[impl]
            row["times_s"] = ts
            row["median_s"] = statistics.median(ts)
            if len(ts) >= 3:
                q1, _, q3 = statistics.quantiles(ts, n=4)
                row["iqr_rel"] = (q3 - q1) / row["median_s"]
            row["load1"] = [load_before, os.getloadavg()[0]]
            row["cpu_pressure10"] = [pressure_before, cpu_pressure()]
        if not args.no_memory:
            for impl, call in calls.items():
                try:
                    results[impl]["peak_bytes"], results[impl]["retained_bytes"] = peak_memory(call, device)
                except Exception as exc:  # the profiler is best-effort
                    results[impl]["memory_error"] = _status(exc)
    finally:
        for ctx in reversed(contexts):
            ctx.__exit__(None, None, None)
    floor = results.get(task.floor)
    for row in results.values():
        if row["median_s"] is not None and floor is not None and floor["median_s"]:
            row["ratio"] = row["median_s"] / floor["median_s"]
            pressure = max((p for p in row.get("cpu_pressure10", []) if p is not None), default=0.0)
            row["noisy"] = (any((r["iqr_rel"] or 0.0) > NOISY_IQR for r in (row, floor))
                            or pressure > CONTENDED_PRESSURE)
    ours, peer = results.get("lrpfunc"), results.get(task.peer or "")
    if ours is not None and peer is not None and ours["median_s"] is not None and peer["median_s"]:
        ours["peer"], ours["peer_ratio"] = task.peer, ours["median_s"] / peer["median_s"]
        pressure = max((p for p in ours.get("cpu_pressure10", []) if p is not None), default=0.0)
        ours["peer_noisy"] = (any((r["iqr_rel"] or 0.0) > NOISY_IQR for r in (ours, peer))
                              or pressure > CONTENDED_PRESSURE)
    return list(results.values())


def progress(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"  {row['impl']:<17} {row['status']}"
    mem = "" if row["peak_bytes"] is None else f"  peak {report.mib(row['peak_bytes']):>8} MiB"
    if (row.get("retained_bytes") or 0) > 2**20:
        mem += f" (+{row['retained_bytes'] / 2**20:.1f} MiB kept after the call)"
    ratio = "" if row["ratio"] is None else f"  {row['ratio']:6.2f}x"
    spread = f"  [{1e3 * min(row['times_s']):.1f}..{1e3 * max(row['times_s']):.1f}]"
    if row.get("memory_error"):
        mem += f"  peak memory not measured: {row['memory_error']}"
    note = "  (value wrong, see notes)" if row.get("note") else ""
    if row["impl"].endswith("-compiled") and row.get("first_call_s") is not None:
        note += f"  (first call, compiling: {row['first_call_s']:.1f} s)"
    peer = f"  {row['peer_ratio']:.2f}x {row['peer']}" if row.get("peer_ratio") is not None else ""
    return (f"  {row['impl']:<17} {1e3 * row['median_s']:9.1f} ms{ratio}  (n={len(row['times_s'])}){spread}"
            f"{mem}{peer}{note}")


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(models.MODELS),
                   help="default: resnet18, vgg11, " + ", ".join(configs.FIXED)
                        + f" (these three with their own input: {', '.join(c.label for c in configs.FIXED.values())})")
    p.add_argument("--sizes", nargs="+", type=int,
                   help="image sizes of the ImageNet-style models; default 64 (and 224 with --full)")
    p.add_argument("--batches", nargs="+", type=int,
                   help="batch sizes of the ImageNet-style models; default resnet18 b8, vgg11 b1 and b8")
    p.add_argument("--tasks", nargs="+", choices=list(cases.TASKS), default=list(cases.TASKS))
    p.add_argument("--composites", nargs="+", choices=cases.COMPOSITES,
                   help="variants of the first-order task, for every configuration (default: each "
                        "configuration's own list, see benchmarks/configs.py)")
    p.add_argument("--classes", nargs="+", type=int, default=[10, 100], help="K of the all-class task")
    p.add_argument("--repeats", type=int, default=15, help="most timed rounds per group (default 15)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first call (default 1)")
    p.add_argument("--budget", type=float, default=8.0,
                   help="stop a group after this many seconds once 3 rounds are done (default 8)")
    p.add_argument("--quick", action="store_true",
                   help="ResNet-18 64px b8 only, K=10, fewer rounds: a smoke run in about a minute")
    p.add_argument("--full", action="store_true", help="also 224x224 (batch 1 and 8)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each group, wait up to this long for the CPU pressure to drop below 25%%")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-mallopt", action="store_true",
                   help="leave glibc malloc's defaults (freed memory goes back to the kernel; noisier)")
    p.add_argument("--no-lrpfunc", action="store_true", help="measure only the peers and the floor")
    p.add_argument("--compile-all", action="store_true",
                   help="compiled implementations for every model (default: mlp100 only; inductor takes minutes "
                        "for a ResNet on two cores)")
    p.add_argument("--check", action="store_true", help="run the sanity checks before measuring")
    p.add_argument("--check-only", action="store_true", help="run the sanity checks and stop")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    p.add_argument("--markdown", type=Path, metavar="PATH",
                   help="write Markdown tables (ratio, time and peak memory in every cell) for a README")
    p.add_argument("--plot", nargs="?", type=Path, const=HERE / "results.png",
                   help="write a bar chart of the ratios (default benchmarks/results.png)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing implementations")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.budget = min(args.repeats, 5), min(args.budget, 3.0)
        args.classes = [args.classes[0]]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_all:
        cases.COMPILED_FAMILIES = cases.FAMILIES
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    malloc_note = "glibc malloc defaults (--no-mallopt)" if args.no_mallopt else keep_freed_memory()
    peers = peers_mod.load(want_lrpfunc=not args.no_lrpfunc)

    print(f"torch {torch.__version__} on {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus), python {platform.python_version()}")
    for name in ("lrpfunc", "zennit", "captum"):
        if name in peers.versions:
            print(f"{name}: {peers.versions[name]}")
        else:
            print(f"{name}: not available: {peers.why[name]}")
    for note in peers.notes:
        print(f"note: {note}")
    print(f"note: {malloc_note}")
    print(f"note: 1-min load average {os.getloadavg()[0]:.2f}, CPU pressure (10 s) {cpu_pressure()}%")

    setups: list[Setup] = []
    built: dict[str, torch.nn.Module] = {}
    for config in configs.configurations(args):
        if config.model not in built:
            built[config.model] = models.build(config.model, device=device)
        setups.append(cases.make_setup(config, built[config.model], device))

    if args.check or args.check_only:
        failed = checks.run_checks(setups, peers)
        if args.check_only:
            return 1 if failed else 0

    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    seen_inputs: set[str] = set()
    for setup in setups:
        for task_name in args.tasks:
            task = cases.TASKS[task_name]
            if not configs.task_runs_on(args, task_name, setup.config):
                continue
            if task.per_input:
                if setup.single().label in seen_inputs:
                    continue
                seen_inputs.add(setup.single().label)
            variants = {"first-order": args.composites or setup.config.composites,
                        "all-class": args.classes}.get(task_name, task.variants)
            for variant in variants:
                label = setup.single().label if task.per_input else setup.label
                waited = wait_quiet(args.wait_quiet) if args.wait_quiet else 0.0
                print(f"\n[{time.perf_counter() - started:6.0f}s] {task.name} | {label} | {variant}"
                      f"  (load {os.getloadavg()[0]:.1f}, cpu pressure {cpu_pressure()}%"
                      f"{f', waited {waited:.0f}s' if waited >= 1 else ''})", flush=True)
                try:
                    rows = run_group(task, setup, variant, peers, args, device)
                except Exception as exc:  # e.g. an implementation that fails only on a later call
                    print(f"  group failed: {_status(exc)}", flush=True)
                    if args.verbose:
                        traceback.print_exc()
                    continue
                for row in rows:
                    print(progress(row), flush=True)
                results.extend(rows)

    memory_method = MEMORY_CUDA if device.type == "cuda" else MEMORY_CPU
    print(report.render(results, cases.TASKS.values(), memory_method))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")

    if args.out:
        meta = {
            "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "versions": peers.versions, "unavailable": peers.why, "notes": peers.notes,
            "memory_method": memory_method, "malloc": malloc_note,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        print(f"wrote {args.out}")
    if args.markdown:
        args.markdown.write_text(report.markdown(results, cases.TASKS.values()))
        print(f"wrote {args.markdown}")
    if args.plot:
        try:
            title = (f"time ratio to the plain-gradient floor (log2 scale; lower is better; median time and peak "
                     f"memory of one call in brackets) - torch {torch.__version__}, {device}, "
                     f"{torch.get_num_threads()} threads unless the configuration says otherwise")
            print(f"wrote {report.plot(results, cases.TASKS.values(), args.plot, title)}")
        except ImportError as exc:
            print(f"--plot: Pillow not available ({exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
