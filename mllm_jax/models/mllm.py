"""The multimodal LLM: ViT -> connector -> decoder LLM.

    pixel_values --VisionEncoder--> [n_img, tokens, Dv] --connector--> [n_img, tokens, E]
    input_ids ----embed_tokens----> [B, T, E] --merge_image_features (at image-token ids)-->
    [B, T, E] --Decoder--> logits [B, T, vocab]

Image placeholder tokens (`image_token_id`, already expanded to `cfg.image_tokens` per image)
are replaced in order by the connector outputs, so a batch may mix samples with 0, 1 or several
images.

Q-Former connectors (BLIP-2 / InstructBLIP, `connector.kind='qformer'`) turn each image into
`num_queries` tokens; InstructBLIP's also reads the instruction, `qformer_input_ids` /
`qformer_attention_mask` [B, L] (one per sample, shared by the sample's images), [B, M, L] (one
per image slot: the file pipeline's, so packed rows give each image its own sample's
instruction) or [N, L] (one per image of a flat image list, as transformers' processor returns).

LLaVA-NeXT (AnyRes, `image_grid_pinpoints`): each image arrives as tiles (a base tile of the
whole image, then a grid chosen from the pinpoints for its size); the projected tiles are packed
into [base tokens; grid rows cropped to the unpadded image, each row followed by
`image_newline`], so an image's token count depends on its size (`anyres_layout`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.models import layers as L
from mllm_jax.models.config import MLLMConfig
from mllm_jax.models.connectors import build_connector
from mllm_jax.models.llm import Decoder
from mllm_jax.models.vit import VisionEncoder, to_channels_last


def merge_image_features(text_embeds, image_features, input_ids, image_token_id, lengths=None):
  """Scatter image features into the image-token positions, in order.

  text_embeds [B, T, E]; input_ids [B, T].
  image_features either [B, M, n, E] (per sample: sample b's images fill sample b's image
  tokens in order) or [N, n, E] (one flat list for the batch, consumed row-major over
  (batch, position) as transformers' LLaVA does). Unused image slots are ignored, so padded
  image slots cost compute but never leak into the sequence.
  lengths ([B, M] or [N], optional): image i uses only its first lengths[i] feature rows
  (LLaVA-NeXT images of different sizes).
  Returns [B, T, E].
  """
  is_img = input_ids == image_token_id
  if lengths is not None:
    if image_features.ndim == 4:
      gathered = jax.vmap(_gather_ragged)(image_features, lengths, is_img)
    else:
      gathered = _gather_ragged(image_features, lengths, is_img.reshape(-1))
      gathered = gathered.reshape(text_embeds.shape)
    return jnp.where(is_img[..., None], gathered.astype(text_embeds.dtype), text_embeds)
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


def _gather_ragged(features, lengths, is_img):
  """features [N, n, E], lengths [N], is_img [S] -> [S, E]: the k-th image token gets row k of
  the concatenation of features[i, :lengths[i]]."""
  k = jnp.cumsum(is_img) - 1
  ends = jnp.cumsum(lengths)
  img = jnp.clip(jnp.searchsorted(ends, k, side='right'), 0, features.shape[0] - 1)
  pos = jnp.clip(k - (ends[img] - lengths[img]), 0, features.shape[1] - 1)
  return features[img, pos]


# ----------------------------------------------------------------------------------------------
# LLaVA-NeXT AnyRes packing
# ----------------------------------------------------------------------------------------------
def select_best_resolution(image_sizes, pinpoints):
  """[N, 2] (height, width) -> [N, 2] the pinpoint that keeps the most image resolution, then
  wastes the least. Run on the host in float64 with transformers' int() truncation, so its
  tie-breaks (which decide the token count) agree exactly; works under jit."""
  def host(sizes):
    out = np.zeros(sizes.shape, np.int32)
    for n, (h0, w0) in enumerate(np.asarray(sizes).reshape(-1, 2).tolist()):
      best, best_eff, best_waste = pinpoints[0], 0, float('inf')
      if h0 <= 0 or w0 <= 0:   # an empty (padding) image slot
        out.reshape(-1, 2)[n] = best
        continue
      for h, w in pinpoints:
        scale = min(w / w0, h / h0)
        eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        if eff > best_eff or (eff == best_eff and h * w - eff < best_waste):
          best, best_eff, best_waste = (h, w), eff, h * w - eff
      out.reshape(-1, 2)[n] = best
    return out
  image_sizes = jnp.asarray(image_sizes, jnp.int32)
  return jax.pure_callback(host, jax.ShapeDtypeStruct(image_sizes.shape, jnp.int32),
                           image_sizes, vmap_method='sequential')


def anyres_max_tokens(pinpoints, tile: int, side: int) -> int:
  """Static upper bound of an image's packed length (side = patches per tile side)."""
  return side * side + max((h // tile * side) * (w // tile * side + 1) for h, w in pinpoints)


def anyres_layout(image_sizes, pinpoints, tile: int, side: int, max_len: int):
  """Where each packed token of each image comes from.

  image_sizes [N, 2] (original height, width); tile = vision image size; side = patches per
  tile side. Returns (tile_index, patch_index, is_newline) each [N, max_len] and lengths [N]:
  token q of image i is patch `patch_index` of tile `tile_index` (tile 0 = base image), or
  `image_newline`. Unpadding crops the grid rows/columns that only hold the processor's
  padding; integer arithmetic here equals transformers' float `int(round(x, 7))`. An empty
  image slot (size 0 x 0) has length 0.
  """
  best = select_best_resolution(image_sizes, pinpoints)
  gh, gw = best[:, 0] // tile, best[:, 1] // tile
  ch, cw = gh * side, gw * side                      # packed grid, in patches
  real = (image_sizes[:, 0] > 0) & (image_sizes[:, 1] > 0)
  h0, w0 = (jnp.maximum(image_sizes[:, i].astype(jnp.int32), 1) for i in (0, 1))
  wide = w0 * ch > cw * h0                           # original aspect wider than the grid's
  pad_h = jnp.where(wide, (ch - (h0 * cw) // w0) // 2, 0)
  pad_w = jnp.where(wide, 0, (cw - (w0 * ch) // h0) // 2)
  uh, uw = ch - 2 * pad_h, cw - 2 * pad_w
  base = side * side
  q = jnp.arange(max_len)[None]
  t = q - base
  row, col = t // (uw[:, None] + 1), t % (uw[:, None] + 1)
  r, c = row + pad_h[:, None], col + pad_w[:, None]
  in_base = q < base
  tile_index = jnp.where(in_base, 0, 1 + (r // side) * gw[:, None] + c // side)
  patch_index = jnp.where(in_base, q, (r % side) * side + c % side)
  is_newline = ~in_base & (col == uw[:, None])
  return tile_index, patch_index, is_newline, jnp.where(real, base + uh * (uw + 1), 0)


def _per_image(x, lead, name):
  """[*prefix, L] with `prefix` a prefix of the image dims `lead` -> [prod(lead), L]."""
  x = jnp.asarray(x)
  prefix = x.shape[:-1]
  if prefix != lead[:len(prefix)]:
    raise ValueError(f'{name} of shape {list(x.shape)} does not fit images with leading dims '
                     f'{list(lead)}: expected [{", ".join(map(str, lead[:1]))}, L] (per sample) '
                     f'or [{", ".join(map(str, lead))}, L]')
  x = x.reshape(prefix + (1,) * (len(lead) - len(prefix)) + x.shape[-1:])
  return jnp.broadcast_to(x, lead + x.shape[-1:]).reshape(-1, x.shape[-1])


class MLLM(nn.Module):
  """`apply({'params': p}, input_ids, pixel_values=None, attention_mask=None, ...)` -> logits.

  input_ids [B, T] int; pixel_values [B, M, H, W, 3] (per-sample image slots) or [N, H, W, 3]
  (flat list, transformers' convention; channels-first [.., 3, H, W] is accepted too);
  attention_mask [B, T] (1 = real token). Returns fp32 logits [B, T, vocab].
  InstructBLIP: qformer_input_ids / qformer_attention_mask [B, L] or [B, M, L] (or [N, L] for a
  flat list).
  LLaVA-NeXT (`cfg.image_grid_pinpoints`): pixel_values [N, tiles, H, W, 3] with image_sizes
  [N, 2] (original height, width), or per sample [B, M, tiles, H, W, 3] with [B, M, 2].
  """
  cfg: MLLMConfig

  def setup(self):
    c = self.cfg
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
    self.llm = Decoder(c.llm, attention_impl=c.attention, attention_blocks=c.attention_blocks,
                       remat_policy=c.remat_policy, **kw)
    if c.vision is not None:
      self.vision = VisionEncoder(c.vision, attention_impl=c.attention,
                                  remat_policy=c.vision_remat_policy,
                                  layer_loop=c.vision_layer_loop, **kw)
      self.connector = build_connector(c.connector, c.llm.hidden, attention_impl=c.attention,
                                       **kw)
      if c.connector.kind == 'qformer' and c.image_grid_pinpoints:
        raise ValueError("config.model.image_grid_pinpoints (LLaVA-NeXT tiles) can't be used "
                         "with connector.kind='qformer'")
      if c.image_grid_pinpoints:
        self.image_newline = self.param(
            'image_newline', L.dense_init(('norm',), std=c.llm.hidden ** -0.5), (c.llm.hidden,),
            c.weight_dtype)

  def encode_images(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
    """[..., H, W, 3] -> connector outputs [..., tokens, E] (leading dims kept).

    qformer_input_ids / qformer_attention_mask [..., L] (InstructBLIP) have a prefix of the
    image leading dims (e.g. [B, L] for images [B, M, ...]) and are shared along the rest."""
    pixel_values = to_channels_last(pixel_values)
    lead = pixel_values.shape[:-3]
    feats = self.vision(pixel_values.reshape((-1,) + pixel_values.shape[-3:]))
    if self.cfg.connector.kind != 'qformer':
      if qformer_input_ids is not None:
        raise ValueError(f'qformer_input_ids given to a model whose connector is '
                         f'{self.cfg.connector.kind!r}, not a Q-Former')
      out = self.connector(feats)
    else:
      ids, mask = (None if a is None else _per_image(a, lead, name)
                   for a, name in ((qformer_input_ids, 'qformer_input_ids'),
                                   (qformer_attention_mask, 'qformer_attention_mask')))
      out = self.connector(feats, ids, mask)
    return out.reshape(lead + out.shape[1:])

  def encode_anyres(self, pixel_values, image_sizes):
    """Tiles [..., tiles, H, W, 3] + image_sizes [..., 2] -> (packed [..., max_len, E],
    lengths [...]) with the leading (image) dims of image_sizes."""
    c = self.cfg
    lead = image_sizes.shape[:-1]
    tiles = self.encode_images(to_channels_last(pixel_values))    # [..., tiles, n, E]
    n_tiles, n = tiles.shape[-3], tiles.shape[-2]
    side = c.vision.image_size // c.vision.patch_size
    if n != side * side:
      raise ValueError(f'LLaVA-NeXT packing needs {side}x{side} tokens per tile, got {n} '
                       "(use feature_select='patch' for a CLIP tower)")
    tiles = tiles.reshape((-1, n_tiles * n, tiles.shape[-1]))
    max_len = anyres_max_tokens(c.image_grid_pinpoints, c.vision.image_size, side)
    tile_index, patch_index, newline, lengths = anyres_layout(
        image_sizes.reshape(-1, 2), c.image_grid_pinpoints, c.vision.image_size, side, max_len)
    idx = jnp.clip(tile_index * n + patch_index, 0, n_tiles * n - 1)
    packed = jnp.take_along_axis(tiles, idx[..., None], axis=1)
    packed = jnp.where(newline[..., None], jnp.asarray(self.image_newline, packed.dtype), packed)
    return packed.reshape(lead + packed.shape[1:]), lengths.reshape(lead)

  def embed(self, input_ids, pixel_values=None, image_sizes=None, qformer_input_ids=None,
            qformer_attention_mask=None):
    """Token embeddings with image features merged in: [B, T, E]."""
    embeds = self.llm.embed(input_ids)
    if pixel_values is not None:
      if self.cfg.vision is None:
        raise ValueError('pixel_values given to a model without a vision tower '
                         '(config.model.vision is None)')
      if self.cfg.image_grid_pinpoints:
        if image_sizes is None:
          raise ValueError('a LLaVA-NeXT model (image_grid_pinpoints) needs image_sizes '
                           '[n_images, 2] (height, width), as its processor returns')
        feats, lengths = self.encode_anyres(pixel_values, jnp.asarray(image_sizes))
        return merge_image_features(embeds, feats, input_ids, self.cfg.image_token_id, lengths)
      if image_sizes is not None:
        raise ValueError('image_sizes is only used by LLaVA-NeXT models (image_grid_pinpoints)')
      feats = self.encode_images(pixel_values, qformer_input_ids, qformer_attention_mask)
      embeds = merge_image_features(embeds, feats, input_ids, self.cfg.image_token_id)
    elif self.is_initializing() and self.cfg.vision is not None:
      v = self.cfg.vision   # create the vision and connector params at init
      self.encode_images(jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32))
    return embeds

  def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, positions=None,
                    segment_ids=None, image_sizes=None, cache=None, qformer_input_ids=None,
                    qformer_attention_mask=None):
    """-> [B, T, E]; with a KV `cache` (generation) -> (hidden states, updated cache)."""
    embeds = self.embed(input_ids, pixel_values, image_sizes, qformer_input_ids,
                        qformer_attention_mask)
    return self.llm.hidden_states(embeds, attention_mask, positions, segment_ids, cache)

  def init_cache(self, batch: int, length: int):
    return self.llm.init_cache(batch, length)

  def logits(self, hidden, dtype=jnp.float32):
    return self.llm.logits(hidden, dtype)

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, positions=None,
               segment_ids=None, image_sizes=None, qformer_input_ids=None,
               qformer_attention_mask=None):
    return self.logits(self.hidden_states(
        input_ids, pixel_values, attention_mask, positions, segment_ids, image_sizes,
        qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask))
