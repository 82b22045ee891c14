"""Hugging Face interop: load_hf / save_hf against transformers' PyTorch models built locally with
random weights (eager attention, fp32, non-trivial norms and biases), for every supported family;
both LLaVA key layouts; sharded files; loud errors on bad checkpoints; sharded, low-memory
placement on the 8-device CPU mesh; the convert CLI and the train loop's pretrained start."""
import dataclasses
import json
import os
import tracemalloc

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

import mllm_jax
from mllm_jax import sharding as shd
from mllm_jax.hf import CheckpointError, pretrained
from mllm_jax.models import MLLM, VisionEncoder
from mllm_jax.models.mllm import anyres_layout
from mllm_jax.train import steps

IMAGE_ID = 4
WORDS = ['<pad>', '<s>', '</s>', '<unk>', '<image>', 'USER', ':', 'ASSISTANT', 'describe', 'the',
         'picture', 'compare', 'and', 'a', 'red', 'cat', 'what', 'is', 'it', '?']


def randomize(model, seed=0):
  """transformers initialises norms to 1 and biases to 0; make every one of them matter."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name and name.endswith('weight'):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith('bias') or 'image_newline' in name:
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
  model.set_attn_implementation('eager')
  return model.eval()


def assert_close(ours, ref, mask=None):
  ours, ref = np.asarray(ours), np.asarray(ref)
  if mask is not None:
    ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  assert err <= 1e-4 * scale, (err, scale)


def apply_fn(model):
  return jax.jit(lambda p, kw: model.apply({'params': p}, **kw))


def torch_inputs(inputs):
  return {k: torch.tensor(v) for k, v in inputs.items()}


def tree_equal(a, b):
  fa, fb = (flax.traverse_util.flatten_dict(t, sep='/') for t in (a, b))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture(scope='module')
def tokenizer():
  tk = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token='<unk>'))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.add_special_tokens(WORDS[:5])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='<pad>',
                                              bos_token='<s>', eos_token='</s>', unk_token='<unk>')


def images(*sizes, seed=0):
  rng = np.random.RandomState(seed)
  return [Image.fromarray(rng.randint(0, 255, s + (3,), dtype=np.uint8)) for s in sizes]


# ----------------------------------------------------------------------------------------------
# Decoders
# ----------------------------------------------------------------------------------------------
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, rms_norm_eps=1e-5, max_position_embeddings=128)
DECODERS = {
    'llama_gqa': (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        num_key_value_heads=2, **TEXT)),
    'qwen2_bias_tied': (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        num_key_value_heads=1, tie_word_embeddings=True, **TEXT)),
    'mistral_gqa': (transformers.MistralForCausalLM, transformers.MistralConfig(
        num_key_value_heads=1, head_dim=8, **TEXT)),   # head_dim != hidden / heads
    'mistral_sliding_window': (transformers.MistralForCausalLM, transformers.MistralConfig(
        num_key_value_heads=2, sliding_window=8, **TEXT)),   # window < the 40 test tokens
    'llama_rope_linear': (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        rope_parameters=dict(rope_type='linear', rope_theta=5e4, factor=4.0), **TEXT)),
    'llama3_rope': (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        num_key_value_heads=2, rope_parameters=dict(
            rope_type='llama3', rope_theta=5e4, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16), **TEXT)),
}


@pytest.mark.parametrize('name', list(DECODERS))
def test_decoder_logits_match_transformers_and_export_round_trips(name, tmp_path):
  cls, cfg = DECODERS[name]
  torch.manual_seed(0)
  hf = randomize(cls(cfg))
  hf.save_pretrained(tmp_path / 'hf')
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'))
  assert isinstance(model, MLLM) and model.cfg.vision is None
  ids = np.random.RandomState(0).randint(0, 128, (2, 40))
  mask = np.ones_like(ids)
  mask[1, :7] = 0   # left padding
  inputs = dict(input_ids=ids, attention_mask=mask)
  with torch.no_grad():
    ref = hf(**torch_inputs(inputs)).logits.numpy()
  assert_close(apply_fn(model)(params, inputs), ref, mask)

  mllm_jax.save_hf(model, params, str(tmp_path / 'out'))
  back = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', attn_implementation='eager').eval()
  assert back.config.tie_word_embeddings == cfg.tie_word_embeddings
  with torch.no_grad():
    assert_close(back(**torch_inputs(inputs)).logits.numpy(), ref, mask)


# ----------------------------------------------------------------------------------------------
# Vision towers
# ----------------------------------------------------------------------------------------------
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=14)


@pytest.mark.parametrize('kind', ['clip', 'siglip', 'clip_dual'])
def test_vision_tower_matches_transformers(kind, tmp_path):
  torch.manual_seed(1)
  if kind == 'clip':
    hf = saved = randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
  elif kind == 'siglip':   # with its MAP pooling head, which load_hf skips on purpose
    hf = saved = randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)))
  else:   # the vision half of a CLIPModel (text tower and projections skipped)
    saved = randomize(transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=VISION, text_config=dict(vocab_size=32, hidden_size=16,
                                               intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2))))
    hf = saved.vision_model
    kind = 'clip'
  saved.save_pretrained(tmp_path / 'hf')
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'))
  assert isinstance(model, VisionEncoder)
  assert (model.cfg.feature_layer, model.cfg.feature_select) == (-1, 'full')
  pixels = np.random.RandomState(0).randn(2, 3, 28, 28).astype(np.float32)   # channels-first
  with torch.no_grad():
    out = hf(pixel_values=torch.tensor(pixels), output_hidden_states=True)
  hs = [h.numpy() for h in out.hidden_states]
  ours = np.asarray(jax.jit(model.apply)({'params': params}, pixels))
  assert_close(ours, hs[-1])
  post = model.apply({'params': params}, pixels, method=lambda m, x: m.post_norm(m(x)))
  if kind == 'clip':   # CLIP's last_hidden_state is the raw encoder output
    assert_close(ours, out.last_hidden_state.numpy())
  else:                # SigLIP's has post_layernorm applied
    assert_close(post, out.last_hidden_state.numpy())
  # LLaVA's choices: the input of the last layer, without the class token
  second = VisionEncoder(dataclasses.replace(model.cfg, feature_layer=-2, feature_select='patch'))
  expect = hs[-2][:, 1:] if kind == 'clip' else hs[-2]
  assert_close(second.apply({'params': params}, pixels), expect)

  mllm_jax.save_hf(model, params, str(tmp_path / 'out'))
  back = transformers.AutoModel.from_pretrained(tmp_path / 'out', attn_implementation='eager')
  assert type(back).__name__ == ('CLIPVisionModel' if kind == 'clip' else 'SiglipVisionModel')
  with torch.no_grad():
    assert_close(back.eval()(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy(),
                 out.last_hidden_state.numpy())


# ----------------------------------------------------------------------------------------------
# LLaVA and LLaVA-NeXT
# ----------------------------------------------------------------------------------------------
def text_config(kind='llama', **kw):
  d = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
  d.update(kw)
  return (transformers.Qwen2Config if kind == 'qwen2' else transformers.LlamaConfig)(**d)


LLAVA = {   # tower, feature layer, selection, text model, projector bias
    'clip_default_llama': dict(tower='clip', layer=-2, select='default', text='llama', bias=True),
    'clip_full_qwen2_tied_nobias': dict(tower='clip', layer=-1, select='full', text='qwen2',
                                        bias=False),
    'siglip_full_layer_list': dict(tower='siglip', layer=[-3, -1], select='full', text='llama',
                                   bias=True),
}


def build_llava(tower='clip', layer=-2, select='default', text='llama', bias=True, pinpoints=None):
  torch.manual_seed(2)
  vc = (transformers.CLIPVisionConfig if tower == 'clip' else transformers.SiglipVisionConfig)(
      **VISION)
  kw = dict(vision_config=vc, text_config=text_config(text, tie_word_embeddings=text == 'qwen2'),
            image_token_index=IMAGE_ID, vision_feature_layer=layer,
            vision_feature_select_strategy=select, multimodal_projector_bias=bias)
  if pinpoints:
    return randomize(transformers.LlavaNextForConditionalGeneration(
        transformers.LlavaNextConfig(image_grid_pinpoints=pinpoints, **kw)))
  return randomize(transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**kw)))


PROMPTS = ['USER : <image> <image> compare ASSISTANT : a red cat',   # two images
           'USER : <image> describe the picture ASSISTANT :',       # one image
           'USER : what is it ?']                                   # text only


@pytest.mark.parametrize('name', list(LLAVA))
def test_llava_logits_match_transformers_and_export_round_trips(name, tmp_path, tokenizer):
  v = LLAVA[name]
  hf = build_llava(**v)
  hf.save_pretrained(tmp_path / 'hf')
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'))
  tokenizer.padding_side = 'left' if name == 'clip_default_llama' else 'right'
  proc = transformers.LlavaProcessor(
      image_processor=transformers.CLIPImageProcessorPil(
          size={'shortest_edge': 28}, crop_size={'height': 28, 'width': 28}),
      tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy=v['select'],
      num_additional_image_tokens=1 if v['tower'] == 'clip' else 0)
  inputs = dict(proc(text=PROMPTS, images=images((40, 30), (28, 28), (50, 50)),
                     return_tensors='np', padding=True))
  assert inputs['pixel_values'].shape == (3, 3, 28, 28)   # channels-first, flat over the batch
  with torch.no_grad():
    ref = hf(**torch_inputs(inputs)).logits.numpy()
  assert_close(apply_fn(model)(params, inputs), ref, inputs['attention_mask'])

  mllm_jax.save_hf(model, params, str(tmp_path / 'out'))
  back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / 'out').eval()
  with torch.no_grad():
    assert_close(back(**torch_inputs(inputs)).logits.numpy(), ref, inputs['attention_mask'])


def test_llava_key_layouts_load_identical_params(tmp_path):
  """save_pretrained (5.23) files, the >= 5.6 and <= 5.5 in-memory layouts, and the hub layout
  (`language_model.model.*`, `vision_tower.vision_model.*`) give the same parameters."""
  hf = build_llava()
  hf.save_pretrained(tmp_path / 'saved')
  model, ref = mllm_jax.load_hf(str(tmp_path / 'saved'))
  sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
  assert 'model.vision_tower.embeddings.class_embedding' in sd   # >= 5.6 in memory
  layouts = {
      'v5_state_dict': lambda k: k,
      'legacy_state_dict': lambda k: k.replace('model.vision_tower.',
                                               'model.vision_tower.vision_model.'),
      'hub': lambda k: (k.replace('model.language_model.', 'language_model.model.')
                        .replace('model.vision_tower.', 'vision_tower.vision_model.')
                        .replace('model.multi_modal_projector.', 'multi_modal_projector.')
                        .replace('lm_head.', 'language_model.lm_head.'))}
  for name, rename in layouts.items():
    d = tmp_path / name
    d.mkdir()
    (d / 'config.json').write_text((tmp_path / 'saved' / 'config.json').read_text())
    safetensors.torch.save_file({rename(k): v for k, v in sd.items()}, str(d / 'model.safetensors'))
    tree_equal(mllm_jax.load_hf(str(d))[1], ref)
  # the hub layout also loads in transformers itself
  hub = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / 'hub')
  np.testing.assert_array_equal(hub.lm_head.weight.detach().numpy(), sd['lm_head.weight'].numpy())
  # and a state dict in memory maps the same way
  tree_equal(mllm_jax.hf.params_from_state_dict(model, hf.state_dict()), ref)


PINPOINTS = [[28, 56], [56, 28], [56, 56]]   # 28 px tiles: grids of 1x2, 2x1, 2x2


def llava_next_processor(tokenizer):
  """transformers' LlavaNextProcessor for `build_llava(pinpoints=PINPOINTS)` (28 px CLIP
  tiles of 14 px patches, CLS dropped)."""
  return transformers.LlavaNextProcessor(
      image_processor=transformers.LlavaNextImageProcessorPil(
          size={'shortest_edge': 28}, crop_size={'height': 28, 'width': 28},
          image_grid_pinpoints=PINPOINTS),
      tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy='default',
      num_additional_image_tokens=1)


def test_llava_next_anyres_matches_transformers(tmp_path, tokenizer):
  hf = build_llava(pinpoints=PINPOINTS)
  hf.save_pretrained(tmp_path / 'hf')
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'))
  assert model.cfg.image_grid_pinpoints == ((28, 56), (56, 28), (56, 56))
  tokenizer.padding_side = 'right'
  proc = llava_next_processor(tokenizer)
  sizes = [(30, 50), (60, 20), (28, 28)]
  inputs = dict(proc(text=PROMPTS, images=images(*sizes), return_tensors='np', padding=True))
  # the reference count: a 30x50 image on 28px tiles with these pinpoints packs 14 features
  # (2x2 grid unpadded to 2x4 = 8, 2 newlines, 4 base)
  _, _, _, lengths = anyres_layout(jnp.array(sizes), model.cfg.image_grid_pinpoints, 28, 2, 64)
  assert lengths[0] == 14
  per_image = (inputs['input_ids'] == IMAGE_ID).sum(1)
  assert per_image[0] == lengths[0] + lengths[1] and per_image[1] == lengths[2]
  with torch.no_grad():
    ref = hf(**torch_inputs(inputs)).logits.numpy()
  fwd = apply_fn(model)
  assert_close(fwd(params, inputs), ref, inputs['attention_mask'])
  # per-sample slots [batch, images, tiles, ...]; empty slots have size (0, 0)
  pv, sz = inputs['pixel_values'], inputs['image_sizes']
  slots = np.zeros((3, 2) + pv.shape[1:], pv.dtype)
  slot_sizes = np.zeros((3, 2, 2), sz.dtype)
  for (b, m), i in {(0, 0): 0, (0, 1): 1, (1, 0): 2}.items():
    slots[b, m], slot_sizes[b, m] = pv[i], sz[i]
  per_sample = dict(inputs, pixel_values=slots, image_sizes=slot_sizes)
  assert_close(fwd(params, per_sample), ref, inputs['attention_mask'])

  mllm_jax.save_hf(model, params, str(tmp_path / 'out'))
  back = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path / 'out').eval()
  with torch.no_grad():
    assert_close(back(**torch_inputs(inputs)).logits.numpy(), ref, inputs['attention_mask'])


# ----------------------------------------------------------------------------------------------
# Files: sharding, bad input
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('llama')
  torch.manual_seed(3)
  randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
      num_key_value_heads=2, **TEXT))).save_pretrained(d)
  return str(d)


def test_sharded_checkpoints_read_and_write(llama_dir, tmp_path):
  model, params = mllm_jax.load_hf(llama_dir)
  # ours, in ~30 KB shards with an index, loads back identically and in transformers
  mllm_jax.save_hf(model, params, str(tmp_path / 'ours'), max_shard_size=30_000)
  files = sorted(os.listdir(tmp_path / 'ours'))
  shards = [f for f in files if f.startswith('model-')]
  assert 'model.safetensors.index.json' in files and len(shards) > 2, files
  tree_equal(mllm_jax.load_hf(str(tmp_path / 'ours'))[1], params)
  ids = torch.tensor([[1, 5, 9, 30]])
  a = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()(ids).logits
  b = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'ours').eval()(ids).logits
  torch.testing.assert_close(a, b, rtol=0, atol=0)
  # exporting again over it leaves no stale shard or index behind
  mllm_jax.save_hf(model, params, str(tmp_path / 'ours'))
  assert sorted(os.listdir(tmp_path / 'ours')) == ['config.json', 'model.safetensors']
  # transformers' own shards
  a_model = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
  a_model.save_pretrained(tmp_path / 'theirs', max_shard_size='40KB')
  assert os.path.exists(tmp_path / 'theirs' / 'model.safetensors.index.json')
  tree_equal(mllm_jax.load_hf(str(tmp_path / 'theirs'))[1], params)


def test_bf16_checkpoints_load_and_export(llama_dir, tmp_path):
  hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir).to(torch.bfloat16)
  hf.save_pretrained(tmp_path / 'bf16')   # as hub checkpoints are stored
  model, params = mllm_jax.load_hf(str(tmp_path / 'bf16'), dtype=jnp.bfloat16)
  assert model.cfg.param_dtype == model.cfg.dtype == 'bfloat16'
  w = params['llm']['layers']['mlp']['up_proj']['kernel']
  assert w.dtype == jnp.bfloat16
  np.testing.assert_array_equal(   # bit-exact: [in, out] of layer 1 is the weight's transpose
      np.asarray(w[1].astype(jnp.float32)),
      hf.model.layers[1].mlp.up_proj.weight.detach().float().numpy().T)
  mllm_jax.save_hf(model, params, str(tmp_path / 'out'))
  assert json.load(open(tmp_path / 'out' / 'config.json'))['dtype'] == 'bfloat16'
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'out', dtype=torch.bfloat16)
  for (k, a), b in zip(hf.state_dict().items(), back.state_dict().values()):
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_legacy_rope_config_keys_are_read(tmp_path):
  cfg = dict(TEXT, architectures=['LlamaForCausalLM'], model_type='llama', rope_theta=5e5,
             rope_scaling=dict(type='llama3', factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=64))
  (tmp_path / 'config.json').write_text(json.dumps(cfg))   # pre-5.0 keys
  llm = mllm_jax.hf.model_config(str(tmp_path)).llm
  assert llm.rope_theta == 5e5 and llm.rope_scaling.type == 'llama3'
  assert llm.rope_scaling.original_max_position == 64


def _copy_dir(src, dst):
  os.makedirs(dst)
  for f in os.listdir(src):
    with open(os.path.join(src, f), 'rb') as i, open(os.path.join(dst, f), 'wb') as o:
      o.write(i.read())
  return str(dst)


def test_unsupported_architecture_lists_the_supported_ones(llama_dir, tmp_path):
  d = _copy_dir(llama_dir, tmp_path / 'x')
  cfg = json.load(open(os.path.join(d, 'config.json')))
  cfg['architectures'] = ['GPT2LMHeadModel']
  json.dump(cfg, open(os.path.join(d, 'config.json'), 'w'))
  with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported:.*LlamaForCausalLM.*"
                                       r"LlavaNextForConditionalGeneration"):
    mllm_jax.load_hf(d)


@pytest.mark.parametrize('bad, match', [
    (dict(rope_parameters=dict(rope_type='yarn', rope_theta=1e4, factor=2.0)),
     r"rope_type='yarn' is not supported; supported: \['default', 'linear', 'llama3'\]"),
    (dict(attention_bias=True), 'attention_bias=true is not supported'),
    (dict(hidden_act='tanh'), r"hidden_act='tanh' is not supported")])
def test_unsupported_config_options_are_named(bad, match, tmp_path):
  transformers.LlamaConfig(architectures=['LlamaForCausalLM'], **TEXT, **bad).save_pretrained(
      tmp_path)
  with pytest.raises(ValueError, match=match):
    mllm_jax.hf.model_config(str(tmp_path))


def test_missing_unexpected_and_misshaped_tensors_are_listed(llama_dir, tmp_path):
  sd = safetensors.torch.load_file(os.path.join(llama_dir, 'model.safetensors'))
  del sd['model.layers.1.mlp.up_proj.weight']
  del sd['model.norm.weight']
  sd['model.layers.0.extra.weight'] = torch.zeros(3)
  sd['model.layers.0.self_attn.q_proj.weight'] = torch.zeros(64, 60)
  d = tmp_path / 'bad'
  d.mkdir()
  (d / 'config.json').write_text(open(os.path.join(llama_dir, 'config.json')).read())
  safetensors.torch.save_file(sd, str(d / 'model.safetensors'))
  with pytest.raises(CheckpointError) as e:
    mllm_jax.load_hf(str(d))
  msg = str(e.value)
  assert 'missing 2' in msg and 'model.layers.{i}.mlp.up_proj.weight (i in 1..1)' in msg
  assert 'model.norm.weight' in msg
  assert 'unexpected 1' in msg and 'model.layers.{i}.extra.weight' in msg
  assert 'model.layers.0.self_attn.q_proj.weight: [64, 60], expected [64, 64]' in msg


def test_corrupt_files_are_named_and_pickles_never_loaded(llama_dir, tmp_path):
  d = _copy_dir(llama_dir, tmp_path / 'trunc')
  path = os.path.join(d, 'model.safetensors')
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size - 100)
  with pytest.raises(CheckpointError, match=f'{path}: truncated safetensors file'):
    mllm_jax.load_hf(d)
  with open(path, 'wb') as f:
    f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}')
  with pytest.raises(CheckpointError, match=f'{path}: corrupt safetensors header'):
    mllm_jax.load_hf(d)
  os.remove(path)
  torch.save({'x': torch.zeros(2)}, os.path.join(d, 'pytorch_model.bin'))
  with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*never loaded"):
    mllm_jax.load_hf(d)
  # an index naming a shard that is not there
  d2 = _copy_dir(llama_dir, tmp_path / 'index')
  os.rename(os.path.join(d2, 'model.safetensors'),
            os.path.join(d2, 'model-00001-of-00002.safetensors'))
  keys = safetensors.torch.load_file(os.path.join(d2, 'model-00001-of-00002.safetensors')).keys()
  weight_map = {k: 'model-00001-of-00002.safetensors' for k in keys}
  weight_map['model.norm.weight'] = 'model-00002-of-00002.safetensors'
  json.dump({'weight_map': weight_map}, open(os.path.join(d2, 'model.safetensors.index.json'), 'w'))
  with pytest.raises(CheckpointError, match='model-00002-of-00002.safetensors'):
    mllm_jax.load_hf(d2)


# ----------------------------------------------------------------------------------------------
# Sharded placement and host memory
# ----------------------------------------------------------------------------------------------
def test_load_on_mesh_is_sharded_and_holds_about_one_tensor_on_the_host(tmp_path):
  torch.manual_seed(4)
  big = dict(TEXT, vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
             num_key_value_heads=2)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**big))
  hf.save_pretrained(tmp_path / 'hf')
  nbytes = sum(p.numel() * 4 for p in hf.parameters())
  mesh = shd.make_mesh({'fsdp': 4, 'tensor': 2})
  # a first load compiles the on-device stacking (Python allocations independent of model size)
  mllm_jax.load_hf(str(tmp_path / 'hf'), mesh=mesh, rules='fsdp_tp')
  tracemalloc.start()
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'), mesh=mesh, rules='fsdp_tp')
  jax.block_until_ready(params)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  # every array carries the layout the train loop would create it in
  factory = steps.StateFactory(model, mesh, shd.logical_rules('fsdp_tp'))
  want = flax.traverse_util.flatten_dict(factory.param_shardings, sep='/')
  for k, v in flax.traverse_util.flatten_dict(params, sep='/').items():
    assert v.sharding == want[k], k
  q = params['llm']['layers']['attn']['q_proj']['kernel']   # [layers, embed, heads, head_dim]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  assert q.addressable_shards[0].data.shape == (6, 32, 2, 32)
  # host: about the largest tensor, the 512 KB embedding (1/11 of the checkpoint)
  assert peak < 0.2 * nbytes, (peak, nbytes)
  ids = np.random.RandomState(0).randint(0, 1024, (2, 16))
  with torch.no_grad():
    ref = hf.eval()(torch.tensor(ids)).logits.numpy()
  assert_close(apply_fn(model)(params, dict(input_ids=ids)), ref)


# ----------------------------------------------------------------------------------------------
# CLI and the train loop's starting point
# ----------------------------------------------------------------------------------------------
def test_convert_cli_round_trip(llama_dir, tmp_path):
  from mllm_jax import convert
  convert.main(['--from-hf', llama_dir, '--out', str(tmp_path / 'ckpt')])
  assert os.path.isdir(tmp_path / 'ckpt' / 'params')
  convert.main(['--to-hf', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'hf')])
  ids = torch.tensor([[1, 5, 9, 30, 7]])
  a = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()(ids).logits
  b = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'hf').eval()(ids).logits
  torch.testing.assert_close(a, b, rtol=0, atol=0)


def _demo_model_config(**over):
  from mllm_jax.models import MLLMConfig
  d = dict(llm=dict(vocab_size=128, hidden=64, depth=2, heads=4, kv_heads=2, mlp_dim=96,
                    norm_eps=1e-5, max_position=128),
           vision=dict(kind='clip', image_size=28, patch_size=14, width=32, depth=3, heads=4,
                       mlp_dim=64, norm_eps=1e-5, feature_layer=-2),
           image_token_id=IMAGE_ID)
  for k, v in over.items():
    d[k] = {**d[k], **v} if isinstance(v, dict) else v
  return MLLMConfig.from_dict(d)


def test_train_start_from_separate_hf_checkpoints(llama_dir, tmp_path):
  torch.manual_seed(5)
  clip = randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
  clip.save_pretrained(tmp_path / 'clip')
  mesh = shd.make_mesh({'fsdp': -1})
  cfg = _demo_model_config(vision=dict(hf_path=str(tmp_path / 'clip')),
                           llm=dict(hf_path=llama_dir))
  factory = steps.StateFactory(MLLM(cfg), mesh, shd.logical_rules('fsdp'))
  # the random init is the train loop's own (tested there); a constant one compiles in no time
  factory.init_params = lambda rng: jax.tree.map(
      lambda s: jnp.full(s.shape, 0.5, s.dtype, device=s.sharding), factory.abstract_params)
  params = pretrained.init_params(factory, jax.random.key(0))
  tree_equal(params['vision'], mllm_jax.load_hf(str(tmp_path / 'clip'))[1])
  tree_equal(params['llm'], mllm_jax.load_hf(llama_dir)[1]['llm'])
  emb = params['llm']['embed_tokens']['embedding']
  assert emb.sharding == factory.param_shardings['llm']['embed_tokens']['embedding']
  assert bool(jnp.all(params['connector']['linear_1']['kernel'] == 0.5))   # not loaded
  # a config that does not describe the checkpoint says which values would
  bad = _demo_model_config(llm=dict(hf_path=llama_dir, hidden=32, norm_eps=1e-6))
  with pytest.raises(ValueError, match=r'config.model.llm.hidden=32, checkpoint: 64[\s\S]*'
                                       r'--config.model.llm.hidden=64 '
                                       r'--config.model.llm.norm_eps=1e-05'):
    pretrained.init_params(steps.StateFactory(MLLM(bad), mesh, shd.logical_rules('fsdp')),
                           jax.random.key(0))
  overrides = pretrained.config_overrides(llama_dir, 'llm')
  assert overrides['model.llm.hidden'] == 64 and overrides['model.llm.kv_heads'] == 2

  # a tokenizer with added tokens: a larger vocabulary grows from the checkpoint's mean row
  grown = _demo_model_config(vision=dict(hf_path=''), llm=dict(hf_path=llama_dir, vocab_size=136))
  factory = steps.StateFactory(MLLM(grown), mesh, shd.logical_rules('fsdp'))
  factory.init_params = lambda rng: jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), factory.abstract_params)
  llm = pretrained.init_params(factory, jax.random.key(0))['llm']
  ref = mllm_jax.load_hf(llama_dir)[1]['llm']
  for emb, full in ((llm['embed_tokens']['embedding'], ref['embed_tokens']['embedding']),
                    (llm['lm_head']['kernel'].T, ref['lm_head']['kernel'].T)):
    assert emb.shape == (136, 64)
    np.testing.assert_array_equal(emb[:128], full)
    np.testing.assert_allclose(emb[128:], np.broadcast_to(full.mean(0), (8, 64)), atol=1e-8)

  # the whole model from a convert checkpoint (config.model.init_from)
  model = MLLM(cfg)
  pretrained.save_params(str(tmp_path / 'ckpt'), model, params)
  cfg2 = dataclasses.replace(cfg, init_from=str(tmp_path / 'ckpt'),
                             vision=dataclasses.replace(cfg.vision, hf_path=''),
                             llm=dataclasses.replace(cfg.llm, hf_path=''))
  restored = pretrained.init_params(
      steps.StateFactory(MLLM(cfg2), mesh, shd.logical_rules('fsdp')), jax.random.key(1))
  tree_equal(restored, params)
