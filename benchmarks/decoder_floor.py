"""Benchmark: how fast could `factory generate` be with a smaller decoder? The decode loop's cost per
record by decoder depth, the rest of the pipeline, and what that allows at 100,000 records.

    python benchmarks/decoder_floor.py [--domain finance] [-n 4000]

Issue #16 asks for 100,000 records within 2x MOSTLY AI's raw `sample(100000)`. The decode loop's speed
does not depend on the decoder's weights (every step runs the same ops on the same shapes; the schema
mask keeps every row decoding), so the variants here are the shipped decoder cut to its first L
layers, L = all .. 0. Their records are not valid and are not looked at: only time is measured.

1. In process, one thread: `generate_ids(n)` (diffusion latents -> injector -> decode loop, what a
   worker runs per shard before parsing) with each decoder, 2 reps interleaved, the faster kept;
   and the diffusion sampler alone.
2. The README's main command, `factory generate -n 100000` with its defaults (2 workers, CLI, gate,
   export): wall and CPU seconds of all its processes. "The rest" (parse, rules, privacy, store, gate,
   export, start-up) is its CPU per record minus step 1's for the shipped decoder.
3. 100,000 records with L layers: that run's wall time minus what the smaller decoder saves on each
   of the 2 workers, (decode(shipped) - decode(L)) x 100,000 / 2.
4. The attention kernel alone, in process: every position of a record, over the shipped decoder's
   KV cache at its decode batch, and the bytes of cache it reads; against what this core streams
   (a float32 sum over 256 MB): how close the decode loop's largest part sits to the memory bound.
MOSTLY AI's time is the same-machine `sample(100000)` of the committed generate benchmark of this CPU
kind (reports/benchmarks/generate_<domain>_100000_<kind>.json), or --mostly-s.
Writes reports/benchmarks/decoder_floor_<domain>_<kind>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from benchmarks.generate import run_cli  # noqa: E402
from benchmarks.machine import cpu_vendor, header, machine_info  # noqa: E402
from factory.difflm import fused  # noqa: E402
from factory.difflm.decoder import DecoderConfig, DomainDecoder  # noqa: E402
from factory.domain import load_domain  # noqa: E402
from factory.generators import load_generator  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"
N_TARGET = 100_000


def first_layers(dec: DomainDecoder, layers: int) -> DomainDecoder:
    """The decoder's embeddings, final norm and first `layers` layers (same dtype), for timing only."""
    cfg = DecoderConfig(**{**dec.cfg.__dict__, "num_layers": layers})
    cut = DomainDecoder(cfg, inference=True)
    keep = {k: v for k, v in dec.state_dict().items()
            if not k.startswith("lm.model.layers.") or int(k.split(".")[3]) < layers}
    cut.load_state_dict(keep, strict=False)
    cut.lm.tie_weights()
    cut.freeze().to_precision(dec.precision)
    return cut


def per_record_ms(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) / n * 1e3


def stream_gbs() -> float:
    """GB/s this core reads streaming: a float32 sum over 256 MB (best of 3)."""
    x = torch.ones(64 * 2**20)
    x.sum()
    best = min(per_record_ms(x.sum, 1) for _ in range(3)) / 1e3
    return x.numel() * 4 / best / 1e9


