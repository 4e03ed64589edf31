"""A simulation's report: one HTML page (inline SVG line charts drawn here, no script,
no external asset) and the same figures as JSON."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def line_chart(
    title: str,
    x: Mapping[str, Sequence[float]],
    y: Mapping[str, Sequence[float]],
    y_label: str,
    width: int = 640,
    height: int = 260,
) -> str:
    """An SVG line chart, one line per series name (NaN points are gaps)."""
    left, right, top, bottom = 64, 150, 28, 36
    points = [
        (a, b)
        for name in y
        for a, b in zip(x[name], y[name], strict=False)
        if math.isfinite(a) and math.isfinite(b)
    ]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * plot_w

    def sy(v: float) -> float:
        return top + plot_h - (v - y0) / (y1 - y0) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#999"/>',
    ]
    for k in range(5):
        value = y0 + (y1 - y0) * k / 4
        out.append(
            f'<text x="{left - 6}" y="{sy(value) + 4:.1f}" font-size="10" text-anchor="end">'
            f"{value:.3g}</text>"
            f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(value):.1f}" y2="{sy(value):.1f}" '
            'stroke="#eee"/>'
        )
        at = x0 + (x1 - x0) * k / 4
        out.append(
            f'<text x="{sx(at):.1f}" y="{top + plot_h + 14}" font-size="10" '
            f'text-anchor="middle">{at:.3g}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" font-size="10" text-anchor="middle">'
        "hours</text>"
        f'<text x="12" y="{top + plot_h / 2}" font-size="10" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + plot_h / 2})">{html.escape(y_label)}</text>'
    )
    for n, name in enumerate(y):
        colour = COLOURS[n % len(COLOURS)]
        runs: list[list[str]] = [[]]
        for a, b in zip(x[name], y[name], strict=False):
            if math.isfinite(a) and math.isfinite(b):
                runs[-1].append(f"{sx(a):.1f},{sy(b):.1f}")
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if len(run) > 1:
                out.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" '
                    f'points="{" ".join(run)}"/>'
                )
            elif run:
                x_, y_ = run[0].split(",")
                out.append(f'<circle cx="{x_}" cy="{y_}" r="2" fill="{colour}"/>')
        legend_y = top + 14 + 16 * n
        out.append(
            f'<line x1="{left + plot_w + 10}" x2="{left + plot_w + 28}" y1="{legend_y - 4}" '
            f'y2="{legend_y - 4}" stroke="{colour}" stroke-width="2"/>'
            f'<text x="{left + plot_w + 32}" y="{legend_y}" font-size="11">'
            f"{html.escape(name)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


CHARTS = {
    "A": (
        ("net_usd", "Net revenue so far", "USD"),
        ("utilisation", "Utilisation", "share of GPUs"),
        ("price_ratio", "Mean price over the list price (leases won per interval)", "ratio"),
    ),
    "B": (
        ("score", "Score share so far", "share"),
        ("utilisation", "GPUs held by instances", "share of GPUs"),
        ("cu_per_hour", "Compute units per hour", "compute units"),
    ),
}


def render(report: Mapping[str, Any]) -> str:
    """The HTML page for a report as `simulate` makes it."""
    scenario = report["scenario"]
    runs = report["strategies"]
    x = {name: run["series"]["t_h"] for name, run in runs.items()}
    charts = [
        line_chart(title, x, {n: r["series"][key] for n, r in runs.items()}, unit)
        for key, title, unit in CHARTS[scenario]
    ]
    metrics = sorted({m for run in runs.values() for m in run["metrics"]})
    head = "".join(f"<th>{html.escape(n)}</th>" for n in runs)
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td>"
        + "".join(f"<td>{_fmt(run['metrics'].get(m))}</td>" for run in runs.values())
        + "</tr>"
        for m in metrics
    )
    settings = html.escape(json.dumps(report.get("settings", {}), indent=1, default=str))
    samples = "".join(
        f"<h3>{html.escape(name)}</h3>{_decisions(run.get('decisions') or [])}"
        for name, run in runs.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Market simulation, scenario {scenario}, seed {report['seed']}</title>"
        "<style>body{font-family:sans-serif;margin:24px;max-width:1000px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child{text-align:left}</style></head><body>"
        f"<h1>Market simulation: scenario {scenario}, seed {report['seed']}</h1>"
        f"<p>{html.escape(report.get('description', ''))}</p>"
        + "".join(f"<div>{c}</div>" for c in charts)
        + f"<h2>Figures</h2><table><tr><th>metric</th>{head}</tr>{rows}</table>"
        + f"<h2>Decisions (a sample, with their reasons)</h2>{samples}"
        + f"<h2>Settings</h2><pre>{settings}</pre></body></html>"
    )


def _decisions(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value)) if value is not None else "-"


def write(report: Mapping[str, Any], folder: Path, stem: str) -> tuple[Path, Path]:
    """`<stem>.html` and `<stem>.json` in `folder` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    page, data = folder / f"{stem}.html", folder / f"{stem}.json"
    page.write_text(render(report))
    data.write_text(json.dumps(plain(report), indent=1, allow_nan=False))
    return page, data


def plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, paths and enums as text, NaN as null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)
