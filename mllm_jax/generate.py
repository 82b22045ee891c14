"""Generation: jitted prefill, then a static-shape KV-cache decode loop (`lax.while_loop`).

    new_ids = mllm_jax.generate(model, params, input_ids, attention_mask=None, pixel_values=None,
                                max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0,
                                stop_tokens=(eos_id,), seed=0)            # int32 [B, max_new_tokens]

Same input conventions as `model.apply`: image placeholder tokens already expanded in
`input_ids`, `pixel_values` per sample [B, M, H, W, 3] or flat [N, H, W, 3] (channels first is
accepted too); a LLaVA-NeXT model takes AnyRes tiles [B, M, tiles, H, W, 3] or [N, tiles, H, W,
3] with `image_sizes` [B, M, 2] / [N, 2] (original height, width), as its processor returns,
each image tag expanded to that image's count (`image_token_counts`). Prompts of different
lengths are LEFT-padded (attention_mask 0 at the start), as for transformers' `generate`;
position ids follow its convention (cumsum of the mask - 1).
After a row emits a stop token it emits `pad_token_id`; the loop ends when every row stopped.

`temperature=0` is greedy decoding; otherwise logits / temperature, then top-k, then top-p
(nucleus), then a categorical sample (`seed`). Visual contrastive decoding (VCD, Leng et al.
2024) runs when `vcd_alpha > 0`: a second branch sees the images noised by the diffusion forward
process at `vcd_noise_step` (of 1000, sigmoid beta schedule), and the next token comes from
`(1 + alpha) * l(v) - alpha * l(v')`, restricted to tokens with l(v) >= log(beta) + max l(v).

CLI: `python -m mllm_jax.generate --checkpoint WORKDIR --image IMG --prompt "..."` (or
`--hf DIR`); see `main`. The module itself is callable: `mllm_jax.generate(...)` is
`mllm_jax.generate.generate(...)`.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import types
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30


# ----------------------------------------------------------------------------------------------
# Token choice
# ----------------------------------------------------------------------------------------------
def vcd_logits(logits, noised_logits, alpha: float, beta: float):
  """Contrastive logits `(1+alpha) l - alpha l'`, -inf where l < log(beta) + max l. [B, V]."""
  cutoff = jnp.log(beta) + jnp.max(logits, -1, keepdims=True)
  cd = (1 + alpha) * logits - alpha * noised_logits
  return jnp.where(logits < cutoff, -jnp.inf, cd)


def greedy_token(logits):
  """[B, V] -> [B] int32: the first index of the largest logit, as `argmax` gives it, found as
  a max then a min over the matching indices. Two plain reductions vectorise on XLA:CPU where
  argmax's (value, index) reduction does not: 0.4 vs 1.4 ms at [8, 32000], ~5% of a decode step
  of the benchmark model. Rows with NaN logits: the last token id where the max propagates
  the NaN; XLA:CPU's vectorised max skips NaNs at large V (32000), which then gives the largest
  non-NaN logit's index (argmax, and the decode kernel's `cpu.greedy_token`: the NaN's)."""
  v = logits.shape[-1]
  best = jnp.max(logits, -1, keepdims=True)
  first = jnp.min(jnp.where(logits == best, jnp.arange(v, dtype=jnp.int32), v), -1)
  return jnp.minimum(first, v - 1)


def sample_token(logits, rng, temperature: float, top_k: int, top_p: float):
  """[B, V] fp32 logits -> [B] int32 (greedy when temperature == 0)."""
  if temperature == 0.0:
    return greedy_token(logits)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, -1), order, -1)
    before = jnp.cumsum(sorted_probs, -1) - sorted_probs     # mass of the better tokens
    drop_sorted = before >= top_p                             # the best token always stays
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        drop_sorted)
    logits = jnp.where(drop, NEG_INF, logits)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


def diffusion_noise(pixel_values, rng, step: int, num_steps: int = 1000):
  """VCD's forward diffusion q(x_t | x_0) on normalised pixels: sqrt(a_t) x + sqrt(1-a_t) eps."""
  betas = jax.nn.sigmoid(jnp.linspace(-6.0, 6.0, num_steps)) * (5e-3 - 1e-5) + 1e-5
  alpha_bar = jnp.cumprod(1.0 - betas)[step]
  eps = jax.random.normal(rng, pixel_values.shape, jnp.float32)
  return (jnp.sqrt(alpha_bar) * pixel_values + jnp.sqrt(1 - alpha_bar) * eps).astype(
      pixel_values.dtype)


