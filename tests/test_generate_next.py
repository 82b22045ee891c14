"""LLaVA-NeXT (AnyRes) generation: greedy tokens equal transformers' `generate` for images of
different sizes (flat and per-sample layouts, left padding), VCD's noised branch over tiles,
clear errors for missing sizes / wrong token counts / too few tiles, and the CLI on an HF
directory against transformers' processor + generate."""
import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mllm_jax import generate as gen
from mllm_jax.hf import api
from mllm_jax.models import layers as L
from test_generate import hf_generate
from test_hf import (IMAGE_ID, PINPOINTS, build_llava, images, llava_next_processor,
                     tokenizer)  # noqa: F401 (fixture)
PROMPTS = ['USER : <image> <image> compare ASSISTANT :',
           'USER : <image> describe the picture ASSISTANT :',
           'USER : what is it ? ASSISTANT :']
SIZES = [(30, 50), (60, 20), (70, 90)]          # wide, tall, big (2x2 grid)


@pytest.fixture(scope='module')
def llava_next(tmp_path_factory, tokenizer):
  """A tiny random LLaVA-NeXT saved in HF format with tokenizer + processor, loaded both ways,
  and left-padded processor inputs for PROMPTS (images of SIZES)."""
  path = tmp_path_factory.mktemp('llava_next')
  hf = build_llava(pinpoints=PINPOINTS)
  hf.generation_config.pad_token_id = 0
  hf.save_pretrained(path)
  tokenizer.padding_side = 'left'
  proc = llava_next_processor(tokenizer)
  proc.save_pretrained(path)
  inputs = dict(proc(text=PROMPTS, images=images(*SIZES), return_tensors='np', padding=True))
  model, params = api.load_hf(str(path))
  return hf, model, params, inputs, path


def ours(model, params, inputs, **kw):
  return np.asarray(gen.generate(model, params, inputs['input_ids'], inputs['attention_mask'],
                                 to_nhwc(inputs['pixel_values']),
                                 image_sizes=inputs['image_sizes'], **kw))


def to_nhwc(pv):
  return np.moveaxis(pv, -3, -1)


def per_sample(inputs):
  """Flat [N, tiles, ...] + [N, 2] -> slots [B, 2, tiles, ...] + [B, 2, 2] (empty: 0 x 0)."""
  pv, sz = inputs['pixel_values'], inputs['image_sizes']
  slots = np.zeros((3, 2) + pv.shape[1:], pv.dtype)
  slot_sizes = np.zeros((3, 2, 2), sz.dtype)
  for (b, m), i in {(0, 0): 0, (0, 1): 1, (1, 0): 2}.items():
    slots[b, m], slot_sizes[b, m] = pv[i], sz[i]
  return dict(inputs, pixel_values=slots, image_sizes=slot_sizes)


def test_greedy_equals_transformers_generate_for_images_of_different_sizes(llava_next):
  hf, model, params, inputs, _ = llava_next
  assert inputs['attention_mask'][:, 0].min() == 0             # left padding is exercised
  counts = gen.image_token_counts(model, inputs['image_sizes'])
  assert len(set(counts.tolist())) == 3                         # three different token counts
  n_image = (inputs['input_ids'] == IMAGE_ID).sum(1)
  assert n_image.tolist() == [counts[0] + counts[1], counts[2], 0]   # the processor's counts
  ref = hf_generate(hf, inputs, 10)
  np.testing.assert_array_equal(ours(model, params, inputs, max_new_tokens=10), ref)
  # per-sample image slots (an empty slot has size 0 x 0), and the scanned layer loop
  np.testing.assert_array_equal(ours(model, params, per_sample(inputs), max_new_tokens=10), ref)
  np.testing.assert_array_equal(
      ours(model, params, inputs, max_new_tokens=10, layer_loop='scan'), ref)


def test_bf16_kernels_on_a_prefill_longer_than_the_decode_attention_limit(llava_next):
  """These prompts (35 tokens) are prefilled with the CPU kernels' dense layers and cache
  write but XLA's attention (over layers.DECODE_ATTENTION_MAX_TOKENS new tokens); in bf16 the
  unrolled loop with the kernels gives the tokens of the scanned loop on XLA's ops (with the
  vision tower unrolled in both, as generate runs it for bf16)."""
  _, _, _, inputs, path = llava_next
  assert inputs['input_ids'].shape[1] > L.DECODE_ATTENTION_MAX_TOKENS
  model, params = api.load_hf(str(path), dtype=jnp.bfloat16)
  assert gen._decode_kernel(model, params, 'unrolled', 'auto') == 'packed'
  tower = type(model)(dataclasses.replace(model.cfg, vision_layer_loop='unrolled'))
  scan = ours(tower, params, inputs, max_new_tokens=10, layer_loop='scan')
  np.testing.assert_array_equal(ours(model, params, inputs, max_new_tokens=10), scan)
  assert len(np.unique(scan)) > 3


