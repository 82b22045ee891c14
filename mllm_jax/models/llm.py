"""Decoder-only LLM of the Llama / Qwen2 / Qwen3 / Mistral family, dense or Mixture-of-Experts
(Mixtral, Qwen2-MoE, Qwen3-MoE).

    ids -> embed_tokens -> [DecoderBlock] x depth (nn.scan) -> RMSNorm -> lm_head -> logits
    DecoderBlock: x += Attention(RMSNorm(x)); x += SwiGLU(RMSNorm(x)) or MoEBlock(RMSNorm(x))

Parameter names follow the HF modules (q_proj, gate_proj, input_norm, ...) so that checkpoint
conversion is a rename plus a transpose. Layers are stacked on a leading `layers` axis. When
MoE and dense layers mix, `layer_plan` splits the depth into scanned stacks: one stack of
groups ([every - 1 dense blocks, 1 MoE block], params `layers/block_{j}/...`) when the pattern
repeats, else one stack per run of same-kind layers (`layers_0`, `layers_1`, ...).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models import layers as L
from mllm_jax.models import moe as moe_lib
from mllm_jax.models.config import LLMConfig

REMAT_POLICIES = {
    'none': None,   # no rematerialisation
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(module_cls, policy: str, static_argnums=()):
  if policy not in REMAT_POLICIES:
    raise ValueError(f'remat policy {policy!r}: expected one of {sorted(REMAT_POLICIES)} '
                     '(config.model.remat_policy / config.model.vision_remat_policy)')
  if policy == 'none':
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=False,
                  static_argnums=static_argnums)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE. x [B, T, E] -> [B, T, E]."""
  cfg: LLMConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  impl: str = 'einsum'
  blocks: int = 1   # causal query blocks (layers.dot_product_attention)

  @nn.compact
  def __call__(self, x, mask, cos, sin, kv=None):
    """`kv` (generation): dict(k, v [B, Hkv, L, D], index int32) - the new keys/values are
    written at slots [index, index + T) and the queries attend to all L slots (`mask` is then
    [B, 1, T, L]). Returns the output, and the updated `kv` (None without a cache). The cache
    keeps heads before slots, the layout the score matmul reads, so a decode step never
    transposes the cached keys."""
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = L.fused_dense(self, 'qkv', [
        L.DenseGeneral((c.heads, c.dim_per_head), ('embed', 'heads', 'head_dim'),
                       use_bias=c.qkv_bias, name='q_proj', **kw),
        L.DenseGeneral((c.num_kv_heads, c.dim_per_head), ('embed', 'kv_heads', 'head_dim'),
                       use_bias=c.qkv_bias, name='k_proj', **kw),
        L.DenseGeneral((c.num_kv_heads, c.dim_per_head), ('embed', 'kv_heads', 'head_dim'),
                       use_bias=c.qkv_bias, name='v_proj', **kw)], x)
    if c.qk_norm:   # Qwen3: RMSNorm over each head's dim, before RoPE
      q = L.RMSNorm(c.norm_eps, name='q_norm', **kw)(q)
      k = L.RMSNorm(c.norm_eps, name='k_norm', **kw)(k)
    q = L.constrain(L.apply_rope(q, cos, sin), ('act_batch', 'act_length', 'act_heads', None))
    k = L.constrain(L.apply_rope(k, cos, sin), ('act_batch', 'act_length', 'act_kv_heads', None))
    v = L.constrain(v, ('act_batch', 'act_length', 'act_kv_heads', None))
    kernels = kv is not None and L.decode_kernel_on(self, 'decode_attention')
    if kv is not None:
      write = L.decode_cache_write if kernels else L.cache_write
      k = write(kv['k'], k.transpose(0, 2, 1, 3), kv['index'])
      v = write(kv['v'], v.transpose(0, 2, 1, 3), kv['index'])
      kv = dict(k=k, v=v, index=kv['index'])
    if kernels and x.shape[1] <= L.DECODE_ATTENTION_MAX_TOKENS:   # generate's CPU decode step
      out = L.decode_attention(q, k, v, mask, self.dtype)
    else:
      out = L.dot_product_attention(q, k, v, mask, impl=self.impl, dtype=self.dtype,
                                    causal_blocks=self.blocks, kv_heads_first=kv is not None)
    return L.DenseGeneral(c.hidden, ('heads', 'head_dim', 'embed'), in_axes=(-2, -1),
                          name='o_proj', **kw)(out), kv


class GatedMLP(nn.Module):
  """SwiGLU: down(act(gate(x)) * up(x)). x [B, T, E] -> [B, T, E]."""
  hidden: int
  mlp_dim: int
  act: str = 'silu'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate, up = L.fused_dense(self, 'gate_up', [
        L.Dense(self.mlp_dim, ('embed', 'mlp'), name='gate_proj', **kw),
        L.Dense(self.mlp_dim, ('embed', 'mlp'), name='up_proj', **kw)], x)
    h = L.constrain(L.ACTIVATIONS[self.act](gate) * up, ('act_batch', 'act_length', 'act_mlp'))
    return L.Dense(self.hidden, ('mlp', 'embed'), name='down_proj', **kw)(h)


