"""BLIP-2 stage 1 (ITC / ITM / ITG): the Q-Former's three attention patterns over one set of
parameters, the losses' check values and parity with transformers'
Blip2ForImageTextRetrieval (training: test_blip2_stage1_train.py)."""
import flax.linen as nn
import jax
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
  return model, jax.tree.map(np.asarray, nn.meta.unbox(params))


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
  jitted = {m: jax.jit(lambda p, *a, m=m: model.apply({'params': p}, *a, method=m))
            for m in ('features', 'text_embeds', 'image_embeds', 'itm_logits', 'itg_logits')}
  run = lambda method, *a, p=params: np.asarray(jitted[method](p, *a))
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
    jax.eval_shape(lambda: bad.apply({'params': params}, px, ids, mask))


# ----------------------------------------------------------------------------------------------
# Losses: hand-computed values
# ----------------------------------------------------------------------------------------------
from mllm_jax.train import blip2_stage1 as s1   # noqa: E402

L1 = np.log1p(np.exp(-2.0))   # CE of logits (2, 0) for class 0: 0.126928


def test_itc_similarity_and_loss_values():
  img = np.array([[[1.0, 0.0], [0.0, 1.0]]])            # one image, two query embeddings
  txt = np.array([[0.6, 0.8], [1.0, 0.0]])
  np.testing.assert_allclose(s1.itc_similarity(img, txt), [[0.8, 1.0]], rtol=1e-6)
  eye = np.eye(2, dtype=np.float32)
  out = s1.itc_loss(eye, 0.5)                            # logits [[2, 0], [0, 2]]
  np.testing.assert_allclose(out['loss'], L1, rtol=1e-5)
  assert out['i2t_accuracy'] == 1.0
  # label smoothing 0.1: targets (0.95, 0.05): 0.95 * L1 + 0.05 * (2 + L1) = L1 + 0.1
  np.testing.assert_allclose(s1.itc_loss(eye, 0.5, label_smoothing=0.1)['loss'], L1 + 0.1,
                             rtol=1e-5)
  # both images closest to text 0: i2t (log(1 + e^-1) + log(1 + e)) / 2, t2i log 2
  out = s1.itc_loss(np.array([[1.0, 0.0], [1.0, 0.0]]), 1.0)
  want = ((np.log1p(np.exp(-1)) + np.log1p(np.e)) / 2 + np.log(2)) / 2
  np.testing.assert_allclose(out['loss'], want, rtol=1e-5)
  assert out['i2t_accuracy'] == 0.5
  # texts 0 and 1 are the same caption: both count for image 0 (targets 1/2, 1/2)
  pos = np.array([[True, True], [True, True]])
  np.testing.assert_allclose(s1.itc_loss(eye, 0.5, pos)['loss'], np.log1p(np.exp(-2)) + 1,
                             rtol=1e-5)


def test_itm_and_itg_loss_values():
  out = s1.itm_loss(np.array([[0.0, 0.0], [2.0, 0.0]]), np.array([1, 0]))
  np.testing.assert_allclose(out['loss'], (np.log(2) + L1) / 2, rtol=1e-5)
  assert out['accuracy'] == 0.5
  logits = np.zeros((1, 3, 2), np.float32)
  logits[0, 0] = [0.0, 2.0]                              # predicts token 1 with CE L1
  logits[0, 1] = [5.0, -5.0]                             # predicts a pad: excluded
  ids, mask = np.array([[1, 1, 0]]), np.array([[1, 1, 0]])
  out = s1.itg_loss(logits, ids, mask)
  np.testing.assert_allclose(out['loss'], L1, rtol=1e-5)
  assert out['tokens'] == 1 and out['accuracy'] == 1
  # label smoothing 0.2 over 2 classes: targets (0.1, 0.9): 0.9 * L1 + 0.1 * (2 + L1)
  np.testing.assert_allclose(s1.itg_loss(logits, ids, mask, 0.2)['loss'], L1 + 0.2, rtol=1e-5)