def test_vcd_noises_the_tiles_and_keeps_the_sizes(llava_next):
  """The first VCD token is argmax((1+a) l(v) - a l(v')) over the plausible set, with v' the
  noised tiles of the same image sizes, computed here from two separate forwards."""
  _, model, params, inputs, _ = llava_next
  a, b = 3.0, 0.01
  out = ours(model, params, inputs, max_new_tokens=1, vcd_alpha=a, vcd_beta=b, seed=5)
  px = jnp.asarray(to_nhwc(inputs['pixel_values']), jnp.float32)
  _, noise_rng = jax.random.split(jax.random.key(5))
  noised = gen.diffusion_noise(px, noise_rng, 500)
  mask = inputs['attention_mask']
  fwd = lambda pv: model.apply({'params': params}, inputs['input_ids'], pv, mask,
                               jnp.maximum(jnp.cumsum(mask, -1) - 1, 0),
                               image_sizes=inputs['image_sizes'])[:, -1]
  ref = jnp.argmax(gen.vcd_logits(fwd(px), fwd(noised), a, b), -1)
  np.testing.assert_array_equal(out[:, 0], np.asarray(ref))
  # the noise reached the image rows' tiles; the text-only row's branches are the same
  gap = np.abs(np.asarray(fwd(px)) - np.asarray(fwd(noised))).max(-1)
  assert gap[0] > 1e-5 and gap[1] > 1e-5 and gap[2] == 0, gap


def test_bad_anyres_inputs_are_clear_errors(llava_next):
  _, model, params, inputs, _ = llava_next
  ids, mask = inputs['input_ids'], inputs['attention_mask']
  px, sizes = to_nhwc(inputs['pixel_values']), inputs['image_sizes']
  with pytest.raises(ValueError, match='needs image_sizes'):
    gen.generate(model, params, ids, mask, px, max_new_tokens=2)
  wrong = sizes.copy()
  wrong[2] = (28, 28)                      # the big image reported as a small one
  assert gen.image_token_counts(model, wrong)[2] != gen.image_token_counts(model, sizes)[2]
  with pytest.raises(ValueError, match='pack into'):
    gen.generate(model, params, ids, mask, px, image_sizes=wrong, max_new_tokens=2)
  with pytest.raises(ValueError, match=r'needs 5 tiles .* has 3'):
    gen.generate(model, params, ids, mask, px[:, :3], image_sizes=sizes, max_new_tokens=2)
  with pytest.raises(ValueError, match=r'rows \[1\]'):
    slots = per_sample(inputs)
    slots['image_sizes'][1, 0] = (28, 28)  # the big image reported as a small one
    gen.generate(model, params, ids, mask, to_nhwc(slots['pixel_values']),
                 image_sizes=slots['image_sizes'], max_new_tokens=2)
  with pytest.raises(ValueError, match='expected tiles'):
    gen.generate(model, params, ids, mask, px[:, 0], image_sizes=sizes, max_new_tokens=2)


def test_cli_on_an_hf_llava_next_directory_prints_transformers_answer(llava_next, tmp_path):
  hf, _, _, _, path = llava_next
  files = []
  for i, pic in enumerate(images((30, 50), (70, 90))):
    files.append(str(tmp_path / f'img{i}.png'))
    pic.save(files[-1])
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    gen.main(['--hf', str(path), '--image', files[0], '--image', files[1],
              '--prompt', 'compare', '--max-new-tokens', '6'])
  # the same request through transformers: processor + generate + decode
  proc = transformers.AutoProcessor.from_pretrained(path)
  tok = proc.tokenizer
  text = '<image>\n<image>\ncompare'   # the test tokenizer has no chat template
  ref_in = dict(proc(text=[text], images=images((30, 50), (70, 90)), return_tensors='np'))
  ref = hf_generate(hf, ref_in, 6, eos=tok.eos_token_id)
  assert out.getvalue().strip() == tok.decode(ref[0], skip_special_tokens=True).strip()
