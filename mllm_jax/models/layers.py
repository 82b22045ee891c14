"""Building blocks shared by the vision tower and the decoder LLM.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`vocab`, `norm`, ...) and key activations carry `act_*` names; `mllm_jax.sharding` maps both
onto the device mesh. Parameters live in `param_dtype`; compute runs in `dtype`; softmax and
norm statistics always run in fp32.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import sharding

Dtype = jnp.dtype | str
# Finite "minus infinity": fully masked rows (left padding) must give zeros, not NaNs.
NEG_INF = -0.7 * float(np.finfo(np.float32).max)


def constrain(x, names: tuple[str | None, ...]):
  """Sharding hint on an activation; a no-op outside a mesh + logical-rules context.

  Unlike `nn.with_logical_constraint`, a dimension its mesh axes don't divide (e.g. 2 K/V heads
  on 4 tensor devices) is left unconstrained instead of failing.
  """
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, sharding.spec_for(x.shape, names, mesh, rules))


def dense_init(names: Sequence[str | None], std: float | None = None):
  """Kernel initialiser with logical axis names (lecun-normal unless `std` is given)."""
  init = nn.initializers.normal(std) if std else nn.initializers.lecun_normal()
  return nn.with_logical_partitioning(init, tuple(names))


def zeros_init(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


def ones_init(names):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(names))


def contract_trailing(x, kernel, n_in: int):
  """x [..., *in] . kernel [*in, *out] -> [..., *out], as one 2-D matmul [N, in] x [in, out].

  Flattening the leading dims first matters on XLA:CPU: a dot with batch-like leading dims
  ([B, T, E] x [E, F]) lowers to a slower kernel and its weight gradient contracts over two
  dims through transposed copies; the 2-D form measured ~1.4x faster fwd+bwd for the bench
  model's MLP (BENCHMARKS.md). On TPU/GPU the reshapes are layout no-ops.
  """
  lead, in_shape = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
  out_shape = kernel.shape[n_in:]
  y = matmul(x.reshape((-1, math.prod(in_shape))),
             kernel.reshape((math.prod(in_shape), math.prod(out_shape))))
  return y.reshape(lead + out_shape)


def matmul(a, b):
  """a [M, K] @ b [K, N] in their (common) dtype.

  bf16 on CPU is asked for as a dot with fp32 output, rounded to bf16: the computation XLA:CPU
  runs for a bf16 dot anyway (fp32 sums, one rounding), but in this form it goes to YNNPACK's
  AVX512-BF16 GEMM, ~2x faster than the bf16 dot XLA widens to fp32 (BENCHMARKS.md). Its
  gradient dots then take an fp32 cotangent, which XLA:CPU computes in fp32 as before. Not on
  TPU/GPU: there the bf16 dot is native, and fp32 cotangents would slow the backward pass.
  """
  if _bf16_on_cpu(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  return jnp.dot(a, b)


def einsum(spec: str, a, b):
  """`jnp.einsum(spec, a, b)` in the operands' dtype, bf16 on CPU as `matmul` does it (fp32
  output rounded to bf16: ~2x for the attention's probabilities x values, BENCHMARKS.md)."""
  if _bf16_on_cpu(a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  return jnp.einsum(spec, a, b)


def _bf16_on_cpu(a, b) -> bool:
  return a.dtype == b.dtype == jnp.bfloat16 and jax.default_backend() == 'cpu'


def take_rows(table, ids):
  """`jnp.take(table, ids, axis=0)`: an embedding lookup, [V, E] x int [...] -> [..., E].

  A bf16 table on CPU is gathered as its 16-bit patterns: XLA:CPU gathers bf16 through an fp32
  copy of the whole table, which it hoists out of generate's decode loop (the bench model's
  65 MB vocabulary, ~30 ms per call; BENCHMARKS.md). Same rows, NaN rows for out-of-range ids,
  and the plain gather's gradient.
  """
  if table.dtype == jnp.bfloat16 and jax.default_backend() == 'cpu':
    return _take_bf16_rows(table, ids)
  return jnp.take(table, ids, axis=0)


@jax.custom_vjp
def _take_bf16_rows(table, ids):
  bits = jax.lax.bitcast_convert_type(table, jnp.uint16)
  rows = jnp.take(bits, ids, axis=0, mode='fill', fill_value=0x7FC0)   # bf16 NaN, as jnp.take
  return jax.lax.bitcast_convert_type(rows, jnp.bfloat16)


def _take_bf16_rows_fwd(table, ids):
  return _take_bf16_rows(table, ids), (table, ids)


def _take_bf16_rows_bwd(res, g):
  table, ids = res
  return jax.vjp(lambda t: jnp.take(t, ids, axis=0), table)[1](g)[0], None


_take_bf16_rows.defvjp(_take_bf16_rows_fwd, _take_bf16_rows_bwd)


# generate's CPU kernels (mllm_jax/kernels/cpu.py): a variable collection holding each dense
# kernel packed into column panels, filled by a packing pass (once per params: generate keeps it).
PACKED = 'decode_packed'


def _packing_pass(module: nn.Module) -> bool:
  # `init` makes every collection mutable; only generate's packing pass asks for PACKED
  return module.is_mutable_collection(PACKED) and not module.is_initializing()


def decode_packed(module: nn.Module, name: str, kernel_2d: Callable[[], jax.Array]):
  """The packed panels of `module`'s [K, N] kernel for the CPU decode kernel, or None.

  In generate's packing pass (`PACKED` mutable) the panels are made from `kernel_2d()` and
  stored, and None is returned (the pass itself computes nothing that is kept); in its prefill
  and decode step (`PACKED` given) they are returned; anywhere else there are none (XLA's dot).
  """
  if _packing_pass(module):
    from mllm_jax.kernels import cpu
    module.put_variable(PACKED, name, cpu.pack(kernel_2d()))
    return None
  return module.get_variable(PACKED, name) if module.has_variable(PACKED, name) else None


def decode_kernel_on(module: nn.Module, name: str) -> bool:
  """Whether `module` runs in generate's prefill / decode step with the CPU kernels (generate's
  packing pass records `name` for it; only those then pass it)."""
  if _packing_pass(module):
    module.put_variable(PACKED, name, jnp.ones((), bool))
    return False
  return module.has_variable(PACKED, name)


def cache_write(cache, new, index):
  """KV cache [B, Hkv, L, D] with new [B, Hkv, T, D] written at slots [index, index + T)."""
  return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, 0, index, 0))


