"""The grain pipeline: chat-template masking (demo and a locally built Qwen-style tokenizer),
per-process shards of a seeded global shuffle, length buckets (agreed across 2 jax.distributed
processes), packing (loss through the real model equals the unpacked loss), exact resume from
a saved iterator state (in-process and with worker processes), and a short training run from
LLaVA JSON through `loop.run`."""
import json
import os

import jax
import numpy as np
import pytest

from data_files import (NIT, SIZE, build_qwen_style_tokenizer, conv, numbered_records,
                        write_image, write_json)
from mllm_jax.data import pipeline
from mllm_jax.data import tokenizer as tok_lib
from mllm_jax.models import MLLM, MLLMConfig
from mllm_jax.train import steps


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  return tok_lib.build_demo_tokenizer(str(tmp_path_factory.mktemp('demo_tok')))


@pytest.fixture(scope='module')
def tok(demo_dir):
  return tok_lib.load_tokenizer(demo_dir)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """30 LLaVA records (text-only, JPEG, PNG; 1-2 turns) + one with a missing image."""
  root = tmp_path_factory.mktemp('data')
  write_image(str(root / 'images' / 'a.jpg'), 0)
  write_image(str(root / 'images' / 'b.png'), 1, (30, 20))
  recs = numbered_records(30)
  recs.insert(7, conv(('human', '<image>\nq'), ('gpt', 'a'), image='gone.jpg', sid='missing'))
  return write_json(str(root / 'd.json'), recs), str(root / 'images')


def cfg(**kw):
  kw = {'kind': 'conversation', 'max_len': 96, 'max_images': 2, 'image_size': SIZE,
        'num_image_tokens': NIT, 'bad_input': 'skip', 'window': 2, **kw}
  return pipeline.PipelineConfig(**kw)


def task_of(tok, data, **kw):
  path, root = data
  return pipeline.json_task(tok, cfg(**kw), 'train', [path], image_root=root)


def answer_index(tok, ids, trained):
  """The record index a sample's first answer names ('answer 7'); trained: its answer tokens
  (turn ids 1 = the first answer, or a loss mask)."""
  return int(tok.decode(ids[trained == 1]).split()[1].split('<')[0])


# ---- chat templates ---------------------------------------------------------------------------

def test_masks_exactly_the_assistant_tokens_for_two_templates(tok, tmp_path):
  """Demo template and a Qwen-style (ChatML) tokenizer built and saved locally, loaded with
  AutoTokenizer: the trained tokens are exactly each answer plus its end-of-turn token."""
  corpus = ['what colour is the circle? red blue green', 'where is it? top left bottom right']
  qwen = tok_lib.load_tokenizer(build_qwen_style_tokenizer(str(tmp_path / 'qwen'), corpus))
  assert qwen.bos_token_id is None   # no BOS, as Qwen2
  write_image(str(tmp_path / 'a.jpg'), 0)
  rec = conv(('system', 'be brief.'), ('human', '<image>\nwhat colour is the circle?'),
             ('gpt', 'red'), ('human', 'where is it?'), ('gpt', 'top left'),
             image='a.jpg', sid='chat')
  path = write_json(str(tmp_path / 'c.json'), [rec, conv(('human', 'where is it?'),
                                                         ('gpt', 'bottom right'), sid='t')])
  for t, end in ((tok, '<|end|>'), (qwen, '<|im_end|>')):
    b = pipeline.json_task(t, cfg(bad_input='strict'), 'train', [path],
                           image_root=str(tmp_path)).batch(0, 2)
    ids, loss, turns = b['input_ids'], b['loss_mask'], b['turn_ids']
    assert t.decode(ids[0][turns[0] == 1]) == 'red' + end
    assert t.decode(ids[0][turns[0] == 2]) == 'top left' + end
    assert t.decode(ids[1][loss[1] > 0]) == 'bottom right' + end
    np.testing.assert_array_equal(loss, (turns > 0).astype(np.float32))
    img = t.convert_tokens_to_ids('<image>')
    assert (ids[0] == img).sum() == NIT and (ids[1] == img).sum() == 0
    # every trained span ends at the end-of-turn token: nothing after it (ChatML's '\n') trains
    end_id = t.convert_tokens_to_ids(end)
    for r in range(2):
      last = np.nonzero(loss[r])[0]
      ends = last[np.append(np.diff(last) > 1, True)]
      assert (ids[r][ends] == end_id).all()
  # the Qwen template's default system turn is in the prompt, untrained
  text = qwen.decode(ids[1][b['attention_mask'][1] > 0])
  assert text.startswith('<|im_start|>system\nYou are a helpful assistant.<|im_end|>')


