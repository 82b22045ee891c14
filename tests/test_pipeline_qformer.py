"""InstructBLIP from files: the grain pipeline gives an instruction-aware Q-Former each image's
instruction (`qformer_input_ids` / `qformer_attention_mask` [B, max_images, L], tokenised with a
real BERT tokenizer built locally) from LLaVA JSON, TFDS and preference / caption records, in
grain worker processes too; packed rows keep every image slot's own instruction (the model's
packed logits equal the unpacked ones, and would not with the instructions mixed up); the
training job runs SFT and DPO of a tiny InstructBLIP on LLaVA JSON; an over-long instruction is
bad input naming the file and sample."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import transformers

from data_files import (SIZE, build_bert_tokenizer, conv, write_image, write_json)
from mllm_jax.data import pipeline, records, synthetic, tfds_builders
from mllm_jax.data import tokenizer as tok_lib
from mllm_jax.models import MLLM, MLLMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NQ = 4          # Q-Former queries = image tokens per image
QLEN = 12       # config.data.qformer_max_len

CONVS = [   # (record, the instruction of each of its images)
    (conv(('human', '<image>\nWhat colour is the circle?'), ('gpt', 'red'), image='a.jpg',
          sid='one'), ['What colour is the circle?']),
    # multi-turn: the image's own turn, not the later questions
    (conv(('human', '<image>\nhow many shapes?'), ('gpt', 'two'), ('human', 'and where?'),
          ('gpt', 'left'), image='b.png', sid='multi_turn'), ['how many shapes?']),
    (conv(('system', 'be brief.'), ('human', 'first <image> then'), ('gpt', 'ok'),
          ('human', '<image>\nsame colour?'), ('gpt', 'no'), image=['a.jpg', 'b.png'],
          sid='two_turns'), ['first then', 'same colour?']),
    # a turn that is only the tag: the next user turn's text
    (conv(('human', '<image>'), ('gpt', 'ok'), ('human', 'what is it?'), ('gpt', 'a circle'),
          image='c.jpg', sid='tag_alone'), ['what is it?']),
    (conv(('human', 'compare <image> and <image>'), ('gpt', 'same'), image=['b.png', 'a.jpg'],
          sid='one_turn_two'), ['compare and', 'compare and']),
    (conv(('human', 'hello there'), ('gpt', 'hi'), sid='text_only'), []),
]
PREFS = [
    ({'id': 'trl', 'prompt': 'Is the circle red?', 'chosen': 'yes', 'rejected': 'no',
      'images': ['a.jpg']}, ['Is the circle red?']),
    ({'id': 'parts', 'prompt': [{'role': 'user', 'content': [
        {'type': 'image'}, {'type': 'text', 'text': 'How many shapes?'}]}],
      'chosen': [{'role': 'assistant', 'content': 'two'}], 'rejected': 'three',
      'images': ['b.png']}, ['How many shapes?']),
]
CAPTIONS = [
    ({'id': 'plain', 'image': 'a.jpg', 'caption': 'a red circle'},
     [synthetic.CAPTION_INSTRUCTION]),
    (conv(('human', '<image>\nDescribe the image briefly.'), ('gpt', 'a blue square'),
          image='c.jpg', sid='llava_pretrain'), ['Describe the image briefly.']),
]
QUESTIONS = ['what colour is the circle?', 'how many shapes are there?', 'where is the square?',
             'is there a triangle?', 'what is left of the square?', 'name the biggest shape',
             'which shape is blue?', 'count the red things', 'is the circle above?',
             'what is in the corner?', 'describe the colours', 'what is on the right?']


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return tok_lib.load_tokenizer(tok_lib.build_demo_tokenizer(
      str(tmp_path_factory.mktemp('demo_tok'))))


@pytest.fixture(scope='module')
def qtok_dir(tmp_path_factory):
  texts = [t for _, ins in CONVS + PREFS + CAPTIONS for t in ins] + QUESTIONS
  return build_bert_tokenizer(str(tmp_path_factory.mktemp('qformer_tok')), texts)


@pytest.fixture(scope='module')
def qtok(qtok_dir):
  return transformers.AutoTokenizer.from_pretrained(qtok_dir)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  r = tmp_path_factory.mktemp('files')
  for i, name in enumerate(('a.jpg', 'b.png', 'c.jpg', 'd.png')):
    write_image(str(r / 'images' / name), i, (24 + 4 * i, 30))
  return r


def cfg(kind='conversation', **kw):
  kw = {'max_len': 96, 'max_images': 2, 'image_size': SIZE, 'num_image_tokens': NQ,
        'qformer_max_len': QLEN, 'window': 2, **kw}
  return pipeline.PipelineConfig(kind=kind, **kw)


def expected_rows(qtok, texts, slots=2):
  """The Q-Former tokenizer's own encoding of each text, padded: ids, mask [slots, QLEN]."""
  ids = np.full((slots, QLEN), qtok.pad_token_id, np.int32)
  mask = np.zeros((slots, QLEN), np.int32)
  for i, t in enumerate(texts):
    q = qtok(t)['input_ids']
    ids[i, :len(q)], mask[i, :len(q)] = q, 1
  return ids, mask


