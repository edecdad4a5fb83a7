"""Latent feature injector: MLP from z to k soft-prompt vectors in the decoder's embedding space."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .config import POSITIVE, load_config


@dataclass
class InjectorConfig:
    latent_dim: int = 32
    hidden: int = 256
    prompt_len: int = 4
    embed_dim: int = 192


class SoftPromptInjector(nn.Module):
    def __init__(self, cfg: InjectorConfig, null_prompt: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.hidden), nn.GELU(),
                                 nn.Linear(cfg.hidden, cfg.prompt_len * cfg.embed_dim))
        if null_prompt is not None:  # start as the decoder's own unconditional prompt
            with torch.no_grad():
                self.net[-1].weight.zero_()  # zero-init: z starts with no effect (as ControlNet zero convs)
                self.net[-1].bias.copy_(null_prompt.reshape(-1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], self.cfg.prompt_len, self.cfg.embed_dim)

    def save_pretrained(self, path: str | Path):
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "injector_config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        save_file(self.state_dict(), str(Path(path) / "injector.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SoftPromptInjector":
        from safetensors.torch import load_file

        inj = cls(load_config(InjectorConfig, Path(path) / "injector_config.json",
                              {k: POSITIVE for k in ("latent_dim", "hidden", "prompt_len", "embed_dim")}))
        inj.load_state_dict(load_file(str(Path(path) / "injector.safetensors")))
        return inj
