"""BLIP-2 and InstructBLIP (`Blip2ForConditionalGeneration`, `InstructBlipForConditionalGeneration`)
with a Llama-family language model, e.g. InstructBLIP-Vicuna.

    vision_model (EVA ViT, post-LN)  ->  ours vision (kind='blip2', feature_layer=-1, 'full')
    query_tokens, qformer, language_projection  ->  ours connector (kind='qformer')
    language_model (LlamaForCausalLM, ...)  ->  ours llm

Inputs are the same as transformers 5.x: the processor puts `num_query_tokens` image tokens
(`image_token_index`) in front of the text (before BOS) and the model scatters the projected
query outputs into them in order, which is exactly our `merge_image_features`; InstructBLIP's
processor adds `qformer_input_ids` / `qformer_attention_mask` (the prompt tokenised with the
Q-Former's BERT tokenizer), which our MLLM takes under the same names. OPT and T5 language
models (the original BLIP-2 releases) are out of scope and rejected with an error.

Key layout: transformers 5.23 keeps the same keys in memory, in `save_pretrained` files and on
the hub (`language_model.model.*`, `language_model.lm_head.weight`, `vision_model.*`,
`qformer.*`, `query_tokens`, `language_projection.*`).
"""
from __future__ import annotations

import json
import os

import numpy as np
import transformers

from mllm_jax.hf import families as F
from mllm_jax.hf.families import Rule
from mllm_jax.models.config import (ConnectorConfig, MLLMConfig, QFormerConfig, Stage1Config,
                                    VisionConfig)

VISION_TYPES = ('blip_2_vision_model', 'instructblip_vision_model')


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def vision_from_hf(c, where: str) -> VisionConfig:
  """Blip2VisionConfig / InstructBlipVisionConfig -> VisionConfig(kind='blip2')."""
  if c.model_type not in VISION_TYPES:
    raise ValueError(f'{where}: model_type={c.model_type!r}; expected one of {VISION_TYPES}')
  return VisionConfig(
      kind='blip2', image_size=c.image_size, patch_size=c.patch_size, width=c.hidden_size,
      depth=c.num_hidden_layers, heads=c.num_attention_heads, mlp_dim=c.intermediate_size,
      norm_eps=float(c.layer_norm_eps), act=F._act(c.hidden_act, f'{where}: hidden_act'),
      feature_layer=-1, feature_select='full', qkv_bias=bool(c.qkv_bias))


def qformer_from_hf(c, where: str, instruction: bool = False):
  """(VisionConfig, QFormerConfig) of a Blip2Config / InstructBlipConfig; the Q-Former must
  read the tower's width."""
  q = c.qformer_config
  vision = vision_from_hf(c.vision_config, f'{where}: vision_config')
  if q.encoder_hidden_size != vision.width:
    raise ValueError(f'{where}: qformer_config.encoder_hidden_size={q.encoder_hidden_size} != '
                     f'vision_config.hidden_size={vision.width}')
  return vision, QFormerConfig(
      num_queries=int(c.num_query_tokens), hidden=q.hidden_size, depth=q.num_hidden_layers,
      heads=q.num_attention_heads, mlp_dim=q.intermediate_size, norm_eps=float(q.layer_norm_eps),
      act=F._act(q.hidden_act, f'{where}: qformer_config.hidden_act'),
      cross_attention_every=int(q.cross_attention_frequency), instruction=instruction,
      vocab_size=q.vocab_size, max_position=q.max_position_embeddings)


