"""Benchmark: the decoder's sampling loop, transformers' forward vs DecodeStep, float32 vs bfloat16.

    python benchmarks/decode_step.py [--batch 2000] [--reps 3]

Same process, one thread, variants interleaved rep by rep (medians reported), on the shipped
finance stack's decoder with real soft prompts from its diffusion sampler + injector. Also counts
the rows whose sampled ids equal the transformers path's for the same seed.
Writes reports/benchmarks/decode_step.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from benchmarks.machine import header, machine_info  # noqa: E402
from factory.difflm import fused  # noqa: E402
from factory.difflm.decoder import DomainDecoder  # noqa: E402
from factory.domain import load_domain  # noqa: E402
from factory.generators import load_generator  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="transformers:float32,transformers:bfloat16,fast:float32,fast:bfloat16,"
                    "fast-sdpa:float32,fast-sdpa:bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = machine_info()
    d = load_domain(args.domain)
    gen = load_generator(d, None, precision="float32")
    # The generator's decoder is the sampling-only one (no transformers forward): the reference
    # path needs the LlamaForCausalLM-built decoder of the same weights.
    full = DomainDecoder.from_pretrained(gen.path / "decoder").freeze()
    # one decoder per precision: converting one model back and forth would round its float32 weights
    decoders = {p: copy.deepcopy(full).to_precision(p) for p in ("float32", "bfloat16")}
    kernels = fused.implementation()
    with torch.no_grad():
        prompt = gen.inj(gen.sample_latents(args.batch, torch.Generator().manual_seed(0)))
    variants = [v.split(":") for v in args.variants.split(",")]
    times = {f"{i}:{p}": [] for i, p in variants}
    ids = {}
    for rep in range(args.reps):
        for impl, prec in variants:
            dec = decoders[prec]
            step_impl = "transformers" if impl == "transformers" else "fast"
            if impl.startswith("fast"):
                dec.decode_step().attention = "sdpa" if impl == "fast-sdpa" else kernels
            t = time.perf_counter()
            out = dec.generate(prompt, gen.tok, torch.Generator().manual_seed(1), impl=step_impl)
            times[f"{impl}:{prec}"].append(time.perf_counter() - t)
            ids.setdefault(f"{impl}:{prec}", out)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    same = {k: float((v == ids[f"transformers:{k.split(':')[1]}"]).all(1).float().mean())
            for k, v in ids.items() if not k.startswith("transformers")}
    load = os.getloadavg()[0]
    result = {"machine": info, "batch": args.batch, "reps": args.reps, "fused_attention": kernels, "seconds": times,
              "median_s": med, "records_per_s_one_core": {k: round(args.batch / v, 1) for k, v in med.items()},
              "rows_equal_to_transformers_same_precision": same, "load_average_at_end": load}
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "decode_step.json").write_text(json.dumps(result, indent=1))
    base = med.get("transformers:float32")
    md = header("decoder sampling loop: transformers forward vs DecodeStep", "python benchmarks/decode_step.py "
                + " ".join(sys.argv[1:]), info)
    md += (f"\nOne thread, batch {args.batch}, {args.reps} interleaved reps (median), fused kernels: {kernels}; "
           f"load average at the end {load:.2f} (other jobs share the 2 cores: compare rows of this table, "
           "not with other runs).\n\n| variant | median s / batch | records/s (1 core) | vs transformers fp32 "
           "| rows identical to transformers (same precision) |\n|---|---|---|---|---|\n")
    for k, v in med.items():
        md += (f"| {k} | {v:.2f} | {args.batch / v:.0f} | {base / v:.2f}x | "
               f"{'' if k not in same else f'{same[k]:.2%}'} |\n")
    (REPORTS / "decode_step.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
