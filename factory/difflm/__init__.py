"""The DiffLM stack: encoder (LoRA) -> beta-VAE latent -> EDM latent diffusion -> soft-prompt injector -> frozen causal LM.

One file per component, each with a config dataclass and save/load; `pipeline.py` wires them.
"""