# ----------------------------------------------------------------------------------------------
# Prefill + decode
# ----------------------------------------------------------------------------------------------
def _generate(model, params, packed, input_ids, attention_mask, pixel_values, rng, image_kw, *,
              max_new_tokens, cache_len, temperature, top_k, top_p, stop_tokens, pad_token_id,
              vcd_alpha, vcd_beta, vcd_noise_step, layer_loop, decode_kernel):
  """packed: the CPU decode kernels' weights (`UnrolledDecoder.pack`) with
  decode_kernel='packed', else None. image_kw: the image inputs besides pixel_values
  (image_sizes, qformer_*), [B or N, ...].

  Token i is chosen from the logits after token i - 1; the loop runs the decode step for tokens
  0 .. max_new_tokens - 2 only, since nothing reads the logits after the last one."""
  b, t = input_ids.shape
  variables = {'params': params}
  rng, noise_rng = jax.random.split(rng)
  if vcd_alpha > 0:   # the contrastive branch rides along as extra batch rows
    noised = diffusion_noise(pixel_values, noise_rng, vcd_noise_step)
    pixel_values = jnp.concatenate([pixel_values, noised], 0)
    input_ids, attention_mask = (jnp.concatenate([x, x], 0) for x in (input_ids, attention_mask))
    image_kw = {k: jnp.concatenate([x, x], 0) for k, x in image_kw.items()}
  rows = input_ids.shape[0]
  positions = jnp.maximum(jnp.cumsum(attention_mask, -1) - 1, 0).astype(jnp.int32)

  # greedy on the CPU kernels: one kernel, which reads the lm_head's output as it is (bf16: no
  # fp32 copy per step) unless VCD first computes fp32 contrastive logits from it
  kernel_greedy = temperature == 0.0 and decode_kernel == 'packed'
  raw_logits = kernel_greedy and vcd_alpha == 0

  def last_logits(hidden):   # [rows, V]
    return model.apply(head_variables, hidden[:, -1:], None if raw_logits else jnp.float32,
                       method='logits')[:, 0]

  cache = model.apply(variables, rows, cache_len, method='init_cache')
  unrolled, head_variables = None, variables
  if layer_loop == 'unrolled':
    unrolled = UnrolledDecoder(model, params, cache_len)
    if decode_kernel == 'packed':   # the prefill's dense layers run on the kernels too
      head_variables = unrolled.use_packed(packed)
    embeds = model.apply(variables, input_ids, pixel_values, method='embed', **image_kw)
    hidden, cache = unrolled.run(embeds, attention_mask, positions, unrolled.split_cache(cache))
  else:
    hidden, cache = model.apply(variables, input_ids, pixel_values, attention_mask, positions,
                                cache=cache, method='hidden_states', **image_kw)
  stops = jnp.asarray(stop_tokens or [-1], jnp.int32)

  def choose(logits, key):
    if vcd_alpha > 0:
      logits = vcd_logits(logits[:b], logits[b:], vcd_alpha, vcd_beta)
    if kernel_greedy:
      from mllm_jax.kernels import cpu
      return cpu.greedy_token(logits)   # greedy_token's choice as one kernel (fp32 or bf16)
    return sample_token(logits, key, temperature, top_k, top_p)

  def cond(s):
    i, _, _, done, _, _, _ = s
    return (i < max_new_tokens - 1) & ~jnp.all(done)

  def emit(s):   # token i from the current logits -> (token, tokens, done, rng)
    i, tokens, _, done, rng, logits, _ = s
    rng, key = jax.random.split(rng)
    tok = jnp.where(done, pad_token_id, choose(logits, key))
    return tok, tokens.at[:, i].set(tok), done | jnp.isin(tok, stops), rng

  def body(s):
    i, _, cache, _, _, _, pos = s
    tok, tokens, done, rng = emit(s)
    feed = jnp.concatenate([tok, tok], 0) if vcd_alpha > 0 else tok
    if unrolled is None:
      hidden, cache = model.apply(variables, feed[:, None], None, jnp.ones((rows, 1), jnp.int32),
                                  pos[:, None], cache=cache, method='hidden_states')
    else:
      hidden, cache = unrolled.step(feed[:, None], pos[:, None], cache)
    return i + 1, tokens, cache, done, rng, last_logits(hidden), pos + 1

  init = (jnp.int32(0), jnp.full((b, max_new_tokens), pad_token_id, jnp.int32), cache,
          jnp.zeros((b,), bool), rng, last_logits(hidden), positions[:, -1] + 1)
  # the last token (pad when every row stopped before it), without a step after it
  return emit(jax.lax.while_loop(cond, body, init) if max_new_tokens > 1 else init)[1]


