"""The multimodal LLM: ViT -> connector -> decoder LLM.

    pixel_values --VisionEncoder--> [n_img, tokens, Dv] --connector--> [n_img, tokens, E]
    input_ids ----embed_tokens----> [B, T, E] --merge_image_features (at image-token ids)-->
    [B, T, E] --Decoder--> logits [B, T, vocab]

Image placeholder tokens (`image_token_id`, already expanded to `tokens` per image) are replaced
in order by the connector outputs, so a batch may mix samples with 0, 1 or several images.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models import layers as L
from mllm_jax.models.config import MLLMConfig
from mllm_jax.models.connectors import build_connector
from mllm_jax.models.llm import Decoder
from mllm_jax.models.vit import VisionEncoder


def to_channels_last(pixel_values):
  """Accept [..., H, W, 3] (ours) or [..., 3, H, W] (transformers' processors)."""
  if pixel_values.shape[-1] != 3 and pixel_values.shape[-3] == 3:
    return jnp.moveaxis(pixel_values, -3, -1)
  return pixel_values


def merge_image_features(text_embeds, image_features, input_ids, image_token_id):
  """Scatter image features into the image-token positions, in order.

  text_embeds [B, T, E]; input_ids [B, T].
  image_features either [B, M, n, E] (per sample: sample b's images fill sample b's image
  tokens in order) or [N, n, E] (one flat list for the batch, consumed row-major over
  (batch, position) as transformers' LLaVA does). Unused image slots are ignored, so padded
  image slots cost compute but never leak into the sequence.
  Returns [B, T, E].
  """
  is_img = input_ids == image_token_id
  if image_features.ndim == 4:   # per sample
    b, m, n, e = image_features.shape
    flat = image_features.reshape(b, m * n, e)
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, m * n - 1)        # [B, T]
    gathered = jnp.take_along_axis(flat, idx[..., None], axis=1)         # [B, T, E]
  else:                          # one list for the whole batch
    flat = image_features.reshape(-1, image_features.shape[-1])
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, flat.shape[0] - 1)
    gathered = flat[idx].reshape(text_embeds.shape)
  return jnp.where(is_img[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class MLLM(nn.Module):
  """`apply({'params': p}, input_ids, pixel_values=None, attention_mask=None, ...)` -> logits.

  input_ids [B, T] int; pixel_values [B, M, H, W, 3] (per-sample image slots) or [N, H, W, 3]
  (flat list, transformers' convention; channels-first [.., 3, H, W] is accepted too);
  attention_mask [B, T] (1 = real token). Returns fp32 logits [B, T, vocab].
  """
  cfg: MLLMConfig

  def setup(self):
    c = self.cfg
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
    self.llm = Decoder(c.llm, attention_impl=c.attention, remat_policy=c.remat_policy, **kw)
    if c.vision is not None:
      self.vision = VisionEncoder(c.vision, attention_impl=c.attention,
                                  remat_policy=c.vision_remat_policy, **kw)
      self.connector = build_connector(c.connector, c.llm.hidden, **kw)

  def encode_images(self, pixel_values):
    """[..., H, W, 3] -> connector outputs [..., tokens, E] (leading dims kept)."""
    pixel_values = to_channels_last(pixel_values)
    lead = pixel_values.shape[:-3]
    feats = self.vision(pixel_values.reshape((-1,) + pixel_values.shape[-3:]))
    out = self.connector(feats)
    return out.reshape(lead + out.shape[1:])

  def embed(self, input_ids, pixel_values=None):
    """Token embeddings with image features merged in: [B, T, E]."""
    embeds = self.llm.embed(input_ids)
    if pixel_values is not None:
      if self.cfg.vision is None:
        raise ValueError('pixel_values given to a model without a vision tower '
                         '(config.model.vision is None)')
      embeds = merge_image_features(embeds, self.encode_images(pixel_values), input_ids,
                                    self.cfg.image_token_id)
    elif self.is_initializing() and self.cfg.vision is not None:
      v = self.cfg.vision   # create the vision and connector params at init
      self.encode_images(jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32))
    return embeds

  def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, positions=None,
                    segment_ids=None):
    return self.llm.hidden_states(self.embed(input_ids, pixel_values), attention_mask,
                                  positions, segment_ids)

  def logits(self, hidden):
    return self.llm.logits(hidden)

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, positions=None,
               segment_ids=None):
    return self.logits(self.hidden_states(input_ids, pixel_values, attention_mask, positions,
                                          segment_ids))
