"""The check run as JSON for machines and as one self-contained HTML file for people."""

from __future__ import annotations

import html
import platform
import time
from typing import Any

from gpuprovider import __version__
from gpuprovider.check.result import Result, Status, exit_code, summary

COLOURS = {"PASS": "#1a7f37", "WARN": "#9a6700", "FAIL": "#cf222e", "SKIP": "#6e7781"}


NO_GPU = "NO GPU MEASURED: every GPU check was skipped, so nothing shows this machine fit to sell"


def verdict(results: list[Result], gpu_measured: bool) -> str:
    """One line for the whole run: a FAIL decides, then whether any GPU was measured."""
    if exit_code(results):
        return "NOT FIT: fix the FAILs"
    return "FIT TO SELL" if gpu_measured else NO_GPU


def report_data(
    results: list[Result], started_at: float, wall_s: float, node: str, gpu_measured: bool
) -> dict[str, Any]:
    host = platform.node()
    return {
        "node": node,
        "host": host,
        "verdict": verdict(results, gpu_measured),
        "gpuprovider": __version__,
        "started_at": started_at,
        "wall_s": round(wall_s, 2),
        "summary": summary(results),
        "exit_code": exit_code(results),
        # a whole-node result's subject is the host
        "results": [r.to_dict() | {"subject": r.subject or host} for r in results],
    }


def _bars(title: str, bars: list[tuple[str, float, str]], limit: float | None = None) -> str:
    """A horizontal bar chart as inline SVG: (label, value, shown text) per bar."""
    if not bars:
        return ""
    top = limit or max(v for _, v, _ in bars) or 1.0
    row, label_w, width = 22, 190, 420
    height = row * len(bars) + 8
    parts = [
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 110}" '
        f'height="{height}" role="img">'
    ]
    for i, (label, value, text) in enumerate(bars):
        y = 4 + i * row
        w = max(1.0, width * min(value, top) / top)
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" fill="#0969da"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{html.escape(text)}</text>'
        )
    if limit:
        parts.append(
            f'<line x1="{label_w + width}" y1="0" x2="{label_w + width}" y2="{height}" '
            'stroke="#999" stroke-dasharray="3,3"/>'
        )
    parts.append("</svg></figure>")
    return "".join(parts)


def charts(results: list[Result]) -> str:
    peak = [
        (
            f"{r.subject} {r.data.get('dtype', 'memory')}",
            r.data["pct_of_peak"],
            f"{r.data['pct_of_peak']:.0f} % ({r.shown_value})",
        )
        for r in results
        if r.group == "compute" and r.data.get("pct_of_peak") is not None
    ]
    bandwidth_names = {
        "memory-bandwidth": "host memory",
        "disk-write": "disk write",
        "disk-read": "disk read",
        "host-device": "host→device",
        "peer": "GPU↔GPU",
        "device-memory": "device memory",
    }
    bandwidth = []
    for r in results:
        if r.name in bandwidth_names and isinstance(r.value, float) and r.status != Status.SKIP:
            gbs = r.value / 1000 if r.unit == "MB/s" else r.value
            label = f"{r.subject} {bandwidth_names[r.name]}".strip()
            bandwidth.append((label, gbs, f"{gbs:,.1f} GB/s"))
    out = _bars("GEMM and memory bandwidth, % of catalogue peak", peak, limit=100.0)
    if not out:
        out = "<p>No GPU measured: the per-dtype % of peak chart needs an NVIDIA GPU.</p>"
    return out + _bars("Bandwidths (GB/s)", bandwidth)


def as_html(report: dict[str, Any]) -> str:
    results = [Result.from_dict(r) for r in report["results"]]
    counts = report["summary"]
    rows = "".join(
        "<tr>"
        f"<td>{html.escape(r.group)}</td><td>{html.escape(r.name)}</td>"
        f"<td>{html.escape(r.subject)}</td>"
        f'<td><b style="color:{COLOURS[str(r.status)]}">{r.status}</b></td>'
        f"<td>{html.escape(r.shown_value)}</td><td>{html.escape(r.threshold)}</td>"
        f"<td>{html.escape(r.advice)}</td>"
        "</tr>"
        for r in results
    )
    verdict = html.escape(report["verdict"])
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(report["started_at"]))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>gpuprovider check: {html.escape(report["host"])}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #1f2328; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-bottom: 1px solid #d0d7de; padding: 4px 8px; text-align: left;
  vertical-align: top; }}
th {{ background: #f6f8fa; }}
figure {{ margin: 1.5em 0; }} figcaption {{ font-weight: 600; margin-bottom: .4em; }}
svg text {{ font: 12px system-ui, sans-serif; fill: #1f2328; }}
</style></head><body>
<h1>gpuprovider check: {html.escape(report["host"])}</h1>
<p><b>{verdict}</b> — {counts["PASS"]} pass, {counts["WARN"]} warn, {counts["FAIL"]} fail,
{counts["SKIP"]} skipped · node {html.escape(report["node"])} · {html.escape(when)} ·
{report["wall_s"]} s · gpuprovider {html.escape(report["gpuprovider"])}</p>
{charts(results)}
<table><thead><tr><th>Group</th><th>Check</th><th>Subject</th><th>Status</th><th>Value</th>
<th>Threshold</th><th>What to do</th></tr></thead><tbody>{rows}</tbody></table>
</body></html>
"""
