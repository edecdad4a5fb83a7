"""A self-contained HTML report of one run, for a compliance reviewer.

One page: what was generated and by which model, every metric against the held-out real
test split (factory.evaluate), the distribution-gate checks, why attempts were rejected,
and plots (real vs synthetic per column, Spearman correlation heat-maps, rejection
reasons) embedded as PNG, so the file can be mailed or archived as is. The metrics are
also written as JSON beside it.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import numpy as np
import polars as pl

from factory import evaluate as ev
from schemas.columns import Numeric

MAX_CATEGORIES = 15  # bars per categorical plot; the rest are summed as "other"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _column_plot(col, real: pl.Series, synth: pl.Series) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 2.4))
    if isinstance(col, Numeric):
        r, s = real.drop_nulls().to_numpy().astype(float), synth.drop_nulls().to_numpy().astype(float)
        both = np.concatenate([r, s]) if len(s) else r
        lo, hi = np.quantile(both, [0.01, 0.99]) if len(both) else (0, 1)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
        ax.hist(np.clip(r, lo, hi), bins=bins, density=True, alpha=0.55, label="real test")
        ax.hist(np.clip(s, lo, hi), bins=bins, density=True, alpha=0.55, label="synthetic")
    else:
        rs = real.cast(pl.String).fill_null("null").value_counts(normalize=True, name="share")
        ss = synth.cast(pl.String).fill_null("null").value_counts(normalize=True, name="share")
        cats = rs.sort("share", descending=True)[real.name].head(MAX_CATEGORIES).to_list()
        get = lambda f, c: float(f.filter(pl.col(real.name) == c)["share"].sum())  # noqa: E731
        x = np.arange(len(cats))
        ax.bar(x - 0.2, [get(rs, c) for c in cats], 0.4, label="real test")
        ax.bar(x + 0.2, [get(ss, c) for c in cats], 0.4, label="synthetic")
        ax.set_xticks(x, cats, rotation=60, fontsize=6, ha="right")
    ax.set_title(col.name, fontsize=9)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)
    return _png(fig)


def _spearman(frame: pl.DataFrame, names: list[str]) -> np.ndarray:
    ranks = frame.select([pl.col(n).cast(pl.Float64).rank("average") for n in names]).to_numpy()
    ranks = np.where(np.isnan(ranks), np.nanmean(ranks, axis=0), ranks)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(ranks, rowvar=False)
    return np.nan_to_num(c)


def _heatmaps(spec, real: pl.DataFrame, synth: pl.DataFrame) -> str:
    import matplotlib.pyplot as plt

    names = [c.name for c in spec.columns if isinstance(c, Numeric)]
    cr, cs = _spearman(real, names), _spearman(synth, names)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    fig.subplots_adjust(wspace=0.55)
    for ax, m, title, cmap, lim in ((axes[0], cr, "real test", "coolwarm", 1), (axes[1], cs, "synthetic", "coolwarm", 1),
                                    (axes[2], cs - cr, "synthetic - real", "PiYG", 0.5)):
        im = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_title(f"Spearman correlation: {title}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def _rejection_plot(counts: pl.DataFrame) -> str:
    import matplotlib.pyplot as plt

    top = counts.head(15)
    fig, ax = plt.subplots(figsize=(7, 0.3 * max(3, top.height) + 0.8))
    labels = [f"{s}/{r}" for s, r in zip(top["stage"], top["rule"])]
    ax.barh(labels[::-1], top["attempts"].to_list()[::-1])
    ax.set_xlabel("rejected attempts", fontsize=8)
    ax.tick_params(labelsize=7)
    return _png(fig)


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def build_report(store, domain, run_id: str, synth: pl.DataFrame, out_dir: Path) -> Path:
    """Write out_dir/report.html and out_dir/metrics.json for a stored run; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    run = store.run(run_id)
    train, test = domain.load_split("train"), domain.load_split("test")
    metrics = {"run_id": run_id, "model": f"{run['model_id']} {run['model_version']}",
               **ev.evaluate(domain, synth, train, test)}
    counts = store.rejection_counts(run_id)
    checks = store.frame("SELECT check_name, column_names, statistic, threshold, status, detail FROM checks "
                         "WHERE run_id = ? ORDER BY status = 'passed', check_name", [run_id])
    q, m, p, r = metrics["quality"], metrics["mle"], metrics["privacy"], metrics["rule_validity"]
    summary = [
        {"measure": "records exported", "value": f"{synth.height:,} of {run['requested_n']:,} requested"},
        {"measure": "attempts / rejected / surplus", "value": f"{run['attempted']:,} / {run['rejected']:,} / {run['surplus']:,}"},
        {"measure": "records passing every rule", "value": f"{r['valid_rate']:.2%}"},
        {"measure": "distribution gate", "value": str(run.get("gate"))},
        {"measure": "SDMetrics column shapes / pair trends", "value": f"{q['column_shapes']:.3f} / {q['column_pair_trends']:.3f}"},
        *([{"measure": f"MLE ratio {k}", "value": f"{v:.3f}"} for k, v in m["ratio"].items() if v is not None] if m else []),
        {"measure": "exact copies of training rows", "value": f"{p['exact_copies']:,}"},
        {"measure": "DCR median: synthetic / real test", "value": f"{p['dcr']['median']:.4f} / {p['dcr_reference']['median']:.4f}"},
    ]
    real_all = test.select(domain.spec.names)
    columns_html = "".join(_column_plot(c, real_all[c.name], synth[c.name]) for c in domain.spec.columns)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>factory report {html.escape(run_id)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1400px}} table{{border-collapse:collapse;margin:8px 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}} img{{margin:4px}}
.failed{{color:#b00}}</style></head><body>
<h1>Run {html.escape(run_id)}</h1>
<p>Domain <b>{html.escape(domain.name)}</b> (rule set {html.escape(run['rule_set_hash'])}), model
<b>{html.escape(metrics['model'])}</b>, seed {run['seed']}, status {html.escape(run['status'])},
started {html.escape(str(run['started_at']))} UTC. Reference: the domain's held-out real test split
({test.height:,} rows), never used for training. Metrics as JSON: <code>metrics.json</code>.</p>
<h2>Summary</h2>{_table(summary, ["measure", "value"])}
<h2>Distribution gate ({checks.height} checks; failed first)</h2>
{_table(checks.to_dicts(), checks.columns) if checks.height else "<p>no checks recorded (gate off or skipped)</p>"}
<h2>Why attempts were rejected</h2>
{_rejection_plot(counts) if counts.height else "<p>no rejections</p>"}
{_table(counts.to_dicts(), ["stage", "rule", "attempts", "message"]) if counts.height else ""}
<h2>Real vs synthetic, per column</h2>{columns_html}
<h2>Pairwise relations</h2>{_heatmaps(domain.spec, real_all, synth)}
</body></html>"""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("metrics.json", json.dumps(metrics, indent=1, default=str)), ("report.html", page)):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    return out_dir / "report.html"
