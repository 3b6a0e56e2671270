"""The end of a run: its evaluations (``evaluate_run``), plots, ``report.md`` and ``report.html``.

``report.html`` is one self-contained page per run (plots and thumbnails inlined), next to ``report.md``. It shows
the headline numbers (and CLIP_benchmark's keys), every plot of the run (loss and logit-scale curves, zero-shot
confusion matrix, retrieval recall@k, similarity matrix, ...) and, for a few queries in each retrieval direction,
the top retrieved items with the correct ones marked. Items are drawn by a renderer chosen per modality
kind (``RENDERERS``: thumbnails for images, the text for captions); kinds without one fall back to a trace plot
when the decoded item holds a numeric array (audio waveforms, ECG leads) and to a short description otherwise.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import Config, load_config
from .data.pipeline import expand_urls, find_member
from .errors import ConfigError, DataError
from .eval.runner import (
    evaluate_captions, evaluate_diagnostics, evaluate_retrieval, evaluate_zeroshot, flat_results, merge_results,
)
from .plots import plot_run, plt
from .rundir import RUN_CONFIG, load_scored_model

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
TOP_K = 5
Renderer = Callable[[Any], str]
RENDERERS: dict[str, Renderer] = {}


def register_renderer(kind: str) -> Callable[[Renderer], Renderer]:
    """Register ``fn(decoded_item) -> HTML`` for a modality kind (the item as ``Modality.decode`` returns it)."""

    def add(fn: Renderer) -> Renderer:
        RENDERERS[kind] = fn
        return fn

    return add


def png_tag(data: bytes, alt: str, css: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


@register_renderer("image")
def render_image(image) -> str:
    thumb = image.copy()
    thumb.thumbnail((112, 112))
    if thumb.width < 64:  # tiny images (digits, glyphs): enlarge without blurring
        factor = max(1, 64 // thumb.width)
        thumb = thumb.resize((thumb.width * factor, thumb.height * factor), resample=0)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return png_tag(buf.getvalue(), "image", "thumb")


@register_renderer("text")
def render_text(captions) -> str:
    captions = [captions] if isinstance(captions, str) else list(captions)
    return "<br>".join(f'<span class="caption">{html.escape(c)}</span>' for c in captions)


def find_array(item: Any) -> np.ndarray | None:
    """The first numeric array (1-D signal or channels x time) in a decoded item, if any."""
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray) and item.dtype.kind in "fiu" and item.ndim in (1, 2) and item.size > 1:
        return item.astype(np.float32)
    if dataclasses.is_dataclass(item) and not isinstance(item, type):  # e.g. a time-series Signal(data, rate)
        item = vars(item)
    values = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else []
    for value in values:
        found = find_array(value)
        if found is not None:
            return found
    return None


def render_trace(signal: np.ndarray) -> str:
    """Stacked traces (at most 12 channels, each scaled to its own range): waveforms, ECG leads, sensor axes."""
    rows = signal[None] if signal.ndim == 1 else signal
    if rows.shape[0] > rows.shape[1]:  # time x channels
        rows = rows.T
    rows = rows[:12]
    fig, ax = plt.subplots(figsize=(2.4, 0.5 + 0.25 * len(rows)))
    for i, row in enumerate(rows):
        span = float(np.ptp(row)) or 1.0
        ax.plot((row - row.min()) / span * 0.9 - i, linewidth=0.6)
    ax.axis("off")
    fig.tight_layout(pad=0.1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return png_tag(buf.getvalue(), "trace", "trace")


def render_item(kind: str, item: Any) -> str:
    if kind in RENDERERS:
        return RENDERERS[kind](item)
    signal = find_array(item)
    if signal is not None:
        return render_trace(signal)
    return f"<code>{html.escape(repr(item)[:200])}</code>"


# ------------------------------------------------------------------------------------------------ examples


def read_items(data: str, modalities: dict, keys: set[str]) -> dict[str, dict[str, Any]]:
    """Decoded (untransformed) items of the samples named in ``keys``: ``{key: {modality name: item}}``."""
    import webdataset as wds

    found: dict[str, dict[str, Any]] = {}
    pipeline = wds.DataPipeline(wds.SimpleShardList(expand_urls(data)), wds.tarfile_to_samples())
    for sample in pipeline:
        if sample["__key__"] not in keys:
            continue
        items = {}
        for name, modality in modalities.items():
            member = find_member(sample, name, modality.extensions)
            if member is not None:
                try:
                    items[name] = modality.decode_member(sample, member)
                except DataError as e:  # shown as its key, as the evaluation skipped it
                    log.warning("report: cannot decode %s of sample %s: %s", name, sample["__key__"], e)
        found[sample["__key__"]] = items
        if len(found) == len(keys):
            break
    return found


def retrieval_examples(retrieval: dict, model, n_queries: int) -> list[dict]:
    """For ``n_queries`` queries per direction, spread over the eval set: the query and its top items."""
    q, g = retrieval["query_embeddings"], retrieval["gallery_embeddings"]
    keys, modality = retrieval["keys"], {"query": retrieval["query"], "gallery": retrieval["gallery"]}
    query, gallery = modality["query"], modality["gallery"]
    samples = {side: retrieval[f"{side}_samples"].tolist() for side in modality}  # each row's sample
    groups = {side: retrieval[f"{side}_groups"].tolist() for side in modality}  # equal groups: positives
    first = {side: {} for side in modality}  # the first row of each sample
    for side, rows in samples.items():
        for j, sample in enumerate(rows):
            first[side].setdefault(sample, j)

    def item(side: str, index: int) -> tuple[str, str, int]:
        """(modality, sample key, position among that sample's items of the modality) of a query/gallery row."""
        sample = samples[side][index]
        return modality[side], keys[sample], index - first[side][sample]

    def pair(side: str, index: int, hit: int) -> bool:
        return groups[side][index] == groups["gallery" if side == "query" else "query"][hit]

    sections = []
    for side, a_emb, b_emb, other in (("query", q, g, "gallery"), ("gallery", g, q, "query")):
        picks = np.unique(np.linspace(0, a_emb.shape[0] - 1, min(n_queries, a_emb.shape[0])).astype(int)).tolist()
        top = (a_emb[picks].float() @ b_emb.float().T).topk(min(TOP_K, b_emb.shape[0]), dim=1)
        rows = [{"query": item(side, i),
                 "hits": [(item(other, j), pair(side, i, j), s)
                          for j, s in zip(top.indices[r].tolist(), top.values[r].tolist())]}
                for r, i in enumerate(picks)]
        names = (query, gallery) if side == "query" else (gallery, query)
        sections.append({"title": f"{names[0]} \N{RIGHTWARDS ARROW} {names[1]}", "rows": rows})
    wanted = {key for s in sections for row in s["rows"] for key in [row["query"][1]] + [h[0][1] for h in row["hits"]]}
    items = read_items(retrieval["data"], {n: model.modalities[n] for n in (query, gallery)}, wanted)

    def cell(item: tuple) -> str:
        name, key, index = item
        value = items.get(key, {}).get(name)
        if value is None:
            return f"<code>{html.escape(str(key))}</code>"
        if isinstance(value, list):  # several items per sample (captions): the one that was ranked
            value = value[min(index, len(value) - 1)]
        return render_item(model.modalities[name].kind, value)

    for section in sections:
        section["html"] = [(cell(row["query"]), [(cell(item), ok, score) for item, ok, score in row["hits"]])
                           for row in section["rows"]]
    return sections


# ------------------------------------------------------------------------------------------------ page

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots figure { margin: 0; }
.plots img { max-width: 560px; border: 1px solid #eee; } figcaption { font-size: 0.85em; color: #666; }
.hit { border: 3px solid transparent; padding: 2px; } .hit.correct { border-color: #2a2; }
.score { font-size: 0.75em; color: #888; } .caption { font-size: 0.9em; } .thumb, .trace { display: block; }
"""
# The page checks itself: an image that failed to decode is reported on the console (tests read the console).
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var broken = Array.prototype.filter.call(document.images, function (im) {
    return !im.complete || im.naturalWidth === 0;
  });
  broken.forEach(function (im) { console.error("report: image failed to load: " + im.alt); });
  document.body.setAttribute("data-images", String(document.images.length - broken.length));
});
"""


def metrics_table(results: dict) -> str:
    rows = []
    for key, value in flat_results(results).items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))
        rows.append(f"<tr><th>{html.escape(key)}</th><td class='num'>{shown}</td></tr>")
    return "<table>" + "".join(rows) + "</table>" if rows else "<p>No evaluation configured.</p>"


def examples_html(sections: list[dict]) -> str:
    parts = []
    for section in sections:
        parts.append(f"<h3>{html.escape(section['title'])}</h3><table><tr><th>query</th>"
                     + "".join(f"<th>#{i + 1}</th>" for i in range(TOP_K)) + "</tr>")
        for query, hits in section["html"]:
            cells = "".join(f"<td><div class='hit{' correct' if ok else ''}'>{content}</div>"
                            f"<div class='score'>{score:.3f}{' &#10003;' if ok else ''}</div></td>"
                            for content, ok, score in hits)
            parts.append(f"<tr><td>{query}</td>{cells}</tr>")
        parts.append("</table>")
    return "".join(parts)


def write_html_report(run_dir: Path, results: dict, extras: dict, model, n_examples: int = 6) -> Path:
    """Write ``run_dir/report.html`` from the evaluation results, their extras and the run's PNG plots."""
    run_dir = Path(run_dir)
    figures = sorted(run_dir.glob("*.png"))
    plots = "".join(f"<figure>{png_tag(p.read_bytes(), p.stem)}<figcaption>{html.escape(p.stem.replace('_', ' '))}"
                    f"</figcaption></figure>" for p in figures)
    examples = ""
    if "_retrieval" in extras and n_examples > 0:
        examples = "<h2>Retrieval examples (top 5, correct items framed)</h2>" + examples_html(
            retrieval_examples(extras["_retrieval"], model, n_examples))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mmalign report: {html.escape(run_dir.name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>mmalign run report: {html.escape(str(run_dir))}</h1>
<p>Written {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}.
Modalities: {html.escape(", ".join(f"{n} ({model.modalities[n].kind}, {model.config.modalities[n].tower})"
                                   for n in model.modalities))}.</p>
<h2>Results</h2>{metrics_table(results)}
<h2>Plots</h2><div class="plots">{plots or "<p>No plots.</p>"}</div>
{examples}
<script>{CHECK_SCRIPT}</script>
</body></html>
"""
    path = run_dir / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path


def evaluate_run(cfg: Config, model, run_dir: Path, scored: dict | None = None) -> dict:
    """The recipe's evaluations at the end of training (or of ``mmalign report``), plus plots, report.md and
    report.html in the run directory; ``scored`` (``model``, ``model_step``) says which weights were evaluated."""
    results: dict[str, Any] = dict(scored or {})
    extras: dict[str, Any] = {}

    def absorb(what: str, out: dict) -> None:
        """One evaluation's output: skip counts as ``<what>_skipped``, ``_`` keys for the plots and the report."""
        if skipped := out.pop("skipped", None):
            results[f"{what}_skipped"] = skipped
        extras.update({k: v for k, v in out.items() if k.startswith("_")})
        merge_results(results, {k: v for k, v in out.items() if not k.startswith("_")})

    zs, rt, cap = cfg.eval.zeroshot, cfg.eval.retrieval, cfg.eval.caption
    if zs.data and zs.classes:
        absorb("zeroshot", evaluate_zeroshot(model, zs.data, zs.classes, zs.templates, zs.query, zs.text,
                                             cfg.eval.batch_size))
    if rt.data:
        absorb("retrieval", evaluate_retrieval(model, rt.data, rt.query, rt.gallery, cfg.eval.batch_size,
                                               positives=rt.positives))
    if cap.data:
        out = evaluate_captions(model, cap.data, run_dir / cap.out, cap, cfg.eval.batch_size)
        out["_captions"] = out.pop("_examples")
        absorb("caption", out)
    diagnostics_data = cfg.eval.diagnostics.data or rt.data or zs.data
    if diagnostics_data is None:
        log.info("no eval data: embedding diagnostics on the first training samples (seen in training)")
    try:
        absorb("diagnostics", evaluate_diagnostics(model, diagnostics_data or cfg.data.train, cfg.eval.batch_size,
                                                   cfg.eval.diagnostics.max_samples))
    except DataError as e:  # e.g. eval data without every modality of the model: the run itself stands
        log.warning("no embedding diagnostics: %s", e)
    plot_run(run_dir, results, extras)
    write_html_report(run_dir, results, extras, model, cfg.eval.report_examples)
    return results


def report_run(run_dir: Path, n_examples: int | None = None) -> dict:
    """``mmalign report RUN``: evaluate the run's model on its recipe's eval data again and write the reports
    (``n_examples`` queries per direction; default: the recipe's ``eval.report_examples``)."""
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {RUN_CONFIG})")
    saved = json.loads((run_dir / RUN_CONFIG).read_text())
    cfg = load_config(None, [f"eval.report_examples={n_examples}"] if n_examples is not None else [], base=saved)
    model, scored = load_scored_model(run_dir)
    results = evaluate_run(cfg, model, run_dir, scored)
    return {**results, "report": str(run_dir / REPORT_NAME), "report_md": str(run_dir / "report.md")}
