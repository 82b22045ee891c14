"""LLaVA-NeXT (AnyRes) from files: the grain pipeline tiles each image as transformers'
LlavaNextImageProcessor does and expands its tag to the image's own token count (what
LlavaNextProcessor gives), so a batch from LLaVA JSON gives a tiny LLaVA-NeXT built in
transformers the same logits in our model as in transformers; packed rows keep each image's
tiles and size (the packed logits equal the unpacked ones); the training job trains one from
files (its loss falls), and its export's processor and greedy answer are the generate CLI's."""
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import mllm_jax
from data_files import conv, write_json
from mllm_jax.config import load_config
from mllm_jax.data import pipeline
from mllm_jax.data import tokenizer as tok_lib
from test_hf import VISION, assert_close, randomize
from test_pipeline_qformer import segments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINPOINTS = ((28, 56), (56, 28), (56, 56))   # 28 px tiles: grids of 1x2, 2x1, 2x2
SIZES = {'wide.png': (30, 50), 'tall.png': (60, 20), 'square.png': (28, 28),
         'big.png': (70, 90)}
RECS = [conv(('human', '<image>\nwhat is it?'), ('gpt', 'a red circle'), image='wide.png',
             sid='wide'),
        conv(('human', 'compare <image> and <image>'), ('gpt', 'same'),
             image=['tall.png', 'square.png'], sid='two'),
        conv(('human', 'hello'), ('gpt', 'hi'), sid='text_only'),
        conv(('human', '<image>\ndescribe it'), ('gpt', 'a blue square'), image='big.png',
             sid='big')]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return tok_lib.get_or_build_demo_tokenizer(str(tmp_path_factory.mktemp('tok') / 'tokenizer'))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  d = tmp_path_factory.mktemp('anyres')
  rng = np.random.RandomState(0)
  for name, hw in SIZES.items():
    Image.fromarray(rng.randint(0, 256, hw + (3,), dtype=np.uint8)).save(d / name)
  write_json(str(d / 'train.json'), [dict(r, id=f"{r['id']}-{i}") for i in range(4) for r in RECS])
  return d


@pytest.fixture(scope='module')
def llava_next(tok, tmp_path_factory):
  """A tiny LLaVA-NeXT built in transformers (CLIP tower on 28 px tiles of 14 px patches) over
  the demo tokenizer, saved and loaded: (its directory, transformers model, ours, params)."""
  torch.manual_seed(3)
  text = transformers.LlamaConfig(
      vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
      max_position_embeddings=256)
  hf = randomize(transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(
      vision_config=transformers.CLIPVisionConfig(**VISION), text_config=text,
      image_token_index=tok.convert_tokens_to_ids('<image>'), vision_feature_layer=-2,
      vision_feature_select_strategy='default', image_grid_pinpoints=[list(p) for p in PINPOINTS])))
  d = tmp_path_factory.mktemp('next') / 'hf'
  hf.save_pretrained(d)
  model, params = mllm_jax.load_hf(str(d))
  assert model.cfg.image_grid_pinpoints == PINPOINTS
  return str(d), hf, model, params


def cfg(**kw):
  d = dict(kind='conversation', max_len=128, max_images=2, image_size=28, image_norm='clip',
           image_grid_pinpoints=PINPOINTS, patch_size=14, bad_input='strict')
  d.update(kw)
  return pipeline.PipelineConfig(**d)