def check_rows(qtok, b, expected, rows):
  for r, texts in zip(rows, expected):
    ids, mask = expected_rows(qtok, texts)
    np.testing.assert_array_equal(b['qformer_input_ids'][r], ids, err_msg=str(texts))
    np.testing.assert_array_equal(b['qformer_attention_mask'][r], mask, err_msg=str(texts))
    assert b['num_images'][r] == len(texts)
  assert (b['qformer_input_ids'] != qtok.unk_token_id).all()   # real word pieces, no [UNK]


# ---- (1) which text, tokenised how -------------------------------------------------------------

def test_instructions_from_json_and_tfds_records(tok, qtok, root, tmp_path):
  """Every record kind from JSON and from TFDS shards: each image slot holds the BERT
  tokenizer's encoding of that image's instruction; unused slots are padding with mask 0."""
  for kind, cases in (('conversation', CONVS), ('preference', PREFS), ('caption', CAPTIONS)):
    recs, expected = [c[0] for c in cases], [c[1] for c in cases]
    path = write_json(str(tmp_path / f'{kind}.json'), recs)
    c = cfg(kind)
    from_json = pipeline.json_task(tok, c, 'train', [path], image_root=str(root / 'images'),
                                   qformer_tokenizer=qtok)
    b = from_json.batch(0, len(recs))
    assert b['qformer_input_ids'].shape == (len(recs), 2, QLEN)
    check_rows(qtok, b, expected, range(len(recs)))
    name = tfds_builders.build(kind, 'q', [path], str(tmp_path / 'tfds'),
                               image_root=str(root / 'images'))
    from_tfds = pipeline.tfds_task(tok, c, 'train', name, str(tmp_path / 'tfds'),
                                   qformer_tokenizer=qtok)
    tb = from_tfds.batch(0, len(recs))
    index = {records.record_id(r, i): i for i, r in enumerate(recs)}
    order = [index[records.record_id(from_tfds.source[k]['raw'], 0)] for k in range(len(recs))]
    check_rows(qtok, tb, [expected[i] for i in order], range(len(recs)))
    for key in b:
      np.testing.assert_array_equal(tb[key], b[key][order], err_msg=key)


def test_grain_workers_tokenise_the_instructions(tok, qtok, root, tmp_path):
  """The Q-Former tokenizer travels to a grain worker process with the preprocessing: the
  training stream's rows carry the same instructions as in-process preprocessing."""
  recs = [c[0] for c in CONVS]
  path = write_json(str(tmp_path / 'd.json'), recs)
  task = pipeline.json_task(tok, cfg(workers=1), 'train', [path],
                            image_root=str(root / 'images'), qformer_tokenizer=qtok)
  ref = task.batch(0, len(recs))
  it = task.train_iterator(len(recs), 1, 0, 1)
  try:   # one window: two batches, the records of two (differently shuffled) epochs
    batches = [{k: v[0] for k, v in next(it).items()} for _ in range(2)]
  finally:
    it.close()
  seen = []
  for b in batches:
    for r in range(len(recs)):
      match = [u for u in range(len(recs))
               if np.array_equal(ref['input_ids'][u], b['input_ids'][r])]
      assert len(match) == 1
      seen += match
      for key in ('qformer_input_ids', 'qformer_attention_mask', 'pixel_values'):
        np.testing.assert_array_equal(b[key][r], ref[key][match[0]], err_msg=key)
  assert sorted(seen) == sorted(list(range(len(recs))) * 2)


# ---- (2) packing -------------------------------------------------------------------------------

