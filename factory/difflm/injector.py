"""Latent feature injector: MLP from z to k soft-prompt vectors in the decoder's embedding space."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import POSITIVE, Pretrained


@dataclass
class InjectorConfig:
    latent_dim: int = 32
    hidden: int = 256
    prompt_len: int = 4
    embed_dim: int = 192


INJECTOR_RANGES = {k: POSITIVE for k in ("latent_dim", "hidden", "prompt_len", "embed_dim")}


class SoftPromptInjector(Pretrained, nn.Module):
    config_class, config_ranges = InjectorConfig, INJECTOR_RANGES
    config_file, weights_file = "injector_config.json", "injector.safetensors"

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



@dataclass
class ConditionalInjectorConfig(InjectorConfig):
    cond_sizes: tuple = ()  # ids per condition column (factory/difflm/condition.py)
    cond_dim: int = 64


class ConditionalInjector(Pretrained, nn.Module):
    """injector(z, c): the soft prompt from z and an embedding of condition column values c
    (one id per column, 0 = absent, whose embedding is zero: c all absent = unconditional).

    `from_base` starts it as a trained `SoftPromptInjector` (c's input weights zero), so
    training begins at the unconditional stack and learns what c adds."""

    config_class = ConditionalInjectorConfig
    config_ranges = {**INJECTOR_RANGES, "cond_dim": POSITIVE}
    config_file, weights_file = "injector_config.json", "injector.safetensors"

    def __init__(self, cfg: ConditionalInjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.cond = nn.ModuleList(nn.Embedding(n, cfg.cond_dim, padding_idx=0) for n in cfg.cond_sizes)
        self.net = nn.Sequential(nn.Linear(cfg.latent_dim + cfg.cond_dim, cfg.hidden), nn.GELU(),
                                 nn.Linear(cfg.hidden, cfg.prompt_len * cfg.embed_dim))

    @classmethod
    def from_base(cls, base: SoftPromptInjector, cond_sizes, cond_dim: int = 64) -> "ConditionalInjector":
        b = base.cfg
        inj = cls(ConditionalInjectorConfig(b.latent_dim, b.hidden, b.prompt_len, b.embed_dim, tuple(cond_sizes),
                                            cond_dim))
        with torch.no_grad():
            inj.net[0].weight.zero_()
            inj.net[0].weight[:, :b.latent_dim].copy_(base.net[0].weight)
            inj.net[0].bias.copy_(base.net[0].bias)
            inj.net[2].load_state_dict(base.net[2].state_dict())
            for e in inj.cond:
                nn.init.normal_(e.weight, std=0.1)
                e.weight[0].zero_()
        return inj

    def embed_condition(self, c: torch.Tensor) -> torch.Tensor:
        return sum(e(c[:, j]) for j, e in enumerate(self.cond))

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed_condition(c).to(z.dtype)], -1)
        return self.net(h).view(z.shape[0], self.cfg.prompt_len, self.cfg.embed_dim)

