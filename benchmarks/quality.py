"""Benchmark: quality of the DiffLM stack's exported records, with ablations.

    python benchmarks/quality.py -n 10000 --seed 7 [--model-dir domains/finance/model]

Each variant runs `factory.generate` (the library entry point the CLI calls: the same loop,
rules, privacy filter and gate; the gate is recorded, not enforced, so every variant is scored):
- difflm                 diffusion latents, schema-guided decoding (the shipped default)
- difflm_unconstrained   diffusion latents, no logits mask            (issue 5: quality before/after)
- difflm_prior_z         z ~ N(0, I) instead of diffusion              (DiffLM's ablation)
- baseline               independent marginals (the reference to beat)
It reports the attempts per accepted record and the rejections by stage (parse, rule,
privacy), then SDMetrics shapes and trends against the held-out test split, MLE ratios,
exact copies and DCR of the accepted records (what the factory exports).
Writes reports/benchmarks/quality_<domain>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import polars as pl  # noqa: E402

from benchmarks.machine import header, machine_info  # noqa: E402
from factory import evaluate as ev  # noqa: E402
from factory.domain import load_domain  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"
VARIANTS = ("difflm", "difflm_unconstrained", "difflm_prior_z", "baseline")


def variant_options(variant: str) -> dict:
    """factory.generate's model and generator options for a variant."""
    if variant == "baseline":
        return {"model": "baseline"}
    return {"generator_options": {"difflm": {}, "difflm_unconstrained": {"constrained": False},
                                  "difflm_prior_z": {"latent": "prior"}}[variant]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--workers", type=int, default=None, help="local worker processes (default: factory's)")
    args = ap.parse_args()
    import factory

    info = machine_info()
    domain = load_domain(args.domain)
    model_dir = Path(args.model_dir) if args.model_dir else None
    train, test = domain.load_split("train"), domain.load_split("test")
    real_mle = ev.mle(train, test, domain)
    results = {}
    for variant in args.variants:
        opts = variant_options(variant)
        t = time.time()
        run = factory.generate(domain, args.n, seed=args.seed, allow_drift=True, workers=args.workers,
                               model_dir=None if variant == "baseline" else model_dir, **opts)
        wall = time.time() - t
        res, accepted = run.result, run.records
        counts = run.store.rejection_counts(run.run_id).filter(pl.col("stage") != "distribution")  # gate rows: no attempt
        by_stage = {st: int(counts.filter(pl.col("stage") == st)["attempts"].sum()) for st in counts["stage"].unique()}
        e = ev.evaluate(domain, accepted, train, test, real_mle=real_mle)
        results[variant] = {
            "attempted": res.attempted, "accepted": res.accepted, "wall_s": round(wall, 1),
            "records_per_s": round(res.accepted / wall, 1), "attempts_per_record": round(res.attempted / res.accepted, 3),
            "rejections_by_stage": by_stage, "gate": res.gate.status if res.gate else "off",
            "top_rejections": dict(zip(counts["rule"].head(6).to_list(), counts["attempts"].head(6).to_list())),
            "evaluated_rows": accepted.height, "model_version": getattr(run.generator, "model_version", ""), **e}
        run.close()
        q = e["quality"]
        print(f"[{variant}] {results[variant]['records_per_s']:.0f} rec/s, {results[variant]['attempts_per_record']} "
              f"attempts/record, shapes {q['column_shapes']:.3f} trends {q['column_pair_trends']:.3f} "
              f"mle {e['mle']['ratio']}", flush=True)
    REPORTS.mkdir(parents=True, exist_ok=True)
    out = {"machine": info, "args": vars(args), "real_mle": real_mle, "results": results}
    (REPORTS / f"quality_{args.domain}.json").write_text(json.dumps(out, indent=1, default=str))
    md = header(f"Quality of the {args.domain} DiffLM stack (accepted records vs the held-out test split)",
                "python benchmarks/quality.py " + " ".join(sys.argv[1:]), info)
    md += ("\nEach row is one `factory.generate` call (local engine, default shards, --workers worker "
           "processes; gate recorded, not enforced): it decodes until n records pass every rule and the privacy "
           "filter. Attempts per record and rejections count every decode; quality, MLE and privacy are computed "
           "on the n accepted records, i.e. what the factory exports. rec/s is accepted records per second of the "
           "whole call (model load included).\n\n"
           "| variant | rec/s | attempts / record | rejections (parse / rule / privacy) | gate | column shapes | "
           "pair trends | MLE ratios (synthetic-trained / real-trained) | exact copies | DCR median (synth) | "
           "DCR median (real test) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    for k, r in results.items():
        q, m, p, st = r["quality"], r["mle"]["ratio"], r["privacy"], r["rejections_by_stage"]
        ratios = ", ".join(f"{t}: {v:.3f}" for t, v in m.items() if v is not None)
        md += (f"| {k} | {r['records_per_s']} | {r['attempts_per_record']} | "
               f"{st.get('parse', 0):,} / {st.get('rule', 0) + st.get('schema', 0):,} / {st.get('privacy', 0):,} | "
               f"{r['gate']} | {q['column_shapes']:.3f} | {q['column_pair_trends']:.3f} | {ratios} | "
               f"{p['exact_copies']} | {p['dcr']['median']:.4f} | {p['dcr_reference']['median']:.4f} |\n")
    md += "\nTop rejection reasons (rule: attempts):\n\n"
    for k, r in results.items():
        md += f"- {k}: {r['top_rejections']}\n"
    (REPORTS / f"quality_{args.domain}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