class UnrolledDecoder:
  """The prefill and the decode step with the layers unrolled over per-layer weights and
  per-layer KV caches.

  In the scanned decoder every decode step dynamic-slices each layer's weights and KV cache out
  of the stacked arrays and writes the cache back; on XLA:CPU those copies cost more than the
  step's matmuls, and in bf16 the scanned prefill converts all stacked weights to fp32 and back
  (BENCHMARKS.md). Here the stacked weights are split once per `generate` call and each layer's
  cache is its own loop-carried buffer that `dynamic_update_slice` updates in place. The price
  is a second copy of the LLM's layer weights for the duration of the call (none with the CPU
  kernels, whose packed weights replace them), which is why `layer_loop='auto'` picks this only
  on CPU (TPU/GPU fuse the slices).
  Numbers are those of the scanned decoder: the same `DecoderBlock` runs on the same weights.
  """

  def __init__(self, model, params, cache_len: int):
    from mllm_jax.models import layers as L
    from mllm_jax.models.llm import DecoderBlock, layer_plan
    c = model.cfg
    self.model, self.params, self.cfg = model, params, c.llm
    # RoPE's cos / sin for every cache slot's position, once per call ([L, head_dim] each): a
    # step gathers its rows. Computed in the step, XLA fuses the sin / cos into every layer's
    # q and k rotation and evaluates them 2 x depth times per step (~10 us each, bench model).
    cos, sin = L.rope_cos_sin(jnp.arange(cache_len)[None], L.rope_inv_freq(
        c.llm.dim_per_head, c.llm.rope_theta, c.llm.rope_scaling.as_dict()))
    self.rope = cos[0], sin[0]
    self.packed = None   # per layer, the `layers.PACKED` collection (`use_packed`)
    # Per layer, in order: (block module, its weights), from every scanned stack of the plan
    # (a stack of groups holds `block_j` sub-trees; MoE layers are MoE blocks).
    self.layers = []
    for name, kinds, reps, _ in layer_plan(c.llm):
      stacked = params['llm'][name]
      for r in range(reps):
        group = jax.tree.map(lambda x, r=r: x[r], stacked)
        for j, is_moe in enumerate(kinds):
          block = DecoderBlock(c.llm, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                               attention_impl=c.attention, moe=is_moe)
          self.layers.append((block, group if len(kinds) == 1 else group[f'block_{j}']))

  def split_cache(self, cache):
    """Stacked cache (k, v [depth, ...]) -> per-layer lists."""
    return dict(k=list(cache['k']), v=list(cache['v']), filled=cache['filled'],
                index=cache['index'])

  def _inputs(self, attention_mask, positions, cache):
    """The blocks' inputs for new tokens' attention_mask, positions [B, T]: mask, cos, sin,
    token mask, and the cache's new filled slots (as in the LLM's `hidden_states`)."""
    from mllm_jax.models import layers as L
    c = self.cfg
    filled = jax.lax.dynamic_update_slice(cache['filled'], attention_mask.astype(bool),
                                          (0, cache['index']))
    mask = L.make_cache_mask(filled, cache['index'], positions.shape[1], c.sliding_window)
    cos, sin = self.rope[0][positions], self.rope[1][positions]
    token_mask = attention_mask if c.moe.num_experts else None
    return mask, cos, sin, token_mask, filled

  def embed(self, ids):
    """Token ids [B, T] -> embeddings [B, T, E]."""
    return self.model.apply({'params': self.params}, ids, method=lambda m, i: m.llm.embed(i))

  def pack(self):
    """The CPU decode kernels' weights: {'layers': per layer its `layers.PACKED` collection,
    'head': the lm_head's (or tied embedding's)}. Every dense kernel is packed by a
    packing pass of its module (`layers.PACKED` mutable) on a dummy one-token step whose
    outputs are dropped, so XLA keeps only the packing; the pass also marks each attention layer
    for the decode-attention kernel."""
    from mllm_jax.models import layers as L
    ids = jnp.zeros((1, 1), jnp.int32)
    cache = self.split_cache(self.model.apply({'params': self.params}, 1, 1,
                                              method='init_cache'))
    x = self.embed(ids)
    mask, cos, sin, token_mask, _ = self._inputs(jnp.ones_like(ids), ids, cache)
    layers = []
    for (block, p), k, v in zip(self.layers, cache['k'], cache['v']):
      _, cols = block.apply({'params': p}, x, mask, cos, sin, token_mask,
                            dict(k=k, v=v, index=cache['index']), mutable=[L.PACKED])
      layers.append(cols[L.PACKED])
    _, head = self.model.apply({'params': self.params}, x, method='logits', mutable=[L.PACKED])
    return dict(layers=layers, head=head[L.PACKED])

  def use_packed(self, packed):
    """Switch the step to the CPU decode kernels on `pack()`'s weights; returns the variables
    for `model.apply(..., method='logits')` with the lm_head packed."""
    from mllm_jax.models import layers as L
    self.packed = packed['layers']
    return {'params': self.params, L.PACKED: packed['head']}

  def step(self, ids, positions, cache):
    """ids, positions [B, T] -> (final-normed hidden states [B, T, E], cache)."""
    return self.run(self.embed(ids), jnp.ones(ids.shape, jnp.int32), positions, cache)

  def run(self, embeds, attention_mask, positions, cache):
    """New tokens' embeddings [B, T, E], attention_mask, positions [B, T] -> (final-normed
    hidden states [B, T, E], cache): the LLM's `hidden_states` with a cache, layer by layer.
    The prefill runs here too: in the scanned layers XLA:CPU converts the per-layer slices of
    bf16 weights to fp32 and back (all LLM weights, every call; BENCHMARKS.md)."""
    from mllm_jax.models import layers as L
    mask, cos, sin, token_mask, filled = self._inputs(attention_mask, positions, cache)
    x = embeds.astype(self.model.cfg.compute_dtype)
    index = cache['index']
    ks, vs = [], []
    for i, ((block, p), k, v) in enumerate(zip(self.layers, cache['k'], cache['v'])):
      variables = {'params': p} if self.packed is None else {'params': p, L.PACKED: self.packed[i]}
      x, (kv, _) = block.apply(variables, x, mask, cos, sin, token_mask,
                               dict(k=k, v=v, index=index))
      ks.append(kv['k'])
      vs.append(kv['v'])
    h = self.model.apply({'params': self.params}, x, method=lambda m, x: m.llm.norm(x))
    return h, dict(k=ks, v=vs, filled=filled, index=index + positions.shape[1])


