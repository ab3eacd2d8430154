"""Shared presentation of results: text tables (ratios, milliseconds, peak MiB), Markdown tables for a
README, and a Pillow bar chart.

A result is a plain dict (what ``--out`` writes as JSON)::

    {"task", "config", "variant", "impl", "status", "median_s", "times_s", "peak_bytes",
     "retained_bytes", "ratio", "noisy", "threads", "note"}

``peak_bytes`` is the peak memory of one call above what was live before it, ``retained_bytes`` what was
still live after it (see ``run.peak_memory``); ``memory_error`` says why they are missing. ``status`` is
``"ok"``, ``"n/a"``, ``"n/a: <why>"``, ``"unsupported: <why>"`` or ``"error: <why>"``; ``note`` (or None)
says why a measured value is known to be wrong (the cell gets a footnote mark). lrpfunc's row also
carries ``peer`` (the peer of its task, e.g. ``"zennit"``), ``peer_ratio`` (lrpfunc's median time over
the peer's, same rounds) and ``peer_noisy``.

``python benchmarks/report.py results.json`` prints the text tables of a JSON written by ``run.py
--out``; ``--markdown`` prints the Markdown tables instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

Result = dict[str, Any]
Cell = Callable[[Result], "str | tuple[str, str]"]  # text, or (text, footnote)


def _rows_and_columns(results: list[Result], task: str) -> tuple[list[tuple[str, str]], list[str]]:
    rows: list[tuple[str, str]] = []
    columns: list[str] = []
    for r in results:
        if r["task"] != task:
            continue
        key = (r["config"], str(r["variant"]))
        if key not in rows:
            rows.append(key)
        if r["impl"] not in columns:
            columns.append(r["impl"])
    return rows, columns


def _format_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mark(footnotes: dict[str, int], text: str) -> str:
    return f"[{footnotes.setdefault(text, len(footnotes) + 1)}]"


def cell(r: Result | None, value: Cell, footnotes: dict[str, int]) -> str:
    """One cell: ``-`` (absent or n/a), ``n/a[k]``/``[k]`` (not run, the reason in footnote k), or the
    value, followed by a mark for a footnote of its own or a known wrong value."""
    if r is None or r["status"] == "n/a":
        return "-"
    if r["status"].startswith("n/a: "):
        return "n/a" + _mark(footnotes, r["status"])
    if r["status"] != "ok":
        return _mark(footnotes, r["status"])
    shown = value(r)
    text, own = (shown, None) if isinstance(shown, str) else shown
    if own:
        text += _mark(footnotes, own)
    if r.get("note"):
        text += _mark(footnotes, r["note"])
    return text


def table(results: list[Result], task: Any, value: Cell, footnotes: dict[str, int], *,
          peer_column: bool = False) -> str:
    """One table for ``task``: a row per (config, variant), a column per implementation, and with
    ``peer_column`` a last column ``lrpfunc/<peer>`` (lrpfunc's time over the task's peer's)."""
    rows, columns = _rows_and_columns(results, task.name)
    index = {(r["config"], str(r["variant"]), r["impl"]): r for r in results if r["task"] == task.name}
    peer = getattr(task, "peer", None) if peer_column else None
    body = []
    for config, variant in rows:
        line = [config, variant] + [cell(index.get((config, variant, impl)), value, footnotes) for impl in columns]
        if peer:
            line.append(_peer_cell(index, config, variant, peer))
        body.append(line)
    header = ["config", "variant", *columns] + ([f"lrpfunc/{peer}"] if peer else [])
    return _format_table(header, body)


def _peer_cell(index: dict[tuple[str, str, str], Result], config: str, variant: str, peer: str) -> str:
    """lrpfunc's median over the peer's (stored as ``peer_ratio``; from the medians for older JSON)."""
    ours, theirs = index.get((config, variant, "lrpfunc")), index.get((config, variant, peer))
    if ours is None or ours.get("median_s") is None:
        return "-"
    if ours.get("peer_ratio") is not None:
        return f"{'~' if ours.get('peer_noisy') else ''}{ours['peer_ratio']:.2f}x"
    if theirs is None or not theirs.get("median_s"):
        return "-"
    return f"{ours['median_s'] / theirs['median_s']:.2f}x"


def _ratio(r: Result) -> str:
    if r.get("ratio") is None:
        return "?"
    return f"{'~' if r.get('noisy') else ''}{r['ratio']:.2f}x"


def _ms(r: Result) -> str:
    return f"{1e3 * r['median_s']:.1f}"


def mib(nbytes: int) -> str:
    """Bytes in MiB: one decimal from 1 MiB up, three below (``mlp100`` peaks at a few KiB)."""
    value = nbytes / 2**20
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _mib(r: Result) -> str | tuple[str, str]:
    if r.get("peak_bytes") is None:
        if r.get("memory_error"):
            return "?", f"peak memory not measured: {r['memory_error']}"
        return "?"
    kept = r.get("retained_bytes") or 0
    return mib(r["peak_bytes"]) + (f" (+{kept / 2**20:.0f} kept)" if kept > 2**20 else "")


def render(results: list[Result], tasks: Iterable[Any], memory_method: str) -> str:
    """All tables for all tasks (ratios, times, peak memory), with footnotes for cells that did not run."""
    out: list[str] = []
    footnotes: dict[str, int] = {}
    for task in tasks:
        if not any(r["task"] == task.name for r in results):
            continue
        out.append(f"\n=== {task.name}: {task.title}")
        if task.note:
            out.append(f"    {task.note}")
        peer = f"; lrpfunc/{task.peer} = lrpfunc's median time over {task.peer}'s" if task.peer else ""
        out.append(f"\n-- time ratio to '{task.floor}' (median; lower is better; ~ = noisy: an interquartile "
                   f"range above 25% of the median, or CPU pressure above 25%){peer}")
        out.append(table(results, task, _ratio, footnotes, peer_column=True))
        out.append("\n-- median time [ms]")
        out.append(table(results, task, _ms, footnotes))
        out.append(f"\n-- peak memory [MiB]: {memory_method}; (+N kept) = still live after the call")
        out.append(table(results, task, _mib, footnotes))
    if footnotes:
        out.append("\nnotes:")
        out.extend(f"[{n}] {status}" for status, n in footnotes.items())
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Markdown (for a README): every cell holds the time ratio and the peak memory
# --------------------------------------------------------------------------------------------------

def _md_cell(r: Result, floor: bool) -> str | tuple[str, str]:
    mem = "" if r.get("peak_bytes") is None else f", {mib(r['peak_bytes'])} MiB"
    time = f"{_ratio(r)} ({1e3 * r['median_s']:.1f} ms{mem})" if floor else f"{_ratio(r)}{mem}"
    if r.get("peak_bytes") is None and r.get("memory_error"):
        return time, f"peak memory not measured: {r['memory_error']}"
    return time


def markdown(results: list[Result], tasks: Iterable[Any]) -> str:
    """Markdown tables, one per task: a row per (config, variant), a column per implementation.

    Each cell is the time ratio to the task's floor and the peak memory of one call; the floor's cell
    also gives its median time. The last column is lrpfunc's time over its peer's (e.g. Zennit's).
    Footnotes follow each table.
    """
    out: list[str] = []
    for task in tasks:
        rows, columns = _rows_and_columns(results, task.name)
        if not rows:
            continue
        index = {(r["config"], str(r["variant"]), r["impl"]): r for r in results if r["task"] == task.name}
        footnotes: dict[str, int] = {}
        header = ["configuration", "variant", *columns] + ([f"lrpfunc/{task.peer}"] if task.peer else [])
        out += [f"**{task.name}**: {task.title}. Cells: time ratio to `{task.floor}`, peak memory of one "
                f"call (`{task.floor}`: also its median time).", "",
                "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for config, variant in rows:
            line = [config, variant]
            for impl in columns:
                r = index.get((config, variant, impl))
                line.append(cell(r, lambda r, floor=(impl == task.floor): _md_cell(r, floor), footnotes))
            if task.peer:
                line.append(_peer_cell(index, config, variant, task.peer))
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |")
        out += [""] + [f"[{n}] {text}  " for text, n in footnotes.items()] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Bar chart (Pillow only; no matplotlib dependency)
# --------------------------------------------------------------------------------------------------

PALETTE = {
    "plain": (150, 150, 150),
    "lrpfunc": (31, 119, 180),
    "zennit": (255, 127, 14),
    "zennit-attributor": (214, 89, 0),
    "zennit-loop": (255, 127, 14),
    "zennit-batch": (214, 89, 0),
    "captum": (44, 160, 44),
}


def plot(results: list[Result], tasks: Iterable[Any], path: Path, title: str = "") -> Path:
    """Horizontal bars of time ratios (log2 scale), one block per (task, config, variant)."""
    import math

    from PIL import Image, ImageDraw, ImageFont

    blocks: list[tuple[str, list[Result]]] = []
    for task in tasks:
        rows, columns = _rows_and_columns(results, task.name)
        for config, variant in rows:
            members = [r for r in results if r["task"] == task.name and r["config"] == config
                       and str(r["variant"]) == variant and r["status"] != "n/a"]
            members.sort(key=lambda r: columns.index(r["impl"]))
            if members:
                blocks.append((f"{task.name}  {config}  {variant}", members))

    ratios = [r["ratio"] for _, m in blocks for r in m if r["status"] == "ok" and r.get("ratio")]
    lo = min(-1, math.floor(math.log2(min(ratios, default=1.0))))
    hi = max(1, math.ceil(math.log2(max(ratios, default=2.0))))

    font = ImageFont.load_default()
    bar_h, gap, label_w, width, margin = 16, 4, 130, 1100, 12
    plot_x0, plot_x1 = margin + label_w, width - margin - 230
    body = sum(22 + len(m) * (bar_h + gap) + 8 for _, m in blocks)
    top = margin + 46
    height = top + body + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, margin), title or "time ratio to the plain-gradient floor (log2 scale; lower is better; "
              "median time and peak memory of one call in brackets)",
              fill="black", font=font)
    draw.text((margin, margin + 16), "* value known to be wrong (see the notes of the text report); "
              "~ noisy (interquartile range > 25% of the median, or CPU pressure > 25%)", fill=(90, 90, 90), font=font)

    def x_of(ratio: float) -> float:
        return plot_x0 + (plot_x1 - plot_x0) * (math.log2(max(ratio, 2.0 ** lo)) - lo) / (hi - lo)

    for e in range(lo, hi + 1):  # grid first, bars over it
        x = x_of(2.0 ** e)
        draw.line([x, top, x, top + body], fill=(90, 90, 90) if e == 0 else (225, 225, 225), width=1)
        draw.text((x - 8, top + body + 6), f"{2.0 ** e:g}x", fill="black", font=font)

    y = top
    for label, members in blocks:
        draw.text((margin, y), label, fill="black", font=font)
        y += 22
        for r in members:
            draw.text((margin + 10, y + 2), r["impl"], fill="black", font=font)
            if r["status"] == "ok" and r.get("ratio"):
                color = PALETTE.get(r["impl"], (120, 80, 160))
                draw.rectangle([plot_x0, y, x_of(r["ratio"]), y + bar_h], fill=color)
                marks = ("*" if r.get("note") else "") + ("~" if r.get("noisy") else "")
                mem = "" if r.get("peak_bytes") is None else f", {mib(r['peak_bytes'])} MiB"
                text = f"{r['ratio']:.2f}x{marks}  ({1e3 * r['median_s']:.0f} ms{mem})"
                draw.text((x_of(r["ratio"]) + 6, y + 2), text, fill="black", font=font)
            else:
                draw.text((plot_x0 + 4, y + 2), r["status"][:120], fill=(180, 0, 0), font=font)
            y += bar_h + gap
        y += 8
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Print the tables of a JSON written by ``run.py --out`` (text, or Markdown with ``--markdown``)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", type=Path, help="a JSON written by run.py --out")
    p.add_argument("--markdown", action="store_true", help="Markdown tables for a README")
    args = p.parse_args(argv)
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.cases import TASKS  # the task titles, floors and peers (imports torch)

    data = json.loads(args.results.read_text())
    if args.markdown:
        print(markdown(data["results"], TASKS.values()))
    else:
        print(render(data["results"], TASKS.values(), data["meta"].get("memory_method", "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