def decode_cache_write(cache, new, index):
  """`cache_write` with generate's CPU kernels: a custom call that updates the cache in place
  (XLA:CPU runs a bf16 dynamic_update_slice in fp32, converting the whole cache up and back:
  5.6 ms of a 14.9 ms profiled bf16 batch-8 step on the bench model, BENCHMARKS.md)."""
  from mllm_jax.kernels import cpu
  return cpu.cache_write(cache, new, index)


# New tokens per row up to which generate's CPU kernels run the attention (its decode steps);
# a prefill of more runs XLA's batched matmuls, as fast or faster at the bench model's 256
# tokens and not limited to one query row's pass over the values at a time (BENCHMARKS.md).
DECODE_ATTENTION_MAX_TOKENS = 16


def decode_attention(q, k, v, mask, dtype=jnp.float32):
  """`dot_product_attention(q, k, v, mask, kv_heads_first=True)` with the CPU decode kernel:
  q [B, T, H, D], k, v [B, Hkv, S, D], mask bool [B, 1, T, S] -> [B, T, H, D]; fp32 or bf16
  (the cache's dtype)."""
  from mllm_jax.kernels import cpu
  b, t, h, d = q.shape
  hkv = k.shape[1]
  qg = q.reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, -1, d)
  out = cpu.decode_attention(qg, k, v, mask[:, 0], d ** -0.5)      # [B, Hkv, G * T, D]
  return out.reshape(b, hkv, h // hkv, t, d).transpose(0, 3, 1, 2, 4).reshape(
      b, t, h, d).astype(dtype)