@functools.lru_cache(maxsize=32)
def _compiled(model, **static):
  return jax.jit(functools.partial(_generate, model, **static))


@functools.lru_cache(maxsize=8)
def _packer(model):
  return jax.jit(lambda params: UnrolledDecoder(model, params, 1).pack())


class _KeptPacked:
  """The packed weights of the last params `generate` ran the CPU decode kernels on, for the
  next call with the same params: packing the bench model's LLM takes 10-30 ms, a few decode
  steps' worth (BENCHMARKS.md). "Same" is the same jax.Array objects, which are immutable;
  params holding other arrays (numpy) are packed on every call. The entry goes when any of its
  arrays is garbage-collected, when other params are packed, or with keep_packed=False."""

  def __init__(self):
    # (model, weak references to the params' leaves, packed weights, token): the token tells a
    # collected leaf's callback whether the entry is still the one it was made for
    self.entry = None

  def get(self, model, params, keep: bool):
    leaves = jax.tree.leaves(params)
    e = self.entry
    if keep and e is not None and e[0] == model and len(e[1]) == len(leaves) and all(
        r() is x for r, x in zip(e[1], leaves)):
      return e[2]
    self.entry = None   # (dropped before packing: the old and new copies never coexist)
    packed = _packer(model)(params)
    if keep and all(isinstance(x, jax.Array) for x in leaves):
      token = object()

      def drop(_, token=token):   # a leaf was collected: these params are gone
        if self.entry is not None and self.entry[3] is token:
          self.entry = None

      self.entry = (model, [weakref.ref(x, drop) for x in leaves], packed, token)
    return packed


_kept_packed = _KeptPacked()


def release_packed():
  """Drop the packed weights `generate` kept for its next call (keep_packed), e.g. before
  training on the same params: the copy is as large as the LLM's weights."""
  _kept_packed.entry = None


def tokens_per_image(model) -> int:
  """Sequence tokens one image becomes (the connector's output length; for LLaVA-NeXT see
  `image_token_counts`)."""
  return model.cfg.image_tokens


def image_token_counts(model, image_sizes) -> np.ndarray:
  """LLaVA-NeXT: sequence tokens of each image of original size (H, W), int [...] for
  image_sizes [..., 2] (0 for an empty slot of size 0 x 0): base tile + unpadded grid + one
  newline per grid row, as the model packs them and LlavaNextProcessor counts them."""
  from mllm_jax.data import images as image_lib
  c = model.cfg
  sizes = np.asarray(image_sizes).reshape(-1, 2)
  counts = [0 if min(hw) <= 0 else sum(image_lib.anyres_num_features(
      (int(hw[0]), int(hw[1])), c.image_grid_pinpoints, (c.vision.image_size,) * 2,
      c.vision.patch_size)) for hw in sizes]
  return np.asarray(counts, np.int64).reshape(np.shape(image_sizes)[:-1])


def anyres_tiles_needed(model, image_sizes) -> np.ndarray:
  """LLaVA-NeXT: tiles each image needs (base + its grid), int [...] for image_sizes [..., 2]."""
  from mllm_jax.data import images as image_lib
  c = model.cfg
  sizes = np.asarray(image_sizes).reshape(-1, 2)
  need = [0 if min(hw) <= 0 else image_lib.anyres_num_tiles(
      (int(hw[0]), int(hw[1])), c.image_grid_pinpoints, c.vision.image_size) for hw in sizes]
  return np.asarray(need, np.int64).reshape(np.shape(image_sizes)[:-1])