def test_hard_negatives_follow_the_similarities():
  # image i's most similar other text is (i + 1) % 3; the positives (diagonal) are higher still
  sim = np.array([[9.0, 5.0, 0.0], [0.0, 9.0, 5.0], [5.0, 0.0, 9.0]], np.float32)
  neg_image, neg_text = s1.sample_hard_negatives(jax.random.key(0), sim, 0.1)
  np.testing.assert_array_equal(neg_text, [1, 2, 0])
  np.testing.assert_array_equal(neg_image, [2, 0, 1])    # text j: image (j - 1) % 3
  # equal similarities: the negatives are uniform over the others, never the positive
  keys = jax.random.split(jax.random.key(1), 3000)
  draw = jax.vmap(lambda k: s1.sample_hard_negatives(k, np.zeros((3, 3), np.float32), 1.0))
  neg_image, neg_text = map(np.asarray, draw(keys))
  for neg in (neg_image, neg_text):
    assert (neg != np.arange(3)).all()
    freq = (neg[:, 0, None] == np.arange(3)).mean(0)
    np.testing.assert_allclose(freq, [0, 0.5, 0.5], atol=0.04)
  # a softmax with temperature: p(text 1 | image 0) = e^1 / (e^1 + e^0) at temp 1
  sim = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
  _, neg_text = map(np.asarray, jax.vmap(lambda k: s1.sample_hard_negatives(k, sim, 1.0))(keys))
  np.testing.assert_allclose((neg_text[:, 0] == 1).mean(), np.e / (np.e + 1), atol=0.03)
  # other positives (same caption) are never negatives
  pos = np.eye(3, dtype=bool) | np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
  _, neg_text = map(np.asarray, jax.vmap(
      lambda k: s1.sample_hard_negatives(k, np.zeros((3, 3), np.float32), 1.0, pos))(keys))
  assert (neg_text[:, 0] == 2).all() and (neg_text[:, 1] == 2).all()
  image, text, label = map(np.asarray, s1.itm_pairs(np.array([2, 0, 1]), np.array([1, 2, 0])))
  np.testing.assert_array_equal(image, [0, 1, 2, 2, 0, 1, 0, 1, 2])
  np.testing.assert_array_equal(text, [0, 1, 2, 0, 1, 2, 1, 2, 0])
  np.testing.assert_array_equal(label, [1, 1, 1, 0, 0, 0, 0, 0, 0])
  with pytest.raises(ValueError, match='at least 2'):
    s1.sample_hard_negatives(jax.random.key(0), np.zeros((1, 1), np.float32), 1.0)


# ----------------------------------------------------------------------------------------------
# Parity with transformers' Blip2ForImageTextRetrieval (ITC scores, ITM logits)
# ----------------------------------------------------------------------------------------------
def test_itc_and_itm_match_transformers(tmp_path):
  import torch
  import transformers
  from mllm_jax.hf import blip2 as hf_blip2
  from test_qformer import VISION, randomize
  torch.manual_seed(0)
  cfg = transformers.Blip2Config(
      vision_config=VISION, num_query_tokens=3, image_text_hidden_size=8,
      qformer_config=dict(vocab_size=40, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=48, max_position_embeddings=16,
                          cross_attention_frequency=2, use_qformer_text_input=True))
  hf = randomize(transformers.Blip2ForImageTextRetrieval(cfg))
  hf.save_pretrained(tmp_path)
  model, params = hf_blip2.load_stage1_hf(str(tmp_path), decoder_bos_id=39)
  assert model.cfg.embed_dim == 8 and model.cfg.qformer.depth == 3
  assert 'cross_attn' not in params['qformer']['layer_1']
  assert params['temp'] == np.float32(0.07) and params['lm_head']['bias'].shape == (40,)

  rng = np.random.RandomState(0)
  px = rng.randn(3, 3, 28, 28).astype(np.float32)
  ids = np.array([[5, 9, 12, 30, 7, 6], [5, 21, 8, 6, 0, 0], [5, 33, 6, 0, 0, 0]], np.int64)
  mask = (ids > 0).astype(np.int64)
  with torch.no_grad():
    t = lambda x: torch.tensor(x)
    itc = hf(pixel_values=t(px), input_ids=t(ids), attention_mask=t(mask)).logits_per_image
    itm = hf(pixel_values=t(px), input_ids=t(ids), attention_mask=t(mask),
             use_image_text_matching_head=True).logits_per_image
  itc, itm = itc.numpy(), itm.numpy()
  assert itc.shape == (3, 3) and itm.shape == (3, 2)

  @jax.jit
  def ours(p, px, ids, mask):
    run = lambda method, *a: model.apply({'params': p}, *a, method=method)
    feats = run('features', px)
    sim = s1.itc_similarity(run('image_embeds', feats), run('text_embeds', ids, mask))
    return sim, run('itm_logits', feats, ids, mask)

  def close(a, ref):
    np.testing.assert_allclose(a, ref, rtol=0, atol=1e-4 * np.abs(ref).max())

  sim, logits = ours(params, px, ids.astype(np.int32), mask.astype(np.int32))
  close(sim, itc)
  close(logits, itm)
  # the text and the image reach both outputs: other inputs differ by far more than the tolerance
  sim2, logits2 = ours(params, px[::-1].copy(), ids[[1, 2, 0]].astype(np.int32),
                       mask[[1, 2, 0]].astype(np.int32))
  assert np.abs(np.asarray(logits2) - itm).max() > 100 * 1e-4 * np.abs(itm).max()
  assert np.abs(np.asarray(sim2) - itc).max() > 100 * 1e-4 * np.abs(itc).max()