def test_tiles_sizes_and_tokens_are_llava_next_processors_and_so_are_the_logits(
    tok, root, llava_next):
  _, hf, model, params = llava_next
  task = pipeline.json_task(tok, cfg(), 'train', [str(root / 'train.json')],
                            image_root=str(root))
  b = task.batch(0, 4)
  assert b['pixel_values'].shape == (4, 2, 5, 28, 28, 3) and b['image_sizes'].shape == (4, 2, 2)
  proc = transformers.LlavaNextProcessor(
      image_processor=transformers.LlavaNextImageProcessorPil(
          size={'shortest_edge': 28}, crop_size={'height': 28, 'width': 28},
          image_grid_pinpoints=[list(p) for p in PINPOINTS]),
      tokenizer=tok, patch_size=14, vision_feature_select_strategy='default',
      num_additional_image_tokens=1)
  image_id = tok.convert_tokens_to_ids('<image>')
  flat_pixels, flat_sizes = [], []
  for r, rec in enumerate(RECS):
    names = rec.get('image', [])
    names = [names] if isinstance(names, str) else names
    want_tokens = 0
    for m, name in enumerate(names):
      pil = Image.open(root / name).convert('RGB')
      ref = proc(text='<image>', images=[pil], return_tensors='np')
      want_tokens += int((ref['input_ids'] == image_id).sum())
      tiles = ref['pixel_values'][0].transpose(0, 2, 3, 1)   # [tiles, H, W, 3]
      np.testing.assert_allclose(b['pixel_values'][r, m, :len(tiles)], tiles, atol=1e-5)
      assert not b['pixel_values'][r, m, len(tiles):].any()
      np.testing.assert_array_equal(b['image_sizes'][r, m], SIZES[name])
      flat_pixels.append(b['pixel_values'][r, m])
      flat_sizes.append(b['image_sizes'][r, m])
    assert (b['input_ids'][r] == image_id).sum() == want_tokens
    assert not b['image_sizes'][r, len(names):].any()
  # the text around the images is the chat template's, as for single-tile models
  assert tok.decode(b['input_ids'][0][b['loss_mask'][0] > 0]).startswith('a red circle')

  # transformers' model on the same ids, with the images as its processor lays them out
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(b['input_ids'].astype(np.int64)),
             attention_mask=torch.tensor(b['attention_mask']),
             pixel_values=torch.tensor(np.stack(flat_pixels).transpose(0, 1, 4, 2, 3)),
             image_sizes=torch.tensor(np.stack(flat_sizes).astype(np.int64))).logits.numpy()
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, **x))
  keys = ('input_ids', 'attention_mask', 'pixel_values', 'image_sizes')
  assert_close(fwd(params, {k: b[k] for k in keys}), ref, b['attention_mask'])


def test_packed_rows_keep_each_images_tiles_and_size(tok, root, llava_next):
  """Packed rows: each sample's logits equal its logits run alone (image slots carry their own
  tiles and sizes, and the per-image token counts line up with them)."""
  _, _, model, params = llava_next
  path = [str(root / 'train.json')]
  packed_task = pipeline.json_task(tok, cfg(packing=True, window=1, max_images=3), 'train', path,
                                   image_root=str(root))
  it = pipeline.TrainIterator(packed_task.dataset(2, repeat=False), 1, 2, False)
  packed = [{k: v[0] for k, v in x.items()} for x in it]
  alone = pipeline.json_task(tok, cfg(max_images=3), 'train', path,
                             image_root=str(root)).batch(0, 4)
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, **x))
  keys = ('input_ids', 'attention_mask', 'pixel_values', 'image_sizes')
  ref = np.asarray(fwd(params, {k: alone[k] for k in keys}))
  n_alone = alone['attention_mask'].sum(1)
  found, multi = [], 0
  for b in packed:
    got = np.asarray(fwd(params, {k: b[k] for k in keys + ('segment_ids', 'positions')}))
    for r in range(len(b['input_ids'])):
      segs = segments(b, r)
      multi += len(segs) > 1
      for _, start, n in segs:
        ids = b['input_ids'][r, start:start + n]
        match = [u for u in range(4) if n == n_alone[u] and
                 np.array_equal(ids, alone['input_ids'][u, :n])]
        assert len(match) == 1
        found.append(match[0])
        assert_close(got[r, start:start + n], ref[match[0], :n])
  assert sorted(found) == sorted(list(range(4)) * 4) and multi > 0

  # Multi-host: a process whose bucket is shorter pads its packed rows to the longest one
  # (`pipeline.pad_tokens`); the logits of the real tokens stay, the images are untouched.
  b = packed[0]
  t = b['input_ids'].shape[1]
  longer = pipeline.pad_tokens(b, t + 16, tok.pad_token_id)
  assert longer['input_ids'].shape[1] == t + 16 and longer['segment_ids'][:, t:].max() == 0
  for k in ('pixel_values', 'image_sizes'):
    np.testing.assert_array_equal(longer[k], b[k])
  ks = keys + ('segment_ids', 'positions')
  assert_close(np.asarray(fwd(params, {k: longer[k] for k in ks}))[:, :t],
               np.asarray(fwd(params, {k: b[k] for k in ks})), b['attention_mask'])
  # image slots, sizes and Q-Former instructions keep their shape even as long as the tokens
  odd = {'input_ids': np.ones((2, 3), np.int32), 'loss_mask': np.ones((2, 3), np.float32),
         'pixel_values': np.ones((2, 3, 4, 4, 3), np.float32),
         'image_sizes': np.ones((2, 3, 2), np.int32),
         'qformer_input_ids': np.ones((2, 3, 3), np.int32),
         'qformer_attention_mask': np.ones((2, 3, 3), np.int32)}
  out = pipeline.pad_tokens(odd, 5, 7)
  assert out['input_ids'].tolist() == [[1, 1, 1, 7, 7]] * 2
  assert out['loss_mask'].tolist() == [[1, 1, 1, 0, 0]] * 2
  assert all(out[k].shape == odd[k].shape for k in odd if k not in ('input_ids', 'loss_mask'))