class DecoderBlock(nn.Module):
  """Pre-norm transformer block; scanned, so it returns (carry, (kv, router stats | None))."""
  cfg: LLMConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'einsum'
  attention_blocks: int = 1
  moe: bool = False   # MoE feed-forward instead of the dense SwiGLU

  @nn.compact
  def __call__(self, x, mask, cos, sin, token_mask=None, kv=None):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = L.RMSNorm(c.norm_eps, name='input_norm', **kw)(x)
    attn = Attention(c, impl=self.attention_impl, blocks=self.attention_blocks, name='attn', **kw)
    a, kv = attn(h, mask, cos, sin, kv)
    x = x + a
    h = L.RMSNorm(c.norm_eps, name='post_attn_norm', **kw)(x)
    stats = None
    if self.moe:
      y, stats = moe_lib.MoEBlock(c.moe, c.hidden, c.act, name='mlp', **kw)(h, token_mask)
    else:
      y = GatedMLP(c.hidden, c.mlp_dim, c.act, name='mlp', **kw)(h)
    x = x + y
    return L.constrain(x, ('act_batch', 'act_length', 'act_embed')), (kv, stats)


class DecoderGroup(nn.Module):
  """Consecutive blocks scanned as one unit (e.g. every-1 dense blocks then an MoE block)."""
  cfg: LLMConfig
  kinds: tuple[bool, ...]   # per block: MoE?
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'einsum'
  attention_blocks: int = 1
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, x, mask, cos, sin, token_mask=None, kv=None):
    block = remat(DecoderBlock, self.remat_policy)
    kvs, stats = [], None
    for j, is_moe in enumerate(self.kinds):
      kv_j = None if kv is None else jax.tree.map(lambda a: a[j], kv)
      x, (kv_j, st) = block(self.cfg, self.dtype, self.param_dtype, self.attention_impl,
                            self.attention_blocks, is_moe, name=f'block_{j}')(
                                x, mask, cos, sin, token_mask, kv_j)
      kvs.append(kv_j)
      if st is not None:
        stats = st if stats is None else stats + st
    kv = None if kv is None else jax.tree.map(lambda *a: jnp.stack(a), *kvs)
    return x, (kv, stats)


