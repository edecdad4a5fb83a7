"""Benchmark: the latent sampler's solver and step count, for accuracy, cost and record quality.

    python benchmarks/sampler.py [--domain finance] [-n 10000] [--seeds 0,1] [--variants dpmpp_2m:25,heun:25,...]

For each variant (solver:steps) of the domain's shipped DiffLM stack:
1. accuracy of 4,000 latents against the same noise solved with 100 Heun steps (the ODE's solution
   to ~0.5%): mean relative L2, mean per-dimension std ratio; CPU ms per latent (one thread, bf16
   autocast as the generator runs it); denoiser calls per latent;
2. records: `factory.generate` of -n records per seed (the library entry point the CLI uses), the
   distribution gate's verdict, and `factory.evaluate` against the held-out test split: column
   shapes, pair trends, MLE ratios. The variants run one after another in the same benchmark.
Writes reports/benchmarks/sampler_<domain>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import factory  # noqa: E402
from benchmarks.machine import header, machine_info  # noqa: E402
from factory import evaluate as ev  # noqa: E402
from factory.difflm.diffusion import EDMSampler, SamplerConfig  # noqa: E402
from factory.domain import load_domain  # noqa: E402
from factory.generators import load_generator  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"
LATENTS = 4000


def latents(gen, solver: str, steps: int, n: int = LATENTS, seed: int = 0):
    sampler = EDMSampler(SamplerConfig(**{**gen.sampler.cfg.__dict__, "solver": solver, "steps": steps}))
    g = torch.Generator().manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=gen.dec.precision == "bfloat16"):
        t = time.process_time()
        x = sampler.sample(gen.den, n, g).float()
        return x, (time.process_time() - t) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default="heun:25,dpmpp_2m:25,dpmpp_2m:20,heun:12")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = machine_info()
    d = load_domain(args.domain)
    gen = load_generator(d, "difflm")
    variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    ref, _ = latents(gen, "heun", 100)
    train, test = d.load_split("train"), d.load_split("test")
    rows = []
    for solver, steps in variants:
        latents(gen, solver, steps, n=200)  # warm-up
        x, ms = latents(gen, solver, steps)
        row = {"solver": solver, "steps": steps, "denoiser_calls": steps if solver == "dpmpp_2m" else 2 * steps - 1,
               "ms_per_latent": round(ms, 4),
               "rel_l2_to_heun100": round(((x - ref).norm(dim=1) / ref.norm(dim=1)).mean().item(), 4),
               "std_ratio": round((x.std(0) / ref.std(0)).mean().item(), 4), "runs": []}
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                t = time.time()
                run = factory.generate(d, args.n, seed=seed, db=Path(tmp) / "s.duckdb", allow_drift=True,
                                       generator_options={"solver": solver, "steps": steps})
                wall = time.time() - t
                scores = ev.evaluate(d, run.records, train, test)
                run.close()
            q, m = scores["quality"], scores["mle"]
            row["runs"].append({"seed": seed, "wall_s": round(wall, 1), "gate": run.gate.status,
                                "column_shapes": round(q["column_shapes"], 4),
                                "column_pair_trends": round(q["column_pair_trends"], 4),
                                "mle_ratio": {k: (None if v is None else round(v, 4)) for k, v in m["ratio"].items()}})
            print(solver, steps, row["runs"][-1], flush=True)
        rows.append(row)
        print(row, flush=True)
    info["load_avg_end"] = round(os.getloadavg()[0], 2)
    out = {"machine": info, "domain": args.domain, "n": args.n, "seeds": seeds, "latents": LATENTS, "variants": rows}
    REPORTS.mkdir(parents=True, exist_ok=True)
    stem = REPORTS / f"sampler_{args.domain}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    cmd = f"python benchmarks/sampler.py --domain {args.domain} -n {args.n} --seeds {args.seeds} --variants {args.variants}"
    mle_keys = list(rows[0]["runs"][0]["mle_ratio"]) if rows and rows[0]["runs"] else []
    md = [header(f"Latent sampler: solver and steps ({args.domain})", cmd, info), "",
          f"Latent accuracy: {LATENTS:,} latents from the same noise, against 100 Heun steps; CPU ms per latent on "
          f"one thread. Records: {args.n:,} per seed through `factory.generate` (seeds {args.seeds}), scored "
          f"against the held-out test split (mean over seeds; range in brackets). Load average at the end: "
          f"{info['load_avg_end']}.\n",
          "| solver | steps | denoiser calls | ms / latent | rel. L2 to 100 Heun steps | std ratio | gate | shapes | "
          "trends | " + " | ".join(f"MLE {k}" for k in mle_keys) + " |",
          "|---|---|---|---|---|---|---|---|---|" + "---|" * len(mle_keys)]

    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        mean = sum(values) / len(values)
        return f"{mean:.3f} [{min(values):.3f}-{max(values):.3f}]" if len(values) > 1 else f"{mean:.3f}"

    for r in rows:
        runs = r["runs"]
        md.append(f"| {r['solver']} | {r['steps']} | {r['denoiser_calls']} | {r['ms_per_latent']:.3f} | "
                  f"{r['rel_l2_to_heun100']:.4f} | {r['std_ratio']:.4f} | "
                  f"{', '.join(sorted({x['gate'] for x in runs}))} | {cell([x['column_shapes'] for x in runs])} | "
                  f"{cell([x['column_pair_trends'] for x in runs])} | "
                  + " | ".join(cell([x["mle_ratio"][k] for x in runs]) for k in mle_keys) + " |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
