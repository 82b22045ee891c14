"""BLIP-2 stage 1 (ITC / ITM / ITG): the Q-Former's three attention patterns over one set of
parameters, the losses' check values, parity with transformers' Blip2ForImageTextRetrieval,
the jitted train step and a short run of the demo that learns retrieval and starts stage 2."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.models.blip2_stage1 import QFormerPretrainer
from mllm_jax.models.config import Stage1Config

VOCAB, BOS = 30, 29
CFG = Stage1Config.from_dict(dict(
    vision=dict(kind='blip2', image_size=16, patch_size=8, width=16, depth=1, heads=2,
                mlp_dim=32, feature_layer=-1, feature_select='full'),
    qformer=dict(num_queries=3, hidden=16, depth=2, heads=2, mlp_dim=32, cross_attention_every=2,
                 vocab_size=VOCAB, max_position=10),
    embed_dim=8, decoder_bos_id=BOS))


def tiny_inputs(seed=0):
  rng = np.random.RandomState(seed)
  px = rng.randn(2, 16, 16, 3).astype(np.float32)
  ids = np.array([[2, 5, 6, 7, 8, 3], [2, 9, 10, 3, 0, 0]], np.int32)   # [CLS] ... [SEP] pad
  return px, ids, (ids > 0).astype(np.int32)


@pytest.fixture(scope='module')
def tiny():
  model = QFormerPretrainer(CFG)
  px, ids, mask = tiny_inputs()
  params = jax.jit(lambda r: model.init(r, px, ids, mask)['params'])(jax.random.key(0))
  return model, jax.tree.map(np.asarray, __import__('flax').linen.meta.unbox(params))


def test_parameter_names_are_the_connectors(tiny):
  model, params = tiny
  assert set(params) == {'vision', 'qformer', 'vision_proj', 'text_proj', 'itm_head', 'temp',
                         'lm_head'}
  q = params['qformer']
  assert set(q) == {'query_tokens', 'word_embeddings', 'position_embeddings', 'input_norm',
                    'layer_0', 'layer_1'}
  assert set(q['layer_0']) == {'self_attn', 'cross_attn', 'query_ffn', 'text_ffn'}
  assert set(q['layer_1']) == {'self_attn', 'query_ffn', 'text_ffn'}   # every 2nd layer
  assert params['temp'] == np.float32(0.07)
  assert params['lm_head']['bias'].shape == (VOCAB,) and 'kernel' not in params['lm_head']
  # the temperature is used clipped to [0.001, 0.5] (LAVIS clamps it before each use)
  for raw, used in ((0.07, 0.07), (2.0, 0.5), (-1.0, 0.001)):
    t = model.apply({'params': dict(params, temp=np.float32(raw))}, method='temperature')
    np.testing.assert_allclose(t, used, rtol=1e-6)


def test_attention_modes(tiny):
  """Text-only, bidirectional and causal patterns, checked by what changes what."""
  model, params = tiny
  px, ids, mask = tiny_inputs()
  run = lambda method, *a, p=params: np.asarray(model.apply({'params': p}, *a, method=method))
  feats = run('features', px)
  other_feats = run('features', px[::-1].copy())
  later = ids.copy()
  later[0, 4] = 11                      # a later text token of row 0
  padded = ids.copy()
  padded[1, 4:] = 12                    # row 1's padding (masked)
  big = lambda a, b: np.abs(a - b).max() > 1e-3

  # ITC text: [CLS] sees the whole text, not the queries or the image
  t = run('text_embeds', ids, mask)
  assert big(run('text_embeds', later, mask)[0], t[0])
  np.testing.assert_array_equal(run('text_embeds', padded, mask), t)
  q_changed = jax.tree.map(lambda x: x, params)
  q_changed['qformer'] = dict(params['qformer'], query_tokens=params['qformer']['query_tokens'] + 1)
  np.testing.assert_array_equal(run('text_embeds', ids, mask, p=q_changed), t)
  np.testing.assert_allclose(np.linalg.norm(t, axis=-1), 1, rtol=1e-6)
  img = run('image_embeds', feats)
  assert img.shape == (2, 3, 8)
  np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1, rtol=1e-6)

  # ITM: queries and text see each other (bidirectional); queries see the image
  m = run('itm_logits', feats, ids, mask)
  assert m.shape == (2, 2)
  assert big(run('itm_logits', feats, later, mask)[0], m[0])
  assert big(run('itm_logits', other_feats, ids, mask), m)
  np.testing.assert_allclose(run('itm_logits', feats, padded, mask), m, atol=1e-6)

  # ITG: position t sees queries and tokens <= t only; the first token is [DEC] whatever it was
  g = run('itg_logits', feats, ids, mask)
  assert g.shape == (2, 6, VOCAB)
  g2 = run('itg_logits', feats, later, mask)
  np.testing.assert_allclose(g2[0, :4], g[0, :4], atol=1e-6)   # before the changed token
  assert big(g2[0, 4:], g[0, 4:])
  np.testing.assert_array_equal(g2[1], g[1])
  assert big(run('itg_logits', other_feats, ids, mask)[:, 0], g[:, 0])   # the image matters
  cls_changed = ids.copy()
  cls_changed[:, 0] = 4
  np.testing.assert_array_equal(run('itg_logits', feats, cls_changed, mask), g)
  np.testing.assert_allclose(run('itg_logits', feats, padded, mask)[1, :4], g[1, :4], atol=1e-6)


def test_itg_needs_a_decoder_bos_id(tiny):
  _, params = tiny
  px, ids, mask = tiny_inputs()
  bad = QFormerPretrainer(Stage1Config(vision=CFG.vision, qformer=CFG.qformer, embed_dim=8))
  with pytest.raises(ValueError, match='config.model.decoder_bos_id=-1'):
    bad.apply({'params': params}, px, ids, mask)