def layer_plan(cfg: LLMConfig) -> list[tuple[str, tuple[bool, ...], int, int]]:
  """Scanned stacks of the decoder: [(param name, MoE flag per block of a group, repeats,
  first layer)]. One `layers` stack when every layer is alike or the MoE pattern repeats with
  period `moe.every`; else one stack per run of same-kind layers."""
  kinds, depth = cfg.moe_layers, cfg.depth
  if len(set(kinds)) == 1:
    return [('layers', kinds[:1], depth, 0)]
  p = cfg.moe.every
  if depth % p == 0 and kinds == kinds[:p] * (depth // p):
    return [('layers', kinds[:p], depth // p, 0)]
  plan, i = [], 0
  while i < depth:
    j = i
    while j < depth and kinds[j] == kinds[i]:
      j += 1
    plan.append((f'layers_{len(plan)}', (kinds[i],), j - i, i))
    i = j
  return plan


class Decoder(nn.Module):
  """Causal LM. Call with `input_ids` (or `inputs_embeds`) -> fp32 logits [B, T, vocab].

  `attention_mask` [B, T] (1 = real token) masks padded keys; `positions` [B, T] defaults to
  0..T-1 (as transformers does without explicit position ids); `segment_ids` [B, T] restricts
  attention to tokens of the same packed sample.
  """
  cfg: LLMConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'einsum'
  attention_blocks: int = 1
  remat_policy: str = 'none'

  def setup(self):
    c = self.cfg
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ('vocab', 'embed')))
    self.plan = layer_plan(c)
    stacks = []
    for _, kinds, reps, _ in self.plan:
      if len(kinds) == 1:
        block = remat(DecoderBlock, self.remat_policy)
        args = (c, self.dtype, self.param_dtype, self.attention_impl, self.attention_blocks,
                kinds[0])
      else:   # remat per block inside the group
        block = DecoderGroup
        args = (c, kinds, self.dtype, self.param_dtype, self.attention_impl,
                self.attention_blocks, self.remat_policy)
      stacks.append(nn.scan(
          block, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=(nn.broadcast,) * 4 + (0,), length=reps,
          metadata_params={nn.PARTITION_NAME: 'layers'})(*args))
    # one stack keeps the name `layers`; several are named layers_0, layers_1, ... by flax
    self.layers = stacks[0] if len(stacks) == 1 else stacks
    self.norm = L.RMSNorm(c.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    if not c.tie_embeddings:
      self.lm_head = L.Dense(c.vocab_size, ('embed', 'vocab'), dtype=self.dtype,
                             param_dtype=self.param_dtype)

  def embed(self, input_ids):
    """[B, T] int -> [B, T, E]."""
    rows = L.take_rows(self.embed_tokens.embedding, input_ids).astype(self.dtype)
    return L.constrain(rows, ('act_batch', 'act_length', 'act_embed'))

  def hidden_states(self, inputs_embeds, attention_mask=None, positions=None, segment_ids=None,
                    cache=None):
    """[B, T, E] -> final-normed hidden states [B, T, E].

    With `cache` (see `init_cache`) the T new tokens are written at slots [index, index + T)
    and attend to every filled slot; returns (hidden states, updated cache).
    """
    b, t, _ = inputs_embeds.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq = L.rope_inv_freq(self.cfg.dim_per_head, self.cfg.rope_theta,
                               self.cfg.rope_scaling.as_dict())
    cos, sin = L.rope_cos_sin(positions, inv_freq)
    x = inputs_embeds.astype(self.dtype)
    token_mask = attention_mask if self.cfg.moe.num_experts else None
    if cache is None:
      mask = L.make_attention_mask(attention_mask, causal=True, segment_ids=segment_ids,
                                   sliding_window=self.cfg.sliding_window)
      x, _ = self._run_layers(x, mask, cos, sin, token_mask, None)
      return self.norm(x)
    index = cache['index']
    filled = jax.lax.dynamic_update_slice(cache['filled'], attention_mask.astype(bool),
                                          (0, index))                       # [B, L]
    mask = L.make_cache_mask(filled, index, t, self.cfg.sliding_window)   # [B, 1, T, L]
    x, (k, v) = self._run_layers(x, mask, cos, sin, token_mask, (cache['k'], cache['v'], index))
    return self.norm(x), dict(k=k, v=v, filled=filled, index=index + t)

  def _run_layers(self, x, mask, cos, sin, token_mask, cache):
    """Every stack of `layer_plan` in order; cache = (k, v [depth, ...], index) or None.
    Router statistics of MoE layers are pooled and sown as intermediates 'moe'."""
    stacks = self.layers if isinstance(self.layers, (list, tuple)) else [self.layers]
    ks, vs, stats = [], [], None
    for stack, (_, kinds, reps, first) in zip(stacks, self.plan):
      kv = None
      if cache is not None:
        k, v, index = cache
        g = len(kinds)
        lead = (reps,) if g == 1 else (reps, g)
        sl = lambda a: a[first:first + reps * g].reshape(lead + a.shape[1:])
        kv = dict(k=sl(k), v=sl(v), index=jnp.full(lead, index, jnp.int32))
      x, (kv, st) = stack(x, mask, cos, sin, token_mask, kv)
      if kv is not None:
        ks.append(kv['k'].reshape((-1,) + kv['k'].shape[-4:]))
        vs.append(kv['v'].reshape((-1,) + kv['v'].shape[-4:]))
      if st is not None:
        st = jax.tree.map(lambda a: a.sum(0), st)
        stats = st if stats is None else stats + st
    if stats is not None:
      self.sow('intermediates', 'moe', stats)
    if cache is None:
      return x, None
    return x, (ks[0] if len(ks) == 1 else jnp.concatenate(ks),
               vs[0] if len(vs) == 1 else jnp.concatenate(vs))

  def init_cache(self, batch: int, length: int):
    """Empty KV cache: k, v [depth, B, Hkv, L, D] (compute dtype), filled [B, L], index 0."""
    c = self.cfg
    shape = (c.depth, batch, c.num_kv_heads, length, c.dim_per_head)
    return dict(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype),
                filled=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

  def logits(self, h, dtype=jnp.float32):
    """[B, T, E] -> [B, T, vocab] in `dtype` (None: the compute dtype, e.g. for generate's
    greedy CPU kernel, which reads bf16 logits as they are)."""
    if self.cfg.tie_embeddings:
      packed = L.decode_packed(   # in the dtype `attend` computes in
          self, 'tied_lm_head', lambda: self.embed_tokens.embedding.T.astype(self.dtype))
      out = (self.embed_tokens.attend(h) if packed is None else
             L.packed_matmul(h, packed, (self.cfg.vocab_size,), 1))
    else:
      out = self.lm_head(h)
    return L.constrain(out if dtype is None else out.astype(dtype),
                       ('act_batch', 'act_length', 'act_vocab'))

  def __call__(self, input_ids=None, attention_mask=None, positions=None, segment_ids=None,
               inputs_embeds=None):
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    return self.logits(self.hidden_states(inputs_embeds, attention_mask, positions, segment_ids))