def test_grain_workers_and_length_buckets_carry_the_tiles(tok, root):
  """The training stream with a grain worker process and length buckets: every row is a
  sample's in-process ids, tiles and size, padded to the smallest bucket that fits the batch
  (the records' lengths 12, 32, 46, 47 fall in three buckets)."""
  path = [str(root / 'train.json')]
  buckets = (24, 40, 96)
  task = pipeline.json_task(tok, cfg(workers=1, buckets=buckets, max_images=2), 'train',
                            path, image_root=str(root))
  ref = task.batch(0, 16)
  n_ref = ref['attention_mask'].sum(1)
  it = task.train_iterator(4, 1, 0, 1)
  try:
    batches = [{k: v[0] for k, v in next(it).items()} for _ in range(6)]
  finally:
    it.close()
  seen, lengths = [], set()
  for b in batches:
    t = b['input_ids'].shape[1]
    n = b['attention_mask'].sum(1)
    assert t == min(x for x in buckets + (128,) if x >= n.max())   # the smallest bucket
    lengths.add(t)
    for r in range(4):
      match = [u for u in range(16) if n_ref[u] == n[r] and
               np.array_equal(ref['input_ids'][u, :n[r]], b['input_ids'][r, :n[r]])]
      assert match, r
      u = match[0]
      seen.append(ref['input_ids'][u, :n[r]].tobytes())
      for key in ('pixel_values', 'image_sizes'):
        np.testing.assert_array_equal(b[key][r], ref[key][u], err_msg=key)
  assert len(seen) == 24 and len(set(seen)) > 1 and len(lengths) > 1   # several buckets


