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

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import POSITIVE, Pretrained
from .fused import KVCache, add_rms_norm, decode_attention, gumbel_argmax, implementation, silu_mul
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


# Both decoder builds use these: RMS_EPS is passed to LlamaConfig; ROPE_THETA is its default rope
# (tests/test_decode_step.py checks that both give the same ids).
RMS_EPS, ROPE_THETA = 1e-6, 10000.0


def _max_positions(cfg: DecoderConfig) -> int:
    return cfg.seq_len + cfg.prompt_len + 8


class _Config:
    """The LlamaConfig fields `DecodeStep` reads, for `_SamplingLlama`."""

    def __init__(self, cfg: DecoderConfig):
        self.num_attention_heads = self.num_key_value_heads = cfg.num_heads
        self.hidden_size, self.intermediate_size = cfg.hidden_size, cfg.intermediate_size
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.rms_norm_eps, self.max_position_embeddings = RMS_EPS, _max_positions(cfg)
        self.attention_bias = self.mlp_bias = False
        self.hidden_act = "silu"


class _Weight(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class _Rotary(nn.Module):
    """transformers' LlamaRotaryEmbedding, default rope: cos/sin of position x inv_freq, in float32, then the dtype."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


class _SamplingLlama(nn.Module):
    """The domain decoder's Llama weights under transformers' parameter names, without its modules:
    all `DecodeStep` reads (tests/test_decode_step.py checks it gives the same ids as
    LlamaForCausalLM). It has no forward: training and teacher forcing use LlamaForCausalLM."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        H, inter = cfg.hidden_size, cfg.intermediate_size
        self.config = _Config(cfg)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.model.layers = nn.ModuleList()
        for _ in range(cfg.num_layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, nn.Linear(H, H, bias=False))
            layer.mlp = nn.Module()
            layer.mlp.gate_proj, layer.mlp.up_proj = nn.Linear(H, inter, bias=False), nn.Linear(H, inter, bias=False)
            layer.mlp.down_proj = nn.Linear(inter, H, bias=False)
            layer.input_layernorm, layer.post_attention_layernorm = _Weight(H), _Weight(H)
            self.model.layers.append(layer)
        self.model.norm = _Weight(H)
        self.model.rotary_emb = _Rotary(self.config.head_dim)
        self.lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
        self.tie_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, *args, **kwargs):
        raise NotImplementedError("a decoder loaded for sampling (inference=True) has no forward; load it without")


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


