"""Q-Former connector (BLIP-2) and its instruction-aware variant (InstructBLIP).

    image features [N, P, Dv] (ViT tokens, post-LN)         instruction ids [N, L] (InstructBLIP)
                  |                                                   |
    queries [Q, D] (learned) ---------- LN(cat(queries, word + pos)) -+   [N, Q (+ L), D]
                  |
    layer i (BERT, post-LN), i = 0 .. depth-1:
      x = LN(x + SelfAttn(x))                              queries and instruction together
      q = LN(q + CrossAttn(q, image)) if i % every == 0    queries only (q = x[:, :Q])
      q = LN(q + FFN_query(q));  t = LN(t + FFN_text(t))   separate FFNs (t = x[:, Q:])
                  |
    language_projection(x[:, :Q]) -> [N, Q, E]   Q soft tokens per image for the LLM

Only the query outputs reach the LLM; the instruction steers which image content the queries
extract. Layers are unrolled rather than scanned: cross-attention layers and the others have
different parameters, and 12 layers of a BERT-base Q-Former compile in seconds. As in the rest
of the library there is no dropout (HF's Q-Former uses 0.1 in training; it is the identity in
eval mode, which is what parity checks against).

Parameter names follow HF's modules where they are not BERT's awkward nesting:
  query_tokens [1, Q, D], input_norm, word_embeddings / position_embeddings (InstructBLIP),
  layer_{i}/{self_attn,cross_attn}/{query,key,value,output,norm},
  layer_{i}/{query_ffn,text_ffn}/{intermediate,output,norm}, language_projection.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models import layers as L
from mllm_jax.models.config import QFormerConfig

_ACT = ('act_batch', 'act_length', 'act_embed')


class BertAttention(nn.Module):
  """Post-LN attention block: LN(x + dense(Attn(query(x), key(kv), value(kv)))).

  x [N, T, D]; kv [N, S, Dkv]; mask bool [N, 1, T, S] or None. -> [N, T, D]."""
  cfg: QFormerConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x, kv, mask=None):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = c.hidden // c.heads
    q, k, v = (L.DenseGeneral((c.heads, d), ('embed', 'heads', 'head_dim'), use_bias=True,
                              name=n, **kw)(src)
               for n, src in (('query', x), ('key', kv), ('value', kv)))
    a = L.dot_product_attention(q, k, v, mask, impl=self.attention_impl, dtype=self.dtype)
    out = L.DenseGeneral(c.hidden, ('heads', 'head_dim', 'embed'), in_axes=(-2, -1),
                         use_bias=True, name='output', **kw)(a)
    return L.constrain(L.LayerNorm(c.norm_eps, name='norm', **kw)(out + x), _ACT)


class BertFFN(nn.Module):
  """Post-LN feed-forward block: LN(x + output(act(intermediate(x)))). [N, T, D] -> same."""
  cfg: QFormerConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = L.Dense(c.mlp_dim, ('embed', 'mlp'), use_bias=True, name='intermediate', **kw)(x)
    h = L.constrain(L.ACTIVATIONS[c.act](h), ('act_batch', 'act_length', 'act_mlp'))
    h = L.Dense(c.hidden, ('mlp', 'embed'), use_bias=True, name='output', **kw)(h)
    return L.constrain(L.LayerNorm(c.norm_eps, name='norm', **kw)(h + x), _ACT)


class QFormerLayer(nn.Module):
  """One Q-Former layer. x [N, Q + L, D] (queries first); image [N, P, Dv]."""
  cfg: QFormerConfig
  cross_attention: bool
  last: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x, image, self_mask):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = BertAttention(c, attention_impl=self.attention_impl, name='self_attn', **kw)(
        x, x, self_mask)
    q, t = x[:, :c.num_queries], x[:, c.num_queries:]
    if self.cross_attention:   # every image token is real: no mask
      q = BertAttention(c, attention_impl=self.attention_impl, name='cross_attn', **kw)(q, image)
    q = BertFFN(c, name='query_ffn', **kw)(q)
    if not c.instruction:
      return q
    # The last layer's instruction outputs are never read; their FFN exists (HF has it) but
    # only runs at init, to create its parameters.
    if self.last and not self.is_initializing():
      return jnp.concatenate([q, t], axis=1)
    return jnp.concatenate([q, BertFFN(c, name='text_ffn', **kw)(t)], axis=1)


class QFormer(nn.Module):
  """image features [N, P, Dv] (+ instruction ids / mask [N, L]) -> LLM embeddings [N, Q, E]."""
  cfg: QFormerConfig
  out_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, image, input_ids=None, attention_mask=None):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = image.shape[0]
    queries = self.param('query_tokens', L.dense_init((None, None, 'embed'), std=0.02),
                         (1, c.num_queries, c.hidden), self.param_dtype)
    x = jnp.broadcast_to(jnp.asarray(queries, self.dtype), (n, c.num_queries, c.hidden))
    keep = jnp.ones((n, c.num_queries), bool)
    if c.instruction:
      if input_ids is None:
        if not self.is_initializing():
          raise ValueError('an instruction-aware Q-Former (config.model.connector.qformer.'
                           'instruction=True, InstructBLIP) needs qformer_input_ids: the '
                           'instruction tokenised with the Q-Former tokenizer')
        input_ids = jnp.zeros((n, 1), jnp.int32)
      if input_ids.shape[1] > c.max_position:
        raise ValueError(f'qformer_input_ids of length {input_ids.shape[1]} > '
                         f'config.model.connector.qformer.max_position={c.max_position}')
      if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
      init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ('vocab', 'embed'))
      words = nn.Embed(c.vocab_size, c.hidden, embedding_init=init, name='word_embeddings',
                       **kw)(input_ids)
      pos = nn.Embed(c.max_position, c.hidden, name='position_embeddings', **kw,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 (None, 'embed')))(
                         jnp.arange(input_ids.shape[1]))
      x = jnp.concatenate([x, words + pos[None]], axis=1)
      keep = jnp.concatenate([keep, attention_mask.astype(bool)], axis=1)
    elif input_ids is not None:
      raise ValueError('qformer_input_ids given to a BLIP-2 Q-Former without instruction input '
                       '(config.model.connector.qformer.instruction=False)')
    x = L.constrain(L.LayerNorm(c.norm_eps, name='input_norm', **kw)(x), _ACT)
    # Bidirectional; padded instruction tokens are never attended to.
    self_mask = jnp.broadcast_to(keep[:, None, None, :], (n, 1, x.shape[1], x.shape[1]))
    image = L.constrain(image.astype(self.dtype), _ACT)
    for i in range(c.depth):
      x = QFormerLayer(c, i % c.cross_attention_every == 0, i == c.depth - 1,
                       attention_impl=self.attention_impl, name=f'layer_{i}', **kw)(
                           x, image, self_mask)
    # Axis names as for an MLP ([D, E]) so no mesh axis appears twice in the kernel.
    out = L.Dense(self.out_dim, ('embed', 'mlp'), use_bias=True, name='language_projection',
                  **kw)(x[:, :c.num_queries])
    return L.constrain(out, _ACT)