def test_training_job_trains_llava_next_from_files(tok, root, llava_next, tmp_path):
  """`mllm_jax.train` from the HF LLaVA-NeXT directory on LLaVA JSON (packed): the loss falls."""
  import json
  from mllm_jax.train import loop
  d, _, _, _ = llava_next
  tok.save_pretrained(str(tmp_path / 'tok'))
  over = {'model.init_from': d, 'data.tokenizer': str(tmp_path / 'tok'),
          'data.source': 'llava_json', 'data.train_files': str(root / 'train.json'),
          'data.image_root': str(root), 'data.max_len': 128, 'data.max_images': 3,
          'data.packing': True, 'data.eval_fraction': 0.25,
          'model.image_grid_pinpoints': '28x56,56x28,56x56',
          'train.stages': 'sft', 'sft.steps': 30, 'sft.batch_size': 8, 'sft.optim.lr': 1e-2,
          'sft.optim.warmup_ratio': 0.0, 'train.log_every': 1, 'train.eval_examples': 8,
          'train.eval_batch_size': 8, 'train.progress_bar': False}
  for k, v in mllm_jax.hf.pretrained.config_overrides(d, 'llm').items():
    over[k] = v
  for k, v in mllm_jax.hf.pretrained.config_overrides(d, 'vision').items():
    over[k] = v
  config = load_config(os.path.join(ROOT, 'configs', 'demo.py'), over)
  loop.run(config, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    losses = [json.loads(x)['loss'] for x in f if '"loss"' in x]
  assert len(losses) == 30 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses

  # The run exported with `convert --to-hf`: transformers' LlavaNextProcessor tiles as the
  # pipeline and the generate CLI do, and transformers' greedy answer on the export is the
  # CLI's answer from the run (image tags expanded to each image's own count).
  import contextlib
  import io
  from mllm_jax import convert, generate as gen
  from mllm_jax.data import tokenizer as tl
  convert.main(['--to-hf', str(tmp_path / 'run'), '--out', str(tmp_path / 'hf')])
  proc = transformers.AutoProcessor.from_pretrained(tmp_path / 'hf')
  assert type(proc).__name__ == 'LlavaNextProcessor'
  files = [str(root / 'wide.png'), str(root / 'big.png')]
  pics = [Image.open(f).convert('RGB') for f in files]
  cli_proc = gen.load_for_generation(checkpoint=str(tmp_path / 'run'))[3]
  train_proc = pipeline.Preprocess(tok, cfg()).processor
  exported = proc.image_processor(pics, return_tensors='np')
  for i, pic in enumerate(pics):
    tiles = exported['pixel_values'][i].transpose(0, 2, 3, 1)
    want = train_proc.preprocess(pic)
    np.testing.assert_allclose(tiles[:len(want)], want, atol=1e-5)
    np.testing.assert_allclose(cli_proc([pic])['pixel_values'][0], want, atol=1e-6)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    gen.main(['--checkpoint', str(tmp_path / 'run'), '--image', files[0], '--image', files[1],
              '--prompt', 'compare them', '--max-new-tokens', '8'])
  text = proc.tokenizer.apply_chat_template(
      [{'role': 'user', 'content': '<image>\n<image>\ncompare them'}], tokenize=False,
      add_generation_prompt=True)
  ref_in = proc(text=[text], images=pics, return_tensors='pt', add_special_tokens=False)
  hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path / 'hf').eval()
  with torch.no_grad():
    ref = hf.generate(**ref_in, max_new_tokens=8, do_sample=False,
                      eos_token_id=tl.stop_token_ids(proc.tokenizer), pad_token_id=0)
  ref = ref[0, ref_in['input_ids'].shape[1]:]
  assert len(ref) > 1 and out.getvalue().strip() == proc.tokenizer.decode(
      ref, skip_special_tokens=True).strip(), (out.getvalue(), ref)


def test_preference_pairs_share_the_images_tiles_and_size(tok, root, llava_next, tmp_path):
  """A DPO batch: chosen and rejected expand the image to the same count (the processor's), and
  the pair's tiles and size reach both sides of the DPO forward (`dpo.SHARED`): each side's
  summed log-prob equals the model's on that side alone."""
  import jax.numpy as jnp
  from mllm_jax.train import dpo
  _, _, model, params = llava_next
  path = write_json(str(tmp_path / 'p.json'), [
      {'id': 'p0', 'prompt': '<image>\nwhat is it?', 'chosen': 'a red circle',
       'rejected': 'a blue square', 'images': ['tall.png']}])
  b = pipeline.json_task(tok, cfg(kind='preference', max_images=1), 'train', [path],
                         image_root=str(root)).batch(0, 1)
  image_id = tok.convert_tokens_to_ids('<image>')
  n = [(b[f'{s}_input_ids'][0] == image_id).sum() for s in ('chosen', 'rejected')]
  assert n[0] == n[1] > 0 and tuple(b['image_sizes'][0, 0]) == SIZES['tall.png']
  both = dpo.concat_sides({k: jnp.asarray(v) for k, v in b.items()})
  logps, _ = dpo.completion_logps(model, params, both)
  for i, side in enumerate(('chosen', 'rejected')):
    logits = model.apply({'params': params}, b[f'{side}_input_ids'], b['pixel_values'],
                         b[f'{side}_attention_mask'], image_sizes=b['image_sizes'])
    lp = jax.nn.log_softmax(logits[0, :-1], -1)
    ids, mask = b[f'{side}_input_ids'][0, 1:], b[f'{side}_loss_mask'][0, 1:]
    want = float((np.take_along_axis(np.asarray(lp), ids[:, None], -1)[:, 0] * mask).sum())
    np.testing.assert_allclose(float(logps[i]), want, rtol=1e-5)
