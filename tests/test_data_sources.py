"""Source formats on real files: LLaVA JSON / JSONL, caption pairs (and LLaVA's pretrain JSON),
TRL / Insight-V preference records, TFDS array_record builders; every bad-input case under
both policies."""
import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_files import NIT, SIZE, conv, numbered_records, write_image, write_json
from mllm_jax.data import images, pipeline, records, tfds_builders
from mllm_jax.data import tokenizer as tok_lib


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return tok_lib.load_tokenizer(tok_lib.build_demo_tokenizer(
      str(tmp_path_factory.mktemp('demo_tok'))))


@pytest.fixture
def root(tmp_path):
  img = tmp_path / 'images'
  write_image(str(img / 'a.jpg'), 0)
  write_image(str(img / 'b.png'), 1, (30, 20))
  write_image(str(img / 'sub' / 'c.jpg'), 2, (40, 40))
  return tmp_path


def cfg(kind='conversation', **kw):
  kw = {'max_len': 96, 'max_images': 2, 'image_size': SIZE, 'num_image_tokens': NIT, **kw}
  return pipeline.PipelineConfig(kind=kind, **kw)


def expected_pixels(path):
  proc = images.ImageProcessor(kind='clip', size=SIZE, crop_size=SIZE)
  return proc.preprocess(path)


def trained(tok, ids, mask):
  return tok.decode(ids[mask > 0])


CONVS = [
    conv(('human', 'hello there'), ('gpt', 'hi'), sid='text_only'),
    conv(('human', '<image>\nwhat colour?'), ('gpt', 'red'), image='a.jpg', sid='one_image'),
    conv(('system', 'answer briefly.'), ('human', 'first <image> then <image>, same?'),
         ('gpt', 'no'), ('human', 'why?'), ('gpt', 'colours'),
         image=['b.png', 'sub/c.jpg'], sid='two_images_two_turns'),
]


@pytest.mark.parametrize('jsonl', [False, True])
def test_llava_json_round_trip(tok, root, jsonl):
  path = write_json(str(root / ('d.jsonl' if jsonl else 'd.json')), CONVS, jsonl)
  task = pipeline.json_task(tok, cfg(), 'train', [path], image_root=str(root / 'images'))
  b = task.batch(0, 4)
  img = tok.convert_tokens_to_ids('<image>')
  assert b['input_ids'].shape == (4, 96) and b['pixel_values'].shape == (4, 2, SIZE, SIZE, 3)
  answers = ['hi<|end|>', 'red<|end|>', 'no<|end|>colours<|end|>']
  for r, (rec, ans) in enumerate(zip(CONVS, answers)):
    assert trained(tok, b['input_ids'][r], b['loss_mask'][r]) == ans
    n_img = len(rec.get('image', [])) if isinstance(rec.get('image'), list) else int(
        'image' in rec)
    assert b['num_images'][r] == n_img
    assert (b['input_ids'][r] == img).sum() == n_img * NIT
    assert b['loss_mask'][r][b['input_ids'][r] == img].sum() == 0
    # the row is the template's rendering with each <image> repeated NIT times
    msgs = [{'role': records.ROLE_NAMES[t['from']], 'content': t['value']}
            for t in rec['conversations']]
    text = tok.apply_chat_template(msgs, tokenize=False).replace('<image>', '<image>' * NIT)
    ref = tok.encode(text, add_special_tokens=False)
    n = int(b['attention_mask'][r].sum())
    assert b['input_ids'][r, :n].tolist() == ref
  np.testing.assert_allclose(b['pixel_values'][1, 0], expected_pixels(root / 'images/a.jpg'))
  np.testing.assert_allclose(b['pixel_values'][2, 1],
                             expected_pixels(root / 'images/sub/c.jpg'))
  assert not b['pixel_values'][0].any() and not b['pixel_values'][1, 1].any()
  assert b['attention_mask'][3].sum() == 0      # past the data: an empty row, no loss
  assert task.skipped() == {}


def test_held_out_fraction_is_stable_and_disjoint(tok, root):
  recs = numbered_records(40)
  path = write_json(str(root / 'd.json'), recs)
  kw = dict(train_files=[path], eval_fraction=0.25, image_root=str(root / 'images'))
  tr, ev = (pipeline.json_task(tok, cfg(), s, **kw) for s in ('train', 'eval'))
  ids = lambda t: {recs[int(i)]['id'] for i in t.source.indices}
  assert ids(tr).isdisjoint(ids(ev)) and ids(tr) | ids(ev) == {r['id'] for r in recs}
  assert ids(ev) == {r['id'] for r in recs if records.in_eval_split(r['id'], 0.25)}
  assert 3 <= len(ids(ev)) <= 18
  with pytest.raises(ValueError, match='eval_files or config.data.eval_fraction'):
    pipeline.json_task(tok, cfg(), 'eval', [path])


