"""results.json and a self-contained report.html for the main job.

A job is a list of :class:`Section` objects (title, short text, tables, matplotlib figures, JSON
data). :func:`write` saves ``results.json`` (schema below, checked by :func:`validate`), one PNG per
figure, and ``report.html`` with every figure inlined as a base64 PNG (it opens offline, alone).

results.json (``"schema": "nnsight-moe/results/v1"``)::

    {"schema": str, "created": ISO time, "runtime_s": float,
     "model": {"name", "family", "model_type", "n_layers", "moe_layers", "n_experts", "top_k", "has_shared"},
     "data": {"source", "n_facts", "relations": [{"name", "n_facts", "n_skipped"}],
              "skipped": [{"relation", "subject", "object", "reason"}]},
     "sections": {name: {"title": str, ...section data...}},
     "plots": [{"section", "name", "file", "title"}]}

It is strict JSON (RFC 8259; ``json.loads(text, parse_constant=...)`` never sees ``NaN`` or
``Infinity``): a value that is undefined (a statistic over nothing, e.g. ``recovered_pct`` when
suppressing heads did not lower the MRR, or a correlation of a constant column) is written as
``null``, and so are infinities. Averages over seeds say how many seeds were defined (``n``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnsight_moe.files import atomic_write

__all__ = ["SCHEMA", "Section", "json_value", "validate", "write"]

SCHEMA = "nnsight-moe/results/v1"

_REQUIRED = {
    "schema": str,
    "created": str,
    "runtime_s": (int, float),
    "model": dict,
    "data": dict,
    "sections": dict,
    "plots": list,
}
_MODEL_KEYS = ("name", "family", "model_type", "n_layers", "moe_layers", "n_experts", "top_k", "has_shared")
_DATA_KEYS = ("source", "n_facts", "relations", "skipped")


@dataclass
class Section:
    """One part of the report: ``data`` goes to results.json, tables and figures to report.html."""

    name: str
    title: str
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)  # caption -> pandas DataFrame
    figures: dict[str, Any] = field(default_factory=dict)  # name -> (title, matplotlib Figure)
    html: dict[str, str] = field(default_factory=dict)  # name -> self-contained HTML fragment (inline JS, no network)


def validate(results: dict) -> None:
    """Raise ``ValueError`` naming the first missing or mistyped key of a results.json dict."""
    for key, kind in _REQUIRED.items():
        if key not in results:
            raise ValueError(f"results.json: missing key {key!r}")
        if not isinstance(results[key], kind):
            raise ValueError(f"results.json: {key!r} must be {kind}, got {type(results[key]).__name__}")
    if results["schema"] != SCHEMA:
        raise ValueError(f"results.json: schema must be {SCHEMA!r}, got {results['schema']!r}")
    for key in _MODEL_KEYS:
        if key not in results["model"]:
            raise ValueError(f"results.json: model is missing {key!r}")
    for key in _DATA_KEYS:
        if key not in results["data"]:
            raise ValueError(f"results.json: data is missing {key!r}")
    for name, section in results["sections"].items():
        if not isinstance(section, dict) or "title" not in section:
            raise ValueError(f"results.json: section {name!r} must be an object with a 'title'")
    for plot in results["plots"]:
        for key in ("section", "name", "file", "title"):
            if key not in plot:
                raise ValueError(f"results.json: a plot entry is missing {key!r}: {plot}")
        if plot["section"] not in results["sections"]:
            raise ValueError(f"results.json: plot {plot['name']!r} names unknown section {plot['section']!r}")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def render_table(frame: Any) -> str:
    """A table's report HTML: a pandas DataFrame rendered, or HTML already rendered (a resumed section)."""
    if isinstance(frame, str):
        return frame
    return frame.to_html(float_format=lambda v: f"{v:.4g}", border=0, classes="table")


def render_figure(figure: Any) -> bytes:
    """A figure's PNG bytes: a matplotlib figure rendered, or PNG bytes already rendered (a resumed section)."""
    return figure if isinstance(figure, bytes) else _png(figure)