def packed_matmul(x, packed, out_shape: tuple[int, ...], n_in: int):
  """x [..., *in] . packed kernel -> [..., *out_shape] with the CPU decode kernel, in the
  packed kernel's dtype."""
  from mllm_jax.kernels import cpu
  lead = x.shape[:x.ndim - n_in]
  y = cpu.packed_matmul(x.reshape((-1, math.prod(x.shape[x.ndim - n_in:]))), packed,
                        math.prod(out_shape))
  return y.reshape(lead + tuple(out_shape))


class DenseGeneral(nn.Module):
  """Contract the trailing `in_axes` of x with a kernel [*in_shape, *features].

  E.g. a query projection [embed] -> [heads, head_dim] has kernel [embed, heads, head_dim];
  an output projection with in_axes=(-2, -1) has kernel [heads, head_dim, embed]. The kernel is
  created in its final shape, so its logical names (`kernel_axes`) always match its rank.
  """
  features: int | tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  in_axes: int | tuple[int, ...] = -1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable | None = None   # (key, shape, dtype); default normal(fan_in ** -0.5)

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_axes = (self.in_axes,) if isinstance(self.in_axes, int) else tuple(self.in_axes)
    in_axes = tuple(a % x.ndim for a in in_axes)
    if in_axes != tuple(range(x.ndim - len(in_axes), x.ndim)):
      raise ValueError(f'DenseGeneral contracts trailing axes only, got in_axes={self.in_axes} '
                       f'for an input of rank {x.ndim}')
    in_shape = tuple(x.shape[a] for a in in_axes)
    fan_in = int(np.prod(in_shape))
    init = self.kernel_init or (
        lambda key, shape, dtype: nn.initializers.normal(fan_in ** -0.5)(key, shape, dtype))
    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.kernel_axes),
                        in_shape + features, self.param_dtype)
    packed = decode_packed(self, 'kernel',
                           lambda: jnp.reshape(jnp.asarray(kernel, self.dtype), (fan_in, -1)))
    if packed is None:
      y = contract_trailing(x.astype(self.dtype), jnp.asarray(kernel, self.dtype), len(in_axes))
    else:
      y = packed_matmul(x, packed, features, len(in_axes)).astype(self.dtype)
    if self.use_bias:
      bias = self.param('bias', zeros_init(self.kernel_axes[-len(features):]), features,
                        self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


def fused_dense(module: nn.Module, name: str, projections: Sequence[DenseGeneral], x):
  """[p(x) for p in projections]: DenseGeneral submodules of `module` on one input x [..., K]
  (in_axes=-1), e.g. q / k / v or gate / up.

  With generate's CPU kernels (prefill, decode step) they run as one packed matmul over their
  kernels side by side (packed once, as `name`): one weight stream instead of several, ~10%
  faster on the bench model's projections (BENCHMARKS.md). Each output column is the same dot
  product either way, so the results are those of the separate projections. Anywhere else each
  runs as itself.
  """
  if not (_packing_pass(module) or module.has_variable(PACKED, name)):
    return [p(x) for p in projections]
  params = module.variables['params']
  dtype = projections[0].dtype
  if any(p.dtype != dtype or p.in_axes not in (-1, (-1,)) for p in projections):
    raise ValueError(f'fused_dense {name!r}: the projections must share their dtype and '
                     'contract the last axis only')
  features = [(p.features,) if isinstance(p.features, int) else tuple(p.features)
              for p in projections]
  widths = [math.prod(f) for f in features]
  if _packing_pass(module):
    from mllm_jax.kernels import cpu
    kernels = [jnp.reshape(jnp.asarray(params[p.name]['kernel'], dtype), (x.shape[-1], w))
               for p, w in zip(projections, widths)]
    whole_panels = all(w % cpu.PANEL == 0 for w in widths[:-1])   # packed side by side as is
    module.put_variable(PACKED, name, cpu.pack(*kernels) if whole_panels else
                        cpu.pack(jnp.concatenate(kernels, 1)))
    y = jnp.zeros(x.shape[:-1] + (sum(widths),), dtype)   # the pass's outputs are dropped
  else:
    y = packed_matmul(x, module.get_variable(PACKED, name), (sum(widths),), 1).astype(dtype)
  outs = []
  for p, f, part in zip(projections, features, jnp.split(y, np.cumsum(widths)[:-1], -1)):
    part = part.reshape(x.shape[:-1] + f)
    outs.append(part + jnp.asarray(params[p.name]['bias'], dtype) if p.use_bias else part)
  return outs


def Dense(features, kernel_axes, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
          name=None):
  """A plain (in, out) dense layer with logical names; params `kernel` [in, out], `bias` [out]
  (lecun-normal kernel, zero bias: the initialisation of `nn.Dense`)."""
  return DenseGeneral(features, tuple(kernel_axes), use_bias=use_bias, dtype=dtype,
                      param_dtype=param_dtype, kernel_init=nn.initializers.lecun_normal(),
                      name=name)


class RMSNorm(nn.Module):
  """Llama RMSNorm: `scale * (x32 * rsqrt(mean(x32^2) + eps)).astype(dtype)` (scale after the cast)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', ones_init(('norm',)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)


def LayerNorm(eps, dtype, param_dtype, name=None):
  """LayerNorm with fp32 statistics and logical names on scale/bias."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      scale_init=ones_init(('norm',)), bias_init=zeros_init(('norm',)),
                      use_fast_variance=False, name=name)