def attention_read(gen, batch: int) -> dict:
    """The attention kernel over every position of a record, all layers, at `batch` rows: time per record
    and the cache bytes it reads (keys, values and their scales for positions [0, t) of each row and head)."""
    step = gen.dec.decode_step()
    k, length = gen.dec.cfg.prompt_len, gen.tok.length
    T = k + 1 + length
    step.start(batch, T)
    h, H = step.heads, step.heads * step.head_dim
    qkv = torch.randn(batch, 3 * H).to(step.dtype)
    for layer in range(len(step.layers)):  # a full cache, as a record's last step sees it
        for t in range(1, T + 1):
            fused.decode_attention(qkv, step.cos[t - 1], step.sin[t - 1], step.cache.layer(layer), t, step.scale,
                                   step.attention)
    x = step.cache.tensors  # float: K, V [L, B, h, T, hd]; int8: keys, scales [L, B, h, T], values, scales
    allocated = x[1].shape[-1] if step.kv_cache == "int8" else x[0].shape[-2]
    per_key = sum(c.element_size() * c[0, 0, 0].numel() for c in x) / allocated  # bytes per position, row, head
    secs = []
    for _ in range(2):
        t0 = time.perf_counter()
        for layer in range(len(step.layers)):
            for t in range(1, T + 1):
                fused.decode_attention(qkv, step.cos[t - 1], step.sin[t - 1], step.cache.layer(layer), t,
                                       step.scale, step.attention)
        secs.append(time.perf_counter() - t0)
    read = batch * h * per_key * sum(range(1, T + 1)) * len(step.layers)
    best = min(secs)
    return {"batch": batch, "kv_cache": step.kv_cache, "attention": step.attention,
            "ms_per_record": round(best / batch * 1e3, 3), "bytes_per_record": round(read / batch),
            "gbs": round(read / best / 1e9, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("-n", type=int, default=4000, help="records per in-process timing")
    ap.add_argument("--mostly-s", type=float, default=None, help="MOSTLY AI's sample(100000) seconds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info, kind = machine_info(), cpu_vendor()
    mostly_src = REPORTS / f"generate_{args.domain}_{N_TARGET}_{kind}.json"
    if args.mostly_s is not None:
        mostly, mostly_from = args.mostly_s, "--mostly-s"
    elif mostly_src.is_file():
        g = json.loads(mostly_src.read_text())
        mostly = g["mostly"]["sample_s"]
        mostly_from = f"{mostly_src.name} (commit {g['machine']['commit']}, {g['machine']['date']})"
    else:
        raise SystemExit(f"no {mostly_src.name} on record for this CPU kind: run benchmarks/generate.py, or pass "
                         "--mostly-s")

    d = load_domain(args.domain)
    gen = load_generator(d)
    shipped = gen.dec
    depth = shipped.cfg.num_layers
    decoders = {depth: shipped, **{L: first_layers(shipped, L) for L in range(depth - 1, -1, -1)}}
    gen.generate_ids(500, 1)  # warm: kernels loaded, first allocations
    decode = {L: [] for L in decoders}
    latents = []
    with torch.no_grad():
        for rep in range(2):
            for L, dec in decoders.items():
                gen.dec = dec
                decode[L].append(per_record_ms(lambda: gen.generate_ids(args.n, 11 + rep), args.n))
            g = torch.Generator().manual_seed(rep)
            latents.append(per_record_ms(lambda: gen.sample_latents(2000, g), 2000))
    gen.dec = shipped
    decode = {L: round(min(v), 3) for L, v in decode.items()}
    with torch.no_grad():
        attn = attention_read(gen, gen.batch_size)
    stream = round(stream_gbs(), 1)
    latent_ms = round(min(latents), 3)

    with tempfile.TemporaryDirectory() as tmp:
        e2e = run_cli(args.domain, N_TARGET, 0, Path(tmp) / "e2e", label="defaults")
    e2e_ms = round(e2e["cpu_s"] / e2e["accepted"] * 1e3, 3)
    rest = round(e2e_ms - decode[depth], 3)
    rows = []
    for L, ms in decode.items():
        wall = e2e["wall_s"] - (decode[depth] - ms) * N_TARGET / 2 / 1e3
        rows.append({"layers": L, "decode_ms_per_record": ms, "per_layer_ms": None,
                     "projected_100k_wall_s": round(wall, 1), "x_mostly": round(wall / mostly, 2)})
    for a, b in zip(rows, rows[1:]):
        a["per_layer_ms"] = round(a["decode_ms_per_record"] - b["decode_ms_per_record"], 3)
    result = {"machine": info, "kind": kind, "domain": args.domain, "n": args.n, "e2e": e2e,
              "e2e_cpu_ms_per_record": e2e_ms, "rest_ms_per_record": rest, "latents_ms_per_record": latent_ms,
              "mostly_sample_s": mostly, "mostly_from": mostly_from, "rows": rows, "attention": attn,
              "stream_gbs": stream}
    stem = f"decoder_floor_{args.domain}_{kind}"
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    cmd = "python benchmarks/decoder_floor.py " + " ".join(sys.argv[1:])
    floor = rows[-1]
    md = header(f"Decoder depth vs speed: `factory generate --domain {args.domain}`", cmd.strip(), info)
    md += (f"\nOne thread. The shipped decoder has {depth} layers; the others are its first L layers "
           "(timing only: their records are not valid).\n\n"
           "| layers | decode loop + latents, ms/record | one layer's share | 100,000 records on 2 workers, projected | "
           "x MOSTLY AI's raw sample |\n|---|---|---|---|---|\n")
    for r in rows:
        md += (f"| {r['layers']}{' (shipped)' if r['layers'] == depth else ''} | {r['decode_ms_per_record']} | "
               f"{r['per_layer_ms'] if r['per_layer_ms'] is not None else ''} | {r['projected_100k_wall_s']} s | "
               f"{r['x_mostly']}x |\n")
    md += (f"\n- Diffusion latents alone: {latent_ms} ms/record (in every row above).\n"
           f"- The main command, {e2e['accepted']:,} records (`{e2e['command']}`): **{e2e['wall_s']} s** wall, "
           f"{e2e['cpu_s']} CPU s ({e2e_ms} ms/record); the rest of the pipeline (parse, rules, privacy, store, gate, "
           f"export, start-up) is **{rest} ms/record** of CPU. Gate: {e2e['gate']}.\n"
           f"- MOSTLY AI `sample(100000)`: {mostly} s, from {mostly_from}. 2x that is {2 * mostly:.1f} s.\n"
           f"- The attention kernel alone ({attn['attention']}, {attn['kv_cache']} cache, {attn['batch']:,} rows, "
           f"every position of a record, all layers): {attn['ms_per_record']} ms/record, reading "
           f"{attn['bytes_per_record'] / 2**20:.2f} MiB of cache per record: **{attn['gbs']} GB/s**, against "
           f"{stream} GB/s for a float32 sum over 256 MB on this core.\n"
           f"- Projection: the main command's wall time minus (decode(shipped) - decode(L)) x 100,000 / 2 workers. "
           f"With no decoder layer at all the pipeline "
           f"would take {floor['projected_100k_wall_s']} s ({floor['x_mostly']}x).\n")
    (REPORTS / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
