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
from pathlib import Path

import numpy as np
import polars as pl

from factory import evaluate as ev
from factory.files import atomic_write_text
from factory.inputs import InputError
from schemas.columns import Numeric

MAX_CATEGORIES = 15  # bars per categorical plot; the rest are summed as "other"
# Plots are drawn at 72 dpi, where a point is a pixel, and no wider than MAX_PLOT_PX, so that at an
# 800 px wide window they are shown unscaled: tick labels TICK_PT (>= 10 px), titles TITLE_PT.
TICK_PT, TITLE_PT, MAX_PLOT_PX = 10, 12, 760
MAX_LABEL = 18  # characters of a category label on an axis


def _label(v, most: int = MAX_LABEL) -> str:
    t = str(v)
    return t if len(t) <= most else t[:most - 1] + "…"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _column_plot(col, real: pl.Series, synth: pl.Series) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    if isinstance(col, Numeric):
        r, s = real.drop_nulls().to_numpy().astype(float), synth.drop_nulls().to_numpy().astype(float)
        both = np.concatenate([r, s]) if len(s) else r
        lo, hi = np.quantile(both, [0.01, 0.99]) if len(both) else (0, 1)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
        ax.hist(np.clip(r, lo, hi), bins=bins, density=True, alpha=0.55, label="real test")
        ax.hist(np.clip(s, lo, hi), bins=bins, density=True, alpha=0.55, label="synthetic")
        ax.set_xlabel(f"{col.name} (1st-99th percentile)", fontsize=TICK_PT)
        ax.set_ylabel("density", fontsize=TICK_PT)
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    else:
        rs = real.cast(pl.String).fill_null("null").value_counts(normalize=True, name="share")
        ss = synth.cast(pl.String).fill_null("null").value_counts(normalize=True, name="share")
        cats = rs.sort("share", descending=True)[real.name].head(MAX_CATEGORIES).to_list()
        get = lambda f, c: float(f.filter(pl.col(real.name) == c)["share"].sum())  # noqa: E731
        x = np.arange(len(cats))
        ax.bar(x - 0.2, [get(rs, c) for c in cats], 0.4, label="real test")
        ax.bar(x + 0.2, [get(ss, c) for c in cats], 0.4, label="synthetic")
        tilt = len(cats) > 4 or sum(len(_label(c)) for c in cats) > 24  # labels that would touch
        ax.set_xticks(x, [_label(c) for c in cats], rotation=60 if tilt else 0, ha="right" if tilt else "center",
                      fontsize=TICK_PT)
        shown = "" if rs.height <= MAX_CATEGORIES else f" ({MAX_CATEGORIES} most common of {rs.height})"
        ax.set_xlabel(f"{col.name}{shown}", fontsize=TICK_PT)
        ax.set_ylabel("share of rows", fontsize=TICK_PT)
    ax.set_title(col.name, fontsize=TITLE_PT)
    ax.tick_params(labelsize=TICK_PT)
    ax.legend(fontsize=TICK_PT)
    return _png(fig)


def _heatmaps(spec, real: pl.DataFrame, synth: pl.DataFrame) -> str:
    import matplotlib.pyplot as plt

    names = [c.name for c in spec.columns if isinstance(c, Numeric)]
    if len(names) < 2:
        return "<p>fewer than two numeric columns: no correlation matrix</p>"
    from factory.checks.distribution import spearman  # the gate's corr:max: the map shows what it checks

    cr, cs = spearman(real, spec, names), spearman(synth, spec, names)
    side = min(MAX_PLOT_PX / 72 - 3.2, 2.5 + 0.22 * len(names))  # inches of matrix; labels stay TICK_PT
    figs = []
    for m, title, cmap, lim in ((cr, "real test", "coolwarm", 1), (cs, "synthetic", "coolwarm", 1),
                                (cs - cr, "synthetic - real", "PiYG", 0.5)):
        fig, ax = plt.subplots(figsize=(side + 1.2, side))
        im = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(names)), [_label(n) for n in names], rotation=90, fontsize=TICK_PT)
        ax.set_yticks(range(len(names)), [_label(n) for n in names], fontsize=TICK_PT)
        ax.set_title(f"Spearman correlation: {title}", fontsize=TITLE_PT)
        cb = fig.colorbar(im, ax=ax, fraction=0.046)
        cb.ax.tick_params(labelsize=TICK_PT)
        figs.append(_png(fig))
    return "".join(figs)