# ---- shuffle, shards, buckets -----------------------------------------------------------------

def epoch(tok, data, process_index=0, process_count=1, **kw):
  """One epoch of this process's batches (no repeat) -> (batches, record indices in order)."""
  task = task_of(tok, data, **kw)
  it = pipeline.TrainIterator(task.dataset(4, process_index, process_count, repeat=False),
                              1, 4, False)
  batches = list(it)
  order = []
  for b in batches:
    for r in range(4):
      ids = b['input_ids'][0, r]
      if 'segment_ids' in b:   # packed: each sample's answers
        seg = b['segment_ids'][0, r]
        order += [answer_index(tok, ids, (seg == s) * b['loss_mask'][0, r])
                  for s in np.unique(seg[seg > 0])]
      elif b['attention_mask'][0, r].any():
        order.append(answer_index(tok, ids, b['turn_ids'][0, r]))
  return batches, order, it.skipped()


def test_processes_read_disjoint_shards_of_one_seeded_shuffle(tok, data):
  _, a, skip_a = epoch(tok, data, 0, 2, buckets=(48, 64))
  _, b, skip_b = epoch(tok, data, 1, 2, buckets=(48, 64))
  assert sorted(a + b) == list(range(30))               # every record once, across processes
  assert {**skip_a, **skip_b} == {'bad_image': 1}       # the missing image: one process, once
  again = epoch(tok, data, 0, 2, buckets=(48, 64))[1]
  assert again == a                                     # same seed, same order
  other = epoch(tok, data, 0, 2, buckets=(48, 64), seed=1)[1]
  assert other != a and len(other) in (14, 15, 16)


def test_length_buckets(tok, data):
  batches, order, _ = epoch(tok, data, buckets=(40, 56))
  assert sorted(order) == list(range(30))
  lengths = set()
  for b in batches:
    t = b['input_ids'].shape[-1]
    n = b['attention_mask'][0].sum(-1)
    lengths.add(t)
    assert t in (40, 56, 96) and n.max() <= t
    assert t == min(x for x in (40, 56, 96) if x >= n.max())   # the smallest bucket that fits
    assert 'segment_ids' not in b
  assert len(lengths) >= 2


# ---- packing ----------------------------------------------------------------------------------

