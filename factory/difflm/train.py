"""Training the DiffLM stack for one domain, in three stages (each resumable):

1. lm:        pretrain the compact domain decoder on the training records (with its
              learned null prompt), early-stopped on validation; then freeze it.
2. vae:       beta-VAE: LoRA encoder -> z -> injector -> frozen decoder, loss =
              reconstruction NLL + beta * KL. Beta starts high and is multiplied by
              `beta_factor` whenever validation reconstruction stalls, down to
              `beta_min`; early stopping on validation; best checkpoint kept.
3. diffusion: encode the training split to latents (mu), normalize, train the EDM denoiser.

`device` (cpu, cuda or auto) is where the modules and batches live. The data, the encoder
cache and every random generator stay on the CPU (random draws are made there and moved),
so the CPU path is unchanged and a checkpoint resumes on either device.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .decoder import DecoderConfig, DomainDecoder
from .device import resolve_device
from .diffusion import Denoiser, DenoiserConfig, EDMSampler, SamplerConfig
from .encoder import EncoderConfig, RecordEncoder, values_text
from .injector import InjectorConfig, SoftPromptInjector
from .tokenizer import SchemaTokenizer

STAGES = ("lm", "vae", "diffusion")


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # cpu | cuda | auto (cuda if torch sees one)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    injector_hidden: int = 256
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    max_train_rows: int = 0  # 0 = all; else a seeded sample of this many train rows (tests use a few hundred)
    # wall-time budget (0 = none): each stage stops once it overruns its share (factory/difflm/budget.py plans
    # the sizes to fit; this is the guard), and the log records that it did
    max_minutes: float = 0.0
    # where the lm and vae stages must end, as shares of max_minutes (the plan sets them from its
    # per-stage estimates, so a busier machine slows every stage alike instead of starving the last)
    budget_shares: tuple = (0.45, 0.9)
    min_diffusion_steps: int = 500  # the budget never stops diffusion before this many steps
    # stage 1: decoder LM
    lm_epochs: int = 10
    lm_batch: int = 64
    lm_lr: float = 2e-3
    lm_patience: int = 2
    # stage 2: VAE
    vae_epochs: int = 6
    vae_batch: int = 64
    vae_lr: float = 1e-3
    beta_start: float = 0.1
    beta_factor: float = 0.7
    beta_min: float = 1e-3
    beta_patience: int = 1  # epochs without val-recon improvement before beta drops
    stall_tol: float = 0.0  # "stalled" = val recon fell by less than this fraction (0: did not fall at all)
    vae_patience: int = 3  # early stopping
    # stage 3: diffusion
    diffusion_steps: int = 3000
    diffusion_batch: int = 256
    diffusion_lr: float = 1e-3

    @classmethod
    def from_dict(cls, d: dict, where: str = "training config") -> "TrainConfig":
        """Every field type- and range-checked (ModelError naming the field), sections too."""
        from .config import POSITIVE, check_fields
        from .decoder import DECODER_RANGES
        from .diffusion import DENOISER_RANGES, SAMPLER_RANGES

        sub = {"decoder": (DecoderConfig, {k: v for k, v in DECODER_RANGES.items() if k not in
                                           ("vocab_size", "seq_len", "__all__")}),
               "encoder": (EncoderConfig, {k: POSITIVE for k in ("lora_layers", "lora_r", "latent_dim", "max_length")}),
               "denoiser": (DenoiserConfig, DENOISER_RANGES), "sampler": (SamplerConfig, SAMPLER_RANGES)}
        positive = ("threads", "injector_hidden", "lm_epochs", "lm_batch", "lm_patience", "vae_epochs", "vae_batch",
                    "beta_patience", "vae_patience", "diffusion_steps", "diffusion_batch")
        ranges = {k: POSITIVE for k in positive}
        ranges |= {k: (lambda v: v > 0, "> 0") for k in ("lm_lr", "vae_lr", "diffusion_lr", "beta_start", "beta_min")}
        ranges |= {"beta_factor": (lambda v: 0 < v <= 1, "in (0, 1]"), "stall_tol": (lambda v: 0 <= v < 1, "in [0, 1)")}
        kw = {k: check_fields(c, d[k], f"{where}: section {k}", r) for k, (c, r) in sub.items() if k in d}
        cfg = check_fields(cls, d, where, ranges, skip=tuple(sub))
        for k, v in kw.items():
            setattr(cfg, k, v)
        return cfg


def _sample(frame, n: int, seed: int):
    """A seeded sample of n rows, in their original order (a split's head may be one corner of the table)."""
    if frame.height <= n:
        return frame
    idx = torch.randperm(frame.height, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return frame[idx.numpy()]


def encoder_cache_dir() -> Path:
    """FACTORY_CACHE_DIR, else $XDG_CACHE_HOME/factory, else ~/.cache/factory (never inside a model folder)."""
    if os.environ.get("FACTORY_CACHE_DIR"):
        return Path(os.environ["FACTORY_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "factory"


def encoder_cache_path(texts: dict[str, list[str]], enc_cfg: EncoderConfig) -> Path:
    h = hashlib.sha256(json.dumps(asdict(enc_cfg) | {"latent_dim": None, "lora_r": None, "lora_alpha": None},
                                  sort_keys=True).encode())
    for split in sorted(texts):
        h.update(split.encode())
        for t in texts[split]:
            h.update(t.encode())
            h.update(b"\n")
    return encoder_cache_dir() / "encoder" / f"{h.hexdigest()[:24]}.pt"


def _batches(n: int, size: int, g: torch.Generator | None):
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    for i in range(0, n, size):
        yield order[i:i + size]


class Trainer:
    def __init__(self, domain, cfg: TrainConfig, out: Path, log: Callable[[dict], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None):
        self.device = resolve_device(cfg.device)  # a DeviceError before anything is written
        # The stack is built in a staging folder beside `out` and renamed into place whole when
        # every stage is done, so `out` always holds one complete stack (old or new), never a mix.
        self.domain, self.cfg, self.final = domain, cfg, Path(out)
        self.out = staging_dir(self.final)
        self.ckpt = self.out / "checkpoints"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.log_fn, self.progress = log, progress or (lambda *a: None)
        torch.set_num_threads(cfg.threads)
        self.columns = domain.spec.generated_names
        self.tok = SchemaTokenizer(domain.spec, self.columns)
        train, val = (domain.to_generated(domain.load_split(s)) for s in ("train", "val"))
        if cfg.max_train_rows:
            train, val = _sample(train, cfg.max_train_rows, cfg.seed), _sample(val, max(32, cfg.max_train_rows // 8), cfg.seed)
        self.frames = {"train": train, "val": val}
        self.ids = {k: self.tok.encode(v) for k, v in self.frames.items()}
        cfg.decoder.vocab_size, cfg.decoder.seq_len = self.tok.vocab_size, self.tok.length
        cfg.encoder.latent_dim = cfg.denoiser.latent_dim
        self.t0 = time.time()
        self.stopped_early: list[str] = []  # stages cut short by the time budget

    def over_budget(self, stage: str) -> bool:
        """Has training overrun the end of `stage`'s share of `max_minutes` (budget_shares; diffusion 97%)?"""
        if not self.cfg.max_minutes:
            return False
        # diffusion ends a little early: saving the stack and starting the process take time too
        share = {"lm": self.cfg.budget_shares[0], "vae": self.cfg.budget_shares[1], "diffusion": 0.97}[stage]
        if time.time() - self.t0 <= share * self.cfg.max_minutes * 60:
            return False
        if stage not in self.stopped_early:
            self.stopped_early.append(stage)
            self.log({"stage": stage, "budget": f"stopped early: past {share:.0%} of the "
                                                f"{self.cfg.max_minutes:g}-minute budget"})
        return True

    def log(self, rec: dict):
        rec = {"time_s": round(time.time() - self.t0, 1)} | rec
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.log_fn:
            self.log_fn(rec)

    def _save_ckpt(self, stage: str, state: dict):
        tmp = self.ckpt / f"{stage}.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.ckpt / f"{stage}.pt")

    def _load_ckpt(self, stage: str, resume: bool) -> dict | None:
        p = self.ckpt / f"{stage}.pt"
        return _safe_load(p) if resume and p.exists() else None

    def _stage_done(self, stage: str) -> bool:
        return (self.ckpt / f"{stage}.done").exists()

    def _mark_done(self, stage: str) -> None:
        """Written after a stage's files are saved: --resume skips only stages whose files are whole."""
        (self.ckpt / f"{stage}.done").write_text("done\n")

    # ---- stage 1 --------------------------------------------------------------------
    def train_lm(self, resume: bool) -> DomainDecoder:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        dec = DomainDecoder(cfg.decoder).to(self.device)
        opt = torch.optim.AdamW(dec.parameters(), lr=cfg.lm_lr, weight_decay=0.01)
        steps_per_epoch = math.ceil(len(self.ids["train"]) / cfg.lm_batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lm_lr, total_steps=cfg.lm_epochs * steps_per_epoch,
                                                    pct_start=0.1)
        g = torch.Generator().manual_seed(cfg.seed)
        start, best, best_state, bad = 0, float("inf"), None, 0
        if (ck := self._load_ckpt("lm", resume)) is not None:
            dec.load_state_dict(ck["model"]), opt.load_state_dict(ck["opt"]), sched.load_state_dict(ck["sched"])
            g.set_state(ck["rng"])
            start, best, best_state, bad = ck["epoch"] + 1, ck["best"], ck["best_state"], ck["bad"]
        tokens = self.tok.length
        for epoch in range(start, cfg.lm_epochs):
            dec.train()
            tot, n = 0.0, 0
            for i, idx in enumerate(_batches(len(self.ids["train"]), cfg.lm_batch, g)):
                nll = dec.forward_prompted(None, self.ids["train"][idx].to(self.device)).mean() / tokens
                opt.zero_grad()
                nll.backward()
                torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
                opt.step(), sched.step()
                tot, n = tot + nll.item() * len(idx), n + len(idx)
                self.progress(f"lm epoch {epoch + 1}/{cfg.lm_epochs}", i + 1, steps_per_epoch)
            val = self._lm_val(dec)
            self.log({"stage": "lm", "epoch": epoch + 1, "train_nll_per_token": tot / n, "val_nll_per_token": val})
            if val < best - 1e-4:
                best, bad, best_state = val, 0, {k: v.clone() for k, v in dec.state_dict().items()}
            else:
                bad += 1
            self._save_ckpt("lm", {"model": dec.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                   "rng": g.get_state(), "epoch": epoch, "best": best, "best_state": best_state,
                                   "bad": bad})
            if bad >= cfg.lm_patience or self.over_budget("lm"):
                break
        dec.load_state_dict(best_state)
        dec.save_pretrained(self.out / "decoder")
        return dec.freeze()

    @torch.no_grad()
    def _lm_val(self, dec) -> float:
        dec.eval()
        ids = self.ids["val"]
        tot = sum(dec.forward_prompted(None, ids[idx].to(self.device)).sum().item()
                  for idx in _batches(len(ids), 256, None))
        return tot / (len(ids) * self.tok.length)

    # ---- stage 2 --------------------------------------------------------------------
    def _texts(self, split: str) -> list[str]:
        spec = self.domain.spec
        return [values_text(r, spec, self.columns) for r in self.frames[split].select(self.columns).iter_rows(named=True)]

    def _cache_bottom(self, enc: RecordEncoder) -> dict:
        """Frozen encoder layers run once per record (the expensive part, done once, not per epoch).

        Cached outside the model folder (which gets shipped): in `encoder_cache_dir()`, under a hash
        of the records' texts and the encoder settings, so a cache is reused only for the same data."""
        texts_of = {split: self._texts(split) for split in ("train", "val")}
        path = encoder_cache_path(texts_of, enc.cfg)
        if path.exists():
            from .config import ModelError

            try:
                return _safe_load(path)
            except ModelError:  # a truncated or foreign cache: rebuild it
                path.unlink(missing_ok=True)
        cache = {}
        for split in ("train", "val"):
            texts = texts_of[split]
            hs, ms = [], []
            for i in range(0, len(texts), 128):
                h, m = enc.encode_frozen(texts[i:i + 128])
                hs.append(h.half().cpu()), ms.append(m.cpu())
                self.progress(f"caching frozen encoder layers ({split})", min(i + 128, len(texts)), len(texts))
            cache[split] = (torch.cat(hs), torch.cat(ms))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save(cache, tmp)
        tmp.replace(path)
        return cache

    def _vae_loss(self, enc, inj, dec, hidden, mask, ids, beta, g=None, sample=True):
        hidden, mask, ids = hidden.to(self.device), mask.to(self.device), ids.to(self.device)
        mu, logvar = enc.forward_top(hidden.float(), mask)
        z = enc.sample(mu, logvar, g) if sample else mu
        rec = dec.forward_prompted(inj(z), ids)  # [B] nats per record
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return rec.mean(), kl.mean(), (rec + beta * kl).mean()

    def train_vae(self, dec: DomainDecoder, resume: bool):
        cfg = self.cfg
        torch.manual_seed(cfg.seed + 1)
        enc = RecordEncoder(cfg.encoder).to(self.device)
        inj = SoftPromptInjector(InjectorConfig(cfg.denoiser.latent_dim, cfg.injector_hidden,
                                                cfg.decoder.prompt_len, cfg.decoder.hidden_size),
                                 null_prompt=dec.null_prompt.detach()).to(self.device)
        cache = self._cache_bottom(enc)
        params = [p for p in enc.parameters() if p.requires_grad] + list(inj.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.vae_lr)
        g = torch.Generator().manual_seed(cfg.seed + 2)
        start, beta, best_rec, best_state, since_best, since_beta = 0, cfg.beta_start, float("inf"), None, 0, 0
        if (ck := self._load_ckpt("vae", resume)) is not None:
            enc.load_state_dict(ck["enc"]), inj.load_state_dict(ck["inj"]), opt.load_state_dict(ck["opt"])
            g.set_state(ck["rng"])
            start, beta, best_rec, best_state = ck["epoch"] + 1, ck["beta"], ck["best_rec"], ck["best_state"]
            since_best, since_beta = ck["since_best"], ck["since_beta"]
        (h_tr, m_tr), (h_va, m_va) = cache["train"], cache["val"]
        ids_tr, ids_va = self.ids["train"], self.ids["val"]
        steps = math.ceil(len(ids_tr) / cfg.vae_batch)
        for epoch in range(start, cfg.vae_epochs):
            enc.train(), inj.train()
            sums = torch.zeros(2)
            for i, idx in enumerate(_batches(len(ids_tr), cfg.vae_batch, g)):
                rec, kl, loss = self._vae_loss(enc, inj, dec, h_tr[idx], m_tr[idx], ids_tr[idx], beta, g)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sums += torch.tensor([rec.item(), kl.item()]) * len(idx)
                self.progress(f"vae epoch {epoch + 1}/{cfg.vae_epochs} beta={beta:.4f}", i + 1, steps)
            enc.eval(), inj.eval()
            with torch.no_grad():
                vr = vk = 0.0
                for idx in _batches(len(ids_va), 256, None):
                    rec, kl, _ = self._vae_loss(enc, inj, dec, h_va[idx], m_va[idx], ids_va[idx], beta, sample=False)
                    vr, vk = vr + rec.item() * len(idx), vk + kl.item() * len(idx)
                vr, vk = vr / len(ids_va), vk / len(ids_va)
            tr = (sums / len(ids_tr)).tolist()
            self.log({"stage": "vae", "epoch": epoch + 1, "beta": beta, "train_recon": tr[0], "train_kl": tr[1],
                      "val_recon": vr, "val_kl": vk, "val_recon_per_token": vr / self.tok.length})
            improved = vr < best_rec
            if vr < best_rec * (1 - cfg.stall_tol):
                since_best, since_beta = 0, 0
            else:
                since_best, since_beta = since_best + 1, since_beta + 1
                if since_beta >= cfg.beta_patience and beta > cfg.beta_min:
                    beta, since_beta = max(cfg.beta_min, beta * cfg.beta_factor), 0
            if improved:  # keep the best checkpoint even when the gain is below the stall tolerance
                best_rec = vr
                best_state = {"enc": {k: v.clone() for k, v in enc.trainable_state().items()},
                              "inj": {k: v.clone() for k, v in inj.state_dict().items()}}
            self._save_ckpt("vae", {"enc": enc.state_dict(), "inj": inj.state_dict(), "opt": opt.state_dict(),
                                    "rng": g.get_state(), "epoch": epoch, "beta": beta, "best_rec": best_rec,
                                    "best_state": best_state, "since_best": since_best, "since_beta": since_beta})
            if since_best >= cfg.vae_patience or self.over_budget("vae"):
                break
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(enc.model, {k[5:]: v for k, v in best_state["enc"].items() if k.startswith("lora.")})
        enc.head.load_state_dict({k[5:]: v for k, v in best_state["enc"].items() if k.startswith("head.")})
        inj.load_state_dict(best_state["inj"])
        enc.save_pretrained(self.out / "encoder")
        inj.save_pretrained(self.out / "injector")
        return enc.eval(), inj.eval(), cache

    # ---- stage 3 --------------------------------------------------------------------
    def _latent_targets(self, enc: RecordEncoder, cache: dict):
        """The train rows' posterior means, standardized per dimension (what the denoiser learns), and
        the mean and std that undo it at sampling time."""
        with torch.no_grad():
            h, m = cache["train"]
            mus = torch.cat([enc.forward_top(h[i:i + 256].to(self.device).float(), m[i:i + 256].to(self.device))[0]
                             for i in range(0, len(h), 256)])
        mean, std = mus.mean(0), mus.std(0).clamp(min=1e-6)
        return (mus - mean) / std, mean, std

    def _fit_denoiser(self, den, x: torch.Tensor, stage: str, label: str, batch_loss, resume: bool,
                      budget: bool = False) -> None:
        """The denoiser's training loop: AdamW + cosine schedule over `diffusion_steps` batches of
        latents; `batch_loss(idx, g)` is the loss of the rows `idx`. A checkpoint every 500 steps
        (`stage`), and with `budget` a stop once past the time budget (after `min_diffusion_steps`)."""
        cfg = self.cfg
        opt = torch.optim.AdamW(den.parameters(), lr=cfg.diffusion_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.diffusion_steps)
        g = torch.Generator().manual_seed(cfg.seed + 4)
        start, run = 0, 0.0
        if (ck := self._load_ckpt(stage, resume)) is not None:
            den.load_state_dict(ck["model"]), opt.load_state_dict(ck["opt"]), sched.load_state_dict(ck["sched"])
            g.set_state(ck["rng"])
            start = ck["step"]
        for step in range(start, cfg.diffusion_steps):
            idx = torch.randint(len(x), (cfg.diffusion_batch,), generator=g)
            loss = batch_loss(idx, g)
            opt.zero_grad()
            loss.backward()
            opt.step(), sched.step()
            run = 0.98 * run + 0.02 * loss.item() if step > start else loss.item()
            self.progress(label, step + 1, cfg.diffusion_steps)
            if (step + 1) % 500 == 0 or step + 1 == cfg.diffusion_steps:
                self.log({"stage": stage, "step": step + 1, "loss": run})
                self._save_ckpt(stage, {"model": den.state_dict(), "opt": opt.state_dict(),
                                        "sched": sched.state_dict(), "rng": g.get_state(), "step": step + 1})
            if (budget and (step + 1) % 100 == 0 and cfg.min_diffusion_steps <= step + 1 < cfg.diffusion_steps
                    and self.over_budget(stage)):
                self.log({"stage": stage, "step": step + 1, "loss": run})
                break

    def _save_denoiser(self, den, sampler: EDMSampler, mean: torch.Tensor, std: torch.Tensor) -> None:
        from safetensors.torch import save_file

        den.save_pretrained(self.out / "denoiser")
        sampler.save_pretrained(self.out / "denoiser")
        save_file({"mean": mean.cpu(), "std": std.cpu()}, str(self.out / "denoiser" / "latent_stats.safetensors"))

    def train_diffusion(self, enc: RecordEncoder, cache: dict, resume: bool):
        x, mean, std = self._latent_targets(enc, cache)
        torch.manual_seed(self.cfg.seed + 3)
        den = Denoiser(self.cfg.denoiser).to(self.device)
        self._fit_denoiser(den, x, "diffusion", "diffusion", lambda idx, g: den.loss(x[idx.to(self.device)], g),
                           resume, budget=True)
        self._save_denoiser(den, EDMSampler(self.cfg.sampler), mean, std)
        return den

    # ---- all ------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        if not resume:  # a fresh training never builds on an earlier, interrupted one's files
            import shutil

            shutil.rmtree(self.out, ignore_errors=True)
            self.ckpt.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        self.tok.save_pretrained(self.out)
        times = {}
        t = time.time()
        if resume and self._stage_done("lm"):
            dec = DomainDecoder.from_pretrained(self.out / "decoder").to(self.device).freeze()
        else:
            dec = self.train_lm(resume)
            self._mark_done("lm")
        times["lm_s"] = time.time() - t
        t = time.time()
        if resume and self._stage_done("vae"):
            enc = RecordEncoder.from_pretrained(self.out / "encoder").to(self.device).eval()
            inj = SoftPromptInjector.from_pretrained(self.out / "injector").to(self.device)
            cache = self._cache_bottom(enc)
        else:
            enc, inj, cache = self.train_vae(dec, resume)
            self._mark_done("vae")
        times["vae_s"] = time.time() - t
        t = time.time()
        self.train_diffusion(enc, cache, resume)
        times["diffusion_s"] = time.time() - t
        summary = {"domain": self.domain.name, "rule_set_hash": self.domain.rule_set_hash, "columns": self.columns,
                   "train_rows": len(self.ids["train"]), "val_rows": len(self.ids["val"]),
                   "device": self.device.type,
                   "times_s": {k: round(v, 1) for k, v in times.items()},
                   "stopped_early_by_budget": self.stopped_early,
                   "total_s": round(time.time() - self.t0, 1)}
        summary["files"] = stack_manifest(self.out)  # sha256 of every stack file, checked on load
        (self.out / "pipeline.json").write_text(json.dumps(summary, indent=1))
        self.log({"stage": "done"} | summary)
        commit_stack(self.out, self.final)
        return summary


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.training"


def stack_manifest(path: Path) -> dict[str, str]:
    """sha256 of every file of a stack folder that generation reads (not checkpoints or logs)."""
    import hashlib

    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and "checkpoints" not in p.relative_to(path).parts
            and p.suffix in (".json", ".safetensors") and p.name != "pipeline.json"}


def commit_stack(staging: Path, final: Path) -> None:
    """Replace `final` with the finished `staging` folder: the old stack is moved aside, the new
    one renamed into place, then the old one deleted. Checkpoints stay behind (deleted)."""
    import shutil

    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.parent / f".{final.name}.replaced"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _safe_load(path: Path):
    """A checkpoint, loaded with weights_only=True: tensors and plain containers only, so a
    pickle planted in a checkpoint cannot run code. An unreadable file is one ModelError."""
    from .config import ModelError

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated file, foreign pickle, not a torch file: torch raises many kinds
        line = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ModelError(f"checkpoint {path} cannot be loaded safely ({line}); delete it to redo that stage, "
                         "or train without --resume") from None


# ---- the conditional stage (issue 15) ----------------------------------------------------
@dataclass
class ConditionalConfig:
    """A conditional VAE + conditional latent diffusion on top of a trained (frozen) decoder.

    The injector reads z and c (a random subset of the record's own column values, see
    factory/difflm/condition.py); the KL has a free-bits floor (`free_bits` nats per latent
    dimension, averaged over the batch, Kingma et al. 2016) so that z is not squeezed to
    nothing by a decoder that already models the records well."""
    seed: int = 0
    threads: int = 1
    max_train_rows: int = 0
    bins: int = 10
    cond_dim: int = 64
    p_empty: float = 0.2
    max_keep: int = 3
    epochs: int = 4
    batch: int = 64
    lr: float = 1e-3
    beta: float = 0.1
    free_bits: float = 0.25
    # > 0: fine-tune a copy of the decoder (saved in conditional/decoder/) at this learning rate.
    # Measured on finance: with the shipped decoder frozen, one epoch gave c = one column value
    # 0.003 nats/record of reconstruction and z (KL 14.5 nats) 0.8: a decoder pretrained with a
    # constant null prompt hardly reads its prompt, so the prompt cannot carry the condition.
    decoder_lr: float = 3e-4
    diffusion_steps: int = 4000
    diffusion_batch: int = 256
    diffusion_lr: float = 1e-3

    @classmethod
    def from_dict(cls, d: dict) -> "ConditionalConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown conditional training config keys: {sorted(unknown)}")
        return cls(**d)


class ConditionalTrainer:
    """Trains `<base>/conditional/` (encoder, injector, denoiser, condition codec) from a
    finished stack in `base`, whose tokenizer and decoder it reuses unchanged."""

    def __init__(self, domain, base: Path, cfg: ConditionalConfig, out: Path | None = None,
                 log: Callable[[dict], None] | None = None, progress: Callable[[str, int, int], None] | None = None):
        from .condition import CodecConfig, ConditionCodec

        self.domain, self.base, self.cfg = domain, Path(base), cfg
        self.out = Path(out) if out is not None else self.base / "conditional"
        self.ckpt = self.out / "checkpoints"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.log_fn, self.progress = log, progress or (lambda *a: None)
        torch.set_num_threads(cfg.threads)
        self.columns = domain.spec.generated_names
        self.tok = SchemaTokenizer.from_pretrained(self.base, domain.spec)
        records = {s: domain.load_split(s) for s in ("train", "val")}
        if cfg.max_train_rows:
            records = {"train": records["train"].head(cfg.max_train_rows),
                       "val": records["val"].head(max(32, cfg.max_train_rows // 8))}
        self.records = records
        self.frames = {k: domain.to_generated(v) for k, v in records.items()}
        self.ids = {k: self.tok.encode(v) for k, v in self.frames.items()}
        self.codec = ConditionCodec(CodecConfig.fit(domain.spec, records["train"], cfg.bins))
        self.c = {k: self.codec.encode(v) for k, v in records.items()}
        self.t0 = time.time()

    device = torch.device("cpu")
    log = Trainer.log
    _save_ckpt = Trainer._save_ckpt
    _latent_targets = Trainer._latent_targets
    _fit_denoiser = Trainer._fit_denoiser
    _save_denoiser = Trainer._save_denoiser
    _load_ckpt = Trainer._load_ckpt
    _texts = Trainer._texts
    _cache_bottom = Trainer._cache_bottom

    def _loss(self, enc, inj, dec, hidden, mask, ids, c, g=None, sample=True):
        mu, logvar = enc.forward_top(hidden.float(), mask)
        z = enc.sample(mu, logvar, g) if sample else mu
        rec = dec.forward_prompted(inj(z, c), ids)
        kl_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)  # [B, d]
        kl = kl_dim.sum(1).mean()
        kl_term = kl_dim.mean(0).clamp(min=self.cfg.free_bits).sum()
        return rec.mean(), kl, rec.mean() + self.cfg.beta * kl_term

    def train_vae(self, resume: bool = False):
        from .condition import column_dropout
        from .injector import ConditionalInjector

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        dec = DomainDecoder.from_pretrained(self.base / "decoder").freeze()
        if cfg.decoder_lr > 0:
            for p in dec.parameters():
                p.requires_grad_(True)
        enc = RecordEncoder.from_pretrained(self.base / "encoder")  # starts at the shipped posterior
        for n, p in enc.named_parameters():
            p.requires_grad_("lora_" in n or n.startswith("head."))
        inj = ConditionalInjector.from_base(SoftPromptInjector.from_pretrained(self.base / "injector"),
                                            self.codec.sizes, cfg.cond_dim)
        cache = self._cache_bottom(enc)
        params = [p for p in enc.parameters() if p.requires_grad] + list(inj.parameters())
        groups = [{"params": params}] + ([{"params": list(dec.parameters()), "lr": cfg.decoder_lr}]
                                         if cfg.decoder_lr > 0 else [])
        params = params + (list(dec.parameters()) if cfg.decoder_lr > 0 else [])
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        (h_tr, m_tr), (h_va, m_va) = cache["train"], cache["val"]
        ids_tr, ids_va, c_tr, c_va = self.ids["train"], self.ids["val"], self.c["train"], self.c["val"]
        start, best, best_state = 0, float("inf"), None
        if (ck := self._load_ckpt("cvae", resume)) is not None:
            enc.load_state_dict(ck["enc"]), inj.load_state_dict(ck["inj"]), opt.load_state_dict(ck["opt"])
            dec.load_state_dict(ck["dec"])
            g.set_state(ck["rng"])
            start, best, best_state = ck["epoch"] + 1, ck["best"], ck["best_state"]
        steps = math.ceil(len(ids_tr) / cfg.batch)
        if start == 0:  # "before": the base stack (c's weights start at zero, so this is it exactly)
            self.log({"stage": "cvae", "epoch": 0, **self.measure(enc.eval(), inj, dec, (h_va, m_va), ids_va, c_va)})
        for epoch in range(start, cfg.epochs):
            enc.train(), inj.train()
            if cfg.decoder_lr > 0:
                dec.train()
            sums = torch.zeros(2)
            for i, idx in enumerate(_batches(len(ids_tr), cfg.batch, g)):
                c = column_dropout(c_tr[idx], g, cfg.p_empty, cfg.max_keep)
                rec, kl, loss = self._loss(enc, inj, dec, h_tr[idx], m_tr[idx], ids_tr[idx], c, g)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sums += torch.tensor([rec.item(), kl.item()]) * len(idx)
                self.progress(f"conditional vae epoch {epoch + 1}/{cfg.epochs}", i + 1, steps)
            enc.eval(), inj.eval(), dec.eval()
            val = self.measure(enc, inj, dec, (h_va, m_va), ids_va, c_va)
            tr = (sums / len(ids_tr)).tolist()
            self.log({"stage": "cvae", "epoch": epoch + 1, "train_recon": tr[0], "train_kl": tr[1], **val})
            score = val["val_recon_posterior_c_empty"]
            if score < best:
                best = score
                best_state = {"enc": {k: v.clone() for k, v in enc.state_dict().items()},
                              "inj": {k: v.clone() for k, v in inj.state_dict().items()},
                              "dec": {k: v.clone() for k, v in dec.state_dict().items()}}
            self._save_ckpt("cvae", {"enc": enc.state_dict(), "inj": inj.state_dict(), "opt": opt.state_dict(),
                                     "dec": dec.state_dict(),
                                     "rng": g.get_state(), "epoch": epoch, "best": best, "best_state": best_state})
        enc.load_state_dict(best_state["enc"]), inj.load_state_dict(best_state["inj"])
        if cfg.decoder_lr > 0:
            dec.load_state_dict(best_state["dec"])
            dec.save_pretrained(self.out / "decoder")
        dec.freeze()
        enc.save_pretrained(self.out / "encoder")
        inj.save_pretrained(self.out / "injector")
        self.codec.save_pretrained(self.out)
        return enc.eval(), inj.eval(), cache

    @torch.no_grad()
    def measure(self, enc, inj, dec, cache_split, ids, c_full) -> dict:
        """Validation: reconstruction NLL per record with the posterior mean z (c absent, and c =
        one random column), with z = 0 (c absent), and KL per record."""
        h, m = cache_split
        g = torch.Generator().manual_seed(123)
        out = {"val_recon_posterior_c_empty": 0.0, "val_recon_posterior_c_one": 0.0, "val_recon_prior_mean": 0.0,
               "val_recon_null_prompt": 0.0, "val_kl": 0.0}
        for idx in _batches(len(ids), 256, None):
            mu, logvar = enc.forward_top(h[idx].float(), m[idx])
            empty = torch.zeros_like(c_full[idx])
            one = torch.where(torch.rand(c_full[idx].shape, generator=g).argsort(1) == 0, c_full[idx], 0)
            out["val_recon_posterior_c_empty"] += dec.forward_prompted(inj(mu, empty), ids[idx]).sum().item()
            out["val_recon_posterior_c_one"] += dec.forward_prompted(inj(mu, one), ids[idx]).sum().item()
            out["val_recon_prior_mean"] += dec.forward_prompted(inj(torch.zeros_like(mu), empty), ids[idx]).sum().item()
            out["val_recon_null_prompt"] += dec.forward_prompted(None, ids[idx]).sum().item()
            out["val_kl"] += (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)).sum().item()
        return {k: v / len(ids) for k, v in out.items()}

    def train_diffusion(self, enc, cache, resume: bool = False):
        from .condition import column_dropout
        from .diffusion import ConditionalDenoiser, ConditionalDenoiserConfig

        cfg = self.cfg
        base_cfg = Denoiser.from_pretrained(self.base / "denoiser").cfg
        x, mean, std = self._latent_targets(enc, cache)
        torch.manual_seed(cfg.seed + 3)
        den = ConditionalDenoiser(ConditionalDenoiserConfig(**asdict(base_cfg), cond_sizes=tuple(self.codec.sizes)))
        c_tr = self.c["train"]
        self._fit_denoiser(den, x, "cdiffusion", "conditional diffusion",
                           lambda idx, g: den.loss(x[idx], g, c=column_dropout(c_tr[idx], g, cfg.p_empty, cfg.max_keep)),
                           resume)
        self._save_denoiser(den, EDMSampler.from_pretrained(self.base / "denoiser"), mean, std)
        return den

    def run(self, resume: bool = False) -> dict:
        (self.out / "conditional_config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        t = time.time()
        enc, inj, cache = self.train_vae(resume)
        vae_s = time.time() - t
        t = time.time()
        self.train_diffusion(enc, cache, resume)
        summary = {"domain": self.domain.name, "base_rule_set_hash": self.domain.rule_set_hash,
                   "condition_columns": self.codec.names, "train_rows": len(self.ids["train"]),
                   "times_s": {"vae_s": round(vae_s, 1), "diffusion_s": round(time.time() - t, 1)}}
        (self.out / "pipeline.json").write_text(json.dumps(summary, indent=1))
        self.log({"stage": "done"} | summary)
        return summary