def packing_records():
  """12 records, each its own question (its instruction) and answer 'answer i'; every third has
  two images (the question's turn and a follow-up turn with its own text)."""
  recs, instructions = [], []
  for i, q in enumerate(QUESTIONS):
    imgs = [['a.jpg', 'b.png', 'c.jpg', 'd.png'][i % 4]]
    turns = [('human', f'<image>\n{q}'), ('gpt', f'answer {i}')]
    ins = [q]
    if i % 3 == 0:
      imgs.append(['d.png', 'c.jpg'][i % 2])
      nxt = QUESTIONS[(i + 5) % len(QUESTIONS)]
      turns += [('human', f'<image>\n{nxt}'), ('gpt', f'then {i}')]
      ins.append(nxt)
    recs.append(conv(*turns, image=imgs, sid=f'p{i}'))
    instructions.append(ins)
  return recs, instructions


def tiny_instructblip(tok, qtok):
  """BLIP-2 tower -> instruction-aware Q-Former (reading the BERT tokenizer's ids) -> LLM, with
  weights spread wider than init (so the instruction moves the logits by far more than
  float noise)."""
  cfg = MLLMConfig.from_dict(dict(
      llm=dict(vocab_size=-(-len(tok) // 8) * 8, hidden=32, depth=2, heads=4, kv_heads=2,
               mlp_dim=64, max_position=128),
      vision=dict(kind='blip2', image_size=SIZE, patch_size=8, width=16, depth=1, heads=2,
                  mlp_dim=32, feature_layer=-1, feature_select='full'),
      connector=dict(kind='qformer', qformer=dict(
          num_queries=NQ, hidden=16, depth=2, heads=2, mlp_dim=32, cross_attention_every=1,
          instruction=True, vocab_size=-(-len(qtok) // 8) * 8, max_position=QLEN)),
      image_token_id=tok.convert_tokens_to_ids('<image>')))
  model = MLLM(cfg)
  # Parameters drawn here from their shapes (no init computation to compile): kernels and
  # embeddings ~ N(0, 1 / fan_in), norm scales 1 + N(0, 0.3^2), biases N(0, 0.3^2).
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), np.zeros((1, 8), np.int32))['params']))
  rng = np.random.default_rng(1)

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if len(x.shape) > 1:
      return noise * x.shape[0] ** -0.5
    return 0.3 * noise + (jax.tree_util.keystr(path).endswith("['scale']"))
  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def segments(b, r):
  """(segment id, start, length) of packed row r, in order."""
  seg = b['segment_ids'][r]
  out = []
  for s in np.unique(seg[seg > 0]):
    where = np.nonzero(seg == s)[0]
    out.append((int(s), int(where[0]), len(where)))
  return out