def tiny_model(tok):
  cfg = MLLMConfig.from_dict(dict(
      llm=dict(vocab_size=-(-len(tok) // 8) * 8, hidden=32, depth=2, heads=4, kv_heads=2,
               mlp_dim=64, max_position=128),
      vision=dict(kind='clip', image_size=SIZE, patch_size=8, width=16, depth=1, heads=2,
                  mlp_dim=32, feature_layer=-1, feature_select='patch'),
      image_token_id=tok.convert_tokens_to_ids('<image>')))
  assert cfg.vision.num_tokens == NIT
  model = MLLM(cfg)
  params = model.init(jax.random.key(0), input_ids=np.zeros((1, 8), np.int32),
                      pixel_values=np.zeros((1, 1, SIZE, SIZE, 3), np.float32))['params']
  return model, params


def total_loss(model, params, batches, drop=()):
  """Summed loss of all batches, run as one (their row lengths agree)."""
  b = {k: np.concatenate([x[k][0] for x in batches]) for k in batches[0] if k not in drop}
  out = jax.jit(lambda p, b: steps.sequence_loss(model, p, b))(params, b)
  return {k: float(v) for k, v in out.items()}


def test_packed_loss_equals_unpacked_loss(tok, data):
  """Packed rows (segment ids + per-sample positions) give the real model exactly the loss of
  the same samples one per row; without segments and positions they would not."""
  unpacked, order_u, _ = epoch(tok, data, window=8)
  packed, order_p, skipped = epoch(tok, data, packing=True, max_images=3, window=2)
  assert sorted(order_u) == sorted(order_p) == list(range(30)) and skipped == {'bad_image': 1}
  n_rows = sum(int(b['attention_mask'][0].any(-1).sum()) for b in packed)
  assert n_rows < 20                          # ~2 samples per row
  seg = np.concatenate([b['segment_ids'][0] for b in packed])
  assert seg.max() >= 2 and sum(len(np.unique(s[s > 0])) for s in seg) == 30
  for b in packed:                            # positions restart at each sample
    s, p = b['segment_ids'][0], b['positions'][0]
    starts = (s > 0) & (np.diff(np.pad(s, ((0, 0), (1, 0))), axis=1) != 0)
    assert (p[starts] == 0).all() and b['loss_mask'][0][starts].sum() == 0
  model, params = tiny_model(tok)
  ref = total_loss(model, params, unpacked)
  got = total_loss(model, params, packed)
  assert got['tokens'] == ref['tokens'] > 0
  np.testing.assert_allclose(got['loss_sum'], ref['loss_sum'], rtol=2e-5)
  assert got['correct'] == ref['correct']
  leaky = total_loss(model, params, packed, drop=('segment_ids', 'positions'))
  assert abs(leaky['loss_sum'] - ref['loss_sum']) > 1e-3 * ref['loss_sum']


# ---- exact resume -----------------------------------------------------------------------------

def equal_batches(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('packing', [False, True])
def test_resume_continues_with_exactly_the_next_batch(tok, data, packing):
  kw = dict(packing=packing, buckets=() if packing else (48, 64), max_images=3)
  it = task_of(tok, data, **kw).train_iterator(8, 2, 0, 1)   # [2, 4, ...] per step
  seen, states = [], []
  for _ in range(9):    # several windows and two epochs of the 30 records
    states.append(json.loads(json.dumps(it.get_state())))
    seen.append(next(it))
  assert seen[0]['input_ids'].shape[:2] == (2, 4)
  for k in (1, 2, 3, 6):
    fresh = task_of(tok, data, **kw).train_iterator(8, 2, 0, 1)   # as after a restart
    fresh.set_state(states[k])
    for j in range(k, min(k + 3, 9)):
      assert equal_batches(next(fresh), seen[j]), (k, j)
  assert it.skipped()['bad_image'] >= 1
  fresh = task_of(tok, data, **kw).train_iterator(8, 2, 0, 1)
  fresh.set_state(states[6])
  assert fresh.skipped() == states[6]['skipped']
  # next_with_state: the state that comes with a batch resumes right after it
  b, state = fresh.next_with_state()
  assert equal_batches(b, seen[6]) and state == json.loads(json.dumps(state))
  again = task_of(tok, data, **kw).train_iterator(8, 2, 0, 1)
  again.set_state(state)
  assert equal_batches(next(again), seen[7])


def test_worker_processes_resume_exactly_and_report_skips(tok, data):
  """Decode + tokenise in 2 grain worker processes: skip counts come back from the workers,
  and a saved state resumes with exactly the next batch."""
  task = task_of(tok, data, workers=2, buckets=(48, 64))
  it = task.train_iterator(4, 1, 0, 1)
  try:
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(2)]
    n = sum(len(v) for v in first[:1])
    assert n and it.skipped().get('bad_image', 0) >= 1
  finally:
    it.close()
  fresh = task_of(tok, data, workers=2, buckets=(48, 64)).train_iterator(4, 1, 0, 1)
  try:
    fresh.set_state(state)
    for w in want:
      assert equal_batches(next(fresh), w)
  finally:
    fresh.close()


# ---- the training job -------------------------------------------------------------------------

# 19 s: a training run; LLaVA-JSON reading and its config's stages are in test_data_sources
@pytest.mark.slow
def test_training_from_llava_json(tmp_path):
  """`loop.run` on LLaVA JSON records with images: a few steps, finite and falling loss."""
  from mllm_jax.config import load_config
  from mllm_jax.train import loop
  write_image(str(tmp_path / 'images' / 'a.jpg'), 0, (40, 40))
  write_image(str(tmp_path / 'images' / 'b.png'), 1, (32, 48))
  recs = [conv(('human', ('<image>\n' if i % 2 == 0 else '') + 'what is it?'),
               ('gpt', 'a red circle' if i % 4 == 0 else 'a blue square'),
               image=['a.jpg', 'b.png'][i % 4 // 2] if i % 2 == 0 else None, sid=f's{i}')
          for i in range(120)]
  for i in range(5, 120, 10):   # missing images: dropped and counted under bad_input='skip'
    recs[i] = conv(('human', '<image>\nwhat is it?'), ('gpt', 'gone'), image='missing.jpg',
                   sid=f'missing{i}')
  path = write_json(str(tmp_path / 'train.json'), recs)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = load_config(os.path.join(root, 'configs', 'demo.py'), {
      'model.llm.depth': 1, 'model.vision.depth': 1, 'data.source': 'llava_json',
      'data.train_files': path, 'data.image_root': str(tmp_path / 'images'),
      'data.eval_fraction': 0.1, 'data.max_len': 48, 'data.max_images': 1,
      'train.stages': 'sft', 'sft.steps': 8, 'sft.batch_size': 8, 'sft.optim.lr': 3e-3,
      'sft.optim.warmup_ratio': 0.0, 'train.log_every': 1, 'train.checkpoint_every': 100,
      'train.eval_examples': 8, 'train.eval_batch_size': 8, 'train.progress_bar': False,
      'data.bad_input': 'skip'})
  out = loop.run(config, str(tmp_path / 'work'))
  with open(tmp_path / 'work' / 'metrics.jsonl') as f:
    lines = list(map(json.loads, f))
  losses = [m['loss'] for m in lines if 'loss' in m]
  # ~1 in 10 records has no image; counts are per window of 8 batches read (64 samples, the
  # second window wraps into the next epoch, where the same records are dropped again)
  skipped = [m['data/skipped_bad_image'] for m in lines if 'data/skipped_bad_image' in m]
  assert len(skipped) == 8 and skipped == sorted(skipped) and 0 < skipped[0] <= 12
  assert len(losses) == 8 and np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2])
  assert np.isfinite(out['eval/loss'])


# ---- several processes ------------------------------------------------------------------------

WORKER = r'''
import json, sys
import jax
import numpy as np
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from mllm_jax.data import pipeline, tokenizer as tok_lib
tok = tok_lib.load_tokenizer(sys.argv[3])
cfg = pipeline.PipelineConfig(kind='conversation', max_len=96, buckets=tuple(range(24, 96, 4)),
                              max_images=2, image_size=16, num_image_tokens=4, bad_input='skip',
                              window=2)
task = pipeline.json_task(tok, cfg, 'train', [sys.argv[4]], image_root=sys.argv[5])
synced = task.train_iterator(8, 2)        # jax.process_index() / process_count()
own = pipeline.TrainIterator(task.dataset(4, jax.process_index(), 2), 2, 2, False)
out = []
for _ in range(6):
  a, b = next(synced), next(own)
  t = b['input_ids'].shape[-1]
  assert a.keys() == b.keys()
  for k in a:   # the same rows, only padded further
    if a[k].ndim >= 3 and k != 'pixel_values':
      np.testing.assert_array_equal(a[k][:, :, :t], b[k])
      fill = tok.pad_token_id if k == 'input_ids' else 0
      assert (a[k][:, :, t:] == fill).all()
    else:
      np.testing.assert_array_equal(a[k], b[k])
  out.append([a['input_ids'].shape[-1], t])
print('RESULT ' + json.dumps(out))
'''


def test_two_processes_agree_on_each_step_length(demo_dir, data, tmp_path):
  """jax.distributed with 2 CPU processes (gloo): each reads its own shard, and every step's
  bucket length is the longest either process chose (what a global batch needs)."""
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(PYTHONPATH=root + os.pathsep + env.get('PYTHONPATH', ''),
             TOKENIZERS_PARALLELISM='false')
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, f'localhost:{port}', str(i), demo_dir,
                             data[0], data[1]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.split('RESULT ')[1]))
  (s0, own0), (s1, own1) = (np.array(r).T for r in results)
  np.testing.assert_array_equal(s0, s1)
  np.testing.assert_array_equal(s0, np.maximum(own0, own1))
  assert (own0 != own1).any()    # the processes did choose differently
