"""A self-contained HTML report of one run, for a compliance reviewer.

One page: what was generated and by which model, every metric against the held-out real
test split (factory.evaluate), the distribution-gate checks, why attempts were rejected,
and plots (real vs synthetic per column, Spearman correlation heat-maps, rejection
reasons) embedded as PNG, so the file can be mailed or archived as is. The metrics are
also written as JSON beside it.

With `compare` (a JSON written by benchmarks/peers.py), the page also puts the run side by
side with other generators scored by the same `factory.evaluate` functions, and flags every
peer whose numbers were not computed the same way (different split, rule set, metric code,
settings or number of rows) or whose real references differ from the run's.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
from pathlib import Path

import numpy as np
import polars as pl

from factory import evaluate as ev
from factory.inputs import InputError
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


COMPARE_HINT = "factory report RUN_ID --compare reports/benchmarks/peers.json"
# Bars of the comparison chart: (label, key of _scores); the MLE bars follow the domain's tasks.
CHART_SCORES = (("pass every rule", "valid_rate"), ("column shapes", "column_shapes"),
                ("pair trends", "column_pair_trends"))
MLE_CHART_METRIC = {"regression": ("r2", "R²"), "classification": ("accuracy", "accuracy")}


def chart_scores(domain) -> tuple:
    """CHART_SCORES plus one bar per MLE task of the domain (its R² or accuracy ratio)."""
    from factory.evaluate import mle_tasks

    try:
        tasks = mle_tasks(domain)
    except KeyError:
        tasks = ()
    return CHART_SCORES + tuple((f"MLE ratio {t.name} {MLE_CHART_METRIC[t.kind][1]}",
                                 f"mle.{t.name}.{MLE_CHART_METRIC[t.kind][0]}") for t in tasks)


def load_peers(path: Path, domain: str) -> dict:
    """A peers JSON as written by benchmarks/peers.py: {"header": {...}, "real_mle": {...},
    "results": {candidate: factory.evaluate output + "note"}}, all of `domain`, plus its file name and sha256."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except FileNotFoundError:
        raise InputError(f"--compare {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise InputError(f"--compare {path}: cannot read it as JSON ({e})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not results or not all(
            isinstance(r, dict) and {"domain", "n_rows", "rule_validity", "privacy"} <= set(r) for r in results.values()):
        raise InputError(f"--compare {path}: not a peers file (expected \"results\": {{candidate: metrics}} "
                         "as written by benchmarks/peers.py)")
    wrong = sorted({r["domain"] for r in results.values()} - {domain})
    if wrong:
        raise InputError(f"--compare {path}: candidates of domain {', '.join(map(str, wrong))}; the run is {domain}")
    header = data.get("header") or {}
    data["source"] = {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest()[:16], "date": header.get("date"),
                      "git_commit": header.get("git_commit"), "git_commit_at_end": header.get("git_commit_at_end"),
                      "command": header.get("command"), "config": header.get("config")}
    return data


def _scores(m: dict) -> dict:
    """The side-by-side numbers of one factory.evaluate result (None where not defined)."""
    q, mle = m.get("quality") or {}, m.get("mle") or {}
    return {"n_rows": m["n_rows"], "valid_rate": m["rule_validity"].get("valid_rate"),
            "column_shapes": q.get("column_shapes"), "column_pair_trends": q.get("column_pair_trends"),
            **{f"mle.{k}": v for k, v in (mle.get("ratio") or {}).items()},
            "exact_copies": m["privacy"].get("exact_copies"), "dcr_median": m["privacy"]["dcr"].get("median")}


def _same(a, b) -> bool:
    """Equal JSON values, floats to 1e-9 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-12)
    return a == b


def _differences(run: dict, peer: dict, quick: bool) -> list[str]:
    """Why a peer's numbers are not computed exactly like the run's (empty: same setup, same rows)."""
    out = ["QUICK smoke run, not a result"] if quick else []
    rs, ps = run.get("setup"), peer.get("setup")
    if ps is None:
        out.append("no setup recorded: split, rule set and metric code unverified")
    elif rs is not None:
        for split in ("test", "train"):
            if not _same(ps.get(split), rs.get(split)):
                p, r = ps.get(split) or {}, rs.get(split) or {}
                out.append(f"different {split} split ({p.get('rows')} rows, sha256 {p.get('sha256')}; "
                           f"run: {r.get('rows')} rows, sha256 {r.get('sha256')})")
        if ps.get("rule_set_hash") != rs.get("rule_set_hash"):
            out.append(f"different rule set ({ps.get('rule_set_hash')}; run: {rs.get('rule_set_hash')})")
        if ps.get("metric_code_sha256") != rs.get("metric_code_sha256"):
            out.append(f"different metric code (factory/evaluate.py sha256 {ps.get('metric_code_sha256')}; "
                       f"run: {rs.get('metric_code_sha256')})")
        for k in ("n_estimators", "seed", "quality_max_rows"):
            if ps.get(k) != rs.get(k):
                out.append(f"{k} {ps.get(k)} (run: {rs.get(k)})")
    if peer["n_rows"] != run["n_rows"]:
        out.append(f"{peer['n_rows']:,} rows (run: {run['n_rows']:,})")
    # The real references must come out identical if the setup is the same; checked even without a setup.
    if not _same(peer["privacy"].get("dcr_reference"), run["privacy"].get("dcr_reference")):
        out.append("DCR of the real test split differs from the run's")
    if peer.get("mle") and run.get("mle") and not _same(peer["mle"].get("real_train"), run["mle"].get("real_train")):
        out.append("real-train MLE reference differs from the run's")
    if peer.get("quality") and run.get("quality"):
        if peer["quality"].get("n_real") != run["quality"].get("n_real"):
            out.append(f"quality scored against {peer['quality'].get('n_real')} real rows "
                       f"(run: {run['quality'].get('n_real')})")
        if peer["quality"].get("subsampled") != run["quality"].get("subsampled"):
            out.append("quality subsampled differently")
    return out


def comparison(metrics: dict, peers: dict, run_note: str = "") -> dict:
    """The run and every peer (from `load_peers`), side by side: scores, where each number comes
    from, and the differences in how it was computed."""
    quick = bool((peers["source"].get("config") or {}).get("quick"))
    src = peers["source"]
    peer_src = f"{Path(src['file']).name}, {src.get('date') or 'undated'}, commit {(src.get('git_commit') or '?')[:10]}"
    rows = [{"candidate": f"this run: {metrics['model']}", "source": "factory.evaluate, this report",
             "note": run_note or f"run {metrics['run_id']}", "scores": _scores(metrics), "differences": []}]
    rows += [{"candidate": name, "source": peer_src, "note": r.get("note", ""), "scores": _scores(r),
              "differences": _differences(metrics, r, quick)} for name, r in peers["results"].items()]
    return {"included": True, "source": src, "candidates": rows}


def fmt_number(v, digits: int = 3) -> str:
    """A table cell: "—" for a missing value, thousands separators for counts, `digits` decimals else."""
    if v is None:
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}"


def _comparison_html(comp: dict, bars: tuple = CHART_SCORES) -> str:
    src = comp["source"]
    mle_keys = list(dict.fromkeys(k for c in comp["candidates"] for k in c["scores"] if k.startswith("mle.")))
    head = ["candidate", "numbers from", "rows", "pass every rule", "column shapes", "pair trends",
            *[f"MLE ratio {k[4:]}" for k in mle_keys], "exact copies", "DCR median", "computed like this run?"]
    body = []
    for c in comp["candidates"]:
        s = c["scores"]
        cells = [c["candidate"], c["source"], fmt_number(s["n_rows"]), fmt_number(s["valid_rate"]), fmt_number(s["column_shapes"]),
                 fmt_number(s["column_pair_trends"]), *[fmt_number(s.get(k)) for k in mle_keys], fmt_number(s["exact_copies"]),
                 fmt_number(s["dcr_median"], 4)]
        same = "yes" if not c["differences"] else "; ".join(c["differences"])
        cls = "" if not c["differences"] else ' class="differs"'
        body.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells)
                    + f"<td{cls}>{html.escape(same)}</td></tr>")
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(body)
             + "</table>")
    notes = "".join(f"<li><b>{html.escape(c['candidate'])}</b>: {html.escape(c['note'])}</li>"
                    for c in comp["candidates"])
    commit = html.escape(str(src.get("git_commit")))
    if src.get("git_commit_at_end"):
        commit += f" (at the end of that run: {html.escape(str(src['git_commit_at_end']))})"
    return f"""<p>Every number comes from the same <code>factory.evaluate</code> functions against the same
held-out real test split: this run's are computed for this report, the peers' were computed by
<code>benchmarks/peers.py</code> and read from <code>{html.escape(src['file'])}</code>
(sha256 {html.escape(src['sha256'])}, written {html.escape(str(src.get('date')))}, commit {commit}, command
<code>{html.escape(str(src.get('command')))}</code>). The last column says whether a peer's numbers were computed
exactly like this run's: same splits, rule set, metric code and settings (<code>factory.evaluate.setup</code>),
the same number of rows, and identical real references (real-train MLE scores, DCR of the real test split).
Anything else is named there. MLE ratio = XGBoost score on the real test split when trained on the
candidate / when trained on the real train split; DCR = distance to the closest training row.</p>
{table}<ul style="font-size:12px">{notes}</ul>{_comparison_plot(comp, bars)}"""


def _comparison_plot(comp: dict, bars: tuple = CHART_SCORES) -> str:
    import matplotlib.pyplot as plt

    names = [c["candidate"] for c in comp["candidates"]][::-1]
    fig, axes = plt.subplots(1, len(bars), figsize=(3.2 * len(bars), 0.3 * len(names) + 1.2),
                             sharey=True)
    for ax, (label, key) in zip(axes, bars):
        vals = [c["scores"].get(key) for c in comp["candidates"]][::-1]
        colors = ["#d62728" if n.startswith("this run") else "#999999" if n.startswith("real_") else "#1f77b4"
                  for n in names]  # the run red, real-data references grey, generators blue
        ax.barh(range(len(names)), [0 if v is None else v for v in vals], color=colors)
        for i, v in enumerate(vals):
            ax.text(0 if v is None else max(v, 0), i, " n/a" if v is None else f" {v:.2f}", va="center", fontsize=6)
        ax.axvline(0, color="black", lw=0.5)
        ax.set_xlim(min([0.0, *(v for v in vals if v is not None)]) - 0.05, 1.2)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(range(len(names)), names)
    return _png(fig)


def build_report(store, domain, run_id: str, synth: pl.DataFrame, out_dir: Path, compare: Path | None = None) -> Path:
    """Write out_dir/report.html and out_dir/metrics.json for a stored run; returns the HTML path.
    `compare`: a peers JSON (benchmarks/peers.py) to put side by side with the run."""
    import matplotlib

    matplotlib.use("Agg")
    peers = load_peers(compare, domain.name) if compare is not None else None  # a bad file fails before the slow part
    run = store.run(run_id)
    train, test = domain.load_split("train"), domain.load_split("test")
    metrics = {"run_id": run_id, "model": f"{run['model_id']} {run['model_version']}",
               **ev.evaluate(domain, synth, train, test)}
    run_note = (f"run {run_id}: its {synth.height:,} stored records; the loop stores only records that pass every "
                f"rule and its other checks ({run['attempted']:,} attempts, {run['rejected']:,} rejected), while a "
                "peer's row scores what that peer wrote (see its note), unfiltered")
    metrics["comparison"] = comparison(metrics, peers, run_note) if peers else {
        "included": False, "how": f"not included: no peer metrics given ({COMPARE_HINT})"}
    comparison_html = _comparison_html(metrics["comparison"], chart_scores(domain)) if peers else (
        f"<p>Not included: this report was made without peer metrics. Made with <code>{html.escape(COMPARE_HINT)}"
        "</code>, this section shows the run next to the baselines and SDV models, scored the same way.</p>")
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
.failed{{color:#b00}} .differs{{color:#b00}}</style></head><body>
<h1>Run {html.escape(run_id)}</h1>
<p>Domain <b>{html.escape(domain.name)}</b> (rule set {html.escape(run['rule_set_hash'])}), model
<b>{html.escape(metrics['model'])}</b>, seed {run['seed']}, status {html.escape(run['status'])},
started {html.escape(str(run['started_at']))} UTC. Reference: the domain's held-out real test split
({test.height:,} rows), never used for training. Metrics as JSON: <code>metrics.json</code>.</p>
<h2>Summary</h2>{_table(summary, ["measure", "value"])}
<h2>Side by side with other generators</h2>{comparison_html}
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
