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
  """One Q-Former layer. x [N, nq + L, D] (the nq queries first); image [N, P, Dv] or None.

  Queries (if any) cross-attend to the image and go through `query_ffn`; text tokens go through
  `text_ffn`, which exists only when `text` (InstructBLIP's instruction, stage-1 text)."""
  cfg: QFormerConfig
  cross_attention: bool
  text: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x, image, self_mask, num_queries: int, text_out: bool = True):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = BertAttention(c, attention_impl=self.attention_impl, name='self_attn', **kw)(
        x, x, self_mask)
    q, t = x[:, :num_queries], x[:, num_queries:]
    if num_queries:
      if self.cross_attention:   # every image token is real: no mask
        q = BertAttention(c, attention_impl=self.attention_impl, name='cross_attn', **kw)(
            q, image)
      q = BertFFN(c, name='query_ffn', **kw)(q)
    if not self.text or (t.shape[1] == 0 and not self.is_initializing()):
      return q   # no text tokens (ITC's image branch): nothing for the text FFN
    # Outputs nobody reads (the connector's last-layer instruction tokens) skip their FFN; it
    # exists (HF has it) and runs at init only, to create its parameters.
    if not text_out and not self.is_initializing():
      return jnp.concatenate([q, t], axis=1)
    return jnp.concatenate([q, BertFFN(c, name='text_ffn', **kw)(t)], axis=1)


MODES = ('connector', 'text', 'bidirectional', 'causal')


class QFormer(nn.Module):
  """image features [N, P, Dv] (+ instruction ids / mask [N, L]) -> LLM embeddings [N, Q, E].

  `mode` picks the attention pattern over the same parameters (BLIP-2 stage 1 uses the last
  three; `text=True` gives the module word / position embeddings and text FFNs):
    'connector'      the MLLM's connector: queries (+ instruction) bidirectional, projected by
                     `language_projection` to out_dim -> [N, Q, out_dim]
    'text'           text only (ITC text branch): no queries, no image -> hidden [N, L, D]
    'bidirectional'  queries + text (ITM; queries alone for ITC's image branch), queries
                     cross-attend to the image -> hidden [N, Q + L, D]
    'causal'         ITG: queries see only queries, text token i sees every query and text
                     tokens <= i -> hidden [N, Q + L, D]
  Padded text tokens (attention_mask 0) are never attended to. Text positions start at 0
  whether or not queries precede them (as in HF / LAVIS).
  """
  cfg: QFormerConfig
  out_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'einsum'
  text: bool = False   # word / position embeddings and text FFNs without `cfg.instruction`

  @nn.compact
  def __call__(self, image, input_ids=None, attention_mask=None, mode: str = 'connector'):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if mode not in MODES:
      raise ValueError(f'QFormer mode={mode!r}: expected one of {MODES}')
    has_text = c.instruction or self.text
    if mode == 'connector' and c.instruction and input_ids is None:
      if not self.is_initializing():
        raise ValueError('an instruction-aware Q-Former (config.model.connector.qformer.'
                         'instruction=True, InstructBLIP) needs qformer_input_ids: the '
                         'instruction tokenised with the Q-Former tokenizer')
      n = image.shape[0]
      input_ids = jnp.zeros((n, 1), jnp.int32)
    if input_ids is not None and not has_text:
      raise ValueError('qformer_input_ids given to a BLIP-2 Q-Former without instruction input '
                       '(config.model.connector.qformer.instruction=False)')
    if mode == 'text' and input_ids is None:
      raise ValueError("QFormer mode='text' needs input_ids")
    n = image.shape[0] if image is not None else input_ids.shape[0]
    nq = 0 if mode == 'text' else c.num_queries
    parts, keep = [], []
    if nq:
      queries = self.param('query_tokens', L.dense_init((None, None, 'embed'), std=0.02),
                           (1, nq, c.hidden), self.param_dtype)
      parts.append(jnp.broadcast_to(jnp.asarray(queries, self.dtype), (n, nq, c.hidden)))
      keep.append(jnp.ones((n, nq), bool))
    if input_ids is not None:
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
      parts.append(words + pos[None])
      keep.append(attention_mask.astype(bool))
    x = jnp.concatenate(parts, axis=1)
    keep = jnp.concatenate(keep, axis=1)
    x = L.constrain(L.LayerNorm(c.norm_eps, name='input_norm', **kw)(x), _ACT)
    t = x.shape[1]
    # Padded text tokens are never attended to; 'causal' adds ITG's query / causal-text pattern.
    self_mask = jnp.broadcast_to(keep[:, None, None, :], (n, 1, t, t))
    if mode == 'causal':
      i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
      self_mask = self_mask & ((j < nq) | ((i >= nq) & (j <= i)))
    if image is not None:
      image = L.constrain(image.astype(self.dtype), _ACT)
    elif nq and not self.is_initializing():
      raise ValueError(f'QFormer mode={mode!r} needs image features')
    for i in range(c.depth):
      x = QFormerLayer(c, i % c.cross_attention_every == 0, has_text,
                       attention_impl=self.attention_impl, name=f'layer_{i}', **kw)(
                           x, image, self_mask, nq,
                           text_out=not (mode == 'connector' and i == c.depth - 1))
    if mode != 'connector':
      return L.constrain(x, _ACT)
    # Axis names as for an MLP ([D, E]) so no mesh axis appears twice in the kernel.
    out = L.Dense(self.out_dim, ('embed', 'mlp'), use_bias=True, name='language_projection',
                  **kw)(x[:, :c.num_queries])
    return L.constrain(out, _ACT)