def mllm_from_hf(c, where: str = 'config.json') -> MLLMConfig:
  """Blip2Config / InstructBlipConfig -> MLLMConfig with a Q-Former connector."""
  t, q = c.text_config, c.qformer_config
  if t.model_type not in F.LLM_TYPES or not getattr(c, 'use_decoder_only_language_model', True):
    raise ValueError(
        f'{where}: text_config.model_type={t.model_type!r}: BLIP-2 / InstructBLIP with an OPT or '
        f'T5 language model (or any other than the Llama family) is out of scope; supported '
        f'text models: {list(F.LLM_TYPES)} (e.g. InstructBLIP-Vicuna)')
  if c.image_token_index is None:
    raise ValueError(f'{where}: image_token_index is null: checkpoints from before '
                     'transformers put image tokens in input_ids are not supported; set it to '
                     'the id of the tokenizer\'s "<image>" token')
  instruction = c.model_type == 'instructblip'
  if not instruction and getattr(q, 'use_qformer_text_input', False):
    raise ValueError(f'{where}: qformer_config.use_qformer_text_input=true is not supported '
                     '(BLIP-2 generation never feeds text to its Q-Former)')
  vision, qformer = qformer_from_hf(c, where, instruction)
  return MLLMConfig(
      llm=F.llm_from_hf(t, f'{where}: text_config'), vision=vision,
      connector=ConnectorConfig(kind='qformer', qformer=qformer),
      image_token_id=int(c.image_token_index))


