"""Shared presentation of results: text tables (ratios, milliseconds, peak MiB) and a Pillow bar chart.

A result is a plain dict (what ``--out`` writes as JSON)::

    {"task", "config", "variant", "impl", "status", "median_s", "times_s", "peak_bytes", "ratio"}

``retained_bytes`` is what was still live after the call (see ``run.peak_memory``). ``status`` is ``"ok"``, ``"n/a"``, ``"unsupported: <why>"`` or ``"error: <why>"``; ``note`` (or None) says
why a measured value is known to be wrong (the cell gets a footnote mark).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

Result = dict[str, Any]


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


def table(results: list[Result], task: str, value: Callable[[Result], str], footnotes: dict[str, int]) -> str:
    """One table for ``task``: a row per (config, variant), a column per implementation."""
    rows, columns = _rows_and_columns(results, task)
    index = {(r["config"], str(r["variant"]), r["impl"]): r for r in results if r["task"] == task}
    body = []
    for config, variant in rows:
        line = [config, variant]
        for impl in columns:
            r = index.get((config, variant, impl))
            if r is None or r["status"] == "n/a":
                line.append("-")
            elif r["status"] != "ok":
                mark = footnotes.setdefault(r["status"], len(footnotes) + 1)
                line.append(f"[{mark}]")
            elif r.get("note"):
                line.append(f"{value(r)}[{footnotes.setdefault(r['note'], len(footnotes) + 1)}]")
            else:
                line.append(value(r))
        body.append(line)
    return _format_table(["config", "variant", *columns], body)


def _ratio(r: Result) -> str:
    if r.get("ratio") is None:
        return "?"
    return f"{'~' if r.get('noisy') else ''}{r['ratio']:.2f}x"


def _ms(r: Result) -> str:
    return f"{1e3 * r['median_s']:.1f}"


def _mib(r: Result) -> str:
    if r.get("peak_bytes") is None:
        return "?"
    kept = r.get("retained_bytes") or 0
    return f"{r['peak_bytes'] / 2**20:.1f}" + (f" (+{kept / 2**20:.0f} kept)" if kept > 2**20 else "")


def render(results: list[Result], tasks: Iterable[Any], memory_method: str) -> str:
    """All tables for all tasks, with footnotes for cells that did not run."""
    out: list[str] = []
    footnotes: dict[str, int] = {}
    for task in tasks:
        if not any(r["task"] == task.name for r in results):
            continue
        out.append(f"\n=== {task.name}: {task.title}")
        if task.note:
            out.append(f"    {task.note}")
        out.append(f"\n-- time ratio to '{task.floor}' (median; lower is better; ~ = noisy: an interquartile "
                   "range above 25% of the median, or CPU pressure above 25%)")
        out.append(table(results, task.name, _ratio, footnotes))
        out.append("\n-- median time [ms]")
        out.append(table(results, task.name, _ms, footnotes))
        out.append(f"\n-- peak memory [MiB]: {memory_method}; (+N kept) = still live after the call")
        out.append(table(results, task.name, _mib, footnotes))
    if footnotes:
        out.append("\nnotes:")
        out.extend(f"[{n}] {status}" for status, n in footnotes.items())
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
    draw.text((margin, margin), title or "time ratio to the plain-gradient floor (log2 scale; lower is better)",
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
                text = f"{r['ratio']:.2f}x{marks}  ({1e3 * r['median_s']:.0f} ms)"
                draw.text((x_of(r["ratio"]) + 6, y + 2), text, fill="black", font=font)
            else:
                draw.text((plot_x0 + 4, y + 2), r["status"][:120], fill=(180, 0, 0), font=font)
            y += bar_h + gap
        y += 8
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