class DomainDecoder(Pretrained, FrozenLM):
    config_class, config_ranges = DecoderConfig, DECODER_RANGES
    config_file, weights_file = "decoder_config.json", "decoder.safetensors"

    def __init__(self, cfg: DecoderConfig, inference: bool = False):
        """`inference`: hold the LM's weights in `_SamplingLlama` (same parameter names, no
        transformers import: 157 MiB less per generation worker) instead of transformers'
        LlamaForCausalLM; only `generate` works then (no teacher-forced forward)."""
        super().__init__()
        self.cfg = cfg
        if inference:
            self.lm = _SamplingLlama(cfg)
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            self.lm = LlamaForCausalLM(LlamaConfig(
                vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_heads, max_position_embeddings=_max_positions(cfg),
                tie_word_embeddings=True, rms_norm_eps=RMS_EPS,  # rope: LlamaConfig's default, ROPE_THETA
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
                 min_p: float = 0.0, row_masks: dict[int, torch.Tensor] | None = None,
                 narrowing: dict | None = None, keep: int | None = None, impl: str = "fast") -> torch.Tensor:
        """Sample one record per prompt row; returns ids [B, L].

        `row_masks` {position t: BoolTensor [B, V]}: per-row masks ANDed with the schema mask at
        step t (conditions force a column's value this way); a row the AND would leave with no
        token keeps the schema mask alone (the loop's condition check then rejects it).

        `narrowing` (from `tokenizer.narrowing`, a condition's values per column): sequential
        importance resampling, so the rows follow the LM's own distribution *given* the condition,
        not its marginal with a forced value. At each position the condition narrows, every row is
        weighted by the probability the LM gives the narrowed tokens (its chance of meeting the
        condition there, given everything decoded before), the batch is resampled by those
        weights (systematic resampling), and the token is then drawn from the narrowed mask. The
        columns decoded *before* a condition column so follow p(prefix | condition) instead of
        p(prefix); no record is decoded twice. Every weight is reset by the resampling, so the
        finished rows are unweighted. A row the condition leaves with no token gets weight 0; if
        every row does, the step keeps the schema mask (the loop's condition check then rejects).
        Needs `impl="fast"` (its cache is resampled with the rows). `keep` (<= the prompt's rows):
        the rows to return; the prompt's extra rows are particles kept up to the last narrowed
        position, whose resampling chooses `keep` rows among them, so fewer finished records share
        the columns decoded before the condition (if no step narrows, the first `keep` rows).

        `min_p` > 0: drop tokens whose probability is below min_p times the step's most
        likely token's (min-p sampling), after the schema mask.
        With `constrained`, each step's logits are masked to what the schema allows
        (tokenizer.allowed), so every output parses by construction.
        `impl`: "fast" (default) runs the LM's own weights through `DecodeStep` (a pre-allocated
        KV cache and attention over the cached positions only); "transformers" runs the Llama
        model's forward over a StaticCache (the reference the tests compare with; 3-5x slower).
        Runs in the LM's own dtype (see `to_precision`) and on its device: `generator` and
        the tokenizer's masks (`SchemaTokenizer.to`) must be on that device too.
        """
        dev = self.null_prompt.device
        B = prompt.shape[0] if prompt is not None else batch
        if prompt is None:
            prompt = self.null_prompt.expand(B, -1, -1)
        k = prompt.shape[1]
        bos = self.embed(torch.full((B, 1), BOS, dtype=torch.long, device=dev))
        x = torch.cat([prompt.to(bos.dtype), bos], 1)
        if narrowing and impl != "fast":
            raise ValueError("narrowing (conditions) needs impl='fast'")
        if impl == "fast":
            run = self.decode_step().start(B, k + 1 + tokenizer.length)
            for p in range(k):
                run.step(x[:, p], p, logits=False)
            logits = run.step(x[:, k], k)
            forward = lambda nxt, p: run.step(self.embed(nxt), p)  # noqa: E731
        elif impl == "transformers":
            from transformers import StaticCache

            lm = self.lm
            cache = StaticCache(config=lm.config, max_cache_len=k + 1 + tokenizer.length)
            logits = lm(inputs_embeds=x, cache=cache, use_cache=True,
                        position_ids=torch.arange(k + 1, device=dev)[None]).logits[:, -1]
            forward = lambda nxt, p: lm(input_ids=nxt[:, None], cache=cache, use_cache=True,  # noqa: E731
                                        position_ids=torch.tensor([[p]], device=dev)).logits[:, -1]
        else:
            raise ValueError(f"impl must be fast or transformers, got {impl!r}")
        sample_impl = run.attention if impl == "fast" else "sdpa"  # the reference path samples in aten ops
        state = tokenizer.init_state(B)
        last_narrowed = max((t for t, sl in enumerate(tokenizer.slots) if sl.column in (narrowing or {})), default=-1)
        tokens = []
        log_min_p = math.log(min_p) if min_p > 0 else None
        for t in range(tokenizer.length):
            logits = logits.float()
            if temperature != 1.0:
                logits = logits / temperature
            if constrained:
                logits = logits.masked_fill(~tokenizer.allowed(t, state), float("-inf"))
            if row_masks is not None and t in row_masks:  # per-row hook (conditions); see the docstring
                forced = logits.masked_fill(~row_masks[t], float("-inf"))
                logits = torch.where(torch.isfinite(forced).any(-1, keepdim=True), forced, logits)
            narrowed = tokenizer.narrow(t, state, torch.isfinite(logits), narrowing) if narrowing else None
            if narrowed is not None:
                cond = logits.masked_fill(~narrowed, float("-inf"))
                logw = torch.logsumexp(cond, -1) - torch.logsumexp(logits, -1)  # log p(condition here | row)
                if bool(torch.isfinite(logw).any()):
                    last = t == last_narrowed  # the batch shrinks to `keep` rows at the last one
                    idx = systematic_resample(logw, generator, keep if last else None)
                    keep = None if last else keep
                    cond, state = cond[idx], tokenizer.select_rows(state, idx)
                    tokens = [x[idx] for x in tokens]
                    run.select_rows(idx)
                    if row_masks is not None:
                        row_masks = {p: (m[idx] if p > t else m) for p, m in row_masks.items()}
                    logits = cond
            if min_p > 0:  # p / p_max < min_p  <=>  logit < max logit + log(min_p)
                logits = logits.masked_fill(logits < logits.amax(-1, keepdim=True) + log_min_p, float("-inf"))
            # Gumbel-max: one pass, no normalization, same distribution as multinomial.
            u = torch.rand(logits.shape, generator=generator, device=dev)
            nxt = gumbel_argmax(logits.contiguous(), u, sample_impl)
            state = tokenizer.advance(t, state, nxt)
            tokens.append(nxt)
            if t + 1 < tokenizer.length:
                logits = forward(nxt, k + 1 + t)
        return torch.stack(tokens, 1)[:keep]

    def decode_step(self) -> "DecodeStep":
        """The LM's weights laid out for `DecodeStep`, rebuilt when they change (dtype, device, training)."""
        key = tuple((id(p), p.dtype, p.device, p.data_ptr(), p._version) for p in self.lm.parameters())
        if getattr(self, "_step_key", None) != key:
            self._step, self._step_key = DecodeStep(self.lm), key
        return self._step

    def to_precision(self, precision: str, device: torch.device | None = None) -> "DomainDecoder":
        """"float32", "bfloat16", or "auto": bfloat16 where the CPU has native bf16 units, or, for a
        CUDA `device`, where the GPU supports bf16. Chosen from CPU features, never from a timing at
        load (that would make records depend on the machine's load). Measured on an AMD EPYC with
        avx512_bf16 and no AMX (reports/benchmarks/decode_step.md): bf16 matrix products 4.8x faster
        than float32, the whole decode loop 1.6x; AMX CPUs gain more. Without bf16 units torch
        emulates it, slower than float32."""
        if precision == "auto":
            if device is not None and torch.device(device).type == "cuda":
                precision = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
            else:
                precision = "bfloat16" if cpu_has_bf16() else "float32"
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
        self.precision = precision
        return self.to(getattr(torch, precision))

    def _state(self) -> dict:  # the LM head is tied to the embeddings: saved once
        return {k: v.contiguous() for k, v in self.state_dict().items() if k != "lm.lm_head.weight"}

    def _load_state(self, state: dict, path: Path) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [m for m in missing if m != "lm.lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{path}/decoder.safetensors does not match its config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        self.lm.tie_weights()


def systematic_resample(logw: torch.Tensor, generator: torch.Generator, n: int | None = None) -> torch.Tensor:
    """n (default: all) row indices drawn in proportion to exp(logw) (systematic resampling: one
    uniform for the whole draw, so a row of weight w is kept floor(n w) or ceil(n w) times). Rows of
    weight 0 (logw = -inf) are never kept; at least one weight must be positive."""
    n = logw.shape[0] if n is None else n
    w = torch.softmax(logw.double(), 0)
    u = (torch.rand(1, generator=generator, device=logw.device, dtype=torch.float64)
         + torch.arange(n, device=logw.device, dtype=torch.float64)) / n
    idx = torch.searchsorted(torch.cumsum(w, 0), u, right=True)
    return idx.clamp_(max=int(torch.nonzero(w > 0).max()))  # cumsum rounding below 1 at the top


class DecodeStep:
    """One decode step of a transformers Llama model for a batch of rows, with the SAME weights
    (read from the model, never copied to disk: save/load stays the model's own), shaped for short
    fixed-length records.

    transformers' forward over a StaticCache attends to every slot of the cache with a mask, copies
    the new keys through index_copy and builds masks and rotary tables each step: 43% of generation
    time in its SDPA at 56-token records (py-spy), more than all the matrix products. Here:
    - one pre-allocated cache per run (`fused.KVCache`: int8 for bf16 with the fused kernels, else the
      model dtype);
    - q, k, v in one matrix product, gate and up in one, rotary tables built once;
    - the work between the matrix products in three fused kernels (factory/difflm/fused.py):
      rotary + attention over the t cached positions only, residual add + RMSNorm, SiLU * up.
      In aten ops that work was ~30 ops per layer over [B, 128] tensors, more time than the matrix
      products (torch.profiler, 2,000 rows, bf16: 0.70 s of aten elementwise ops vs 0.46 s of mm).
    The maths is transformers' LlamaDecoderLayer op for op (RMSNorm in float32, each elementwise
    result rounded to the model dtype), but for the int8 cache of bf16 runs; tests/test_decode_step.py
    checks logits and sampled ids against it (float32), and that the int8 cache's error stays within
    bf16's own (bf16).
    """

    def __init__(self, lm):
        cfg, m = lm.config, lm.model
        self.heads = cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        if cfg.num_key_value_heads != self.heads or cfg.attention_bias or cfg.mlp_bias or cfg.hidden_act != "silu":
            raise ValueError("DecodeStep supports Llama with full multi-head attention, no biases, SiLU")
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight,
                torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous(),
                a.o_proj.weight, layer.post_attention_layernorm.weight,
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(), mlp.down_proj.weight))
        self.norm = m.norm.weight
        self.head, self.head_bias = lm.lm_head.weight, lm.lm_head.bias
        self.dtype, self.device = self.head.dtype, self.head.device
        positions = torch.arange(cfg.max_position_embeddings, device=self.device)[None]
        cos, sin = m.rotary_emb(self.head, position_ids=positions)  # [1, P, hd] in the model dtype
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self.attention = implementation() if self.device.type == "cpu" else "sdpa"

    @property
    def kv_cache(self) -> str:
        """int8 for bf16 with the fused kernels (see fused.KVCache: 10x less error than bf16's own), else the
        model dtype. The aten fallback keeps the model dtype: dequantizing the cache at every step costs it more
        than the bytes it saves (fused.decode_attention's int8 aten path is the kernel's test reference)."""
        if self.dtype == torch.bfloat16 and self.attention == "fused" and self.device.type == "cpu":
            return "int8"
        return str(self.dtype).split(".")[1]

    def start(self, batch: int, length: int) -> "DecodeStep":
        self.cache = KVCache(len(self.layers), batch, self.heads, length, self.head_dim, self.dtype, self.device,
                             self.kv_cache == "int8")
        return self

    def select_rows(self, idx: torch.Tensor):
        """Keep rows `idx` of the running batch's cache (a resampling: rows may repeat)."""
        self.cache.select_rows(idx)

    def step(self, x: torch.Tensor, pos: int, logits: bool = True) -> torch.Tensor | None:
        """x [B, H]: the input embedding at position `pos` (earlier positions are cached). -> logits [B, V]."""
        impl, eps, cos, sin, t = self.attention, self.eps, self.cos[pos], self.sin[pos], pos + 1
        d = None  # the last residual branch, added inside the next norm
        for i, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(self.layers):
            x, h = add_rms_norm(x, d, ln1, eps, impl)
            att = decode_attention(F.linear(h, wqkv), cos, sin, self.cache.layer(i), t, self.scale, impl)
            x, h = add_rms_norm(x, F.linear(att, wo), ln2, eps, impl)
            d = F.linear(silu_mul(F.linear(h, wgu), impl), wd)
        if not logits:
            return None
        _, h = add_rms_norm(x, d, self.norm, eps, impl)
        return F.linear(h, self.head, self.head_bias)
