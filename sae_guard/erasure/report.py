"""Writing a suite's results: metrics.json, report.html (table, SVG bar charts, image grids), grid PNGs.

Everything is written into a temporary folder beside the output and renamed into place at the end, so a
failed run leaves either the previous report or none, never half of one. Plots are inline SVG and grids PNG
(PIL): no plotting library is needed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..analysis.charts import bar_chart
from .suite import SuiteResult

GRID_COLUMNS = 12
GRID_SCALE = 3  # 32 px images shown at 96 px


def grid(images: Sequence[np.ndarray], columns: int = GRID_COLUMNS, scale: int = GRID_SCALE,
         gap: int = 2) -> Image.Image:
    """Float (H, W, 3) images in [0, 1] tiled row by row on a white sheet, each enlarged `scale` times."""
    if not len(images):
        return Image.new("RGB", (1, 1), "white")
    height, width = images[0].shape[:2]
    cell_h, cell_w = height * scale + gap, width * scale + gap
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (min(columns, len(images)) * cell_w + gap, rows * cell_h + gap), "white")
    for i, image in enumerate(images):
        tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        tile = tile.resize((width * scale, height * scale), Image.Resampling.NEAREST)
        sheet.paste(tile, (gap + (i % columns) * cell_w, gap + (i // columns) * cell_h))
    return sheet


def _png_data(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _table_html(metrics: Mapping[str, Any], groups: Sequence[str]) -> str:
    columns = ("present", "kept", "flagged", "identical")
    head = "".join(f'<th colspan="{len(columns)}">{html.escape(g)}</th>' for g in groups)
    sub = "".join(f"<th>{c}</th>" for _ in groups for c in columns)
    rows = []
    for method, per_group in metrics.items():
        cells = "".join(
            f"<td>{'&ndash;' if per_group[g][c] is None else f'{100 * per_group[g][c]:.0f}%'}</td>"
            for g in groups for c in columns)
        rows.append(f"<tr><th>{html.escape(method)}</th>{cells}</tr>")
    return (f"<table><tr><th rowspan=2>method</th>{head}</tr><tr>{sub}</tr>{''.join(rows)}</table>")


def write_report(out: str | Path, result: SuiteResult, title: str, facts: Mapping[str, Any],
                 sections: Sequence[str] = ()) -> Path:
    """Write metrics.json, report.html and grid_<group>_<method>.png into `out` (replaced atomically).

    facts: extra JSON-able figures stored beside the metrics (and listed in the report); sections: extra HTML.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        metrics = result.metrics()
        groups = result.groups
        payload = {"facts": dict(facts), "metrics": metrics,
                   "prompts": [{"text": p.text, "group": p.group, "seed": s} for p, s in zip(result.prompts,
                                                                                              result.seeds)],
                   "per_image": {run.name: {"flagged": [bool(f) for f in run.generation.flagged], "rows": run.rows}
                                 for run in result.runs}}
        (staging / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
        body = [f"<h1>{html.escape(title)}</h1>",
                "<ul>" + "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>"
                                 for k, v in facts.items()) + "</ul>",
                "<h2>Figures</h2>", _table_html(metrics, groups),
                "<p>present: the scorer finds the erased concept; kept: the prompt's other attributes are drawn; "
                "flagged: the method acted on the prompt; identical: bit-identical to the unguarded image.</p>",
                "<div>" + bar_chart("concept present", {m: {g: v[g]["present"] for g in groups}
                                                        for m, v in metrics.items()})
                + bar_chart("other attributes kept", {m: {g: v[g]["kept"] for g in groups}
                                                      for m, v in metrics.items()}) + "</div>",
                *sections]
        for group in groups:
            index = result.indices(group)
            body.append(f"<h2>Images: {html.escape(group)} prompts</h2>")
            body.append("<p>" + "; ".join(html.escape(result.prompts[i].text) for i in index[:GRID_COLUMNS])
                        + (" ..." if len(index) > GRID_COLUMNS else "") + "</p>")
            for run in result.runs:
                sheet = grid([run.generation.images[i] for i in index])
                filename = f"grid_{group}_{_slug(run.name)}.png"
                sheet.save(staging / filename)
                body.append(f"<h3>{html.escape(run.name)}</h3><img alt='{html.escape(run.name)} {group}' "
                            f"src='{_png_data(sheet)}'>")
        style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{image-rendering:pixelated}")
        (staging / "report.html").write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n", encoding="utf-8")
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def _replace(staging: Path, out: Path) -> None:
    """Move `staging` to `out`; an existing `out` is moved aside first and removed only once the new one is in."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    old = None
    if out.exists():
        old = out.parent / f".{out.name}-old-{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
