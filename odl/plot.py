"""A dependency-free SVG line chart, enough for the demo's report."""
from __future__ import annotations

from html import escape


def svg_line_chart(points: list[tuple[float, float]], title: str, xlabel: str, ylabel: str,
                   width: int = 640, height: int = 320, reference: float | None = None) -> str:
    """A polyline of ``points``; ``reference`` draws a dashed horizontal line (e.g. chance AUC)."""
    pad_l, pad_r, pad_t, pad_b = 60, 20, 36, 44
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>']
    if not points:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-6:
        y0, y1 = y0 - 0.05, y1 + 0.05
    sx = lambda x: pad_l + (x - x0) / (x1 - x0) * w  # noqa: E731
    sy = lambda y: pad_t + h - (y - y0) / (y1 - y0) * h  # noqa: E731
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#ddd"/>'
                     f'<text x="{pad_l - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3f}</text>')
        xv = x0 + (x1 - x0) * k / 4
        parts.append(f'<text x="{sx(xv):.1f}" y="{pad_t + h + 16}" text-anchor="middle">{xv:.0f}</text>')
    if reference is not None and y0 <= reference <= y1:
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{sy(reference):.1f}" y2="{sy(reference):.1f}" '
                     f'stroke="#d62728" stroke-dasharray="6 4"/>')
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    parts += [f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{path}"/>',
              f'<text x="{pad_l + w / 2}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>',
              f'<text x="14" y="{pad_t + h / 2}" transform="rotate(-90 14 {pad_t + h / 2})" '
              f'text-anchor="middle">{escape(ylabel)}</text></svg>']
    return "".join(parts)