def test_packed_rows_give_each_image_its_own_instruction(tok, qtok, root, tmp_path):
  """Packed rows: image slot k holds the instruction of the sample whose image it is, and the
  model's logits for every packed sample equal its logits run alone; the same packed rows with
  the instructions moved to other slots give other logits."""
  recs, instructions = packing_records()
  path = write_json(str(tmp_path / 'p.json'), recs)
  kw = dict(max_len=80, max_images=4, bad_input='strict')
  packed_task = pipeline.json_task(tok, cfg(packing=True, window=1, **kw), 'train', [path],
                                   image_root=str(root / 'images'), qformer_tokenizer=qtok)
  it = pipeline.TrainIterator(packed_task.dataset(4, repeat=False), 1, 4, False)
  packed = [{k: v[0] for k, v in b.items()} for b in it]
  alone = pipeline.json_task(tok, cfg(**kw), 'train', [path], image_root=str(root / 'images'),
                             qformer_tokenizer=qtok).batch(0, len(recs))
  assert packed[0]['qformer_input_ids'].shape == (4, 4, QLEN)

  model, params = tiny_instructblip(tok, qtok)
  fwd = jax.jit(lambda p, b: model.apply({'params': p}, **b))
  inputs = lambda b, *extra: {k: b[k] for k in ('input_ids', 'attention_mask', 'pixel_values',
                                                 'qformer_input_ids', 'qformer_attention_mask')
                              + extra}
  ref = np.asarray(fwd(params, inputs(alone)))
  image_id = tok.convert_tokens_to_ids('<image>')
  found, multi_sample_rows, change = [], 0, 0.0
  for b in packed:
    got = np.asarray(fwd(params, inputs(b, 'segment_ids', 'positions')))
    # the same rows with every row's instructions rolled to the next row's image slots
    mixed = dict(inputs(b, 'segment_ids', 'positions'),
                 **{k: np.roll(b[k], 1, 0) for k in ('qformer_input_ids',
                                                      'qformer_attention_mask')})
    bad = np.asarray(fwd(params, mixed))
    for r in range(4):
      segs = segments(b, r)
      multi_sample_rows += len(segs) > 1
      slot = 0
      for _, start, n in segs:
        ids = b['input_ids'][r, start:start + n]
        i = int(tok.decode(ids[b['loss_mask'][r, start:start + n] > 0]).split()[1].split('<')[0])
        found.append(i)
        k = len(instructions[i])
        assert (ids == image_id).sum() == k * NQ
        want_ids, want_mask = expected_rows(qtok, instructions[i], k)
        np.testing.assert_array_equal(b['qformer_input_ids'][r, slot:slot + k], want_ids)
        np.testing.assert_array_equal(b['qformer_attention_mask'][r, slot:slot + k], want_mask)
        np.testing.assert_array_equal(b['pixel_values'][r, slot:slot + k],
                                      alone['pixel_values'][i, :k])
        slot += k
        np.testing.assert_array_equal(alone['input_ids'][i, :n], ids)
        scale = np.abs(ref[i, :n]).max()
        np.testing.assert_allclose(got[r, start:start + n], ref[i, :n], atol=2e-5 * scale,
                                   rtol=0)
        change = max(change, np.abs(bad[r, start:start + n] - ref[i, :n]).max() / scale)
      assert not b['pixel_values'][r, slot:].any()
      assert not b['qformer_attention_mask'][r, slot:].any()
  assert sorted(found) == list(range(len(recs))) and multi_sample_rows >= 3
  assert change > 1e-2, change   # mixed-up instructions are caught by the tolerance above


# ---- (3) the training job ----------------------------------------------------------------------