ACTIVATIONS: dict[str, Callable] = {
    'gelu': lambda x: nn.gelu(x, approximate=False),   # torch nn.GELU() / HF "gelu"
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),   # HF "gelu_pytorch_tanh"
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),   # CLIP
    'silu': jax.nn.silu,
    'relu': jax.nn.relu,
}


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (half-split / NeoX layout, as in HF Llama)
# ----------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] with `default`, `linear` or `llama3` scaling."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  kind = (scaling or {}).get('type', 'default') or 'default'
  if kind == 'default':
    return inv.astype(np.float32)
  factor = float(scaling['factor'])
  if kind == 'linear':
    return (inv / factor).astype(np.float32)
  if kind == 'llama3':
    low, high = float(scaling['low_freq_factor']), float(scaling['high_freq_factor'])
    old_len = float(scaling['original_max_position'])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"config.model.llm.rope_scaling.type={kind!r}: expected 'default', "
                   "'linear' or 'llama3'")


def rope_cos_sin(positions, inv_freq):
  """positions [B, T] -> (cos, sin) each [B, T, head_dim] in fp32."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [B, T, H, D]; cos/sin [B, T, D]. Rotation in fp32, result in x.dtype."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def make_attention_mask(attention_mask, causal: bool, segment_ids=None, sliding_window: int = 0):
  """Boolean mask [B, 1, T, T] (True = attend) from a padding mask [B, T] (1 = real token).

  `sliding_window` > 0 (Mistral) keeps only keys with query_index - key_index < window.
  """
  b, t = attention_mask.shape
  keep = attention_mask.astype(bool)[:, None, None, :]
  if causal:
    keep = keep & jnp.tril(jnp.ones((t, t), bool))[None, None]
  if sliding_window:
    keep = keep & ~jnp.tril(jnp.ones((t, t), bool), -sliding_window)[None, None]
  if segment_ids is not None:
    keep = keep & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return keep


def make_cache_mask(filled, index, t: int, sliding_window: int = 0):
  """Mask [B, 1, T, L] for T new tokens at cache slots [index, index + T) over L slots.

  filled [B, L] (True = the slot holds a real token, the new ones included). Slots are in
  sequence order, so causality is slot <= the query's slot.
  """
  slots = jnp.arange(filled.shape[1])
  q_slots = index + jnp.arange(t)
  keep = (slots[None, :] <= q_slots[:, None])[None, None] & filled[:, None, None, :]
  if sliding_window:
    keep = keep & (q_slots[:, None] - slots[None, :] < sliding_window)[None, None]
  return keep


def dot_product_attention(q, k, v, mask, *, impl: str = 'einsum', dtype=jnp.float32,
                          causal_blocks: int = 1, kv_heads_first: bool = False):
  """Multi-head attention with grouped K/V heads.

  q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H % Hkv == 0 ([B, Hkv, S, D] with
  `kv_heads_first`, the KV cache's layout); mask: bool [B, 1, T, S] or None.
  Returns [B, T, H, D]. `impl='einsum'` (default) groups the query heads per K/V head instead
  of repeating K/V and has a hand-written backward pass (`_attention`); `impl='xla'` calls
  `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).

  `causal_blocks` > 1 (einsum, self-attention with a causal `mask` only) splits the queries into
  that many blocks and gives block i only the keys up to its last query: the skipped keys are
  all masked for every query of the block, so real tokens get the same result with
  ~(n+1)/(2n) of the score work. Rows whose every key is masked (padding queries) then average
  fewer values; their outputs are never attended to or trained on.
  """
  b, t, h, d = q.shape
  if kv_heads_first and impl == 'xla':
    k, v, kv_heads_first = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), False
  s, hkv = (k.shape[2], k.shape[1]) if kv_heads_first else (k.shape[1], k.shape[2])
  scale = d ** -0.5
  if impl == 'xla':
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale).astype(dtype)
  if impl != 'einsum':
    raise ValueError(f"config.model.attention={impl!r}: expected 'einsum' or 'xla'")
  # [B, Hkv, G, T, D] against [B, Hkv, S, D]: batched matmuls over (B, Hkv) with the grouped
  # query rows (G, T) as one contiguous M dimension, so no score-sized transposes are needed.
  qg = q.reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)
  kt, vt = (k, v) if kv_heads_first else (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
  m = None if mask is None else mask[:, :, None]                 # [B, 1, 1, T, S]
  n = causal_blocks if (causal_blocks > 1 and t == s) else 1
  bounds = [round(t * i / n) for i in range(n + 1)]
  outs = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    keys = hi if n > 1 else s      # causal blocks: keys past the block's last query are masked
    mi = None if m is None else m[:, :, :, lo:hi, :keys]
    outs.append(_attention(qg[:, :, :, lo:hi], kt[:, :, :keys], vt[:, :, :keys], mi, scale))
  out = outs[0] if n == 1 else jnp.concatenate(outs, axis=3)    # [B, Hkv, G, T, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(dtype)


def _attention_fwd_core(q, k, v, mask, scale):
  """q [B,K,G,T,D], k/v [B,K,S,D], mask bool [B,1,1,T,S] | None -> (out [B,K,G,T,D], probs)."""
  logits = jnp.einsum('bkgtd,bksd->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return einsum('bkgts,bksd->bkgtd', probs, v), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
  """Softmax attention with the textbook backward pass: dS = P * (dP - rowsum(dO * O)).

  Autodiff of softmax differentiates through max/exp/sum/div and transposes the score-sized
  intermediates; this backward touches the [T, S] scores twice (dP, dS) and measured ~1.5x
  faster fwd+bwd on XLA:CPU for the bench model's attention (BENCHMARKS.md).
  """
  return _attention_fwd_core(q, k, v, mask, scale)[0]


def _attention_fwd(q, k, v, mask, scale):
  out, probs = _attention_fwd_core(q, k, v, mask, scale)
  return out, (q, k, v, mask, out, probs)


def _attention_bwd(scale, res, d_out):
  q, k, v, mask, out, probs = res
  dv = einsum('bkgts,bkgtd->bksd', probs, d_out.astype(probs.dtype))
  dp = jnp.einsum('bkgtd,bksd->bkgts', d_out, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  ds = (probs.astype(jnp.float32) * (dp - delta) * scale).astype(q.dtype)
  dq = einsum('bkgts,bksd->bkgtd', ds, k)
  dk = einsum('bkgts,bkgtd->bksd', ds, q)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
