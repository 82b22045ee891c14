"""Generation: greedy decoding equals transformers' `generate`, sampling warpers, VCD check
values, 1 vs 8 devices, bad-input errors, and the CLI on an HF directory."""
import dataclasses
import io
import contextlib
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import mllm_jax
from mllm_jax import generate as gen
from mllm_jax import sharding as shd
from mllm_jax.train import steps
from test_hf import IMAGE_ID, build_llava, images, tokenizer  # noqa: F401 (fixture)

PROMPTS = ['USER : <image> describe the picture ASSISTANT :',
           'USER : <image> what is it ? ASSISTANT :',
           'USER : what is it ? ASSISTANT :']


@pytest.fixture(scope='module')
def llava(tmp_path_factory, tokenizer):
  """A tiny random LLaVA saved in HF format with tokenizer + processor, loaded both ways."""
  path = tmp_path_factory.mktemp('llava')
  hf = build_llava()
  hf.generation_config.pad_token_id = 0
  hf.save_pretrained(path)
  tokenizer.padding_side = 'left'
  proc = transformers.LlavaProcessor(
      image_processor=transformers.CLIPImageProcessorPil(
          size={'shortest_edge': 28}, crop_size={'height': 28, 'width': 28}),
      tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy='default',
      num_additional_image_tokens=1)
  proc.save_pretrained(path)
  inputs = dict(proc(text=PROMPTS, images=images((40, 30), (28, 28)), return_tensors='np',
                     padding=True))
  model, params = mllm_jax.load_hf(str(path))
  return hf, model, params, inputs, path


def generate_hlo(model, params, inputs, **kw):
  """The compiled text of the program `generate(model, params, inputs..., **kw)` runs, with
  the packed weights it is given (the packer's program is separate)."""
  compiled, real = [], gen._compiled
  try:
    gen._compiled = lambda m, **static: compiled.append(real(m, **static)) or compiled[-1]
    gen.generate(model, params, inputs['input_ids'], inputs['attention_mask'],
                 inputs['pixel_values'], **kw)
  finally:
    gen._compiled = real
  packed = gen._packer(model)(params)
  return compiled[-1].lower(params, packed, *(jnp.asarray(inputs[k]) for k in (
      'input_ids', 'attention_mask')), jnp.asarray(inputs['pixel_values'], jnp.float32),
                            jax.random.key(0), {}).compile().as_text()


def hf_generate(hf, inputs, n, eos=None):
  with torch.no_grad():
    out = hf.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, max_new_tokens=n,
                      do_sample=False, eos_token_id=eos, pad_token_id=0)
  return out[:, inputs['input_ids'].shape[1]:].numpy()


def test_greedy_equals_transformers_generate_with_images_and_left_padding(llava):
  hf, model, params, inputs, _ = llava
  assert inputs['attention_mask'][:, 0].min() == 0           # left padding is exercised
  ours = gen.generate(model, params, inputs['input_ids'], inputs['attention_mask'],
                      inputs['pixel_values'], max_new_tokens=12)
  np.testing.assert_array_equal(np.asarray(ours), hf_generate(hf, inputs, 12))
  # mllm_jax.generate is the same function (the module is callable)
  np.testing.assert_array_equal(np.asarray(mllm_jax.generate(
      model, params, inputs['input_ids'], inputs['attention_mask'], inputs['pixel_values'],
      max_new_tokens=12)), np.asarray(ours))


def test_scanned_and_unrolled_layer_loops_agree(llava):
  """The CPU decode path (per-layer weights and caches, with the CPU decode kernels where
  they build: `decode_kernel='auto'`) and the scanned one (TPU/GPU, XLA's dots) must give the
  same tokens, greedy and sampled."""
  _, model, params, inputs, _ = llava
  args = (model, params, inputs['input_ids'], inputs['attention_mask'], inputs['pixel_values'])
  for kw in (dict(), dict(temperature=1.0, top_k=20, seed=3)):
    scan = np.asarray(gen.generate(*args, max_new_tokens=10, layer_loop='scan', **kw))
    unrolled = np.asarray(gen.generate(*args, max_new_tokens=10, layer_loop='unrolled', **kw))
    np.testing.assert_array_equal(scan, unrolled)
  with pytest.raises(ValueError, match='layer_loop'):
    gen.generate(*args, max_new_tokens=2, layer_loop='loop')


