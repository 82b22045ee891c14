"""Connectors: vision features [N, tokens, Dv] -> LLM embeddings [N, tokens, E].

`mlp`: LLaVA's projector, Linear(Dv, E) -> act -> Linear(E, E) for depth 2 (`mlp2x_gelu`);
`linear`: a single Linear(Dv, E) (LLaVA v1); `qformer`: BLIP-2 / InstructBLIP's Querying
Transformer (`mllm_jax.models.qformer`), [N, P, Dv] -> [N, num_queries, E].
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models import layers as L
from mllm_jax.models.config import ConnectorConfig
from mllm_jax.models.qformer import QFormer


class MLPConnector(nn.Module):
  """`depth` linear layers with `act` between them; params linear_1 .. linear_depth."""
  cfg: ConnectorConfig
  out_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    depth = 1 if c.kind == 'linear' else c.depth
    for i in range(depth):
      if i:
        x = L.ACTIVATIONS[c.act](x)
      # Axis names treat the projector as an MLP so no mesh axis appears twice in one kernel.
      axes = ('embed', 'mlp') if i == 0 else ('mlp', 'mlp_out')
      x = L.Dense(self.out_dim, axes, use_bias=c.bias, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f'linear_{i + 1}')(x)
    return L.constrain(x, ('act_batch', 'act_length', 'act_embed'))


def build_connector(cfg: ConnectorConfig, out_dim: int, dtype, param_dtype,
                    attention_impl: str = 'einsum'):
  if cfg.kind in ('mlp', 'linear'):
    if cfg.kind == 'mlp' and cfg.depth < 1:
      raise ValueError(f'config.model.connector.depth={cfg.depth}: must be >= 1')
    return MLPConnector(cfg, out_dim, dtype=dtype, param_dtype=param_dtype, name='connector')
  if cfg.kind == 'qformer':
    q, where = cfg.qformer, 'config.model.connector.qformer'
    for key in ('num_queries', 'hidden', 'depth', 'heads', 'mlp_dim', 'cross_attention_every'):
      if getattr(q, key) < 1:
        raise ValueError(f'{where}.{key}={getattr(q, key)}: must be >= 1')
    if q.hidden % q.heads:
      raise ValueError(f'{where}.hidden={q.hidden} is not divisible by heads={q.heads}')
    if q.act not in L.ACTIVATIONS:
      raise ValueError(f'{where}.act={q.act!r}: expected one of {sorted(L.ACTIVATIONS)}')
    if q.instruction and (q.vocab_size < 1 or q.max_position < 1):
      raise ValueError(f'{where}: an instruction-aware Q-Former needs vocab_size and '
                       f'max_position >= 1, got {q.vocab_size} and {q.max_position}')
    return QFormer(q, out_dim, dtype=dtype, param_dtype=param_dtype,
                   attention_impl=attention_impl, name='connector')
  raise ValueError(f"config.model.connector.kind={cfg.kind!r}: expected 'mlp', 'linear' or "
                   "'qformer'")