def _check_anyres(model, n_tokens, pixel_values, image_sizes):
  """LLaVA-NeXT inputs: tiles [N, tiles, H, W, 3] + sizes [N, 2], or [B, M, tiles, ...] +
  [B, M, 2]; each row's image tokens must be its images' packed lengths."""
  if image_sizes is None:
    raise ValueError('a LLaVA-NeXT model (image_grid_pinpoints) needs image_sizes [N, 2] (or '
                     '[B, M, 2]) with the images\' original (height, width), as its processor '
                     'returns them')
  sizes = np.asarray(image_sizes)
  rank = np.ndim(pixel_values)
  lead = tuple(np.shape(pixel_values)[:rank - 4])
  if rank not in (5, 6) or sizes.shape != lead + (2,):
    raise ValueError(f'LLaVA-NeXT pixel_values {list(np.shape(pixel_values))} with image_sizes '
                     f'{list(sizes.shape)}: expected tiles [N, tiles, H, W, 3] with [N, 2], or '
                     '[B, M, tiles, H, W, 3] with [B, M, 2]')
  need = anyres_tiles_needed(model, sizes)
  have = np.shape(pixel_values)[rank - 4]
  if need.max(initial=0) > have:
    raise ValueError(f'an image of size {sizes.reshape(-1, 2)[need.argmax()].tolist()} needs '
                     f'{int(need.max())} tiles (base + grid) but pixel_values has {have}: '
                     'preprocess with the model\'s image_grid_pinpoints')
  counts = image_token_counts(model, sizes)
  if rank == 5:
    if n_tokens.sum() != counts.sum():
      raise ValueError(f'{len(counts)} images of sizes {sizes.tolist()} pack into '
                       f'{counts.tolist()} tokens (= {int(counts.sum())}) but the prompts hold '
                       f'{int(n_tokens.sum())} image tokens: expand each image tag to its '
                       'image\'s count (generate.image_token_counts)')
    return
  bad = [i for i in range(len(n_tokens)) if n_tokens[i] != counts[i].sum()]
  if bad:
    raise ValueError(f'rows {bad}: image tokens {n_tokens[bad].tolist()} but their images pack '
                     f'into {counts[bad].sum(-1).tolist()}: expand each image tag to its '
                     "image's count (generate.image_token_counts)")


def _check_inputs(model, input_ids, attention_mask, pixel_values, max_new_tokens, cache_len,
                  image_sizes=None):
  """Host-side checks with messages that say what to change."""
  b, t = input_ids.shape
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens}: must be >= 1')
  if t + max_new_tokens > cache_len:
    raise ValueError(f'the prompt ({t} tokens) plus max_new_tokens ({max_new_tokens}) does not '
                     f'fit the KV cache of {cache_len} slots: raise cache_len or shorten the prompt')
  if not np.all(attention_mask[:, -1]):
    raise ValueError('generate needs LEFT-padded prompts (attention_mask ends in 1 on every '
                     "row): tokenize with padding_side='left'")
  cfg = model.cfg
  n_tokens = ((input_ids == cfg.image_token_id) & attention_mask.astype(bool)).sum(1)
  if cfg.vision is None:
    if pixel_values is not None:
      raise ValueError('pixel_values given to a model without a vision tower')
    return
  if pixel_values is None:
    if n_tokens.sum():
      raise ValueError(f'the prompts hold {int(n_tokens.sum())} image tokens but no pixel_values '
                       'were given')
    return
  if cfg.image_grid_pinpoints:
    return _check_anyres(model, n_tokens, pixel_values, image_sizes)
  if image_sizes is not None:
    raise ValueError('image_sizes is only for LLaVA-NeXT models (image_grid_pinpoints)')
  per_image = tokens_per_image(model)
  rank = np.ndim(pixel_values)
  if rank == 4:      # flat list for the batch
    want = pixel_values.shape[0] * per_image
    if n_tokens.sum() != want:
      raise ValueError(f'{pixel_values.shape[0]} images ({per_image} tokens each = {want}) but '
                       f'the prompts hold {int(n_tokens.sum())} image tokens: the number of image '
                       'tags must match the number of images')
  elif rank == 5:    # per sample, unused slots allowed
    slots = pixel_values.shape[1] * per_image
    bad = [i for i in range(b) if n_tokens[i] % per_image or n_tokens[i] > slots]
    if bad:
      raise ValueError(f'rows {bad}: image tokens {n_tokens[bad].tolist()} are not a multiple '
                       f'of {per_image} (tokens per image) up to {slots} ({pixel_values.shape[1]} '
                       'image slots per sample): the image tags must match the images')
  else:
    raise ValueError(f'pixel_values of rank {rank}: expected [N, H, W, 3] or [B, M, H, W, 3]')