def test_caption_pairs_and_llava_pretrain_json(tok, root):
  recs = [{'id': 'p', 'image': 'a.jpg', 'caption': 'a red circle.'},
          {'id': 'q', 'image': 'b.png', 'text': 'two squares.'},
          # LLaVA's pretrain JSON (blip_laion_cc_sbu_558k.json): instruction dropped
          conv(('human', 'Render a clear and concise summary of the photo.\n<image>'),
               ('gpt', 'a dog on a beach.'), image='sub/c.jpg', sid='llava_pretrain')]
  path = write_json(str(root / 'c.json'), recs)
  b = pipeline.json_task(tok, cfg('caption'), 'train', [path],
                         image_root=str(root / 'images')).batch(0, 3)
  img = tok.convert_tokens_to_ids('<image>')
  for r, caption in enumerate(['a red circle.', 'two squares.', 'a dog on a beach.']):
    want = ([tok.bos_token_id] + [img] * NIT + tok.encode(caption, add_special_tokens=False)
            + [tok.eos_token_id])
    n = int(b['attention_mask'][r].sum())
    assert b['input_ids'][r, :n].tolist() == want
    assert trained(tok, b['input_ids'][r], b['loss_mask'][r]) == caption + '</s>'
  np.testing.assert_allclose(b['pixel_values'][2, 0], expected_pixels(root / 'images/sub/c.jpg'))


PREFS = [
    # TRL standard (text) format with images: no tag in the prompt -> one per image, in front
    {'prompt': 'what colour is it?', 'chosen': 'red', 'rejected': 'blue', 'images': ['a.jpg']},
    # TRL conversational format with multimodal content parts
    {'prompt': [{'role': 'user', 'content': [{'type': 'image'},
                                             {'type': 'text', 'text': 'how many?'}]}],
     'chosen': [{'role': 'assistant', 'content': 'two'}],
     'rejected': [{'role': 'assistant', 'content': 'three'}], 'images': ['b.png']},
    # Insight-V style
    {'id': 'iv1', 'image': 'sub/c.jpg', 'prompt': 'describe the scene.', 'answer': 'a square',
     'chosen': 'a green square', 'rejected': 'a red circle'},
    # multi-turn prompt: only the final answer is the preference target
    {'prompt': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'},
                {'role': 'user', 'content': 'yes or no?'}], 'chosen': 'yes', 'rejected': 'no'},
]


def test_preference_records(tok, root):
  path = write_json(str(root / 'p.jsonl'), PREFS, jsonl=True)
  task = pipeline.json_task(tok, cfg('preference', buckets=(32, 48, 64)), 'train', [path],
                            image_root=str(root / 'images'))
  b = task.batch(0, 4)
  img = tok.convert_tokens_to_ids('<image>')
  assert set(b) == {'chosen_input_ids', 'chosen_attention_mask', 'chosen_loss_mask',
                    'rejected_input_ids', 'rejected_attention_mask', 'rejected_loss_mask',
                    'pixel_values', 'num_images'}
  for r, rec in enumerate(PREFS):
    for side in ('chosen', 'rejected'):
      ans = rec[side] if isinstance(rec[side], str) else rec[side][0]['content']
      assert trained(tok, b[f'{side}_input_ids'][r], b[f'{side}_loss_mask'][r]) == ans + '<|end|>'
      assert (b[f'{side}_input_ids'][r] == img).sum() == NIT * (r < 3)
    # the prompt tokens are the same on both sides
    n = np.argmax(b['chosen_loss_mask'][r])
    np.testing.assert_array_equal(b['chosen_input_ids'][r, :n], b['rejected_input_ids'][r, :n])
  assert b['num_images'].tolist() == [1, 1, 1, 0]
  np.testing.assert_allclose(b['pixel_values'][2, 0], expected_pixels(root / 'images/sub/c.jpg'))
  # training batches for the DPO step: [accum, micro, ...], both sides padded to one bucket
  t = next(task.train_iterator(4, 2, 0, 1))
  assert set(t) == set(b) - {'num_images'}
  assert t['chosen_input_ids'].shape[:2] == (2, 2) and t['pixel_values'].shape[:3] == (2, 2, 2)
  assert t['chosen_input_ids'].shape == t['rejected_input_ids'].shape
  assert t['chosen_input_ids'].shape[-1] in (32, 48, 64, 96)