def _rejection_plot(counts: pl.DataFrame) -> str:
    import matplotlib.pyplot as plt

    top = counts.head(15)
    fig, ax = plt.subplots(figsize=(6.0, 0.35 * max(3, top.height) + 1.0))
    labels = [_label(f"{s}/{r}", 34) for s, r in zip(top["stage"], top["rule"])]
    ax.barh(labels[::-1], top["attempts"].to_list()[::-1])
    ax.set_xlabel("rejected attempts", fontsize=TICK_PT)
    ax.tick_params(labelsize=TICK_PT)
    return _png(fig)


def _table(rows: list[dict], columns: list[str], row_class=None) -> str:
    """An HTML table in a box that scrolls sideways on a narrow window; `row_class(row)`: a CSS class or None."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        (f'<tr class="{row_class(r)}">' if row_class and row_class(r) else "<tr>")
        + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'



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
    fig, axes = plt.subplots(len(bars), 1, figsize=(MAX_PLOT_PX / 72, len(bars) * (0.3 * len(names) + 0.9)),
                             squeeze=False)
    axes = axes[:, 0]
    fig.subplots_adjust(hspace=0.9)
    for ax, (label, key) in zip(axes, bars):
        vals = [c["scores"].get(key) for c in comp["candidates"]][::-1]
        colors = ["#d62728" if n.startswith("this run") else "#999999" if n.startswith("real_") else "#1f77b4"
                  for n in names]  # the run red, real-data references grey, generators blue
        ax.barh(range(len(names)), [0 if v is None else v for v in vals], color=colors)
        for i, v in enumerate(vals):
            ax.text(0 if v is None else max(v, 0), i, " n/a" if v is None else f" {v:.2f}", va="center",
                    fontsize=TICK_PT)
        ax.axvline(0, color="black", lw=0.5)
        ax.set_xlim(min([0.0, *(v for v in vals if v is not None)]) - 0.05, 1.2)
        ax.set_title(label, fontsize=TITLE_PT)
        ax.tick_params(labelsize=TICK_PT)
        ax.set_yticks(range(len(names)), [_label(n) for n in names])
    return _png(fig)


CHECK_LEGEND = """<dl class="legend"><dt>How to read the checks</dt>
<dd>Each check compares the run's records with the real train split (for a conditioned run: the real rows
that meet the condition). <b>statistic</b> must be <b>must be</b> (direction) the <b>threshold</b>.</dd>
<dt>ks:&lt;column&gt;</dt><dd>Kolmogorov-Smirnov distance between the run's and the real values of a numeric
column (0 = same distribution, 1 = disjoint).</dd>
<dt>q05 / q50 / q95:&lt;column&gt;</dt><dd>where the run's 5th percentile, median and 95th percentile fall among
the real values, as a distance in probability units (0.02 = two percentile points off).</dd>
<dt>tvd:&lt;column&gt;</dt><dd>total-variation distance between category shares (half the sum of absolute
differences; 0 = same shares).</dd>
<dt>coverage:&lt;column&gt;</dt><dd>share of the real categories holding at least 1% of real rows that the run
produces at all.</dd>
<dt>corr:max</dt><dd>the largest difference between the run's and the real Spearman correlation of any pair of
columns.</dd>
<dt>threshold</dt><dd>the bound the statistic must stay within: calibrated on real data and widened for what
chance alone reaches at the run's size (the sampling bound); see README, "Gates before export".</dd>
<dt>skipped</dt><dd>the check could not be computed meaningfully (e.g. too few values).</dd></dl>"""


def _verdict(run: dict, stored: int, checks: pl.DataFrame) -> tuple[str, str]:
    """(CSS class, one sentence): what a reviewer may do with this run."""
    if run["status"] == "succeeded" and run.get("gate") in ("passed", None, "skipped", "off"):
        gate = "passed the distribution gate" if run.get("gate") == "passed" else f"gate {run.get('gate')}"
        return "pass", f"Complete and {gate}: exportable."
    if run["status"] == "gate_failed" or run.get("gate") in ("failed", "overridden"):
        failed = checks.filter(pl.col("status") == "failed")["check_name"].to_list() if checks.height else []
        names = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        if run.get("gate") == "overridden":
            return "fail", (f"Failed the distribution gate ({names}), overridden with --allow-drift: exportable, "
                            "and every export's manifest records the override.")
        return "fail", (f"Refused by the distribution gate ({names}): stored, not exported; exporting it takes "
                        "--allow-drift, which the manifest records.")
    return "incomplete", (f"Incomplete (status {run['status']}): {stored:,} of {run['requested_n']:,} records stored, "
                          f"not exportable; continue it with factory generate --resume {run['run_id']}.")


def _rules_table(domain, synth: pl.DataFrame, counts: pl.DataFrame) -> str:
    """Every rule of the domain: its message, how many stored records pass it, how many attempts it rejected."""
    failures = domain.validator.validate(synth).failures
    broken = dict(failures.group_by("rule").agg(pl.col("row").n_unique()).iter_rows()) if failures.height else {}
    rejected = dict(counts.filter(pl.col("stage") == "rule").select("rule", "attempts").iter_rows()) \
        if counts.height else {}
    rows = [{"rule": rule.name, "message": rule.message, "broken": broken.get(rule.name, 0),
             "stored records passing": f"{synth.height - broken.get(rule.name, 0):,} of {synth.height:,}",
             "attempts it rejected": f"{rejected.get(rule.name, 0):,}"} for rule in domain.rules]
    return _table(rows, ["rule", "message", "stored records passing", "attempts it rejected"],
                  lambda row: "failed" if row["broken"] else None)


def _versions(run: dict) -> list[dict]:
    from importlib.metadata import PackageNotFoundError, version

    rows = [{"component": "factory", "version": str(run.get("factory_version"))},
            {"component": "model", "version": f"{run['model_id']} {run['model_version']}"},
            {"component": "rule set", "version": run["rule_set_hash"]}]
    for pkg in ("torch", "transformers", "polars", "duckdb", "sdmetrics", "xgboost"):
        try:
            rows.append({"component": pkg, "version": version(pkg)})
        except PackageNotFoundError:
            pass
    return rows


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
    checks = store.frame("SELECT check_name, column_names, statistic, threshold, direction, status, detail FROM checks "
                         "WHERE run_id = ? ORDER BY status = 'passed', status = 'skipped', check_name", [run_id])
    settings = store.run_settings(run_id)
    q, m, p, r = metrics["quality"], metrics["mle"], metrics["privacy"], metrics["rule_validity"]
    verdict_cls, verdict = _verdict(run, synth.height, checks)
    summary = [
        {"measure": "status", "value": verdict},
        {"measure": "records stored", "value": f"{synth.height:,} of {run['requested_n']:,} requested"},
        {"measure": "attempts / rejected / surplus", "value": f"{run['attempted']:,} / {run['rejected']:,} / {run['surplus']:,}"},
        {"measure": "records passing every rule", "value": f"{r['valid_rate']:.2%}"},
        {"measure": "distribution gate", "value": str(run.get("gate"))},
        {"measure": "condition", "value": str(settings.get("where") or settings.get("condition") or "none (unconditional)")},
        {"measure": "SDMetrics column shapes / pair trends", "value": f"{q['column_shapes']:.3f} / {q['column_pair_trends']:.3f}"},
        *([{"measure": f"MLE ratio {k}", "value": f"{v:.3f}"} for k, v in m["ratio"].items() if v is not None] if m else []),
        {"measure": "exact copies of training rows", "value": f"{p['exact_copies']:,}"},
        {"measure": "DCR median: synthetic / real test", "value": f"{p['dcr']['median']:.4f} / {p['dcr_reference']['median']:.4f}"},
    ]
    versions = _versions(run)
    real_all = test.select(domain.spec.names)
    columns_html = "".join(_column_plot(c, real_all[c.name], synth[c.name]) for c in domain.spec.columns)
    n_failed = int((checks["status"] == "failed").sum()) if checks.height else 0
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>factory report {html.escape(run_id)}</title>
<style>body{{font-family:sans-serif;margin:16px;max-width:1200px;font-size:15px;line-height:1.4}}
table{{border-collapse:collapse;margin:8px 0}} .scroll{{overflow-x:auto;max-width:100%}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}}
img{{margin:4px;max-width:100%;height:auto}} code{{overflow-wrap:anywhere}}
tr.failed td{{background:#fde8e8;color:#900;font-weight:bold}} .differs{{color:#b00}}
.verdict{{border:3px solid;padding:10px 14px;margin:12px 0;font-size:17px}}
.verdict.pass{{border-color:#2e7d32;background:#edf7ee}} .verdict.fail{{border-color:#c62828;background:#fdecea}}
.verdict.incomplete{{border-color:#ef6c00;background:#fff4e5}} dl.legend dt{{font-weight:bold;margin-top:4px}}
dl.legend dd{{margin-left:16px}}</style></head><body>
<h1>Run {html.escape(run_id)}</h1>
<div class="verdict {verdict_cls}" id="verdict"><b>{html.escape(verdict)}</b><br>
{synth.height:,} of {run['requested_n']:,} records stored; gate {html.escape(str(run.get('gate')))}
({n_failed} of {checks.height} checks failed); {r['valid_rate']:.2%} of stored records pass every rule.</div>
<p>Domain <b>{html.escape(domain.name)}</b> (rule set {html.escape(run['rule_set_hash'])}), model
<b>{html.escape(metrics['model'])}</b>, seed {run['seed']}, started {html.escape(str(run['started_at']))} UTC.
Reference: the domain's held-out real test split ({test.height:,} rows), never used for training.
Metrics as JSON: <code>metrics.json</code>. An export of this run carries its sha256 in
<code>&lt;file&gt;.manifest.json</code>.</p>
<h2>Summary</h2>{_table(summary, ["measure", "value"])}
<h2>Distribution gate ({checks.height} checks; failed first)</h2>
{_table(checks.to_dicts(), checks.columns, lambda row: "failed" if row["status"] == "failed" else None)
 if checks.height else "<p>no checks recorded (gate off or skipped)</p>"}
{CHECK_LEGEND}
<h2>Rules of the {html.escape(domain.name)} domain</h2>
{_rules_table(domain, synth, counts)}
<h2>Why attempts were rejected</h2>
{_rejection_plot(counts) if counts.height else "<p>no rejections</p>"}
{_table(counts.to_dicts(), ["stage", "rule", "attempts", "message"]) if counts.height else ""}
<h2>Side by side with other generators</h2>{comparison_html}
<h2>Real vs synthetic, per column</h2>{columns_html}
<h2>Pairwise relations</h2>{_heatmaps(domain.spec, real_all, synth)}
<h2>Versions</h2>{_table(versions, ["component", "version"])}
</body></html>"""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("metrics.json", json.dumps(metrics, indent=1, default=str)), ("report.html", page)):
        atomic_write_text(out_dir / name, text)  # a crash leaves the old file or the new one, never half of one
    return out_dir / "report.html"
