"""Flax Linen modules (pure-functional: ``module.apply({"params": p}, ...)``)."""

from .decoder import Chameleon, cache_mask, causal_mask, default_positions, init_cache, init_params
from .vqvae import VQVAE

__all__ = ["Chameleon", "VQVAE", "cache_mask", "causal_mask", "default_positions", "init_cache", "init_params"]