def test_bf16_decode_kernels_give_the_tokens_of_the_scanned_xla_loop(llava):
  """bf16 on CPU: the unrolled loop with the decode kernels (bf16 panels and attention, the
  in-place cache write carried through the loop, the greedy kernel) and the prefill on the
  unrolled layers gives the tokens of the scanned loop on XLA's ops, with left padding and
  images (the vision tower unrolled in both: bf16 rounds its scanned and unrolled loops
  differently); and the compiled program holds no fp32 copy of the LLM's or the vision tower's
  stacked weights or of the vocabulary (XLA:CPU's bf16 dynamic slices and gathers make them:
  layers.take_rows; `generate` unrolls a bf16 vision tower, `_vision_loop`)."""
  _, _, _, inputs, path = llava
  model, params = mllm_jax.load_hf(str(path), dtype=jnp.bfloat16)
  assert gen._decode_kernel(model, params, 'unrolled', 'auto') == 'packed'
  assert gen._vision_loop(model, 'unrolled').cfg.vision_layer_loop == 'unrolled'
  assert gen._vision_loop(model, 'scan') is model
  unrolled_tower = type(model)(dataclasses.replace(model.cfg, vision_layer_loop='unrolled'))
  args = (params, inputs['input_ids'], inputs['attention_mask'], inputs['pixel_values'])
  scan = np.asarray(gen.generate(unrolled_tower, *args, max_new_tokens=12, layer_loop='scan'))
  kernels = np.asarray(gen.generate(model, *args, max_new_tokens=12, layer_loop='unrolled'))
  np.testing.assert_array_equal(kernels, scan)
  assert len(np.unique(scan)) > 3                    # not one token repeated
  hlo = generate_hlo(model, params, inputs, max_new_tokens=12, layer_loop='unrolled')
  packer_hlo = gen._packer(model).lower(params).compile().as_text()   # its own program
  llm = params['llm']
  stacked = [x.shape for x in jax.tree.leaves(llm['layers']) if x.ndim > 2]
  vision = [x.shape for x in jax.tree.leaves(params['vision']['layers']) if x.ndim > 2]
  for shape in stacked + vision + [llm['embed_tokens']['embedding'].shape]:   # materialised:
    # an instruction of that shape on program values (inside a fusion, operands are its %param_N)
    dims = ','.join(map(str, shape))
    for program in (hlo, packer_hlo):
      assert not re.search(rf'= f32\[{dims}\]\{{[0-9,]*\}} \w+\((?!%param_\d)', program), shape


def test_stop_tokens_pad_the_rest(llava):
  _, model, params, inputs, _ = llava
  free = np.asarray(gen.generate(model, params, inputs['input_ids'], inputs['attention_mask'],
                                 inputs['pixel_values'], max_new_tokens=8))
  stop = int(free[0, 2])                      # row 0's third token becomes a stop token
  out = np.asarray(gen.generate(model, params, inputs['input_ids'], inputs['attention_mask'],
                                inputs['pixel_values'], max_new_tokens=8, stop_tokens=(stop,),
                                pad_token_id=-1))
  for row, ref in zip(out, free):
    hit = np.flatnonzero(ref == stop)
    end = hit[0] + 1 if hit.size else len(ref)
    np.testing.assert_array_equal(row[:end], ref[:end])
    assert (row[end:] == -1).all()