def generate(model, params, input_ids, attention_mask=None, pixel_values=None, *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_token_id: int = 0,
             seed: int = 0, cache_len: int | None = None, vcd_alpha: float = 0.0,
             vcd_beta: float = 0.1, vcd_noise_step: int = 500, qformer_input_ids=None,
             qformer_attention_mask=None, image_sizes=None, layer_loop: str = 'auto',
             decode_kernel: str = 'auto', keep_packed: bool = True):
  """New token ids int32 [B, max_new_tokens] (pad_token_id after a stop token). See module doc.

  image_sizes: LLaVA-NeXT's original (height, width) per image, [N, 2] or [B, M, 2].

  qformer_input_ids / qformer_attention_mask: InstructBLIP's instruction for its Q-Former
  ([B, L] per sample, or one row per image of a flat image list).

  Runs on whatever devices `params` live on: call it under `jax.set_mesh(mesh)` and
  `nn.logical_axis_rules(rules)` to keep activations sharded like training does.

  layer_loop: 'scan' (decode over the stacked layers), 'unrolled' (per-layer weights and
  caches, split once per call) or 'auto' (unrolled on CPU, scan elsewhere).
  decode_kernel: the LLM's dense layers and lm_head (prefill and decode step) and the decode
  step's attention over the KV cache as XLA ops ('xla') or as the CPU kernels, on weights
  packed in the compute dtype ('packed', mllm_jax/kernels: fp32 or bf16 compute, unrolled
  layers, params on one CPU device); 'auto' picks 'packed' where it applies and the kernels
  build. Logits differ from XLA's by float rounding only (summation order).
  keep_packed: keep the packed weights (a copy of the LLM's weights) after the call, for the
  next call with the same params (the same jax.Array objects); they are dropped when the params
  are garbage-collected, other params are packed or `release_packed()` is called. False packs
  for this call only and drops what earlier calls kept.
  """
  input_ids = np.asarray(input_ids, np.int32)
  attention_mask = (np.ones_like(input_ids) if attention_mask is None
                    else np.asarray(attention_mask, np.int32))
  cache_len = cache_len or input_ids.shape[1] + max_new_tokens
  if layer_loop == 'auto':
    layer_loop = 'unrolled' if jax.default_backend() == 'cpu' else 'scan'
  if layer_loop not in ('scan', 'unrolled'):
    raise ValueError(f"layer_loop={layer_loop!r}: expected 'auto', 'scan' or 'unrolled'")
  decode_kernel = _decode_kernel(model, params, layer_loop, decode_kernel)
  model = _vision_loop(model, layer_loop)
  _check_inputs(model, input_ids, attention_mask, pixel_values, max_new_tokens, cache_len,
                image_sizes)
  if vcd_alpha > 0 and pixel_values is None:
    raise ValueError('visual contrastive decoding (vcd_alpha > 0) needs pixel_values')
  if pixel_values is not None:
    pixel_values = jnp.asarray(pixel_values, jnp.float32)
  fn = _compiled(model, max_new_tokens=int(max_new_tokens), cache_len=int(cache_len),
                 temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                 stop_tokens=tuple(int(s) for s in stop_tokens), pad_token_id=int(pad_token_id),
                 vcd_alpha=float(vcd_alpha), vcd_beta=float(vcd_beta),
                 vcd_noise_step=int(vcd_noise_step), layer_loop=layer_loop,
                 decode_kernel=decode_kernel)
  image_kw = {k: jnp.asarray(v, jnp.int32) for k, v in (
      ('qformer_input_ids', qformer_input_ids),
      ('qformer_attention_mask', qformer_attention_mask),
      ('image_sizes', None if pixel_values is None else image_sizes)) if v is not None}
  packed = (_kept_packed.get(model, params, keep_packed) if decode_kernel == 'packed' else None)
  return fn(params, packed, jnp.asarray(input_ids), jnp.asarray(attention_mask), pixel_values,
            jax.random.key(seed), image_kw)


def _vision_loop(model, layer_loop: str):
  """The model with its vision tower unrolled (`MLLMConfig.vision_layer_loop`) when the LLM
  loop is unrolled and the compute dtype is bf16: XLA:CPU's scanned bf16 tower converts the
  stacked weights to fp32 and back, ~28% of a batch-1 tower (BENCHMARKS.md, session 10); in
  fp32 the two loops take the same time, so the scan stays."""
  c = model.cfg
  if (layer_loop == 'unrolled' and c.vision is not None and c.vision_layer_loop == 'scan'
      and c.compute_dtype == jnp.bfloat16):
    return type(model)(dataclasses.replace(c, vision_layer_loop='unrolled'))
  return model


