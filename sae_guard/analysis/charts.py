"""Charts as inline SVG strings, so reports need no plotting library: grouped bars of shares, histograms."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

BAR_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def bar_chart(title: str, series: Mapping[str, Mapping[str, float | None]], width: int = 560,
              height: int = 220) -> str:
    """An SVG grouped bar chart of shares in [0, 1]: one group of bars per key of the inner mappings."""
    methods = list(series)
    groups = list(dict.fromkeys(g for values in series.values() for g in values))
    left, bottom, top = 40, 40, 24
    plot_w, plot_h = width - left - 10, height - bottom - top
    slot = plot_w / max(1, len(groups))
    bar = slot * 0.8 / max(1, len(methods))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 18 * len(methods)}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{int(tick * 100)}%</text>')
    for g, group in enumerate(groups):
        x0 = left + g * slot + slot * 0.1
        for m, method in enumerate(methods):
            value = series[method].get(group)
            if value is None:
                continue
            bar_h = plot_h * value
            parts.append(f'<rect x="{x0 + m * bar:.1f}" y="{top + plot_h - bar_h:.1f}" width="{bar * 0.9:.1f}" '
                         f'height="{bar_h:.1f}" fill="{BAR_COLOURS[m % len(BAR_COLOURS)]}">'
                         f'<title>{html.escape(method)} / {html.escape(group)}: {value:.1%}</title></rect>')
        parts.append(f'<text x="{left + (g + 0.5) * slot:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                     f'{html.escape(group)}</text>')
    for m, method in enumerate(methods):
        y = height + 4 + 18 * m
        parts.append(f'<rect x="{left}" y="{y - 9}" width="10" height="10" '
                     f'fill="{BAR_COLOURS[m % len(BAR_COLOURS)]}"/><text x="{left + 16}" y="{y}">'
                     f'{html.escape(method)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(title: str, values: Sequence[float], bins: int = 20, low: float = 0.0, high: float = 1.0,
              width: int = 560, height: int = 200, marker: float | None = None) -> str:
    """An SVG histogram of values in [low, high]; `marker` draws a vertical line there (a threshold, say)."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - low) / (high - low) * bins)))] += 1
    left, bottom, top = 40, 30, 24
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max(counts) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{peak}</text>']
    for i, c in enumerate(counts):
        bar_h = plot_h * c / peak
        parts.append(f'<rect x="{left + i * plot_w / bins:.1f}" y="{top + plot_h - bar_h:.1f}" '
                     f'width="{plot_w / bins * 0.9:.1f}" height="{bar_h:.1f}" fill="{BAR_COLOURS[0]}"/>')
    for tick in (0, 0.5, 1):
        x = left + plot_w * tick
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{low + tick * (high - low):g}'
                     '</text>')
    if marker is not None:
        x = left + plot_w * (marker - low) / (high - low)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="{BAR_COLOURS[3]}" '
                     'stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart(title: str, series: Mapping[str, Sequence[tuple[float, float]]], x_label: str, y_label: str,
               log_x: bool = False, width: int = 560, height: int = 300) -> str:
    """An SVG chart of (x, y) points per series, each joined in the order given (a trade-off curve, say)."""
    import math

    points = [p for values in series.values() for p in values]
    fx = (lambda x: math.log10(x)) if log_x else (lambda x: x)
    xs, ys = [fx(x) for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs, default=0.0), max(xs, default=1.0)
    y0, y1 = min(0.0, min(ys, default=0.0)), max(ys, default=1.0)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, bottom, top, right = 50, 40, 24, 130
    plot_w, plot_h = width - left - right, height - bottom - top
    px = lambda x: left + plot_w * (fx(x) - x0) / (x1 - x0)
    py = lambda y: top + plot_h * (1 - (y - y0) / (y1 - y0))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
             f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)}</text>',
             f'<text x="12" y="{top + plot_h / 2}" transform="rotate(-90 12 {top + plot_h / 2})" '
             f'text-anchor="middle">{html.escape(y_label)}</text>']
    for tick in (0, 0.5, 1):
        xv, yv = x0 + tick * (x1 - x0), y0 + tick * (y1 - y0)
        label = f"{10 ** xv:.3g}" if log_x else f"{xv:.3g}"
        parts.append(f'<text x="{left + plot_w * tick:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{label}</text>'
                     f'<text x="{left - 4}" y="{top + plot_h * (1 - tick) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
    for s, (name, values) in enumerate(series.items()):
        colour = BAR_COLOURS[s % len(BAR_COLOURS)]
        if len(values) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in values)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for x, y in values:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"><title>'
                         f'{html.escape(name)}: ({x:.3g}, {y:.3g})</title></circle>')
        parts.append(f'<rect x="{left + plot_w + 10}" y="{top + 18 * s}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + plot_w + 24}" y="{top + 18 * s + 9}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