def write(out: Path, header: dict[str, Any], sections: list[Section], started: float) -> dict:
    """Write results.json, the PNGs and report.html into ``out``; returns the results dict.

    Each file is written atomically (:func:`nnsight_moe.files.atomic_write`): a failure mid-write (a
    full disk) raises an ``OSError`` naming the file and leaves the previous run's file intact.
    """
    import matplotlib.pyplot as plt

    out = Path(out)
    stale = _previous_plots(out)
    results = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **header}
    results["sections"] = {s.name: {"title": s.title, **s.data} for s in sections}
    results["plots"] = []
    body = []
    for section in sections:
        body.append(f"<section id='{html.escape(section.name)}'><h2>{html.escape(section.title)}</h2>")
        if section.text:
            body.append(f"<p>{html.escape(section.text)}</p>")
        for caption, frame in section.tables.items():
            body.append(f"<h3>{html.escape(caption)}</h3>")
            body.append(render_table(frame))
        for name, (title, figure) in section.figures.items():
            data = render_figure(figure)
            if not isinstance(figure, bytes):
                plt.close(figure)
            file = f"{section.name}_{name}.png"
            atomic_write(out / file, data)
            results["plots"].append({"section": section.name, "name": name, "file": file, "title": title})
            encoded = base64.b64encode(data).decode()
            body.append(
                f"<figure><img id='plot-{html.escape(section.name)}-{html.escape(name)}' "
                f"alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>"
                f"<figcaption>{html.escape(title)}</figcaption></figure>"
            )
        body.extend(section.html.values())
        body.append("</section>")
    results["runtime_s"] = round(time.time() - started, 2)
    for file in stale - {plot["file"] for plot in results["plots"]}:  # plots of an earlier run into this --out
        (out / file).unlink(missing_ok=True)
    validate(results)
    atomic_write(out / "results.json", json.dumps(json_value(results), indent=2, allow_nan=False))
    model = results["model"]
    page = _PAGE.format(
        title=html.escape(f"nnsight-moe report: {model['name']}"),
        summary=html.escape(
            f"{model['name']} ({model['family']}), {model['n_layers']} layers, MoE layers {model['moe_layers']}, "
            f"E={model['n_experts']}, k={model['top_k']}, shared experts: {model['has_shared']}; "
            f"{results['data']['n_facts']} facts from {results['data']['source']}; "
            f"{len(results['data']['skipped'])} skipped; {results['runtime_s']} s."
        ),
        body="\n".join(body),
    )
    atomic_write(out / "report.html", page)
    return results


def _previous_plots(out: Path) -> set[str]:
    """PNG files an earlier results.json in ``out`` lists (plain names inside ``out`` only)."""
    try:
        previous = json.loads((out / "results.json").read_text())
        files = {plot["file"] for plot in previous.get("plots", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str) and f.endswith(".png") and Path(f).name == f}


def json_value(value: Any) -> Any:
    """``value`` as plain JSON data: NaN and ±inf become None (``null``), numpy / torch values Python ones.

    Dicts (keys as strings), lists and tuples are converted recursively; anything else that is not
    JSON data raises a TypeError naming its type.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_value(value.tolist())
    if hasattr(value, "item"):
        return json_value(value.item())
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }}
table.table {{ border-collapse: collapse; font-size: .9em; margin: .5em 0 1.5em; }}
table.table td, table.table th {{ padding: .25em .6em; border-bottom: 1px solid #eee; text-align: right; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: .9em; }}
</style></head>
<body><h1>{title}</h1><p>{summary}</p>
{body}
<script>
// Marks how many plots decoded with a size, for headless checks (data-plots-rendered on <body>).
window.addEventListener("load", function () {{
  var ok = Array.prototype.filter.call(document.images, function (img) {{ return img.naturalWidth > 0; }});
  document.body.setAttribute("data-plots-rendered", String(ok.length));
}});
</script>
</body></html>
"""