def _decode_kernel(model, params, layer_loop: str, choice: str) -> str:
  """Resolve `decode_kernel` ('auto' | 'xla' | 'packed'), with the reason when 'packed' can't."""
  if choice not in ('auto', 'xla', 'packed'):
    raise ValueError(f"decode_kernel={choice!r}: expected 'auto', 'xla' or 'packed'")
  if choice == 'xla':
    return choice
  from mllm_jax.kernels import cpu   # (importing does not build the library)
  c = model.cfg
  devices = {d for leaf in jax.tree.leaves(params) if isinstance(leaf, jax.Array)
             for d in leaf.sharding.device_set}
  reasons = [why for bad, why in (
      (jax.default_backend() != 'cpu', f'the backend is {jax.default_backend()}, not cpu'),
      (layer_loop != 'unrolled', f"layer_loop is {layer_loop!r}, not 'unrolled'"),
      (jnp.dtype(c.compute_dtype) not in cpu.DTYPES,
       f'the compute dtype is {c.compute_dtype}, not float32 or bfloat16'),
      (len(devices) > 1, f'params live on {len(devices)} devices'),
      (jax.device_count() > 1 and jax.sharding.get_abstract_mesh().size > 1,
       'a multi-device mesh is set')) if bad]
  if choice == 'packed' and reasons:
    raise ValueError("decode_kernel='packed' needs fp32 or bf16 compute, params on one CPU "
                     f"device and layer_loop='unrolled': {'; '.join(reasons)}")
  if reasons:
    return 'xla'
  if choice == 'packed':
    cpu.build()   # raises with the compiler's message
    return choice
  return 'packed' if cpu.available() else 'xla'


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def load_for_generation(checkpoint: str | None = None, hf: str | None = None,
                        tokenizer: str | None = None):
  """(model, params, tokenizer, ImageProcessor) from a training run / params checkpoint or an
  HF directory; params placed on one device. `tokenizer`: a tokenizer directory instead of the
  run's / HF directory's own (a params checkpoint carries none)."""
  from mllm_jax.data import images as image_lib, tokenizer as tok_lib
  if (checkpoint is None) == (hf is None):
    raise ValueError('give exactly one of --checkpoint (training workdir, checkpoint step dir '
                     'or convert output) and --hf (Hugging Face model directory)')
  if hf is not None:
    import mllm_jax
    import transformers
    model, params = mllm_jax.load_hf(hf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or hf)
    pp = image_lib.hf_processor_config(hf)
    if pp is not None:
      processor = image_lib.ImageProcessor.from_hf(pp)
    elif model.cfg.vision is None:
      processor = None
    elif model.cfg.image_grid_pinpoints:
      processor = image_lib.ImageProcessor(
          'llava_next', size=model.cfg.vision.image_size, crop_size=model.cfg.vision.image_size,
          image_grid_pinpoints=model.cfg.image_grid_pinpoints)
    else:
      processor = image_lib.ImageProcessor(
          'blip' if model.cfg.connector.kind == 'qformer' else 'clip',
          size=model.cfg.vision.image_size, crop_size=model.cfg.vision.image_size)
    return model, params, tokenizer, processor
  from mllm_jax import sharding as shd
  from mllm_jax.hf import pretrained
  from mllm_jax.models import MLLM
  from mllm_jax.train import steps
  mcfg, tok_dir = pretrained.saved_model_config(checkpoint)
  model = MLLM(mcfg)
  factory = steps.StateFactory(model, shd.make_mesh({'data': 1}, devices=jax.devices()[:1]),
                               shd.logical_rules('dp'))
  params = pretrained.restore_params(checkpoint, factory.abstract_params)
  if tokenizer is None and tok_dir is None:
    raise ValueError(f'{checkpoint}: a params checkpoint carries no tokenizer; give '
                     '--tokenizer DIR (the one it was trained with), or use the training '
                     'workdir or --hf')
  tokenizer = tok_lib.load_tokenizer(tokenizer or tok_dir)
  # the run's image preprocessing, or a params checkpoint's record (none: CLIP's, no padding)
  processor = None if mcfg.vision is None else image_lib.run_processor(
      pretrained.saved_image_norm(checkpoint) or 'clip', mcfg.vision.image_size,
      bool(pretrained.saved_pad_to_square(checkpoint)), mcfg.image_grid_pinpoints)
  return model, params, tokenizer, processor


def needs_instruction(model) -> bool:
  """Whether the model's Q-Former reads an instruction (InstructBLIP)."""
  c = model.cfg.connector
  return model.cfg.vision is not None and c.kind == 'qformer' and c.qformer.instruction


def load_qformer_tokenizer(checkpoint: str | None = None, hf: str | None = None, tokenizer=None):
  """The tokenizer of an instruction-aware Q-Former's input, as the model was trained with it:
  a training run's `config.data.qformer_tokenizer` ('' = its LLM tokenizer, `tokenizer`), or
  an HF directory's `qformer_tokenizer/` (where InstructBlipProcessor saves it)."""
  import os
  if hf is not None:
    import transformers
    sub = os.path.join(hf, 'qformer_tokenizer')
    if not os.path.isdir(sub):
      raise ValueError(f'{hf}: an InstructBLIP model needs its Q-Former tokenizer in '
                       f'{sub} (as InstructBlipProcessor.save_pretrained writes it)')
    return transformers.AutoTokenizer.from_pretrained(sub)
  from mllm_jax.hf import pretrained
  from mllm_jax.train import loop
  config = pretrained.run_config(checkpoint)
  if config is None:
    raise ValueError(f'{checkpoint}: not a training run, so no Q-Former tokenizer is known')
  return loop.load_qformer_tokenizer(config, tokenizer)


def instruction_inputs(model, qformer_tokenizer, text: str, n_images: int) -> dict:
  """InstructBLIP's Q-Former input for one prompt: `text` tokenised with the Q-Former's
  tokenizer as InstructBlipProcessor does (special tokens, no truncation), one row per image
  -> {'qformer_input_ids', 'qformer_attention_mask'} int32 [n_images, L]."""
  ids = qformer_tokenizer(text)['input_ids']
  limit = model.cfg.connector.qformer.max_position
  if len(ids) > limit:
    raise ValueError(f'the Q-Former instruction has {len(ids)} tokens > its max_position='
                     f'{limit}: shorten --instruction (default: the prompt)')
  ids = np.repeat(np.asarray([ids], np.int32), max(n_images, 1), 0)
  return {'qformer_input_ids': ids, 'qformer_attention_mask': np.ones_like(ids)}


