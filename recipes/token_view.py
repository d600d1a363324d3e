"""A per-token routing view: prompts as tokens coloured by their top-1 expert at a chosen MoE layer.

    html = token_view(trace, tokenizer)          # a self-contained <div> (inline JS, no network)
    Path("view.html").write_text(page(html))     # or let the main job put it in report.html

A selector shows every MoE layer as one row of the prompt (the default) or one layer; hovering a token shows its top-k experts and gate weights at
every MoE layer. The routing is embedded as JSON in the fragment, so the view works offline and from a
saved report. After rendering, the container carries ``data-token-view-rendered="<number of tokens>"``
(for headless checks).
"""

from __future__ import annotations

import html as html_lib
import itertools
import json
from typing import Any

__all__ = ["page", "token_view", "view_data"]

_ids = itertools.count()


def view_data(trace: Any, tokenizer: Any = None, *, max_prompts: int = 12) -> dict:
    """The JSON the view embeds: ``{"layers", "n_experts", "prompts": [[{"t": text, "r": [[[e, w], ...] per
    layer]}, ...] per prompt]}`` for the first ``max_prompts`` prompts of ``trace``."""
    prompts: dict[int, list] = {}
    for n in range(trace.n_tokens):
        p = int(trace.prompt[n])
        if p not in prompts and len(prompts) >= max_prompts:
            continue
        token = int(trace.tokens[n])
        text = tokenizer.decode([token]) if tokenizer is not None else str(token)
        order = trace.weights[:, n].argsort(-1, descending=True)
        routing = [[[int(trace.indices[l, n, s]), round(float(trace.weights[l, n, s]), 4)] for s in order[l].tolist()]
                   for l in range(len(trace.layers))]
        prompts.setdefault(p, []).append({"t": text, "r": routing})
    return {"layers": list(trace.layers), "n_experts": int(trace.n_experts), "prompts": list(prompts.values())}


def token_view(trace: Any, tokenizer: Any = None, *, max_prompts: int = 12) -> str:
    """The view as one HTML fragment (a ``<div>`` with its data and script); see the module docstring."""
    uid = f"tokview{next(_ids)}"
    data = json.dumps(view_data(trace, tokenizer, max_prompts=max_prompts)).replace("</", "<\\/")
    options = "<option value='all'>every MoE layer (one row each)</option>" + "".join(
        f"<option value='{i}'>MoE layer {layer}</option>" for i, layer in enumerate(trace.layers))
    return _FRAGMENT.replace("UID", uid).replace("OPTIONS", options).replace("DATA", data)


def page(fragment: str, title: str = "nnsight-moe routing view") -> str:
    """A standalone HTML page around :func:`token_view`'s fragment."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html_lib.escape(title)}</title>"
            f"</head><body>{fragment}</body></html>")


_FRAGMENT = """<div id="UID" class="token-view" style="font-family: ui-monospace, monospace; font-size: .9em;">
<label>colour tokens by their top-1 expert at <select>OPTIONS</select></label>
<span class="legend" style="margin-left: 1em;"></span>
<div class="rows" style="margin-top: .5em; line-height: 2em;"></div>
<script type="application/json" class="data">DATA</script>
<script>
(function () {
  var root = document.getElementById("UID");
  var data = JSON.parse(root.querySelector("script.data").textContent);
  var select = root.querySelector("select"), rows = root.querySelector(".rows"), legend = root.querySelector(".legend");
  var palette = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
                 "#c7c7c7", "#6baed6", "#fd8d3c", "#74c476", "#e377c2", "#bcbd22", "#17becf", "#9467bd", "#e7ba52",
                 "#ad494a", "#a55194"];  // tab20-like, for up to 20 experts; hues spread evenly beyond
  function colour(e) {
    return data.n_experts <= palette.length ? palette[e] : "hsl(" + Math.round(360 * e / data.n_experts) + ", 70%, 78%)";
  }
  function tip(tok) {
    return tok.r.map(function (slots, l) {
      return "layer " + data.layers[l] + ": " + slots.map(function (s) { return "E" + s[0] + " " + s[1].toFixed(3); }).join(", ");
    }).join("\\n");
  }
  function token(tok, layer) {
    var span = document.createElement("span");
    var top = tok.r[layer][0][0];
    span.textContent = tok.t;
    span.title = tip(tok);
    span.setAttribute("data-expert", top);
    span.setAttribute("data-layer", data.layers[layer]);
    span.style.background = colour(top);
    span.style.padding = "2px 3px"; span.style.marginRight = "2px"; span.style.borderRadius = "3px";
    span.style.whiteSpace = "pre";
    return span;
  }
  function draw() {
    var all = select.value === "all", count = 0;
    var shown = all ? data.layers.map(function (_, l) { return l; }) : [Number(select.value)];
    rows.textContent = "";
    data.prompts.forEach(function (prompt) {
      var block = document.createElement("div");
      block.style.marginBottom = all ? ".8em" : "0";
      shown.forEach(function (layer) {
        var line = document.createElement("div");
        if (all) {
          var name = document.createElement("span");
          name.textContent = "L" + data.layers[layer] + " ";
          name.style.display = "inline-block"; name.style.width = "3.5em"; name.style.color = "#777";
          line.appendChild(name);
        }
        prompt.forEach(function (tok) { line.appendChild(token(tok, layer)); if (layer === shown[0]) count += 1; });
        block.appendChild(line);
      });
      rows.appendChild(block);
    });
    legend.textContent = "";
    for (var e = 0; e < Math.min(data.n_experts, 64); e++) {
      var key = document.createElement("span");
      key.textContent = "E" + e; key.style.background = colour(e); key.style.padding = "0 4px"; key.style.marginRight = "2px";
      legend.appendChild(key);
    }
    root.setAttribute("data-token-view-rendered", String(count));
  }
  select.addEventListener("change", draw);
  draw();
})();
</script>
</div>"""