def mllm_to_hf(cfg: MLLMConfig, dtype: str = 'float32'):
  """MLLMConfig (Q-Former connector, blip2 tower) -> Blip2Config / InstructBlipConfig."""
  v, q = cfg.vision, cfg.connector.qformer
  if v.kind != 'blip2' or v.feature_layers != (v.depth,) or v.feature_select != 'full':
    raise ValueError(
        f'export as BLIP-2 / InstructBLIP needs the BLIP-2 tower as transformers runs it: '
        f"config.model.vision.kind='blip2', feature_layer=-1, feature_select='full' (got "
        f'{v.kind!r}, {v.feature_layer}, {v.feature_select!r})')
  if cfg.image_token_id < 0:
    raise ValueError('export needs config.model.image_token_id (the "<image>" token id)')
  vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                hidden_act=F.ACT_TO_HF[v.activation], layer_norm_eps=v.norm_eps,
                qkv_bias=v.qkv_bias)
  # a BLIP-2 Q-Former has no word embeddings: its vocab_size is unused (0 from a training config)
  qformer = dict(vocab_size=q.vocab_size or 30522, hidden_size=q.hidden, num_hidden_layers=q.depth,
                 num_attention_heads=q.heads, intermediate_size=q.mlp_dim,
                 hidden_act=F.ACT_TO_HF[q.act], max_position_embeddings=q.max_position,
                 layer_norm_eps=q.norm_eps, cross_attention_frequency=q.cross_attention_every,
                 encoder_hidden_size=v.width)
  cls = transformers.InstructBlipConfig if q.instruction else transformers.Blip2Config
  return cls(vision_config=vision, qformer_config=qformer,
             text_config=F.llm_to_hf(cfg.llm, dtype).to_dict(), num_query_tokens=q.num_queries,
             image_token_index=cfg.image_token_id, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------
def _linear(ours: str, hf: str, n_in: int = 1, bias: str = 'flat') -> list[Rule]:
  """A biased nn.Linear: kernel + bias ('flat' for [heads, head_dim] biases)."""
  return [Rule(f'{ours}/kernel', f'{hf}.weight', 'linear', n_in=n_in),
          Rule(f'{ours}/bias', f'{hf}.bias', bias)]


def _norm(ours: str, hf: str) -> list[Rule]:
  return [Rule(f'{ours}/scale', f'{hf}.weight'), Rule(f'{ours}/bias', f'{hf}.bias')]


def vision_rules(cfg: VisionConfig, ours: str = '', hf: str = '') -> list[Rule]:
  """Our VisionEncoder(kind='blip2') <-> Blip2VisionModel keys."""
  e, a = 'embeddings.', 'encoder.layers.{i}.'
  r = [Rule('patch_embed/kernel', e + 'patch_embedding.weight', 'conv'),
       Rule('patch_embed/bias', e + 'patch_embedding.bias'),
       Rule('class_embedding', e + 'class_embedding', lead=2),         # HF [1, 1, D]
       Rule('position_embedding', e + 'position_embedding', lead=1),   # HF [1, N + 1, D]
       *_norm('post_norm', 'post_layernorm'),
       *_norm('layers/norm1', a + 'layer_norm1'), *_norm('layers/norm2', a + 'layer_norm2'),
       Rule('layers/qkv/kernel', a + 'self_attn.qkv.weight', 'linear'),   # [D, 3, H, hd]
       *_linear('layers/o_proj', a + 'self_attn.projection', n_in=2, bias='copy'),
       *_linear('layers/fc1', a + 'mlp.fc1', bias='copy'),
       *_linear('layers/fc2', a + 'mlp.fc2', bias='copy')]
  if cfg.qkv_bias:   # one [3D] tensor: q bias, k bias (zeros at init, trainable in HF), v bias
    r.append(Rule('layers/qkv/bias', a + 'self_attn.qkv.bias', 'flat'))
  return F._prefixed(r, ours, hf)


def qformer_rules(q: QFormerConfig, ours: str = 'connector/', hf: str = '') -> list[Rule]:
  """Our QFormer <-> `query_tokens`, `qformer.*`, `language_projection.*`."""
  r = [Rule('query_tokens', 'query_tokens'),
       *_linear('language_projection', 'language_projection', bias='copy')]
  if q.instruction:
    r += [Rule('word_embeddings/embedding', 'qformer.embeddings.word_embeddings.weight'),
          Rule('position_embeddings/embedding', 'qformer.embeddings.position_embeddings.weight'),
          *_norm('input_norm', 'qformer.embeddings.layernorm')]
  else:
    r += _norm('input_norm', 'qformer.layernorm')
  return F._prefixed(r + _qformer_layer_rules(q, q.instruction), ours, hf)


def _qformer_layer_rules(q: QFormerConfig, text: bool) -> list[Rule]:
  """`layer_{i}/...` <-> `qformer.encoder.layer.{i}.*` (the text FFN iff `text`)."""
  r = []
  for i in range(q.depth):
    o, h = f'layer_{i}/', f'qformer.encoder.layer.{i}.'
    blocks = [('self_attn', 'attention')]
    if i % q.cross_attention_every == 0:
      blocks.append(('cross_attn', 'crossattention'))
    for ours_b, hf_b in blocks:
      for n in ('query', 'key', 'value'):
        r += _linear(f'{o}{ours_b}/{n}', f'{h}{hf_b}.attention.{n}')
      r += _linear(f'{o}{ours_b}/output', f'{h}{hf_b}.output.dense', n_in=2, bias='copy')
      r += _norm(f'{o}{ours_b}/norm', f'{h}{hf_b}.output.LayerNorm')
    ffns = [('query_ffn', 'intermediate_query', 'output_query')]
    if text:
      ffns.append(('text_ffn', 'intermediate', 'output'))
    for ours_f, inter, out in ffns:
      r += _linear(f'{o}{ours_f}/intermediate', f'{h}{inter}.dense', bias='copy')
      r += _linear(f'{o}{ours_f}/output', f'{h}{out}.dense', bias='copy')
      r += _norm(f'{o}{ours_f}/norm', f'{h}{out}.LayerNorm')
  return r


def mllm_rules(cfg: MLLMConfig) -> list[Rule]:
  return (F.decoder_rules(cfg.llm, 'llm/', 'language_model.') +
          vision_rules(cfg.vision, 'vision/', 'vision_model.') +
          qformer_rules(cfg.connector.qformer))


def _rename(cfg):
  tied = [r'language_model\.lm_head\.weight'] if cfg.llm.tie_embeddings else []
  return F._renamer([], F._BUFFERS + tied)


FAMILIES = {
    'Blip2ForConditionalGeneration': F.Family('mllm', mllm_from_hf, _rename),
    'InstructBlipForConditionalGeneration': F.Family('mllm', mllm_from_hf, _rename),
}


# ----------------------------------------------------------------------------------------------
# Stage 1: Blip2ForImageTextRetrieval <-> QFormerPretrainer
# ----------------------------------------------------------------------------------------------
def stage1_from_hf(c, where: str = 'config.json', decoder_bos_id: int = -1) -> Stage1Config:
  """Blip2Config of a `Blip2ForImageTextRetrieval` -> Stage1Config. transformers has no ITG
  head, so `decoder_bos_id` (the [DEC] id of its tokenizer) comes from the caller."""
  q = c.qformer_config
  if not getattr(q, 'use_qformer_text_input', False):
    raise ValueError(f'{where}: qformer_config.use_qformer_text_input=false: an image-text '
                     'retrieval Q-Former needs its text FFNs (intermediate / output)')
  vision, qformer = qformer_from_hf(c, where)
  return Stage1Config(vision=vision, qformer=qformer, embed_dim=int(c.image_text_hidden_size),
                      decoder_bos_id=decoder_bos_id)


def stage1_rules(cfg: Stage1Config) -> list[Rule]:
  """Every QFormerPretrainer parameter but `temp` and `lm_head` (not in transformers) <->
  Blip2ForImageTextRetrieval keys: the Q-Former's text embeddings are top-level `embeddings.*`
  there, and queries and text share `qformer.layernorm`."""
  q = cfg.qformer
  r = [Rule('query_tokens', 'query_tokens'),
       Rule('word_embeddings/embedding', 'embeddings.word_embeddings.weight'),
       Rule('position_embeddings/embedding', 'embeddings.position_embeddings.weight'),
       *_norm('input_norm', 'qformer.layernorm'), *_qformer_layer_rules(q, True)]
  return (vision_rules(cfg.vision, 'vision/', 'vision_model.') + F._prefixed(r, 'qformer/', '') +
          _linear('vision_proj', 'vision_projection', bias='copy') +
          _linear('text_proj', 'text_projection', bias='copy') +
          _linear('itm_head', 'itm_head', bias='copy'))


def load_stage1_hf(path: str, decoder_bos_id: int = -1, seed: int = 0):
  """A local `Blip2ForImageTextRetrieval` directory -> (QFormerPretrainer, params), fp32.
  `temp` starts at 0.07 and the ITG head (`lm_head`: not in transformers) at a fresh init
  (seed); every other parameter is the checkpoint's (missing or extra tensors are an error)."""
  import flax
  import jax
  from mllm_jax.hf import api
  from mllm_jax.hf.safetensors_io import Checkpoint
  from mllm_jax.models.blip2_stage1 import QFormerPretrainer
  arch = 'Blip2ForImageTextRetrieval'
  cfg_path = os.path.join(path, 'config.json')
  with open(cfg_path) as f:
    archs = json.load(f).get('architectures') or []
  if arch not in archs:
    raise ValueError(f'{cfg_path}: architectures={archs}; expected [{arch!r}]')
  hf_cfg = transformers.Blip2Config.from_pretrained(path)
  cfg = stage1_from_hf(hf_cfg, f'{path}/config.json', decoder_bos_id)
  model = QFormerPretrainer(cfg)
  s, q = cfg.vision.image_size, cfg.qformer
  shapes = jax.eval_shape(lambda: flax.linen.meta.unbox(model.init(
      jax.random.key(0), np.zeros((1, s, s, 3), np.float32), np.zeros((1, 2), np.int32))[
          'params']))
  # Only `temp` and `lm_head` are initialised (the rest is read): one small program
  fresh = jax.jit(lambda r: flax.linen.meta.unbox(model.init(
      r, np.zeros((1, 1, q.hidden), np.float32), np.zeros((q.vocab_size, q.hidden), np.float32),
      method=lambda m, h, e: m.lm_head(h, e))['params']))(jax.random.key(seed))
  params = flax.traverse_util.flatten_dict(fresh, sep='/')
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  flat = flax.traverse_util.flatten_dict(shapes, sep='/')
  rules = stage1_rules(cfg)
  targets = {r.path: jax.ShapeDtypeStruct(flat[r.path].shape, flat[r.path].dtype, sharding=one)
             for r in rules}
  if set(targets) | set(params) != set(flat):   # a mapping bug, not a user error
    raise RuntimeError(f'stage-1 rules miss {sorted(set(flat) - set(targets) - set(params))}')
  with Checkpoint(path, F._renamer([], F._BUFFERS)) as ckpt:
    params.update(api.load_params(ckpt, rules, targets, f'{arch} as its config.json describes'))
  return model, flax.traverse_util.unflatten_dict(params, sep='/')