def prompt_ids(model, tokenizer, prompt: str, n_images: int, image_token: str = '<image>',
               images_first: bool = False, image_tokens: Sequence[int] | None = None):
  """User turn (image tags first) through the chat template, image tags expanded -> [1, T].

  `images_first`: the image tokens go in front of the whole tokenised prompt instead, as
  transformers' Blip2Processor / InstructBlipProcessor put them (before BOS).
  `image_tokens`: each image's token count (LLaVA-NeXT: `image_token_counts`); default the
  model's fixed count per image."""
  counts = ([tokens_per_image(model)] * n_images if image_tokens is None
            else list(image_tokens))
  if len(counts) != n_images:
    raise ValueError(f'{len(counts)} image token counts for {n_images} images')
  if images_first and n_images:
    body = prompt_ids(model, tokenizer, prompt, 0, image_token)[0]
    return np.concatenate([np.full(sum(counts), model.cfg.image_token_id, np.int32), body])[None]
  content = (image_token + '\n') * n_images + prompt
  if tokenizer.chat_template:
    text = tokenizer.apply_chat_template([{'role': 'user', 'content': content}], tokenize=False,
                                         add_generation_prompt=True)
  else:
    text = content
  ids = tokenizer.encode(text, add_special_tokens=not tokenizer.chat_template)
  if n_images:
    image_id, left = model.cfg.image_token_id, iter(counts)
    if ids.count(image_id) != n_images:
      raise ValueError(f'the tokenised prompt holds {ids.count(image_id)} image tokens for '
                       f'{n_images} images: does {image_token!r} map to the model\'s '
                       f'image_token_id {image_id}?')
    ids = [j for i in ids for j in ([i] * next(left) if i == image_id else [i])]
  return np.asarray([ids], np.int32)


def main(argv=None):
  import argparse
  from PIL import Image
  from mllm_jax.data import tokenizer as tok_lib
  ap = argparse.ArgumentParser(prog='python -m mllm_jax.generate', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument('--checkpoint', help='training workdir, checkpoint step dir or convert output')
  src.add_argument('--hf', help='Hugging Face model directory (LLaVA, Llama, Qwen2, ...)')
  ap.add_argument('--tokenizer', default=None,
                  help="tokenizer directory (default: the run's or the HF directory's; a "
                       'params checkpoint needs it)')
  ap.add_argument('--image', action='append', default=[], help='image file (repeatable)')
  ap.add_argument('--prompt', required=True)
  ap.add_argument('--instruction', default=None,
                  help="InstructBLIP: the Q-Former's instruction (default: the prompt)")
  ap.add_argument('--max-new-tokens', type=int, default=64)
  ap.add_argument('--temperature', type=float, default=0.0)
  ap.add_argument('--top-k', type=int, default=0)
  ap.add_argument('--top-p', type=float, default=1.0)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--vcd-alpha', type=float, default=0.0)
  ap.add_argument('--vcd-beta', type=float, default=0.1)
  ap.add_argument('--vcd-noise-step', type=int, default=500)
  args = ap.parse_args(argv)
  model, params, tokenizer, processor = load_for_generation(args.checkpoint, args.hf,
                                                            args.tokenizer)
  pixel_values = image_sizes = counts = None
  if args.image:
    if processor is None:
      raise SystemExit('--image given but the model has no vision tower')
    pics = processor([Image.open(p) for p in args.image])
    pixel_values = pics['pixel_values']
    if model.cfg.image_grid_pinpoints:   # LLaVA-NeXT: tiles, and a token count per image size
      image_sizes = pics['image_sizes']
      counts = image_token_counts(model, image_sizes).tolist()
  # An HF BLIP-2 / InstructBLIP model saw its image tokens in front of the prompt (the
  # processor's layout); our runs saw them where the image tags were in the conversation.
  ids = prompt_ids(model, tokenizer, args.prompt, len(args.image),
                   images_first=args.hf is not None and model.cfg.connector.kind == 'qformer',
                   image_tokens=counts)
  qformer = {}
  if args.instruction is not None and not needs_instruction(model):
    raise SystemExit('--instruction is for models with an instruction-aware Q-Former '
                     '(InstructBLIP)')
  if needs_instruction(model) and args.image:
    qtok = load_qformer_tokenizer(args.checkpoint, args.hf, tokenizer)
    text = args.prompt if args.instruction is None else args.instruction
    qformer = instruction_inputs(model, qtok, text, len(args.image))
  out = generate(model, params, ids, None, pixel_values, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 stop_tokens=tok_lib.stop_token_ids(tokenizer),
                 pad_token_id=tokenizer.pad_token_id or 0, seed=args.seed,
                 vcd_alpha=args.vcd_alpha, vcd_beta=args.vcd_beta,
                 vcd_noise_step=args.vcd_noise_step, image_sizes=image_sizes, **qformer)
  print(tokenizer.decode(np.asarray(out)[0], skip_special_tokens=True).strip())


class _CallableModule(types.ModuleType):
  """`mllm_jax.generate(...)` calls the function while `python -m mllm_jax.generate` runs the CLI."""

  def __call__(self, *args, **kwargs):
    return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == '__main__':
  from mllm_jax import hostmem
  hostmem.reexec_with_huge_pages()
  main()
