"""Model core: shapes, masks, RoPE, attention, ViT feature selection, image-token merging.
Logit parity against transformers' models (Llama, Qwen2, Mistral, CLIP, SigLIP, LLaVA) is in
tests/test_hf.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mllm_jax.models import MLLM, MLLMConfig, VisionConfig, layers as L
from mllm_jax.models import merge_image_features
from mllm_jax.models.vit import VisionEncoder

TINY = dict(
    llm=dict(vocab_size=96, hidden=32, depth=2, heads=4, kv_heads=2, mlp_dim=64),
    vision=dict(kind='clip', image_size=16, patch_size=8, width=16, depth=3, heads=2,
                mlp_dim=32, feature_layer=-2),
    image_token_id=3)
IMG = 3


def unbox(v):
  return jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, v,
                      is_leaf=lambda x: hasattr(x, 'unbox'))


def tiny_mllm(**over):
  d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
  for k, v in over.items():
    if isinstance(v, dict):
      d[k].update(v)
    else:
      d[k] = v
  cfg = MLLMConfig.from_dict(d)
  model = MLLM(cfg)
  params = unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params']
  return model, params


def jitted(model):
  """model.apply, compiled (eager Flax apply re-traces every scan and is slow on CPU)."""
  return jax.jit(lambda p, *a, **k: model.apply({'params': p}, *a, **k))


def test_shapes_and_dtypes():
  model, params = tiny_mllm()
  fwd = jitted(model)
  ids = jnp.array([[1, IMG, IMG, IMG, IMG, 7, 8, 9]])
  out = fwd(params, ids, jnp.ones((1, 1, 16, 16, 3)))
  assert out.shape == (1, 8, 96) and out.dtype == jnp.float32
  # scanned layers carry a leading layers axis
  assert params['llm']['layers']['attn']['q_proj']['kernel'].shape == (2, 32, 4, 8)
  assert params['llm']['layers']['attn']['k_proj']['kernel'].shape == (2, 32, 2, 8)
  assert params['vision']['layers']['fc1']['kernel'].shape == (3, 16, 32)


def test_bf16_compute_keeps_fp32_params_and_logits():
  model, params = tiny_mllm(dtype='bfloat16')
  fwd = jitted(model)
  assert params['llm']['layers']['mlp']['up_proj']['kernel'].dtype == jnp.float32
  out = fwd(params, jnp.array([[1, 5, 6]]))
  assert out.dtype == jnp.float32
  ref_model = MLLM(dataclasses.replace(model.cfg, dtype='float32'))
  ref = jitted(ref_model)(params, jnp.array([[1, 5, 6]]))
  assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_causal_and_padding_masks():
  model, params = tiny_mllm()
  fwd = jitted(model)
  ids = jnp.array([[1, 5, 6, 7, 8, 9]])
  base = fwd(params, ids)
  changed = fwd(params, ids.at[0, 4].set(20))
  np.testing.assert_allclose(base[0, :4], changed[0, :4], atol=1e-6)   # future never leaks
  assert not np.allclose(base[0, 4:], changed[0, 4:])
  # right padding: real positions unchanged whatever the pad tokens are
  padded = jnp.array([[1, 5, 6, 7, 0, 0], [1, 5, 6, 7, 50, 51]])
  mask = jnp.array([[1, 1, 1, 1, 0, 0]] * 2)
  out = fwd(params, padded, attention_mask=mask)
  np.testing.assert_allclose(out[0, :4], out[1, :4], atol=1e-6)
  np.testing.assert_allclose(out[0, :4], base[0, :4], atol=1e-5)
  # left padding with explicit positions equals the unpadded sequence, and no NaNs anywhere
  left = jnp.array([[0, 0, 1, 5, 6, 7]])
  lmask = jnp.array([[0, 0, 1, 1, 1, 1]])
  pos = jnp.array([[0, 0, 0, 1, 2, 3]])
  out = fwd(params, left, attention_mask=lmask, positions=pos)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out[0, 2:], base[0, :4], atol=1e-5)


def test_attention_impls_agree_with_gqa_and_mask():
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(k1, (2, 5, 6, 8))
  k = jax.random.normal(k2, (2, 5, 2, 8))
  v = jax.random.normal(k3, (2, 5, 2, 8))
  mask = L.make_attention_mask(jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), causal=True)
  a = L.dot_product_attention(q, k, v, mask, impl='einsum')
  b = L.dot_product_attention(q, k, v, mask, impl='xla')
  np.testing.assert_allclose(a, b, atol=1e-5)
  # reference: repeat K/V per group, plain softmax
  kr, vr = jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q, kr) / np.sqrt(8)
  logits = jnp.where(mask, logits, -1e30)
  ref = jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, -1), vr)
  np.testing.assert_allclose(a, ref, atol=1e-5)


def _reference_attention(q, k, v, mask):
  """Repeat K/V per group, plain softmax; autodiff gives the reference gradients."""
  g = q.shape[2] // k.shape[2]
  kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q, kr) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask, logits, -1e30)
  return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, -1), vr)


@pytest.mark.parametrize('blocks', [1, 3])
def test_attention_backward_and_causal_blocks_match_autodiff(blocks):
  """The hand-written backward (and the causal block split, 7 queries in 3 uneven blocks)
  gives the values and gradients of plain softmax attention on every real query row."""
  ks = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(ks[0], (2, 7, 4, 8))
  k = jax.random.normal(ks[1], (2, 7, 2, 8))
  v = jax.random.normal(ks[2], (2, 7, 2, 8))
  am = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])   # left padding in row 0
  mask = L.make_attention_mask(am, causal=True)
  w = jax.random.normal(ks[3], q.shape) * am[:, :, None, None]      # real query rows only
  ours = lambda *a: jnp.sum(L.dot_product_attention(*a, mask, causal_blocks=blocks) * w)
  ref = lambda *a: jnp.sum(_reference_attention(*a, mask) * w)
  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5)
  for a, b in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  out = L.dot_product_attention(q, k, v, mask, causal_blocks=blocks)
  np.testing.assert_allclose(out * am[:, :, None, None],
                             _reference_attention(q, k, v, mask) * am[:, :, None, None], atol=1e-5)


def test_attention_with_more_keys_than_queries_matches_reference():
  """Cross-attention / a decode step: T queries over S > T keys (all keys used)."""
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (2, 3, 4, 8))
  k = jax.random.normal(ks[1], (2, 9, 2, 8))
  v = jax.random.normal(ks[2], (2, 9, 2, 8))
  mask = jnp.ones((2, 1, 3, 9), bool).at[0, :, :, 7:].set(False)
  for blocks in (1, 4):   # blocks apply to causal self-attention only (T == S)
    np.testing.assert_allclose(L.dot_product_attention(q, k, v, mask, causal_blocks=blocks),
                               _reference_attention(q, k, v, mask), atol=1e-5)


def test_rms_norm_formula():
  x = jnp.array([[1.0, -2.0, 3.0, 0.5]])
  out = L.RMSNorm(eps=1e-6).apply({'params': {'scale': jnp.array([1.0, 2.0, 0.5, 1.0])}}, x)
  ref = np.array([1.0, -2.0, 3.0, 0.5]) / np.sqrt(np.mean(np.square([1.0, -2.0, 3.0, 0.5])) + 1e-6)
  np.testing.assert_allclose(out[0], ref * np.array([1.0, 2.0, 0.5, 1.0]), rtol=1e-6)


@pytest.mark.parametrize('scaling', [
    dict(rope_type='linear', factor=4.0),
    dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=64)])
def test_rope_scaling_matches_transformers(scaling):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf_cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=512,
                                    rope_parameters=dict(rope_theta=500000.0, **scaling))
  inv_hf, _ = ROPE_INIT_FUNCTIONS[scaling['rope_type']](hf_cfg, 'cpu')
  ours = L.rope_inv_freq(128, 500000.0, dict(
      type=scaling['rope_type'], factor=scaling['factor'],
      low_freq_factor=scaling.get('low_freq_factor', 1.0),
      high_freq_factor=scaling.get('high_freq_factor', 4.0),
      original_max_position=scaling.get('original_max_position_embeddings', 8192)))
  np.testing.assert_allclose(ours, inv_hf.numpy(), rtol=1e-6)


def test_vit_feature_layer_skips_later_layers_and_selects_tokens():
  cfg3 = VisionConfig(kind='clip', image_size=16, patch_size=8, width=16, depth=3, heads=2,
                      mlp_dim=32, feature_layer=-2, feature_select='full')
  enc3 = VisionEncoder(cfg3)
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  p3 = unbox(enc3.init(jax.random.key(0), x))['params']
  out3 = enc3.apply({'params': p3}, x)
  assert out3.shape == (2, 5, 16)   # CLS + 4 patches
  # the same weights truncated to 2 layers, reading the last layer, give the same features
  cfg2 = VisionConfig(**{**cfg3.__dict__, 'depth': 2, 'feature_layer': -1})
  p2 = dict(p3, layers=jax.tree.map(lambda a: a[:2], p3['layers']))
  np.testing.assert_allclose(out3, VisionEncoder(cfg2).apply({'params': p2}, x), atol=1e-6)
  # and differ from the last layer's output
  cfg_last = VisionConfig(**{**cfg3.__dict__, 'feature_layer': -1})
  assert not np.allclose(out3, VisionEncoder(cfg_last).apply({'params': p3}, x), atol=1e-3)
  cfg_patch = VisionConfig(**{**cfg3.__dict__, 'feature_select': 'patch'})
  np.testing.assert_allclose(VisionEncoder(cfg_patch).apply({'params': p3}, x), out3[:, 1:], atol=1e-6)


@pytest.mark.parametrize('feature_layer', [-2, (1, -2)])
def test_unrolled_vision_layers_equal_the_scan(feature_layer):
  """layer_loop='unrolled' (generate's bf16 tower) runs the scanned stack's weights layer by
  layer: the same features and pooled output in fp32, within bf16 rounding in bf16."""
  cfg = VisionConfig(kind='clip', image_size=16, patch_size=8, width=16, depth=3, heads=2,
                     mlp_dim=32, feature_layer=feature_layer, feature_select='full')
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  p = unbox(VisionEncoder(cfg).init(jax.random.key(0), x))['params']
  for dtype, atol in ((jnp.float32, 0), (jnp.bfloat16, 0.05)):
    pd = jax.tree.map(lambda a: a.astype(dtype), p)
    scan, unrolled = (VisionEncoder(cfg, dtype=dtype, param_dtype=dtype, layer_loop=loop)
                      for loop in ('scan', 'unrolled'))
    for method in ('__call__', 'pooled'):
      a, b = (jax.jit(lambda p, x, m=m: m.apply({'params': p}, x, method=method))(pd, x)
              for m in (scan, unrolled))
      assert a.shape == b.shape and a.dtype == b.dtype == dtype
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol)
  with pytest.raises(ValueError, match='vision_layer_loop'):
    VisionEncoder(cfg, layer_loop='loop').apply({'params': p}, x)


def test_siglip_variant_has_no_class_token_and_conv_bias():
  cfg = VisionConfig(kind='siglip', image_size=16, patch_size=8, width=16, depth=2, heads=2,
                     mlp_dim=32, feature_layer=-1, feature_select='full', norm_eps=1e-6)
  enc = VisionEncoder(cfg)
  x = jnp.ones((1, 16, 16, 3))
  p = unbox(enc.init(jax.random.key(0), x))['params']
  assert 'class_embedding' not in p and 'pre_norm' not in p
  assert p['patch_embed']['bias'].shape == (16,)
  assert p['position_embedding'].shape == (4, 16)
  assert enc.apply({'params': p}, x).shape == (1, 4, 16)


def test_merge_image_features_per_sample_and_flat():
  e = 2
  text = jnp.zeros((3, 6, e))
  ids = jnp.array([[IMG, IMG, 5, IMG, IMG, 6],     # two images of 2 tokens
                   [5, 6, 7, 8, 9, 10],           # no image
                   [5, IMG, IMG, 6, 0, 0]])       # one image
  feats = jnp.arange(3 * 2 * 2 * e, dtype=jnp.float32).reshape(3, 2, 2, e) + 1
  out = merge_image_features(text, feats, ids, IMG)
  np.testing.assert_array_equal(out[0, [0, 1, 3, 4]], feats[0].reshape(4, e))
  np.testing.assert_array_equal(out[1], 0)
  np.testing.assert_array_equal(out[2, [1, 2]], feats[2, 0])
  np.testing.assert_array_equal(out[2, [0, 3, 4, 5]], 0)
  # flat list (transformers' convention): images consumed in row-major order
  flat = jnp.concatenate([feats[0], feats[2, :1]])   # [3 images, 2 tokens, e]
  np.testing.assert_array_equal(merge_image_features(text, flat, ids, IMG), out)


def test_mllm_mixed_batch_is_per_sample_and_order_aware():
  model, params = tiny_mllm()
  fwd = jitted(model)
  rng = np.random.RandomState(0)
  imgs = jnp.asarray(rng.randn(3, 2, 16, 16, 3).astype(np.float32))
  ids = jnp.array([[1] + [IMG] * 8 + [7, 8, 9],          # two images x 4 tokens
                   [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],   # text only
                   [1] + [IMG] * 4 + [7, 8, 9, 10, 11, 12, 13]])  # one image
  out = fwd(params, ids, imgs)
  for b in range(3):   # each sample alone gives the same logits
    alone = fwd(params, ids[b:b + 1], imgs[b:b + 1])
    np.testing.assert_allclose(out[b], alone[0], atol=1e-5)
  # the text-only sample ignores whatever sits in its image slots
  out2 = fwd(params, ids, imgs.at[1].set(5.0))
  np.testing.assert_allclose(out[1], out2[1], atol=1e-6)
  # swapping the two images of sample 0 changes its output after the images
  swapped = fwd(params, ids, imgs.at[0].set(imgs[0, ::-1]))
  assert not np.allclose(out[0, 5:], swapped[0, 5:], atol=1e-4)
  # flat [N, H, W, 3] and channels-first inputs give the same result
  flat = jnp.stack([imgs[0, 0], imgs[0, 1], imgs[2, 0]])
  np.testing.assert_allclose(fwd(params, ids, flat), out, atol=1e-5)
  np.testing.assert_allclose(fwd(params, ids, jnp.moveaxis(flat, -1, 1)),
                             out, atol=1e-5)


def test_config_rejects_unknown_keys():
  with pytest.raises(ValueError, match='hiden'):
    MLLMConfig.from_dict(dict(llm=dict(hiden=3)))
  with pytest.raises(ValueError, match='feature_layer'):
    VisionConfig(depth=2, feature_layer=-4).layers_used


def _bf16(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.bfloat16)


def test_bf16_matmul_on_cpu_is_the_bf16_dot_in_fp32_output_form():
  """On CPU `layers.matmul` / `layers.einsum` ask for a bf16 product's fp32 output and round it
  (the form XLA:CPU hands to its bf16 GEMM): the HLO dot takes bf16 operands and returns fp32,
  values are the exact product rounded once (at most one bf16 step from it, as the plain bf16
  dot), and the gradients are the plain dot's."""
  x, w = _bf16((64, 48), 0), _bf16((48, 40), 1)
  hlo = jax.jit(L.matmul).lower(x, w).as_text()
  assert 'tensor<64x40xf32>' in hlo   # the dot's fp32 output
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  for ours in (L.matmul(x, w), L.einsum('mk,kn->mn', x, w), jnp.dot(x, w)):
    assert ours.dtype == jnp.bfloat16
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)   # bf16 spacing
    assert np.all(np.abs(np.asarray(ours, np.float64) - exact) <= step * 1.01)
  loss = lambda f: (lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * jnp.arange(40.0)))
  for a, b in zip(jax.grad(loss(L.matmul), (0, 1))(x, w), jax.grad(loss(jnp.dot), (0, 1))(x, w)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)     # fp32: the plain dot
  np.testing.assert_array_equal(L.matmul(x32, w32), jnp.dot(x32, w32))


