"""BLIP-2 stage 1: vision-language representation learning with a frozen ViT (LAVIS
`Blip2Qformer`, transformers `Blip2ForImageTextRetrieval` + an ITG head).

    pixels [N, H, W, 3] --vision (frozen)--> features [N, P, Dv]
    ITC  image: qformer(features, 'bidirectional')        -> [N, Q, D] -> vision_proj -> L2norm
         text:  qformer(text, 'text')[:, 0] ([CLS])        -> [N, D]    -> text_proj   -> L2norm
         score(image, text) = max over the Q queries of the cosine similarity, / temp
    ITM  qformer(features, text, 'bidirectional')[:, :Q] -> itm_head -> mean over queries [N, 2]
    ITG  qformer(features, [DEC] + text[1:], 'causal')[:, Q:] -> lm_head -> [N, L, V]

One Q-Former (`models.qformer.QFormer`, text=True) runs all three attention patterns with the
same parameters. Parameter tree:
  vision/...                  the tower (VisionEncoder), frozen in training
  qformer/{query_tokens, word_embeddings, position_embeddings, input_norm, layer_{i}/...}
  vision_proj, text_proj      [D, embed_dim]
  itm_head                    [D, 2]
  temp                        [] ITC temperature (init 0.07; used clipped to [0.001, 0.5])
  lm_head/{dense, norm, bias} BERT LM prediction head; its decoder is the word embeddings
`qformer/` has the names of the MLLM's Q-Former connector (`connector/`), so a stage-1 model
starts stage 2 as it is (`config.model.connector.init_from`,
`train.blip2_stage1.mllm_params_from_stage1`).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models import layers as L
from mllm_jax.models.config import Stage1Config
from mllm_jax.models.qformer import QFormer
from mllm_jax.models.vit import VisionEncoder

TEMP_RANGE = (0.001, 0.5)   # LAVIS clamps temp to this range before every use


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) over the last axis (torch F.normalize)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class LMHead(nn.Module):
  """BERT LM prediction head: LN(gelu(dense(h))) @ embedding.T + bias. h [N, L, D] -> [N, L, V]."""
  hidden: int
  act: str
  norm_eps: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, embedding):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = L.Dense(self.hidden, ('embed', 'mlp'), use_bias=True, name='dense', **kw)(h)
    h = L.LayerNorm(self.norm_eps, name='norm', **kw)(L.ACTIVATIONS[self.act](h))
    bias = self.param('bias', L.zeros_init(('vocab',)), (embedding.shape[0],), self.param_dtype)
    logits = jnp.einsum('nld,vd->nlv', h, jnp.asarray(embedding, self.dtype))
    return (logits + jnp.asarray(bias, self.dtype)).astype(jnp.float32)


class QFormerPretrainer(nn.Module):
  """BLIP-2 stage-1 model (see the module docstring). Methods take vision `features` so that
  ITM's negatives reuse the tower's output; `__call__` runs every branch (and creates every
  parameter)."""
  cfg: Stage1Config

  def setup(self):
    c = self.cfg
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    if c.embed_dim < 1:
      raise ValueError(f'config.model.embed_dim={c.embed_dim}: must be >= 1')
    self.vision = VisionEncoder(c.vision, attention_impl=c.attention, **kw)
    self.qformer = QFormer(c.qformer, 0, attention_impl=c.attention, text=True, **kw)
    self.vision_proj = L.Dense(c.embed_dim, ('embed', 'mlp'), use_bias=True, **kw)
    self.text_proj = L.Dense(c.embed_dim, ('embed', 'mlp'), use_bias=True, **kw)
    self.itm_head = L.Dense(2, ('embed', None), use_bias=True, **kw)
    self.temp = self.param('temp', nn.initializers.constant(0.07), (), jnp.float32)
    q = c.qformer
    self.lm_head = LMHead(q.hidden, q.act, q.norm_eps, **kw)

  def features(self, pixel_values):
    """pixels [N, H, W, 3] (or [N, 3, H, W]) -> vision features [N, P, Dv]."""
    return self.vision(pixel_values)

  def temperature(self):
    """The ITC temperature as used: `temp` clipped to TEMP_RANGE."""
    return jnp.clip(self.temp, *TEMP_RANGE)

  def image_embeds(self, features):
    """features [N, P, Dv] -> ITC image embeddings [N, Q, embed_dim] (unit length)."""
    return l2_normalize(self.vision_proj(self.qformer(features, mode='bidirectional')))

  def text_embeds(self, input_ids, attention_mask):
    """ids / mask [N, L] (first token [CLS]) -> ITC text embeddings [N, embed_dim] (unit)."""
    h = self.qformer(None, input_ids, attention_mask, mode='text')
    return l2_normalize(self.text_proj(h[:, 0]))

  def itm_logits(self, features, input_ids, attention_mask):
    """features [N, P, Dv], text ids / mask [N, L] -> match logits [N, 2] (1 = matched): the
    head on each query's output, averaged over the queries."""
    h = self.qformer(features, input_ids, attention_mask, mode='bidirectional')
    return jnp.mean(self.itm_head(h[:, :self.cfg.qformer.num_queries]), axis=1).astype(
        jnp.float32)

  def itg_logits(self, features, input_ids, attention_mask):
    """features [N, P, Dv], text ids / mask [N, L] -> next-token logits [N, L, V] (fp32).

    The first text token is replaced by `decoder_bos_id` ([DEC]); position t predicts token
    t + 1 and sees the queries (which see only the image and each other) and tokens <= t."""
    bos = self.cfg.decoder_bos_id
    if self.is_initializing():   # the head's parameters don't depend on the id
      bos = max(bos, 0)
    if not 0 <= bos < self.cfg.qformer.vocab_size:
      raise ValueError(f'config.model.decoder_bos_id={bos}: ITG needs the id of the decoder '
                       f'BOS token ([DEC]) in the Q-Former vocabulary '
                       f'(vocab_size={self.cfg.qformer.vocab_size})')
    ids = jnp.asarray(input_ids).at[:, 0].set(bos)
    h = self.qformer(features, ids, attention_mask, mode='causal')
    table = nn.meta.unbox(self.qformer.variables['params']['word_embeddings']['embedding'])
    return self.lm_head(h[:, self.cfg.qformer.num_queries:], table)

  def __call__(self, pixel_values, input_ids, attention_mask=None):
    """-> dict(image_embeds [N, Q, E], text_embeds [N, E], itm_logits [N, 2] of the given
    pairs, itg_logits [N, L, V], temp [])."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    feats = self.features(pixel_values)
    itm = self.itm_logits(feats, input_ids, attention_mask)   # first: creates the Q-Former
    return dict(image_embeds=self.image_embeds(feats),
                text_embeds=self.text_embeds(input_ids, attention_mask), itm_logits=itm,
                itg_logits=self.itg_logits(feats, input_ids, attention_mask),
                temp=self.temperature())