@pytest.mark.parametrize('kind,recs', [('conversation', CONVS), ('preference', PREFS[:3])])
def test_tfds_builder_round_trip(tok, root, kind, recs):
  """JSON -> TFDS array_record (images as the files' encoded bytes) -> tfds.data_source ->
  the same samples as reading the JSON directly."""
  recs = [dict(r, id=f'{kind}{i}') for i, r in enumerate(recs)] * 1
  path = write_json(str(root / 'src.json'), recs)
  data_dir = str(root / 'tfds')
  name = tfds_builders.build(kind, 'mine', [path], data_dir, image_root=str(root / 'images'))
  assert name == f'{tfds_builders.BUILDERS[kind].name}/mine'
  assert any(f.endswith(tuple(f'-of-{i:05d}' for i in range(1, 9))) and 'array_record' in f
             for f in os.listdir(os.path.join(data_dir, name, '1.0.0')))
  src = tfds.data_source(name, data_dir=data_dir, split='train')
  assert len(src) == len(recs)
  by_id = {}
  for i in range(len(src)):
    ex = src[i]
    by_id[ex['id'].decode()] = ex
  rec = next(r for r in recs if r.get('image') or r.get('images'))
  paths = rec.get('image', rec.get('images'))
  paths = [paths] if isinstance(paths, str) else paths
  stored = by_id[rec['id']]
  assert [p.decode() for p in stored['image_paths']] == paths
  assert list(stored['images']) == [open(root / 'images' / p, 'rb').read() for p in paths]

  c = cfg(kind)
  from_json = pipeline.json_task(tok, c, 'train', [path], image_root=str(root / 'images'))
  from_tfds = pipeline.tfds_task(tok, c, 'train', name, data_dir)
  jb, tb = from_json.batch(0, len(recs)), from_tfds.batch(0, len(recs))
  json_index = {r['id']: i for i, r in enumerate(recs)}
  order = [json_index[from_tfds.source[k]['raw']['id']] for k in range(len(recs))]
  for key in jb:
    np.testing.assert_array_equal(tb[key], jb[key][order], err_msg=key)


def test_tfds_eval_split_and_missing_dataset(tok, root):
  recs = numbered_records(30)
  path = write_json(str(root / 'd.json'), recs)
  data_dir = str(root / 'tfds')
  name = tfds_builders.build('conversation', 'held', [path], data_dir,
                             image_root=str(root / 'images'), eval_fraction=0.3)
  tr = tfds_builders.load_data_source(data_dir, name, 'train')
  ev = tfds_builders.load_data_source(data_dir, name, 'eval')
  ids = lambda s: {s[i]['id'].decode() for i in range(len(s))}
  assert ids(ev) == {r['id'] for r in recs if records.in_eval_split(r['id'], 0.3)}
  assert ids(tr) == {r['id'] for r in recs} - ids(ev)
  with pytest.raises(FileNotFoundError, match='no TFDS dataset'):
    tfds_builders.load_data_source(data_dir, 'llava_conversations/other', 'train')
  with pytest.raises(ValueError, match="no split 'test'"):
    tfds_builders.load_data_source(data_dir, name, 'test')


# ---- bad input --------------------------------------------------------------------------------

GOOD = conv(('human', '<image>\nok?'), ('gpt', 'fine'), image='a.jpg', sid='good')
BAD = {   # reason -> a record that has it (images relative to the image root)
    'bad_image:missing': conv(('human', '<image>\nq'), ('gpt', 'a'), image='nope.jpg',
                              sid='missing'),
    'bad_image:corrupt': conv(('human', '<image>\nq'), ('gpt', 'a'), image='corrupt.jpg',
                              sid='corrupt'),
    'bad_image:not_an_image': conv(('human', '<image>\nq'), ('gpt', 'a'), image='text.png',
                                   sid='text'),
    'image_tag_mismatch:more_tags': conv(('human', '<image> <image>\nq'), ('gpt', 'a'),
                                         image='a.jpg', sid='more_tags'),
    'image_tag_mismatch:fewer_tags': conv(('human', 'q'), ('gpt', 'a'), image='a.jpg',
                                          sid='fewer_tags'),
    'empty_conversation': conv(sid='empty'),
    'no_assistant_turn': conv(('human', 'q'), sid='no_answer'),
    'unknown_role': conv(('human', 'q'), ('robot', 'a'), sid='robot'),
    'too_long': conv(('human', 'q ' * 200), ('gpt', 'a'), sid='long'),
    'too_many_images': conv(('human', '<image><image><image>q'), ('gpt', 'a'),
                            image=['a.jpg'] * 3, sid='many'),
}