def test_take_rows_gathers_bf16_bits_with_the_plain_gather_values_and_gradient():
  """An embedding lookup of a bf16 table on CPU gathers 16-bit patterns (no fp32 copy of the
  table in the compiled program), with jnp.take's rows (NaN for out-of-range ids, negative
  ids from the end) and gradient (repeated ids summed)."""
  table = _bf16((50, 8), 2)
  ids = jnp.asarray([[0, 3, 49, 3], [50, -1, 7, 100]])
  ours, ref = L.take_rows(table, ids), jnp.take(table, ids, axis=0)
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))
  assert np.isnan(np.asarray(ours, np.float32)[1, [0, 3]]).all()
  hlo = jax.jit(L.take_rows).lower(table, ids).compile().as_text()
  assert 'f32[50,8]' not in hlo and 'u16[50,8]' in hlo
  w = jnp.arange(8.0)
  grads = [jax.grad(lambda t, f=f: jnp.sum(f(t).astype(jnp.float32) * w))(table)
           for f in (lambda t: L.take_rows(t, ids[:1]), lambda t: jnp.take(t, ids[:1], axis=0))]
  np.testing.assert_array_equal(np.asarray(grads[0], np.float32), np.asarray(grads[1], np.float32))
  assert float(jnp.abs(grads[0][3].astype(jnp.float32) - 2 * w).max()) == 0   # id 3 twice