def test_shorter_runs_are_prefixes_and_the_last_token_takes_no_decode_step(llava):
  """Token i comes from the logits after token i - 1, so the loop runs max_new_tokens - 1
  decode steps: a run of n tokens is the first n of a longer run (greedy and sampled, same
  seed), and with max_new_tokens=1 the compiled program holds no decode step at all."""
  _, model, params, inputs, _ = llava
  args = (model, params, inputs['input_ids'], inputs['attention_mask'], inputs['pixel_values'])
  for kw in (dict(), dict(temperature=1.0, top_k=20, seed=3)):
    long = np.asarray(gen.generate(*args, max_new_tokens=7, **kw))
    for n in (1, 2, 4):
      np.testing.assert_array_equal(np.asarray(gen.generate(*args, max_new_tokens=n, **kw)),
                                    long[:, :n])
  program = lambda n: generate_hlo(model, params, inputs, max_new_tokens=n)
  assert gen._decode_kernel(model, params, 'unrolled', 'auto') == 'packed'
  # every layer writes its keys and values once in the prefill, and once in the decode step
  writes = lambda hlo: hlo.count('custom_call_target="mllm_jax_cache_write"')
  depth = model.cfg.llm.depth
  assert writes(program(2)) == 4 * depth                # the prefill, and the step of token 0
  assert writes(program(1)) == 2 * depth                # the prefill only


def test_packed_weights_are_kept_for_the_same_params_only(llava, monkeypatch):
  """generate packs the LLM's weights for the CPU decode kernels once per params: a second call
  with the same arrays reuses them, other params (same shapes, other values) are packed anew
  and give their own tokens, keep_packed=False keeps nothing, the kept copy goes when the params
  are collected, and numpy params are never kept (they could change in place)."""
  import gc
  _, model, params, inputs, _ = llava
  packs = []
  real = gen._packer
  monkeypatch.setattr(gen, '_packer', lambda m: packs.append(m) or real(m))
  gen.release_packed()
  run = lambda p, **kw: np.asarray(gen.generate(
      model, p, inputs['input_ids'], inputs['attention_mask'], inputs['pixel_values'],
      max_new_tokens=6, **kw))
  first = run(params)
  assert len(packs) == 1 and gen._kept_packed.entry is not None
  np.testing.assert_array_equal(run(params), first)
  assert len(packs) == 1                                # reused
  other = jax.tree.map(lambda x: x * 1.5, params)       # new arrays, new values
  theirs = run(other)
  assert len(packs) == 2
  assert not np.array_equal(theirs, first)
  np.testing.assert_array_equal(theirs, run(other, keep_packed=False))   # packed afresh
  assert len(packs) == 3 and gen._kept_packed.entry is None
  run(other)
  assert len(packs) == 4 and gen._kept_packed.entry is not None
  del other
  gc.collect()
  assert gen._kept_packed.entry is None                 # the params went, so did their copy
  host = jax.tree.map(np.asarray, params)
  np.testing.assert_array_equal(run(host), first)
  assert len(packs) == 5 and gen._kept_packed.entry is None
  np.testing.assert_array_equal(run(params), first)
  assert len(packs) == 6 and gen._kept_packed.entry is not None
  gen.release_packed()
  assert gen._kept_packed.entry is None


