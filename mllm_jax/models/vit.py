"""ViT image encoder in the CLIP, SigLIP and BLIP-2 (EVA) variants.

    CLIP:   patches (conv, no bias) -> [CLS; patches] + pos -> pre_norm -> blocks (quick_gelu)
    SigLIP: patches (conv + bias)   ->  patches       + pos ->            blocks (gelu_tanh)
    BLIP-2: patches (conv + bias)   -> [CLS; patches] + pos ->            blocks (gelu, fused
            qkv) -> post_norm
    block:  x += Attn(LN(x)); x += MLP(LN(x))                               (pre-LN)

The features handed to the connector are hidden state `feature_layer` (0 = embeddings, L = last
layer), before `post_norm`, as LLaVA reads `hidden_states[vision_feature_layer]`; layers past it
are skipped at run time. A tuple of layers concatenates those hidden states on the feature axis
(HF `vision_feature_layer` as a list). `post_norm` is kept for checkpoint round trips and `pooled`.
BLIP-2 hands the Q-Former `post_norm` of its features (LAVIS `ln_vision`; HF's
last_hidden_state), class token included; its tower is EVA ViT-g with the last of 40 layers
removed, so `feature_layer=-1` reads the second-last layer of the original EVA model.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models import layers as L
from mllm_jax.models.config import VisionConfig
from mllm_jax.models.llm import remat


def to_channels_last(pixel_values):
  """Accept [..., H, W, 3] (ours) or [..., 3, H, W] (transformers' processors)."""
  if pixel_values.shape[-1] != 3 and pixel_values.shape[-3] == 3:
    return jnp.moveaxis(pixel_values, -3, -1)
  return pixel_values


class EncoderBlock(nn.Module):
  """Pre-LN ViT block with biased q/k/v/o and a 2-layer MLP. Scanned: (x, i) -> (x, i+1);
  emits each layer's output only when several feature layers are read."""
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'einsum'

  def layer(self, x):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = c.width // c.heads
    h = L.LayerNorm(c.norm_eps, name='norm1', **kw)(x)
    if c.kind == 'blip2':   # one fused projection, as EVA / HF store it ([3, heads, head_dim])
      qkv = L.DenseGeneral((3, c.heads, d), ('embed', None, 'heads', 'head_dim'),
                           use_bias=c.qkv_bias, name='qkv', **kw)(h)
      q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    else:
      q, k, v = (L.DenseGeneral((c.heads, d), ('embed', 'heads', 'head_dim'), use_bias=True,
                                name=f'{n}_proj', **kw)(h) for n in 'qkv')
    a = L.dot_product_attention(q, k, v, None, impl=self.attention_impl, dtype=self.dtype)
    x = x + L.DenseGeneral(c.width, ('heads', 'head_dim', 'embed'), in_axes=(-2, -1),
                           use_bias=True, name='o_proj', **kw)(a)
    h = L.LayerNorm(c.norm_eps, name='norm2', **kw)(x)
    h = L.Dense(c.mlp_dim, ('embed', 'mlp'), use_bias=True, name='fc1', **kw)(h)
    h = L.constrain(L.ACTIVATIONS[c.activation](h), ('act_batch', 'act_length', 'act_mlp'))
    x = x + L.Dense(c.width, ('mlp', 'embed'), use_bias=True, name='fc2', **kw)(h)
    return L.constrain(x, ('act_batch', 'act_length', 'act_embed'))

  @nn.compact
  def __call__(self, carry, layers_used: int):
    x, i = carry
    if self.is_initializing() or layers_used >= self.cfg.depth:
      x = self.layer(x)
    else:   # skip the layers past `feature_layer` (e.g. the last one for LLaVA's -2)
      x = nn.cond(i < layers_used, lambda m, x: m.layer(x), lambda m, x: x, self, x)
    return (x, i + 1), (x if len(self.cfg.feature_layers) > 1 else None)


class VisionEncoder(nn.Module):
  """pixel_values [N, H, W, 3] (normalised; channels-first [N, 3, H, W] is accepted too) ->
  features [N, num_tokens, width * len(feature_layers)]."""
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'einsum'
  remat_policy: str = 'none'
  layer_loop: str = 'scan'   # or 'unrolled': see MLLMConfig.vision_layer_loop

  def setup(self):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.layer_loop not in ('scan', 'unrolled'):
      raise ValueError(f"vision_layer_loop={self.layer_loop!r} (MLLMConfig): expected 'scan' or "
                       "'unrolled'")
    if c.kind not in ('clip', 'siglip', 'blip2'):
      raise ValueError(f"config.model.vision.kind={c.kind!r}: expected 'clip', 'siglip' or "
                       "'blip2'")
    if c.feature_select not in ('patch', 'full'):
      raise ValueError(f"config.model.vision.feature_select={c.feature_select!r}: expected "
                       "'patch' (drop the class token) or 'full'")
    self.patch_embed = nn.Conv(
        c.width, (c.patch_size, c.patch_size), strides=c.patch_size, padding='VALID',
        use_bias=c.kind != 'clip', kernel_init=L.dense_init((None, None, None, 'embed')),
        bias_init=L.zeros_init(('embed',)), **kw)
    n_pos = c.num_patches + (1 if c.has_cls else 0)
    if c.has_cls:
      self.class_embedding = self.param(
          'class_embedding', L.dense_init(('embed',), std=c.width ** -0.5), (c.width,),
          self.param_dtype)
    if c.kind == 'clip':
      self.pre_norm = L.LayerNorm(c.norm_eps, **kw)
    self.position_embedding = self.param(
        'position_embedding', L.dense_init((None, 'embed'), std=0.02), (n_pos, c.width),
        self.param_dtype)
    self.block = remat(EncoderBlock, self.remat_policy, static_argnums=(2,))
    self.layers = nn.scan(
        self.block, variable_axes={'params': 0}, split_rngs={'params': True},
        in_axes=(nn.broadcast,), length=c.depth, metadata_params={nn.PARTITION_NAME: 'layers'})(
            c, self.dtype, self.param_dtype, self.attention_impl)
    self.post_norm = L.LayerNorm(c.norm_eps, **kw)

  def run_layers(self, x, layers_used: int):
    """x [N, T, D] through the first `layers_used` layers -> (last [N, T, D], the outputs of
    layers 1..L [L, N, T, D] when several feature layers are read, else None)."""
    if self.layer_loop == 'scan' or self.is_initializing():
      (last, _), hidden = self.layers((x, jnp.int32(0)), layers_used)
      return last, hidden
    # unrolled: the same block on static slices of the stacked weights, only the layers used
    stacked = nn.unbox(self.variables['params']['layers'])
    block = self.block(self.cfg, self.dtype, self.param_dtype, self.attention_impl, parent=None)
    hidden = []
    for i in range(layers_used):
      (x, _), h = block.apply({'params': jax.tree.map(lambda a, i=i: a[i], stacked)},
                              (x, jnp.int32(i)), self.cfg.depth)
      hidden.append(h)
    return x, (jnp.stack(hidden) if len(self.cfg.feature_layers) > 1 else None)

  def embeddings(self, pixel_values):
    c = self.cfg
    x = self.patch_embed(to_channels_last(pixel_values).astype(self.dtype))   # [N, h, w, D]
    x = x.reshape(x.shape[0], -1, c.width)
    if c.has_cls:
      cls = jnp.broadcast_to(jnp.asarray(self.class_embedding, self.dtype), (x.shape[0], 1, c.width))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + jnp.asarray(self.position_embedding, self.dtype)[None]
    if c.kind == 'clip':
      x = self.pre_norm(x)
    return L.constrain(x, ('act_batch', 'act_length', 'act_embed'))

  def __call__(self, pixel_values):
    c = self.cfg
    x = self.embeddings(pixel_values)
    last, hidden = self.run_layers(x, c.layers_used)
    if self.is_initializing():
      self.post_norm(last)   # create its params
    if len(c.feature_layers) > 1:   # hidden [L, N, T, D]: outputs of layers 1..L
      feats = [x if n == 0 else hidden[n - 1] for n in c.feature_layers]
      if c.norm_features:
        feats = [self.post_norm(f) for f in feats]
      x = jnp.concatenate(feats, axis=-1)
    else:
      x = self.post_norm(last) if c.norm_features else last
    if c.has_cls and c.feature_select == 'patch':
      x = x[:, 1:]
    return x

  def pooled(self, pixel_values):
    """Pooled output as in transformers: post_norm(CLS) for CLIP (all layers run); BLIP-2 applies
    post_norm twice (to last_hidden_state, then to its CLS row), as HF does."""
    x, _ = self.run_layers(self.embeddings(pixel_values), self.cfg.depth)
    if self.cfg.norm_features:
      x = self.post_norm(x)
    return self.post_norm(x[:, 0] if self.cfg.has_cls else x)