def write_bad_files(root):
  data = open(root / 'images' / 'a.jpg', 'rb').read()
  (root / 'images' / 'corrupt.jpg').write_bytes(data[:len(data) // 3])   # truncated JPEG
  (root / 'images' / 'text.png').write_text('not a png')


@pytest.mark.parametrize('case', list(BAD))
@pytest.mark.parametrize('source', ['json', 'tfds'])
def test_bad_input_strict_and_skip(tok, root, case, source):
  write_bad_files(root)
  reason = case.split(':')[0]
  recs = [GOOD, BAD[case], dict(GOOD, id='good2')]
  path = write_json(str(root / 'bad.json'), recs)
  if source == 'tfds':
    name = tfds_builders.build('conversation', 'bad', [path], str(root / 'tfds'),
                               image_root=str(root / 'images'))
    make = lambda c: pipeline.tfds_task(tok, c, 'train', name, str(root / 'tfds'))
  else:
    make = lambda c: pipeline.json_task(tok, c, 'train', [path], image_root=str(root / 'images'))
  where = re.escape(f"bad.json[1]: sample {BAD[case]['id']!r}")
  with pytest.raises(records.BadSample, match=where) as e:
    make(cfg(max_len=64)).batch(0, 3)
  assert e.value.reason == reason
  task = make(cfg(max_len=64, bad_input='skip'))
  b = task.batch(0, 3)
  assert b['attention_mask'].sum(1).astype(bool).tolist() == [True, True, False]
  assert task.skipped() == {reason: 1}
  # the training stream drops it too, and its iterator counts it: one epoch, one skip
  it = pipeline.TrainIterator(task.dataset(2, repeat=False), 1, 2, False)
  assert sum(int(b['attention_mask'].any(-1).sum()) for b in it) == 2
  assert it.skipped() == {reason: 1}
  # strict through the training stream: the same error
  it = make(cfg(max_len=64)).train_iterator(2, 1, 0, 1)
  with pytest.raises(records.BadSample, match=where):
    next(it)


@pytest.mark.parametrize('packing', [False, True])
def test_skips_at_the_end_of_the_data_are_counted(tok, root, packing):
  """A finite stream whose last samples are bad still reports them (in an empty batch)."""
  path = write_json(str(root / 'e.json'), [GOOD, dict(GOOD, id='good2'), BAD['unknown_role']])
  empty_batches = 0
  for seed in range(8):
    task = pipeline.json_task(tok, cfg(window=1, bad_input='skip', packing=packing, seed=seed,
                                       max_len=32), 'train', [path],
                              image_root=str(root / 'images'))
    it = pipeline.TrainIterator(task.dataset(1, repeat=False), 1, 1, False)
    batches = list(it)
    assert it.skipped() == {'unknown_role': 1}
    assert sum(int(b['attention_mask'].any(-1).sum()) for b in batches) == 2
    assert all(b.keys() == batches[0].keys() for b in batches)
    empty_batches += not batches[-1]['attention_mask'].any()
  # buckets: some seed put the bad record after the last full window; packing reads on to the
  # next good sample (or the end), so trailing skips always join the last real batch
  assert (empty_batches > 0) != packing


def test_truncation_never_cuts_an_image(tok, root):
  long_text = conv(('human', 'q'), ('gpt', 'a ' * 100), sid='long_answer')
  late_image = conv(('human', 'q ' * 60 + '<image>'), ('gpt', 'a'), image='a.jpg',
                    sid='late_image')
  path = write_json(str(root / 't.json'), [long_text, late_image, GOOD])
  task = pipeline.json_task(tok, cfg(max_len=64, truncate=True, bad_input='skip'), 'train',
                            [path], image_root=str(root / 'images'))
  b = task.batch(0, 2)
  assert b['attention_mask'][0].sum() == 64 and b['loss_mask'][0].sum() > 0   # cut, still trains
  assert task.skipped() == {'too_long': 1}    # the image would have been cut: dropped
  with pytest.raises(records.BadSample, match="late_image.*cut image tokens"):
    pipeline.json_task(tok, cfg(max_len=64, truncate=True), 'train', [path],
                       image_root=str(root / 'images')).batch(0, 3)


def test_a_dataset_that_yields_nothing_is_an_error(tok, root):
  path = write_json(str(root / 'x.json'), [BAD['no_assistant_turn'], BAD['unknown_role']])
  task = pipeline.json_task(tok, cfg(bad_input='skip'), 'train', [path])
  with pytest.raises(ValueError, match='yields nothing'):
    task.batch(0, 2)
  with pytest.raises(ValueError, match='yields nothing'):
    next(task.train_iterator(2, 1, 0, 1))
  with pytest.raises(ValueError, match='yields nothing'):
    next(pipeline.TrainIterator(task.dataset(2, repeat=False), 1, 2, False))
  with pytest.raises(ValueError, match='is empty'):
    pipeline.json_task(tok, cfg(), 'train', [write_json(str(root / 'e.json'), [])])
  (root / 'broken.json').write_text('[{"id": 1},')
  with pytest.raises(ValueError, match='broken.json: not valid JSON'):
    pipeline.json_task(tok, cfg(), 'train', [str(root / 'broken.json')])
  good = json.dumps(conv(('human', 'q'), ('gpt', 'a'), sid='ok'))
  (root / 'broken.jsonl').write_text(f'{good}\n\n{{"id": \n{good}\n')
  path = str(root / 'broken.jsonl')
  with pytest.raises(records.BadSample, match="broken.jsonl:3: sample '#1': not a JSON record"):
    pipeline.json_task(tok, cfg(), 'train', [path]).batch(0, 2)
  task = pipeline.json_task(tok, cfg(bad_input='skip'), 'train', [path])
  assert task.batch(0, 2)['attention_mask'].any(1).tolist() == [True, True]
  assert task.skipped() == {'bad_record': 1}


# ---- from config ------------------------------------------------------------------------------

def test_tasks_from_config_for_json_and_tfds(tmp_path):
  """configs/llava_json_demo.py on the scenes task exported as files: each stage's task reads
  its own files (captions for pretrain, conversations for SFT), from JSON or from TFDS."""
  from mllm_jax.config import load_config
  from mllm_jax.data import export
  from mllm_jax.train import loop
  paths = export.export(str(tmp_path / 'scenes'), 12, 4, image_size=40)
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  over = {'data.image_root': str(tmp_path / 'scenes' / 'images'),
          'data.caption_files': paths['caption_train'],
          'data.caption_eval_files': paths['caption_eval'],
          'data.train_files': paths['vqa_train'], 'data.eval_files': paths['vqa_eval'],
          'data.workers': 0}
  config = load_config(os.path.join(here, 'configs', 'llava_json_demo.py'), over)
  tok = loop.load_tokenizer(config, str(tmp_path / 'work'))
  mcfg = loop.model_config(config, tok)
  img = tok.convert_tokens_to_ids('<image>')
  n = mcfg.vision.num_tokens
  batches = {}
  for task in ('caption', 'vqa'):
    for split in ('train', 'eval'):
      t = loop.make_task(config, tok, mcfg, task, split)
      b = batches[task, split] = t.batch(0, 12)
      assert b['pixel_values'].shape[2:] == (32, 32, 3)
      assert b['attention_mask'][:, 0].tolist() == [1] * (12 if split == 'train' else 4) + [0] * (
          0 if split == 'train' else 8)
      assert ((b['input_ids'] == img).sum(1) == n * b['num_images']).all()
  cap = batches['caption', 'train']
  assert (cap['input_ids'][:, 0] == tok.bos_token_id).all()
  assert (cap['input_ids'][:, 1:1 + n] == img).all()     # plain template: image first
  assert tok.decode(cap['input_ids'][0][cap['loss_mask'][0] > 0]).endswith('.</s>')
  # the same data as TFDS datasets: each task finds the dataset of its kind
  tfds_dir = str(tmp_path / 'tfds')
  names = [tfds_builders.build(kind, 'scenes', [paths[f'{f}_train']], tfds_dir,
                               eval=[paths[f'{f}_eval']],
                               image_root=str(tmp_path / 'scenes' / 'images'))
           for kind, f in (('caption', 'caption'), ('conversation', 'vqa'))]
  config = load_config(os.path.join(here, 'configs', 'llava_json_demo.py'), {
      'data.source': 'tfds', 'data.tfds_name': ','.join(names), 'data.tfds_dir': tfds_dir})
  for task in ('caption', 'vqa'):
    for split in ('train', 'eval'):
      b = loop.make_task(config, tok, mcfg, task, split).batch(0, 12)
      rows = lambda x: sorted(map(tuple, x['input_ids'].tolist()))   # TFDS orders by key hash
      assert rows(b) == rows(batches[task, split])
  with pytest.raises(ValueError, match='has no dataset of preference records'):
    loop.make_task(config, tok, mcfg, 'dpo', 'train')
  config = load_config(os.path.join(here, 'configs', 'llava_json_demo.py'))
  with pytest.raises(ValueError, match='needs config.data.train_files'):
    loop.make_task(config, tok, mcfg, 'vqa', 'train')