def test_sampling_warpers():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  draw = lambda **kw: np.asarray(gen.sample_token(logits, jax.random.key(0), **kw))
  freq = np.bincount(draw(temperature=1.0, top_k=0, top_p=1.0), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  assert set(draw(temperature=1.0, top_k=2, top_p=1.0)) == {0, 1}
  # top-p 0.7: the best tokens whose preceding mass is < 0.7 stay (0.5 and 0.3)
  freq = np.bincount(draw(temperature=1.0, top_k=0, top_p=0.7), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)
  assert set(draw(temperature=1.0, top_k=0, top_p=0.01)) == {0}   # the best token always stays
  assert set(draw(temperature=0.0, top_k=0, top_p=1.0)) == {0}


def test_greedy_token_is_argmax_including_ties():
  rng = np.random.RandomState(0)
  logits = rng.randn(64, 1000).astype(np.float32)
  logits[:16, 500] = logits[:16, 900] = logits[:16].max(-1) + 1   # ties: the first index wins
  logits[16:32] = np.round(logits[16:32])                          # many ties
  np.testing.assert_array_equal(np.asarray(gen.greedy_token(jnp.asarray(logits))),
                                np.argmax(logits, -1))


def test_sampling_is_seeded(llava):
  _, model, params, inputs, _ = llava
  run = lambda seed: np.asarray(gen.generate(
      model, params, inputs['input_ids'], inputs['attention_mask'], inputs['pixel_values'],
      max_new_tokens=10, temperature=1.5, seed=seed))
  np.testing.assert_array_equal(run(3), run(3))
  assert not np.array_equal(run(3), run(4))


def test_vcd_check_values():
  l, l_noised = jnp.array([[2.0, 1.0, 0.0]]), jnp.array([[1.0, 1.0, 1.0]])
  np.testing.assert_allclose(gen.vcd_logits(l, l_noised, 1.0, 0.1), [[3.0, 1.0, -1.0]])
  np.testing.assert_array_equal(gen.vcd_logits(l, l_noised, 1.0, 0.5),
                                [[3.0, -np.inf, -np.inf]])


def test_vcd_decoding_uses_the_noised_branch(llava):
  _, model, params, inputs, _ = llava
  args = (model, params, inputs['input_ids'][:2], inputs['attention_mask'][:2],
          inputs['pixel_values'][:2])
  plain = np.asarray(gen.generate(*args, max_new_tokens=6))
  # beta -> 0 and alpha -> 0: VCD reduces to greedy decoding on the clean image
  np.testing.assert_array_equal(np.asarray(gen.generate(
      *args, max_new_tokens=6, vcd_alpha=1e-6, vcd_beta=1e-9)), plain)
  # a strong contrast changes the first token to argmax((1+a) l(v) - a l(v')) over the
  # plausible set, computed here from two separate forwards
  a, b = 3.0, 0.01
  out = np.asarray(gen.generate(*args, max_new_tokens=1, vcd_alpha=a, vcd_beta=b, seed=5))
  _, noise_rng = jax.random.split(jax.random.key(5))
  noised = gen.diffusion_noise(jnp.asarray(inputs['pixel_values'][:2]), noise_rng, 500)
  fwd = lambda px: model.apply({'params': params}, inputs['input_ids'][:2], px,
                               inputs['attention_mask'][:2], jnp.maximum(jnp.cumsum(
                                   inputs['attention_mask'][:2], -1) - 1, 0))[:, -1]
  ref = jnp.argmax(gen.vcd_logits(fwd(inputs['pixel_values'][:2]), fwd(noised), a, b), -1)
  np.testing.assert_array_equal(out[:, 0], np.asarray(ref))


def test_same_tokens_on_1_and_8_devices(llava):
  _, model, params, inputs, _ = llava
  one = np.asarray(gen.generate(model, params, inputs['input_ids'], inputs['attention_mask'],
                                inputs['pixel_values'], max_new_tokens=6))
  mesh = shd.make_mesh({'fsdp': 2, 'tensor': 2, 'data': 2})
  rules = shd.logical_rules('fsdp_tp')
  factory = steps.StateFactory(model, mesh, rules)
  sharded = jax.device_put(params, factory.param_shardings)
  assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    eight = gen.generate(model, sharded, inputs['input_ids'][:2], inputs['attention_mask'][:2],
                         inputs['pixel_values'][:2], max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(eight), one[:2])


def test_bad_inputs_are_clear_errors(llava):
  _, model, params, inputs, _ = llava
  ids, mask, px = inputs['input_ids'], inputs['attention_mask'], inputs['pixel_values']
  with pytest.raises(ValueError, match='does not fit the KV cache'):
    gen.generate(model, params, ids, mask, px, max_new_tokens=8, cache_len=ids.shape[1] + 4)
  with pytest.raises(ValueError, match='image tags must match'):
    gen.generate(model, params, ids, mask, px[:1], max_new_tokens=2)    # 2 tags, 1 image
  with pytest.raises(ValueError, match='no pixel_values'):
    gen.generate(model, params, ids, mask, None, max_new_tokens=2)
  with pytest.raises(ValueError, match='LEFT-padded'):
    gen.generate(model, params, ids[:, ::-1], mask[:, ::-1], px, max_new_tokens=2)


def test_cli_on_an_hf_directory_prints_the_greedy_answer(llava, tmp_path):
  hf, model, params, inputs, path = llava
  img = tmp_path / 'img.png'
  images((40, 30))[0].save(img)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    gen.main(['--hf', str(path), '--image', str(img), '--prompt', 'describe the picture',
              '--max-new-tokens', '5'])
  # the same request through transformers: processor + generate + decode
  proc = transformers.AutoProcessor.from_pretrained(path)
  tok = proc.tokenizer
  text = '<image>\ndescribe the picture'   # the test tokenizer has no chat template
  ref_in = dict(proc(text=[text], images=images((40, 30)), return_tensors='np'))
  ref = hf_generate(hf, ref_in, 5, eos=tok.eos_token_id)
  assert out.getvalue().strip() == tok.decode(ref[0], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_run_export_and_cli_preprocess_images_like_the_runs_training_data(tmp_path):
  """A run with image_norm='siglip' (square resize) and pad_to_square: `convert --to-hf`'s
  processor (transformers' LlavaImageProcessor) and the generate CLI's `--checkpoint`
  preprocessing give the training pipeline's pixels for non-square images; the norm and the
  padding are what the run, its export and the export converted back to a params checkpoint
  record, and the CLI on that params checkpoint (with --tokenizer) pads too."""
  import os
  from PIL import Image
  from mllm_jax import convert
  from mllm_jax.config import load_config
  from mllm_jax.data import pipeline
  from mllm_jax.train import loop
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  over = {'model.llm.depth': 1, 'model.llm.hidden': 32, 'model.llm.mlp_dim': 64,
          'model.llm.heads': 2, 'model.llm.kv_heads': 1, 'model.vision.depth': 1,
          'model.vision.width': 32, 'model.vision.heads': 2, 'model.vision.mlp_dim': 64,
          'train.stages': 'sft', 'sft.steps': 1, 'sft.batch_size': 8, 'train.eval_examples': 8,
          'train.eval_batch_size': 8, 'train.progress_bar': False, 'data.image_norm': 'siglip',
          'data.pad_to_square': True}
  config = load_config(os.path.join(root, 'configs', 'demo.py'), over)
  loop.run(config, str(tmp_path / 'run'))
  convert.main(['--to-hf', str(tmp_path / 'run'), '--out', str(tmp_path / 'hf')])
  pics = [Image.fromarray(np.random.RandomState(i).randint(0, 255, s + (3,), dtype=np.uint8))
          for i, s in enumerate(((40, 30), (20, 50)))]
  side = config.model.vision.image_size
  train = pipeline.Preprocess(
      transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf'),
      pipeline.PipelineConfig(image_norm='siglip', pad_to_square=True, image_size=side,
                              num_image_tokens=4)).processor
  want = np.stack([train.preprocess(p) for p in pics])
  assert want.shape == (2, side, side, 3)
  proc = transformers.AutoProcessor.from_pretrained(tmp_path / 'hf')
  got = proc.image_processor(pics, return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, atol=1e-5)
  cli = gen.load_for_generation(checkpoint=str(tmp_path / 'run'))[3]
  np.testing.assert_allclose(cli(pics)['pixel_values'], want, atol=1e-6)
  # the norm travels with the weights: the run, its export, and the export converted back
  from mllm_jax.hf import pretrained
  convert.main(['--from-hf', str(tmp_path / 'hf'), '--out', str(tmp_path / 'ck')])
  assert [pretrained.saved_image_norm(str(tmp_path / d)) for d in ('run', 'hf', 'ck')] == [
      'siglip'] * 3
  assert [pretrained.saved_pad_to_square(str(tmp_path / d)) for d in ('run', 'hf', 'ck')] == [
      True] * 3
  with pytest.raises(ValueError, match='--tokenizer DIR'):   # a params checkpoint has none
    gen.load_for_generation(checkpoint=str(tmp_path / 'ck'))
  cli = gen.load_for_generation(checkpoint=str(tmp_path / 'ck'), tokenizer=str(tmp_path / 'hf'))
  np.testing.assert_allclose(cli[3](pics)['pixel_values'], want, atol=1e-6)