@pytest.mark.slow   # ~50 s of CPU: two stages' compilations
def test_instructblip_sft_and_dpo_from_llava_json(root, qtok_dir, tmp_path):
  """configs/demo_qformer.py shrunk, stages sft (packed LLaVA JSON conversations) then dpo
  (TRL preference records, JSONL) through `loop.run`, the Q-Former reading a BERT tokenizer of
  its own: both stages' losses are finite and fall (DPO's from log 2, policy = reference); a
  qformer_max_len beyond the Q-Former's positions is a config error."""
  from mllm_jax.config import load_config, stage_config
  from mllm_jax.train import loop
  convs, prefs = [], []
  for i in range(48):
    q = QUESTIONS[i % 6]
    convs.append(conv(('human', f'<image>\n{q}'), ('gpt', ['red', 'blue'][i % 4 // 2]),
                      image=['a.jpg', 'b.png'][i % 4 // 2], sid=f's{i}'))
    prefs.append({'id': f'd{i}', 'prompt': q, 'images': ['c.jpg', 'd.png'][i % 2],
                  'chosen': ['a circle', 'a square'][i % 2],
                  'rejected': ['a square', 'a circle'][i % 2]})
  over = {'model.llm.depth': 1, 'model.llm.hidden': 32, 'model.llm.mlp_dim': 64,
          'model.llm.heads': 2, 'model.llm.kv_heads': 1, 'model.vision.depth': 1,
          'model.vision.width': 32, 'model.vision.heads': 2, 'model.vision.mlp_dim': 64,
          'model.vision.image_size': SIZE, 'model.connector.qformer.num_queries': NQ,
          'model.connector.qformer.hidden': 32, 'model.connector.qformer.depth': 1,
          'model.connector.qformer.heads': 2, 'model.connector.qformer.mlp_dim': 64,
          'mesh.data': -1, 'mesh.fsdp': 1, 'data.source': 'llava_json',
          'data.train_files': write_json(str(tmp_path / 'sft.json'), convs),
          'data.preference_files': write_json(str(tmp_path / 'dpo.jsonl'), prefs, jsonl=True),
          'data.image_root': str(root / 'images'), 'data.eval_fraction': 0.1,
          'data.max_len': 48, 'data.max_images': 2, 'data.packing': True,
          'data.qformer_tokenizer': qtok_dir, 'data.qformer_max_len': QLEN,
          'train.stages': 'sft,dpo', 'sft.steps': 8, 'sft.batch_size': 8,
          'sft.optim.lr': 3e-3, 'sft.optim.warmup_ratio': 0.0, 'train.log_every': 1,
          'train.checkpoint_every': 100, 'train.eval_examples': 8, 'train.eval_batch_size': 8,
          'train.progress_bar': False}
  config = load_config(os.path.join(ROOT, 'configs', 'demo_qformer.py'), over)
  config.unlock()
  config.dpo = stage_config(task='dpo', trainable='(connector|llm)/.*', steps=6, batch_size=8,
                            lr=3e-3, warmup_ratio=0.0)
  config.dpo.preference.update(beta=0.5, gamma=0.0)
  config.lock()
  out = loop.run(config, str(tmp_path / 'work'))
  with open(tmp_path / 'work' / 'metrics.jsonl') as f:
    train = [m for m in map(json.loads, f) if 'loss' in m]
  sft, dpo = [m['loss'] for m in train[:8]], [m['loss'] for m in train[8:]]
  assert len(sft) == 8 and len(dpo) == 6 and {m['stage'] for m in train[8:]} == {'dpo'}
  for losses in (sft, dpo):
    assert np.isfinite(losses).all()
  assert np.mean(sft[-2:]) < 0.7 * np.mean(sft[:2]), sft
  assert abs(dpo[0] - np.log(2)) < 1e-3, dpo
  assert np.mean(dpo[-2:]) < 0.8 * np.mean(dpo[:2]), dpo
  assert 0 <= out['eval/preference_accuracy'] <= 1
  config.unlock()
  config.data.qformer_max_len = 64
  tok = tok_lib.load_tokenizer(str(tmp_path / 'work' / 'tokenizer'))
  with pytest.raises(ValueError, match=r'qformer_max_len=64 must be in 1\.\.config\.model\.'
                     r'connector\.qformer\.max_position=32'):
    pipeline.task_from_config(config, tok, loop.model_config(config, tok), 'vqa', 'train')


# ---- (4) bad input -----------------------------------------------------------------------------

def test_an_instruction_longer_than_qformer_max_len(tok, qtok, root, tmp_path):
  """strict: an error naming the file, the sample and the config key; skip: dropped and counted
  as too_long; truncate: cut to qformer_max_len as the tokenizer truncates (ends in [SEP])."""
  long_q = ' '.join(QUESTIONS[:3])
  assert len(qtok(long_q)['input_ids']) > QLEN
  recs = [CONVS[0][0], conv(('human', f'<image>\n{long_q}'), ('gpt', 'x'), image='a.jpg',
                            sid='long'), CONVS[1][0]]
  path = write_json(str(tmp_path / 'd.json'), recs)
  task = lambda **kw: pipeline.json_task(tok, cfg(**kw), 'train', [path],
                                         image_root=str(root / 'images'), qformer_tokenizer=qtok)
  with pytest.raises(records.BadSample, match=(
      rf"d\.json\[1\]: sample 'long': the Q-Former instruction of image 1 .* has "
      rf"{len(qtok(long_q)['input_ids'])} tokens > config\.data\.qformer_max_len={QLEN} "
      r"\[too_long\]")):
    task(bad_input='strict').batch(0, 3)
  skip = task(bad_input='skip')
  it = pipeline.TrainIterator(skip.dataset(4, repeat=False), 1, 4, False)
  rows = sum(int(b['attention_mask'][0].any(-1).sum()) for b in it)
  assert rows == 2 and it.skipped() == {'too_long': 1}
  b = task(bad_input='strict', truncate=True).batch(0, 3)
  cut = qtok(long_q, truncation=True, max_length=QLEN)['input_ids']
  assert len(cut) == QLEN and cut[-1] == qtok.sep_token_id
  np.testing.assert_array_equal(b['qformer_input_ids'][1, 0], cut)
  assert b['qformer_attention_mask'][1, 0].all()
  # the built-in tasks' tokenisation is the same object: a ValueError naming the sample
  with pytest.raises(ValueError, match=r"sample 7: its Q-Former instruction \('.*'\) has \d+ "
                     rf"tokens > config\.data\.qformer_max_len={QLEN}"):
    synthetic.QFormerInstructions(qtok, QLEN)([long_q], ['sample 7'])
  rows = synthetic.QFormerInstructions(qtok, QLEN, truncate=True)([long_q], ['sample 7'])
  np.testing.assert_array_equal(rows['qformer_input_ids'][0], cut)
