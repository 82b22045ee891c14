"""Per-family translation between Hugging Face checkpoints and our models.

For each supported `architectures` entry of a config.json:
  * config: the transformers config object <-> our dataclasses (unsupported options are errors
    that name the config key, never silently dropped);
  * keys: one `Rule` per parameter leaf of ours, naming its HF tensor and the layout change;
  * layouts: prefix rewrites that bring every accepted on-disk key layout to one canonical
    layout (the one transformers 5.23 `save_pretrained` writes, which is also what we export).

Layout changes (`Rule.kind`), ours <-> HF:
  copy    same shape                                  norms, embeddings, biases of [out]
  flat    [H, D] <-> [H*D]                            q/k/v biases
  linear  kernel [*in, *out] <-> weight [out, in]     nn.Linear (in/out flattened)
  conv    kernel [kh, kw, in, out] (HWIO) <-> weight [out, in, kh, kw] (OIHW)
A key containing `{i}` is one tensor per layer, stacked on our leading `layers` axis.
`Rule.lead` > 0: the HF tensor has that many extra leading axes of size 1 (BLIP-2's
`query_tokens` [1, Q, D], `class_embedding` [1, 1, D]).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Callable

import numpy as np
import transformers

from mllm_jax.models.config import (ConnectorConfig, LLMConfig, MLLMConfig, RopeScaling,
                                    VisionConfig)

log = logging.getLogger(__name__)

# HF `hidden_act` / `projector_hidden_act` <-> mllm_jax.models.layers.ACTIVATIONS
ACT_FROM_HF = {'silu': 'silu', 'swish': 'silu', 'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh',
               'gelu_new': 'gelu_tanh', 'gelu_fast': 'gelu_tanh', 'quick_gelu': 'quick_gelu',
               'relu': 'relu'}
ACT_TO_HF = {'silu': 'silu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh',
             'quick_gelu': 'quick_gelu', 'relu': 'relu'}
ROPE_TYPES = ('default', 'linear', 'llama3')
SELECT_FROM_HF = {'default': 'patch', 'full': 'full'}   # vision_feature_select_strategy
SELECT_TO_HF = {v: k for k, v in SELECT_FROM_HF.items()}


def _act(name: str, key: str) -> str:
  if name not in ACT_FROM_HF:
    raise ValueError(f'{key}={name!r} is not supported; supported: {sorted(ACT_FROM_HF)}')
  return ACT_FROM_HF[name]


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
LLM_TYPES = ('llama', 'mistral', 'qwen2')


def llm_from_hf(c, where: str = 'config.json', tie: bool | None = None) -> LLMConfig:
  """LlamaConfig / MistralConfig / Qwen2Config -> LLMConfig (errors name the unsupported key)."""
  if c.model_type not in LLM_TYPES:
    raise ValueError(f'{where}: model_type={c.model_type!r} is not a supported decoder; '
                     f'supported: {list(LLM_TYPES)}')
  for key in ('attention_bias', 'mlp_bias'):   # Llama options our decoder does not have
    if getattr(c, key, False):
      raise ValueError(f'{where}: {key}=true is not supported (only q/k/v biases, as in Qwen2)')
  window = getattr(c, 'sliding_window', None)
  if c.model_type == 'qwen2' and getattr(c, 'use_sliding_window', False):
    raise ValueError(f'{where}: use_sliding_window=true is not supported')
  if c.model_type == 'qwen2' or window is None or window >= c.max_position_embeddings:
    window = 0   # Qwen2 keeps `sliding_window` in its config but only uses it when enabled
  rope = dict(c.rope_parameters or {})
  kind = rope.get('rope_type', 'default')
  if kind not in ROPE_TYPES:
    raise ValueError(f'{where}: rope_parameters.rope_type={kind!r} is not supported; '
                     f'supported: {list(ROPE_TYPES)}')
  scaling = RopeScaling(type=kind)
  if kind in ('linear', 'llama3'):
    scaling = dataclasses.replace(scaling, factor=float(rope['factor']))
  if kind == 'llama3':
    scaling = dataclasses.replace(
        scaling, low_freq_factor=float(rope['low_freq_factor']),
        high_freq_factor=float(rope['high_freq_factor']),
        original_max_position=int(rope['original_max_position_embeddings']))
  head_dim = getattr(c, 'head_dim', None) or 0
  return LLMConfig(
      vocab_size=c.vocab_size, hidden=c.hidden_size, depth=c.num_hidden_layers,
      heads=c.num_attention_heads, kv_heads=c.num_key_value_heads or c.num_attention_heads,
      head_dim=0 if head_dim == c.hidden_size // c.num_attention_heads else head_dim,
      mlp_dim=c.intermediate_size, norm_eps=float(c.rms_norm_eps),
      rope_theta=float(rope.get('rope_theta', 10000.0)), rope_scaling=scaling,
      max_position=c.max_position_embeddings, qkv_bias=c.model_type == 'qwen2',
      tie_embeddings=bool(c.tie_word_embeddings if tie is None else tie),
      sliding_window=int(window),
      act=_act(c.hidden_act, f'{where}: hidden_act'))


def llm_to_hf(cfg: LLMConfig, dtype: str = 'float32'):
  """LLMConfig -> transformers LlamaConfig (no biases) or Qwen2Config (q/k/v biases)."""
  if cfg.moe.num_experts:
    raise ValueError('export of Mixture-of-Experts decoders is not supported yet')
  rope = {'rope_type': cfg.rope_scaling.type, 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling.type in ('linear', 'llama3'):
    rope['factor'] = cfg.rope_scaling.factor
  if cfg.rope_scaling.type == 'llama3':
    rope.update(low_freq_factor=cfg.rope_scaling.low_freq_factor,
                high_freq_factor=cfg.rope_scaling.high_freq_factor,
                original_max_position_embeddings=cfg.rope_scaling.original_max_position)
  kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.num_kv_heads, hidden_act=ACT_TO_HF[cfg.act],
            max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps,
            rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings, dtype=dtype)
  if cfg.qkv_bias:
    if cfg.dim_per_head != cfg.hidden // cfg.heads:
      raise ValueError(f'Qwen2 export needs head_dim == hidden // heads '
                       f'({cfg.hidden // cfg.heads}), got {cfg.dim_per_head}')
    if cfg.sliding_window:
      raise ValueError('export of q/k/v biases with a sliding window is not supported')
    return transformers.Qwen2Config(**kw)
  if cfg.sliding_window:
    return transformers.MistralConfig(head_dim=cfg.dim_per_head,
                                      sliding_window=cfg.sliding_window, **kw)
  return transformers.LlamaConfig(head_dim=cfg.dim_per_head, **kw)


VISION_TYPES = {'clip_vision_model': 'clip', 'siglip_vision_model': 'siglip'}


def vision_from_hf(c, feature_layer=-1, feature_select='full',
                   where: str = 'config.json') -> VisionConfig:
  """CLIPVisionConfig / SiglipVisionConfig -> VisionConfig."""
  if c.model_type not in VISION_TYPES:
    raise ValueError(f'{where}: vision model_type={c.model_type!r} is not supported; '
                     f'supported: {sorted(VISION_TYPES)}')
  if getattr(c, 'num_channels', 3) != 3:
    raise ValueError(f'{where}: num_channels={c.num_channels}; only RGB (3) is supported')
  if isinstance(feature_layer, (list, tuple)):
    feature_layer = tuple(int(x) for x in feature_layer)
  return VisionConfig(
      kind=VISION_TYPES[c.model_type], image_size=c.image_size, patch_size=c.patch_size,
      width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
      mlp_dim=c.intermediate_size, norm_eps=float(c.layer_norm_eps),
      act=_act(c.hidden_act, f'{where}: hidden_act'), feature_layer=feature_layer,
      feature_select=feature_select)


def vision_to_hf(cfg: VisionConfig, dtype: str = 'float32'):
  kw = dict(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads, image_size=cfg.image_size,
            patch_size=cfg.patch_size, layer_norm_eps=cfg.norm_eps,
            hidden_act=ACT_TO_HF[cfg.activation], dtype=dtype)
  if cfg.kind == 'clip':
    return transformers.CLIPVisionConfig(**kw)
  return transformers.SiglipVisionConfig(vision_use_head=False, **kw)   # no MAP head here


def mllm_from_hf(c, where: str = 'config.json') -> MLLMConfig:
  """LlavaConfig / LlavaNextConfig -> MLLMConfig."""
  select = c.vision_feature_select_strategy
  if select not in SELECT_FROM_HF:
    raise ValueError(f'{where}: vision_feature_select_strategy={select!r}; expected '
                     f'{sorted(SELECT_FROM_HF)}')
  vision = vision_from_hf(c.vision_config, c.vision_feature_layer, SELECT_FROM_HF[select],
                          f'{where}: vision_config')
  if not vision.has_cls and select == 'default':
    raise ValueError(f"{where}: vision_feature_select_strategy='default' drops the first token "
                     f'of a {vision.kind} tower, which has no class token; not supported '
                     "(use 'full')")
  pinpoints = ()
  if c.model_type == 'llava_next':
    pinpoints = tuple(tuple(int(v) for v in p) for p in c.image_grid_pinpoints)
    if vision.num_tokens != vision.num_patches:
      raise ValueError(f"{where}: LLaVA-NeXT packing needs square patch grids per tile; "
                       f"vision_feature_select_strategy={select!r} keeps the class token")
  return MLLMConfig(
      llm=llm_from_hf(c.text_config, f'{where}: text_config', tie=c.tie_word_embeddings),
      vision=vision,
      connector=ConnectorConfig(kind='mlp', depth=2, bias=bool(c.multimodal_projector_bias),
                                act=_act(c.projector_hidden_act,
                                         f'{where}: projector_hidden_act')),
      image_token_id=int(c.image_token_id), image_grid_pinpoints=pinpoints)


def mllm_arch(cfg: MLLMConfig) -> str:
  """The transformers architecture an MLLMConfig with a vision tower exports as."""
  if cfg.connector.kind == 'qformer':
    return ('InstructBlipForConditionalGeneration' if cfg.connector.qformer.instruction
            else 'Blip2ForConditionalGeneration')
  return ('LlavaNextForConditionalGeneration' if cfg.image_grid_pinpoints
          else 'LlavaForConditionalGeneration')


def mllm_to_hf(cfg: MLLMConfig, dtype: str = 'float32'):
  c, v = cfg.connector, cfg.vision
  if c.kind == 'qformer':
    from mllm_jax.hf import blip2
    return blip2.mllm_to_hf(cfg, dtype)
  if c.kind != 'mlp' or c.depth != 2:
    raise ValueError(f'connector kind={c.kind!r} depth={c.depth} has no transformers LLaVA '
                     "equivalent (its projector is kind='mlp', depth=2)")
  if not v.has_cls and v.feature_select == 'patch':
    v = dataclasses.replace(v, feature_select='full')   # the same features for SigLIP
  kw = dict(vision_config=vision_to_hf(v, dtype), text_config=llm_to_hf(cfg.llm, dtype),
            image_token_index=cfg.image_token_id, projector_hidden_act=ACT_TO_HF[c.act],
            vision_feature_select_strategy=SELECT_TO_HF[v.feature_select],
            vision_feature_layer=(list(v.feature_layer) if isinstance(v.feature_layer, tuple)
                                  else v.feature_layer),
            multimodal_projector_bias=c.bias, tie_word_embeddings=cfg.llm.tie_embeddings,
            image_seq_length=v.num_tokens, dtype=dtype)
  if cfg.image_grid_pinpoints:
    return transformers.LlavaNextConfig(
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints], **kw)
  return transformers.LlavaConfig(**kw)


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
  """Our parameter leaf `path` ('/'-joined) <-> HF tensor `key` ('{i}': one per layer)."""
  path: str
  key: str
  kind: str = 'copy'   # copy | flat | linear | conv
  n_in: int = 1        # linear: leading input axes of our kernel (2 for [heads, head_dim, embed])
  rows: int = 0        # >0: the checkpoint has only `rows` rows (vocabulary) on HF axis 0; the
                       # added rows start as their mean (LLaVA's new-token initialisation)
  lead: int = 0        # HF has `lead` extra leading axes of size 1

  @property
  def stacked(self) -> bool:
    return '{i}' in self.key

  def hf_shape(self, shape: tuple) -> tuple:
    """HF shape of one tensor, given our (per-layer) shape."""
    if self.kind == 'flat':
      out = (math.prod(shape),)
    elif self.kind == 'linear':
      out = (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))
    elif self.kind == 'conv':
      kh, kw, i, o = shape
      out = (o, i, kh, kw)
    else:
      out = tuple(shape)
    out = (self.rows,) + out[1:] if self.rows else out
    return (1,) * self.lead + out

  def to_ours(self, x: np.ndarray, shape: tuple) -> np.ndarray:
    if self.lead:
      x = x.reshape(x.shape[self.lead:])
    if self.rows:   # grow the vocabulary axis with the mean row
      n = math.prod(shape) // math.prod(x.shape[1:])
      mean = x.astype(np.float32).mean(0, keepdims=True).astype(x.dtype)
      x = np.concatenate([x, np.repeat(mean, n - x.shape[0], axis=0)])
    if self.kind == 'linear':
      x = x.T
    elif self.kind == 'conv':
      x = x.transpose(2, 3, 1, 0)
    return x.reshape(shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.kind == 'linear':
      x = x.reshape(math.prod(x.shape[:self.n_in]), -1).T
    elif self.kind == 'conv':
      x = x.transpose(3, 2, 0, 1)
    elif self.kind == 'flat':
      x = x.reshape(-1)
    return x.reshape((1,) * self.lead + x.shape) if self.lead else x


def _prefixed(rules, ours, hf):
  return [dataclasses.replace(r, path=ours + r.path, key=hf + r.key) for r in rules]


def decoder_rules(cfg: LLMConfig, ours: str = '', hf: str = '') -> list[Rule]:
  """Our Decoder <-> LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM keys."""
  a = 'model.layers.{i}.'
  r = [Rule('embed_tokens/embedding', 'model.embed_tokens.weight'),
       Rule('norm/scale', 'model.norm.weight'),
       Rule('layers/input_norm/scale', a + 'input_layernorm.weight'),
       Rule('layers/post_attn_norm/scale', a + 'post_attention_layernorm.weight'),
       Rule('layers/attn/o_proj/kernel', a + 'self_attn.o_proj.weight', 'linear', n_in=2)]
  for n in 'qkv':
    r.append(Rule(f'layers/attn/{n}_proj/kernel', a + f'self_attn.{n}_proj.weight', 'linear'))
    if cfg.qkv_bias:
      r.append(Rule(f'layers/attn/{n}_proj/bias', a + f'self_attn.{n}_proj.bias', 'flat'))
  for n in ('gate_proj', 'up_proj', 'down_proj'):
    r.append(Rule(f'layers/mlp/{n}/kernel', a + f'mlp.{n}.weight', 'linear'))
  if not cfg.tie_embeddings:
    r.append(Rule('lm_head/kernel', 'lm_head.weight', 'linear'))
  return _prefixed(r, ours, hf)


def vision_rules(cfg: VisionConfig, ours: str = '', hf: str = '') -> list[Rule]:
  """Our VisionEncoder <-> CLIPVisionModel / SiglipVisionModel keys (flat, >= 5.6 layout), or
  Blip2VisionModel keys for kind='blip2'."""
  if cfg.kind == 'blip2':
    from mllm_jax.hf import blip2
    return blip2.vision_rules(cfg, ours, hf)
  e = 'embeddings.'
  r = [Rule('patch_embed/kernel', e + 'patch_embedding.weight', 'conv'),
       Rule('position_embedding', e + 'position_embedding.weight'),
       Rule('post_norm/scale', 'post_layernorm.weight'),
       Rule('post_norm/bias', 'post_layernorm.bias')]
  if cfg.has_cls:
    r += [Rule('class_embedding', e + 'class_embedding'),
          Rule('pre_norm/scale', 'pre_layrnorm.weight'),   # sic: CLIP's spelling
          Rule('pre_norm/bias', 'pre_layrnorm.bias')]
  else:
    r.append(Rule('patch_embed/bias', e + 'patch_embedding.bias'))
  a = 'encoder.layers.{i}.'
  for ours_n, hf_n in (('norm1', 'layer_norm1'), ('norm2', 'layer_norm2')):
    r += [Rule(f'layers/{ours_n}/scale', a + hf_n + '.weight'),
          Rule(f'layers/{ours_n}/bias', a + hf_n + '.bias')]
  for n in 'qkv':
    r += [Rule(f'layers/{n}_proj/kernel', a + f'self_attn.{n}_proj.weight', 'linear'),
          Rule(f'layers/{n}_proj/bias', a + f'self_attn.{n}_proj.bias', 'flat')]
  r += [Rule('layers/o_proj/kernel', a + 'self_attn.out_proj.weight', 'linear', n_in=2),
        Rule('layers/o_proj/bias', a + 'self_attn.out_proj.bias')]
  for n in ('fc1', 'fc2'):
    r += [Rule(f'layers/{n}/kernel', a + f'mlp.{n}.weight', 'linear'),
          Rule(f'layers/{n}/bias', a + f'mlp.{n}.bias')]
  return _prefixed(r, ours, hf)


def mllm_rules(cfg: MLLMConfig) -> list[Rule]:
  """Our MLLM <-> LLaVA / LLaVA-NeXT (BLIP-2 / InstructBLIP for a Q-Former) keys in the layout
  `save_pretrained` writes."""
  if cfg.vision is None:
    return decoder_rules(cfg.llm, 'llm/')
  if cfg.connector.kind == 'qformer':
    from mllm_jax.hf import blip2
    return blip2.mllm_rules(cfg)
  r = decoder_rules(cfg.llm, 'llm/', 'language_model.')
  r += vision_rules(cfg.vision, 'vision/', 'vision_tower.')
  for k in range(1, cfg.connector.depth + 1):
    r.append(Rule(f'connector/linear_{k}/kernel', f'multi_modal_projector.linear_{k}.weight',
                  'linear'))
    if cfg.connector.bias:
      r.append(Rule(f'connector/linear_{k}/bias', f'multi_modal_projector.linear_{k}.bias'))
  if cfg.image_grid_pinpoints:
    r.append(Rule('image_newline', 'image_newline'))
  return r


# ----------------------------------------------------------------------------------------------
# Architectures: accepted key layouts -> canonical keys
# ----------------------------------------------------------------------------------------------
def _renamer(rewrites: list[tuple[str, str]], drop: list[str] = (),
             keep_only: str | None = None) -> Callable[[str], str | None]:
  """First matching (old prefix -> new prefix) rewrite; keys matching a `drop` regex, or not
  starting with `keep_only`, map to None (skipped on purpose and reported)."""
  drop_rx = [re.compile(d) for d in drop]

  def rename(key):
    if keep_only is not None and not key.startswith(keep_only):
      return None
    for old, new in rewrites:
      if key.startswith(old):
        key = new + key[len(old):]
        break
    return None if any(d.fullmatch(key) for d in drop_rx) else key
  return rename


_BUFFERS = [r'.*rotary_emb\.inv_freq', r'.*embeddings\.position_ids']   # non-parameters
_VISION_LEGACY = [('vision_model.', '')]   # transformers <= 5.5 nested the tower one level
_LLAVA_LAYOUTS = [   # in-memory state dict (>= 5.6, <= 5.5) and hub files -> save_pretrained
    ('model.language_model.', 'language_model.model.'),
    ('lm_head.', 'language_model.lm_head.'),
    ('model.vision_tower.vision_model.', 'vision_tower.'),
    ('vision_tower.vision_model.', 'vision_tower.'),
    ('model.vision_tower.', 'vision_tower.'),
    ('model.multi_modal_projector.', 'multi_modal_projector.'),
    ('model.image_newline', 'image_newline')]


@dataclasses.dataclass(frozen=True)
class Family:
  kind: str                           # 'llm' | 'vision' | 'mllm'
  config: Callable                    # transformers config -> our config
  rename: Callable[[object], Callable[[str], str | None]]   # our config -> key renamer


def _llm_rename(cfg):
  tied = [r'lm_head\.weight'] if cfg.llm.tie_embeddings else []   # the tied copy, if saved
  return _renamer([], _BUFFERS + tied)


def _vision_rename(cfg):   # SigLIP's MAP pooling head (`head.*`) is not part of our tower
  return _renamer(_VISION_LEGACY, _BUFFERS + [r'head\..*'])


def _vision_of_dual_rename(cfg):   # CLIPModel / SiglipModel: the vision tower only
  return _renamer(_VISION_LEGACY, _BUFFERS + [r'head\..*'], keep_only='vision_model.')


def _mllm_rename(cfg):
  tied = [r'language_model\.lm_head\.weight'] if cfg.llm.tie_embeddings else []
  return _renamer(_LLAVA_LAYOUTS, _BUFFERS + [r'vision_tower\.head\..*'] + tied)


def _text_only(c):
  return MLLMConfig(llm=llm_from_hf(c), vision=None)


FAMILIES: dict[str, Family] = {
    'LlamaForCausalLM': Family('llm', _text_only, _llm_rename),
    'MistralForCausalLM': Family('llm', _text_only, _llm_rename),
    'Qwen2ForCausalLM': Family('llm', _text_only, _llm_rename),
    'CLIPVisionModel': Family('vision', vision_from_hf, _vision_rename),
    'SiglipVisionModel': Family('vision', vision_from_hf, _vision_rename),
    'CLIPModel': Family('vision', lambda c: vision_from_hf(c.vision_config),
                        _vision_of_dual_rename),
    'SiglipModel': Family('vision', lambda c: vision_from_hf(c.vision_config),
                          _vision_of_dual_rename),
    'LlavaForConditionalGeneration': Family('mllm', mllm_from_hf, _mllm_rename),
    'LlavaNextForConditionalGeneration': Family('mllm', mllm_from_hf, _mllm_rename),
}


from mllm_jax.hf import blip2 as _blip2  # noqa: E402  (uses the helpers above)

FAMILIES.update(_blip2.FAMILIES)


def rules_for(cfg) -> list[Rule]:
  """Rules for an MLLMConfig (LLaVA or text-only) or a VisionConfig (a bare tower)."""
  return vision_rules(cfg) if isinstance(cfg, VisionConfig) else mllm_rules(cfg)
