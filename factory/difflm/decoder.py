"""Decoder: a causal LM that writes a record given k soft-prompt vectors.

Two kinds of decoder share one interface (`embed`, `forward_prompted`, `generate`):
- the compact *domain decoder* (CPU default): a small Llama-architecture model
  (transformers) over the schema tokenizer, pretrained on the domain's training
  records with a learned k-vector "null prompt" in the soft-prompt slot, then frozen;
- any local Hugging Face causal-LM directory (e.g. SmolLM2-135M from a GGUF file),
  used over its own text tokenizer with the serialized `key: value` text.
Its weights stay frozen while the VAE trains; only the soft prompt steers it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from .config import POSITIVE, load_config
from .tokenizer import BOS, SchemaTokenizer


def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class DecoderConfig:
    hidden_size: int = 128  # 0.8M parameters: the CPU budget (train <= 60 min, 100k records <= 10 min)
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    prompt_len: int = 4  # k soft-prompt vectors
    vocab_size: int = 0  # set from the tokenizer
    seq_len: int = 0  # record tokens, set from the tokenizer


DECODER_RANGES = {k: POSITIVE for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "prompt_len",
                                         "vocab_size", "seq_len")}
DECODER_RANGES["__all__"] = (lambda c: c.hidden_size % c.num_heads == 0, "hidden_size must be a multiple of num_heads")


class FrozenLM(nn.Module):
    """What every DiffLM decoder shares: an `lm` whose input embeddings take the soft prompt."""

    lm: nn.Module

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        return self

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)


class DomainDecoder(FrozenLM):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
            max_position_embeddings=cfg.seq_len + cfg.prompt_len + 8, tie_word_embeddings=True,
            bos_token_id=BOS, eos_token_id=None, pad_token_id=0,
        ))
        # The unconditional prompt the LM is pretrained with; the injector starts from it.
        self.null_prompt = nn.Parameter(torch.randn(cfg.prompt_len, cfg.hidden_size) * 0.02)

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    def forward_prompted(self, prompt: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. prompt [B,k,H] (None = null prompt), ids [B,L] -> per-row NLL summed over tokens [B]."""
        B = ids.shape[0]
        if prompt is None:
            prompt = self.null_prompt.expand(B, -1, -1)
        bos = torch.full((B, 1), BOS, dtype=torch.long, device=ids.device)
        x = torch.cat([prompt, self.embed(torch.cat([bos, ids[:, :-1]], 1))], 1)
        logits = self.lm(inputs_embeds=x, use_cache=False).logits[:, prompt.shape[1]:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
        return nll.view(B, -1).sum(1)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor | None, tokenizer: SchemaTokenizer, generator: torch.Generator,
                 temperature: float = 1.0, constrained: bool = True, batch: int | None = None,
                 min_p: float = 0.0, row_masks: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Sample one record per prompt row; returns ids [B, L].

        `row_masks` {position t: BoolTensor [B, V]}: per-row masks ANDed with the schema mask at
        step t (conditions force a column's value this way); a row the AND would leave with no
        token keeps the schema mask alone (the loop's condition check then rejects it).

        `min_p` > 0: drop tokens whose probability is below min_p times the step's most
        likely token's (min-p sampling), after the schema mask.
        With `constrained`, each step's logits are masked to what the schema allows
        (tokenizer.allowed), so every output parses by construction. The KV cache is
        pre-allocated (transformers' StaticCache): the default growing cache re-copied
        itself every step and took 62% of generation time (profiled, batch 2000).
        Runs in the LM's own dtype (see `to_precision`) and on its device: `generator` and
        the tokenizer's masks (`SchemaTokenizer.to`) must be on that device too.
        """
        lm = self.lm
        dev = self.null_prompt.device
        B = prompt.shape[0] if prompt is not None else batch
        if prompt is None:
            prompt = self.null_prompt.expand(B, -1, -1)
        k = prompt.shape[1]
        cache = StaticCache(config=lm.config, max_cache_len=k + 1 + tokenizer.length)
        bos = self.embed(torch.full((B, 1), BOS, dtype=torch.long, device=dev))
        x = torch.cat([prompt.to(bos.dtype), bos], 1)
        logits = lm(inputs_embeds=x, cache=cache, use_cache=True,
                    position_ids=torch.arange(k + 1, device=dev)[None]).logits[:, -1]
        state = tokenizer.init_state(B)
        tokens = []
        log_min_p = math.log(min_p) if min_p > 0 else None
        for t in range(tokenizer.length):
            logits = logits.float() / temperature
            if constrained:
                logits = logits.masked_fill(~tokenizer.allowed(t, state), float("-inf"))
            if row_masks is not None and t in row_masks:  # per-row hook (conditions); see the docstring
                forced = logits.masked_fill(~row_masks[t], float("-inf"))
                logits = torch.where(torch.isfinite(forced).any(-1, keepdim=True), forced, logits)
            if min_p > 0:  # p / p_max < min_p  <=>  logit < max logit + log(min_p)
                logits = logits.masked_fill(logits < logits.amax(-1, keepdim=True) + log_min_p, float("-inf"))
            # Gumbel-max: one pass, no normalization, same distribution as multinomial.
            u = torch.rand(logits.shape, generator=generator, device=dev).clamp_(1e-10, 1.0)
            nxt = (logits - torch.log(-torch.log(u))).argmax(-1)
            state = tokenizer.advance(t, state, nxt)
            tokens.append(nxt)
            if t + 1 < tokenizer.length:
                pos = torch.tensor([[k + 1 + t]], device=dev)
                logits = lm(input_ids=nxt[:, None], cache=cache, use_cache=True, position_ids=pos).logits[:, -1]
        return torch.stack(tokens, 1)

    def to_precision(self, precision: str, device: torch.device | None = None) -> "DomainDecoder":
        """"float32", "bfloat16", or "auto": bfloat16 where the CPU has native bf16 units (1.9x faster
        here), or, for a CUDA `device`, where the GPU supports bf16."""
        if precision == "auto":
            if device is not None and torch.device(device).type == "cuda":
                precision = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
            else:
                precision = "bfloat16" if cpu_has_bf16() else "float32"
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
        self.precision = precision
        return self.to(getattr(torch, precision))

    def save_pretrained(self, path: str | Path):
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "decoder_config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        state = {k: v.contiguous() for k, v in self.state_dict().items() if k != "lm.lm_head.weight"}
        save_file(state, str(path / "decoder.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DomainDecoder":
        from safetensors.torch import load_file

        path = Path(path)
        cfg = load_config(DecoderConfig, path / "decoder_config.json", DECODER_RANGES)
        model = cls(cfg)
        missing, unexpected = model.load_state_dict(load_file(str(path / "decoder.safetensors")), strict=False)
        missing = [m for m in missing if m != "lm.lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{path}/decoder.safetensors does not match its config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        model.lm.tie_weights()
        return model
