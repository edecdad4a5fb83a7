"""A training plan that fits a time budget: model size, epochs, batch size and rows from the
table's shape (`factory train --max-minutes M`, or `max_minutes` in the domain's train settings).

The plan is computed from a fixed cost model, not from timing this run, so the same table,
settings and budget always give the same plan (and the same stack for a seed). The cost model
is the finance stack's measured training on this project's 2-core machine (one thread, beside
another training: domains/finance/model/train_log.jsonl): per training row and token, a decoder
LM epoch takes 8.7e-5 s (hidden 128, 4 layers); the frozen-encoder cache 0.0104 s per row, once;
a VAE epoch 8.1e-3 s per row at 56 tokens; a diffusion step 0.023 s. The small tier (hidden 64,
2 layers) is taken as 3x cheaper for the LM and 1.6x for the VAE (its encoder layer does not
shrink). Rough by nature: the Trainer also stops a stage that overruns its share of the budget
(and logs that it did), which is the only case where wall time changes the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LM_ROW_TOKEN_S = 8.7e-5
CACHE_ROW_S = 0.0104
VAE_ROW_S = 8.1e-3
VAE_TOKENS_REF = 56
DIFFUSION_STEP_S = 0.023
SAFETY = 0.8  # plan for 80% of the budget: the machine may be busier than when the costs were measured
MIN_ROWS = 200

FULL = {"decoder": {}, "denoiser": {}, "encoder": {}}  # the TrainConfig defaults (the finance sizes)
SMALL = {"decoder": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 192, "prompt_len": 2},
         "denoiser": {"latent_dim": 16, "hidden": 128, "blocks": 2, "emb_dim": 64},
         "encoder": {"lora_r": 4}}
TIERS = {"full": (FULL, 1.0, 1.0), "small": (SMALL, 1 / 3, 1 / 1.6)}


@dataclass
class Plan:
    settings: dict  # TrainConfig keys
    estimate_s: float  # what the cost model expects
    budget_s: float
    tier: str
    rows: int  # training rows used

    def describe(self) -> str:
        s = self.settings
        return (f"{self.tier} model, {self.rows:,} training rows, {s['lm_epochs']} LM epochs, {s['vae_epochs']} VAE "
                f"epochs, {s['diffusion_steps']} diffusion steps: about {self.estimate_s / 60:.1f} min "
                f"of a {self.budget_s / 60:.1f} min budget")


def estimate(rows: int, tokens: int, tier: str, lm_epochs: int, vae_epochs: int, steps: int) -> dict:
    """Seconds per stage the cost model expects."""
    _, lm_f, vae_f = TIERS[tier]
    val = max(32, rows // 8)
    vae_row = VAE_ROW_S * (0.5 + 0.5 * tokens / VAE_TOKENS_REF) * vae_f
    return {"lm": lm_epochs * rows * tokens * LM_ROW_TOKEN_S * lm_f,
            "vae": CACHE_ROW_S * (rows + val) + vae_epochs * rows * vae_row,
            "diffusion": steps * DIFFUSION_STEP_S * (0.5 if tier == "small" else 1.0)}


def plan(rows: int, tokens: int, max_minutes: float) -> Plan:
    """The largest plan whose estimate fits SAFETY x the budget: full model and epochs first, then
    fewer epochs, then the small model, then fewer rows, then the fewest epochs."""
    budget = max_minutes * 60
    target = SAFETY * budget
    candidates = [("full", 10, 6, 3000), ("full", 8, 5, 3000), ("full", 6, 4, 2000), ("small", 6, 4, 2000), ("small", 4, 3, 1000),
                  ("small", 3, 2, 500)]
    for tier, lm, vae, steps in candidates:
        if sum(estimate(rows, tokens, tier, lm, vae, steps).values()) <= target:
            return _plan(rows, rows, tokens, tier, lm, vae, steps, budget)
    tier, lm, vae, steps = "small", 3, 2, 500
    per_row = sum(estimate(1000, tokens, tier, lm, vae, 0).values()) / 1000
    room = target - estimate(0, tokens, tier, 0, 0, steps)["diffusion"]
    used = max(MIN_ROWS, min(rows, int(room / per_row))) if room > 0 else MIN_ROWS
    if sum(estimate(used, tokens, tier, lm, vae, steps).values()) > target:
        lm, vae, steps = 2, 1, 200
        per_row = sum(estimate(1000, tokens, tier, lm, vae, 0).values()) / 1000
        room = target - estimate(0, tokens, tier, 0, 0, steps)["diffusion"]
        used = max(MIN_ROWS, min(rows, int(room / per_row))) if room > 0 else MIN_ROWS
    return _plan(rows, used, tokens, tier, lm, vae, steps, budget)


def _plan(rows, used, tokens, tier, lm, vae, steps, budget) -> Plan:
    sizes = TIERS[tier][0]
    # batches: 64 rows (the finance setting) up to 10k rows, then larger so an epoch has <= ~160 steps
    batch = int(min(256, max(64, 2 ** math.ceil(math.log2(max(1, used) / 160)))))
    settings = {"decoder": dict(sizes["decoder"]), "denoiser": dict(sizes["denoiser"]), "encoder": dict(sizes["encoder"]),
                "lm_epochs": lm, "vae_epochs": vae, "diffusion_steps": steps, "lm_batch": batch, "vae_batch": batch,
                "max_train_rows": 0 if used >= rows else used}
    stages = estimate(used, tokens, tier, lm, vae, steps)
    est = sum(stages.values())
    # each stage's deadline in proportion to its estimate, so that overruns are shared, not left to diffusion
    settings["budget_shares"] = [round(stages["lm"] / est, 3), round((stages["lm"] + stages["vae"]) / est, 3)]
    settings["min_diffusion_steps"] = min(steps, 500)
    return Plan(settings, est, budget, tier, used)


def merge(planned: dict, explicit: dict) -> dict:
    """The plan, with every key the user's settings set explicitly winning (sections merged per key)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in planned.items()}
    for k, v in explicit.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out
