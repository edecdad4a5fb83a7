"""Benchmark: how much the DiffLM latent carries, before (shipped stack) and after (its
conditional stage), on the real val split.

    OMP_NUM_THREADS=1 python benchmarks/latent.py

Per stack: KL(q(z|x) || N(0, I)) per record; reconstruction NLL per record (nats, 56 tokens)
with the posterior mean z, with z = 0 (the prior's mean), and with the decoder's null prompt;
for the conditional stage also with z = 0 and c = one random column's value; and the share of
generated columns that a near-greedy decode (temperature 0.01) from the posterior mean writes
exactly as the real record has them (vs the same decode from z = 0: what the decoder writes
without the record).
Writes reports/benchmarks/latent_<domain>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from benchmarks.machine import header, machine_info  # noqa: E402
from factory.difflm.decoder import DomainDecoder  # noqa: E402
from factory.difflm.encoder import RecordEncoder, values_text  # noqa: E402
from factory.difflm.injector import SoftPromptInjector  # noqa: E402
from factory.difflm.tokenizer import SchemaTokenizer  # noqa: E402
from factory.domain import load_domain  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"


@torch.no_grad()
def column_accuracy(dec, tok, prompt, real: torch.Tensor, seed: int = 0) -> float:
    ids = dec.generate(prompt, tok, torch.Generator().manual_seed(seed), temperature=0.01)
    got, want = tok.decode(ids), tok.decode(real)
    return float(sum((got[c] == want[c]).fill_null(got[c].is_null() & want[c].is_null()).mean()
                     for c in tok.columns) / len(tok.columns))


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("--model-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = machine_info()
    domain = load_domain(args.domain)
    base = Path(args.model_dir) if args.model_dir else domain.model_dir
    tok = SchemaTokenizer.from_pretrained(base, domain.spec)
    records = domain.load_split("val")
    frame = domain.to_generated(records)
    ids = tok.encode(frame)
    texts = [values_text(r, domain.spec, tok.columns) for r in frame.select(tok.columns).iter_rows(named=True)]
    out = {"machine": info, "val_rows": len(ids), "tokens_per_record": tok.length}

    def encode(enc):
        mus, kls = [], []
        for i in range(0, len(texts), 128):
            mu, logvar = enc(texts[i:i + 128])
            mus.append(mu)
            kls.append(0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1))
        return torch.cat(mus), torch.cat(kls).mean().item()

    def nll(dec, prompt):
        return sum(dec.forward_prompted(prompt[i:i + 250] if prompt is not None else None, ids[i:i + 250]).sum().item()
                   for i in range(0, len(ids), 250)) / len(ids)

    # before: the shipped stack
    dec = DomainDecoder.from_pretrained(base / "decoder").freeze()
    inj = SoftPromptInjector.from_pretrained(base / "injector").eval()
    enc = RecordEncoder.from_pretrained(base / "encoder").eval()
    mu, kl = encode(enc)
    zero = torch.zeros_like(mu)
    out["before"] = {"kl": kl, "recon_posterior_mean": nll(dec, inj(mu)), "recon_z0": nll(dec, inj(zero)),
                     "recon_null_prompt": nll(dec, None),
                     "column_accuracy_posterior_mean": column_accuracy(dec, tok, inj(mu), ids),
                     "column_accuracy_z0": column_accuracy(dec, tok, inj(zero), ids)}
    print("before", out["before"], flush=True)
    cdir = base / "conditional"
    if (cdir / "pipeline.json").exists():
        from factory.difflm.condition import ConditionCodec
        from factory.difflm.injector import ConditionalInjector

        codec = ConditionCodec.from_pretrained(cdir)
        cinj = ConditionalInjector.from_pretrained(cdir / "injector").eval()
        cdec = DomainDecoder.from_pretrained(cdir / "decoder").freeze() if (cdir / "decoder").is_dir() else dec
        cenc = RecordEncoder.from_pretrained(cdir / "encoder").eval()
        mu, kl = encode(cenc)
        zero = torch.zeros_like(mu)
        c_full = codec.encode(records)
        empty = torch.zeros_like(c_full)
        g = torch.Generator().manual_seed(0)
        one = torch.where(torch.rand(c_full.shape, generator=g).argsort(1) == 0, c_full, 0)
        out["after"] = {"kl": kl, "recon_posterior_mean": nll(cdec, cinj(mu, empty)),
                        "recon_z0": nll(cdec, cinj(zero, empty)), "recon_z0_one_column": nll(cdec, cinj(zero, one)),
                        "recon_null_prompt": nll(cdec, None),
                        "column_accuracy_posterior_mean": column_accuracy(cdec, tok, cinj(mu, empty), ids),
                        "column_accuracy_z0": column_accuracy(cdec, tok, cinj(zero, empty), ids)}
        print("after", out["after"], flush=True)
    REPORTS.mkdir(parents=True, exist_ok=True)
    stem = REPORTS / f"latent_{args.domain}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    rows = [("KL per record (nats)", "kl"), ("recon NLL, posterior mean z", "recon_posterior_mean"),
            ("recon NLL, z = 0", "recon_z0"), ("recon NLL, z = 0 and c = one column", "recon_z0_one_column"),
            ("recon NLL, null prompt (decoder alone)", "recon_null_prompt"),
            ("columns decoded exactly, posterior mean z", "column_accuracy_posterior_mean"),
            ("columns decoded exactly, z = 0", "column_accuracy_z0")]
    md = [header("How much the DiffLM latent carries (val split)", "python benchmarks/latent.py", info), "",
          f"{out['val_rows']} val records, {out['tokens_per_record']} tokens each; NLL in nats per record.\n",
          "| measure | before (shipped stack) | after (conditional stage) |", "|---|---|---|"]
    for label, k in rows:
        b, a = out["before"].get(k), out.get("after", {}).get(k)
        md.append(f"| {label} | {'-' if b is None else f'{b:.3f}'} | {'-' if a is None else f'{a:.3f}'} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
