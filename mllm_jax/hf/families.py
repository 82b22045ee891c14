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
A key containing `{i}` is one tensor per layer, stacked on our leading `layers` axis; stack
position p is HF layer `first + step * p` (a scanned group of `step` blocks, or a stack that
starts at layer `first`; see mllm_jax.models.llm.layer_plan). A key containing `{e}` is one
tensor per expert, stacked on our expert axis: MoE checkpoints on disk hold one tensor per
expert (`experts.{e}.w1.weight` for Mixtral, `experts.{e}.gate_proj.weight` for Qwen-MoE, as
transformers 5.x `save_pretrained` writes them); the fused in-memory tensors of transformers
>= 5 (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) are split into those
keys on reading (`FusedExperts`).
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

from mllm_jax.models.config import (ConnectorConfig, LLMConfig, MLLMConfig, MoEConfig,
                                    RopeScaling, VisionConfig)
from mllm_jax.models.llm import layer_plan

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
LLM_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3', 'mixtral', 'qwen2_moe', 'qwen3_moe')
_QWEN = ('qwen2', 'qwen3', 'qwen2_moe', 'qwen3_moe')   # sliding window only if use_sliding_window


def moe_from_hf(c, where: str) -> MoEConfig:
  """The MoE part of a MixtralConfig / Qwen2MoeConfig / Qwen3MoeConfig (dense: no experts)."""
  if c.model_type == 'mixtral':
    if getattr(c, 'router_jitter_noise', 0.0):
      raise ValueError(f'{where}: router_jitter_noise={c.router_jitter_noise} is not supported '
                       '(set it to 0)')
    return MoEConfig(num_experts=c.num_local_experts, experts_per_token=c.num_experts_per_tok,
                     mlp_dim=c.intermediate_size, norm_topk_prob=True,
                     aux_loss_coef=float(c.router_aux_loss_coef))
  if c.model_type in ('qwen2_moe', 'qwen3_moe'):
    return MoEConfig(
        num_experts=c.num_experts, experts_per_token=c.num_experts_per_tok,
        every=c.decoder_sparse_step, dense_layers=tuple(c.mlp_only_layers or ()),
        mlp_dim=c.moe_intermediate_size, norm_topk_prob=bool(c.norm_topk_prob),
        shared_mlp_dim=(c.shared_expert_intermediate_size if c.model_type == 'qwen2_moe' else 0),
        aux_loss_coef=float(c.router_aux_loss_coef))
  return MoEConfig()


def llm_from_hf(c, where: str = 'config.json', tie: bool | None = None) -> LLMConfig:
  """Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen2-MoE / Qwen3-MoE config -> LLMConfig
  (errors name the unsupported key)."""
  if c.model_type not in LLM_TYPES:
    raise ValueError(f'{where}: model_type={c.model_type!r} is not a supported decoder; '
                     f'supported: {list(LLM_TYPES)}')
  for key in ('attention_bias', 'mlp_bias'):   # Llama / Qwen3 options our decoder does not have
    if getattr(c, key, False):
      raise ValueError(f'{where}: {key}=true is not supported (only q/k/v biases, as in Qwen2)')
  if c.model_type == 'qwen2_moe' and getattr(c, 'shared_expert_intermediate_size', 1) <= 0:
    raise ValueError(f'{where}: shared_expert_intermediate_size must be > 0')
  window = getattr(c, 'sliding_window', None)
  if c.model_type in _QWEN and getattr(c, 'use_sliding_window', False):
    raise ValueError(f'{where}: use_sliding_window=true is not supported')
  if c.model_type in _QWEN or window is None or window >= c.max_position_embeddings:
    window = 0   # Qwen keeps `sliding_window` in its config but only uses it when enabled
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
      max_position=c.max_position_embeddings,
      qkv_bias=c.model_type == 'qwen2' or (c.model_type == 'qwen2_moe' and bool(c.qkv_bias)),
      qk_norm=c.model_type in ('qwen3', 'qwen3_moe'),
      tie_embeddings=bool(c.tie_word_embeddings if tie is None else tie),
      sliding_window=int(window),
      act=_act(c.hidden_act, f'{where}: hidden_act'), moe=moe_from_hf(c, where))


def llm_architecture(hf_config) -> str:
  """transformers config -> its causal-LM class name (LlamaConfig -> LlamaForCausalLM)."""
  return type(hf_config).__name__.replace('Config', 'ForCausalLM')


def llm_to_hf(cfg: LLMConfig, dtype: str = 'float32'):
  """LLMConfig -> transformers LlamaConfig (no biases), Qwen2Config (q/k/v biases), MistralConfig
  (sliding window), Qwen3Config (q/k norms), or for MoE decoders MixtralConfig, Qwen2MoeConfig
  (shared expert / q/k/v biases) or Qwen3MoeConfig (q/k norms)."""
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
  if cfg.moe.num_experts:
    return _moe_to_hf(cfg, kw)
  if cfg.qk_norm:
    if cfg.qkv_bias or cfg.sliding_window:
      raise ValueError('q/k norms export as Qwen3, which has no q/k/v biases or sliding window')
    return transformers.Qwen3Config(head_dim=cfg.dim_per_head, **kw)
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


def _moe_to_hf(cfg: LLMConfig, kw: dict):
  m = cfg.moe
  if cfg.sliding_window and (cfg.qk_norm or cfg.qkv_bias or m.shared_mlp_dim):
    raise ValueError('a sliding window exports only with a Mixtral-shaped MoE decoder')
  common = dict(num_experts_per_tok=m.experts_per_token, router_aux_loss_coef=m.aux_loss_coef)
  qwen = dict(num_experts=m.num_experts, moe_intermediate_size=m.mlp_dim,
              decoder_sparse_step=m.every, mlp_only_layers=list(m.dense_layers),
              norm_topk_prob=m.norm_topk_prob, head_dim=cfg.dim_per_head, **common)
  if cfg.qk_norm:
    if cfg.qkv_bias or m.shared_mlp_dim:
      raise ValueError('MoE with q/k norms exports as Qwen3-MoE, which has no q/k/v biases '
                       'and no shared expert')
    return transformers.Qwen3MoeConfig(**qwen, **kw)
  if m.shared_mlp_dim:
    return transformers.Qwen2MoeConfig(shared_expert_intermediate_size=m.shared_mlp_dim,
                                       qkv_bias=cfg.qkv_bias, **qwen, **kw)
  if cfg.qkv_bias or not all(cfg.moe_layers) or not m.norm_topk_prob:
    raise ValueError('an MoE decoder without a shared expert or q/k norms exports as Mixtral, '
                     'which needs every layer MoE, renormalised top-k weights and no biases '
                     '(config.model.llm.moe.every / dense_layers / norm_topk_prob)')
  return transformers.MixtralConfig(num_local_experts=m.num_experts, head_dim=cfg.dim_per_head,
                                    sliding_window=cfg.sliding_window or None,
                                    **common, **{**kw, 'intermediate_size': m.mlp_dim})


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
  first: int = 0       # stacked: position p of our stack is HF layer first + step * p
  step: int = 1

  @property
  def stacked(self) -> bool:
    return '{i}' in self.key

  @property
  def experts(self) -> bool:   # '{e}': one tensor per expert, stacked on our expert axis
    return '{e}' in self.key

  def key_at(self, p: int | None, e: int | None = None) -> str:
    """HF key of position p of our stacked leaf (and expert e)."""
    return self.key.format(i=None if p is None else self.first + self.step * p, e=e)

  def hf_tensors(self, shape: tuple):
    """-> [(HF key, HF shape, index into our leaf)] for our leaf of `shape`."""
    layers = [(p,) for p in range(shape[0])] if self.stacked else [()]
    inner = shape[1:] if self.stacked else shape
    if self.experts:
      return [(self.key_at(*(l or (None,)), e), self.hf_shape(inner[1:]), l + (e,))
              for l in layers for e in range(inner[0])]
    return [(self.key_at(*l) if l else self.key, self.hf_shape(inner), l) for l in layers]

  def read(self, reader, shape: tuple, p: int | None = None) -> np.ndarray:
    """Our (per-layer, for stacked rules) array of `shape` from a checkpoint reader."""
    if self.experts:
      return np.stack([self.to_ours(reader.read(self.key_at(p, e)), shape[1:])
                       for e in range(shape[0])])
    return self.to_ours(reader.read(self.key_at(p) if self.stacked else self.key), shape)

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
  """Our Decoder <-> Llama / Qwen2 / Qwen3 / Mistral / Mixtral / Qwen2-MoE / Qwen3-MoE
  ForCausalLM keys."""
  r = [Rule('embed_tokens/embedding', 'model.embed_tokens.weight'),
       Rule('norm/scale', 'model.norm.weight')]
  for name, kinds, _, first in layer_plan(cfg):
    for j, is_moe in enumerate(kinds):
      at = dict(first=first + j, step=len(kinds))
      path = f'{name}/' + (f'block_{j}/' if len(kinds) > 1 else '')
      r += [dataclasses.replace(rule, path=path + rule.path, **at)
            for rule in _block_rules(cfg, is_moe)]
  if not cfg.tie_embeddings:
    r.append(Rule('lm_head/kernel', 'lm_head.weight', 'linear'))
  return _prefixed(r, ours, hf)


# HF expert tensor names (gate, up, down) per MoE module name of the checkpoint files
EXPERT_NAMES = {'block_sparse_moe': ('w1', 'w3', 'w2'), 'mlp': ('gate_proj', 'up_proj', 'down_proj')}


def moe_module(cfg: LLMConfig) -> str:
  """The MoE module's name in checkpoint files: Mixtral's `block_sparse_moe`, else `mlp`
  (Qwen2-MoE / Qwen3-MoE). The same test as `llm_to_hf`'s choice of family."""
  m = cfg.moe
  mixtral = not (cfg.qk_norm or cfg.qkv_bias or m.shared_mlp_dim) and all(cfg.moe_layers)
  return 'block_sparse_moe' if mixtral else 'mlp'


def _block_rules(cfg: LLMConfig, is_moe: bool) -> list[Rule]:
  """One decoder layer's rules, paths relative to the block."""
  a = 'model.layers.{i}.'
  r = [Rule('input_norm/scale', a + 'input_layernorm.weight'),
       Rule('post_attn_norm/scale', a + 'post_attention_layernorm.weight'),
       Rule('attn/o_proj/kernel', a + 'self_attn.o_proj.weight', 'linear', n_in=2)]
  for n in 'qkv':
    r.append(Rule(f'attn/{n}_proj/kernel', a + f'self_attn.{n}_proj.weight', 'linear'))
    if cfg.qkv_bias:
      r.append(Rule(f'attn/{n}_proj/bias', a + f'self_attn.{n}_proj.bias', 'flat'))
  if cfg.qk_norm:
    r += [Rule(f'attn/{n}_norm/scale', a + f'self_attn.{n}_norm.weight') for n in 'qk']
  if is_moe:
    m = a + moe_module(cfg) + '.'
    names = EXPERT_NAMES[moe_module(cfg)]
    r.append(Rule('mlp/router/kernel', m + 'gate.weight', 'linear'))
    r += [Rule(f'mlp/{ours}', m + f'experts.{{e}}.{hf}.weight', 'linear')
          for ours, hf in zip(('gate_proj', 'up_proj', 'down_proj'), names)]
    if cfg.moe.shared_mlp_dim:
      r += [Rule(f'mlp/shared_expert/{n}/kernel', m + f'shared_expert.{n}.weight', 'linear')
            for n in ('gate_proj', 'up_proj', 'down_proj')]
      r.append(Rule('mlp/shared_expert_gate/kernel', m + 'shared_expert_gate.weight', 'linear'))
  else:
    r += [Rule(f'mlp/{n}/kernel', a + f'mlp.{n}.weight', 'linear')
          for n in ('gate_proj', 'up_proj', 'down_proj')]
  return r


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
  return _moe_renamer(cfg.llm, _renamer([], _BUFFERS + tied))


_MIXTRAL_MLP = re.compile(r'(model\.layers\.\d+)\.mlp\.')


def _moe_renamer(llm: LLMConfig, rename):
  """Mixtral's in-memory module is `mlp`, its files' `block_sparse_moe`: files win."""
  if not llm.moe.num_experts or moe_module(llm) != 'block_sparse_moe':
    return rename

  def moe_rename(key):
    key = rename(key)
    return None if key is None else _MIXTRAL_MLP.sub(r'\1.block_sparse_moe.', key)
  return moe_rename


class FusedExperts:
  """A checkpoint reader (Checkpoint / StateDict) whose fused expert tensors, as transformers
  >= 5 holds them in memory (`<m>.experts.gate_up_proj` [E, 2I, H], `<m>.experts.down_proj`
  [E, H, I]), read as the per-expert keys of the files (`<m>.experts.{e}.<gate|up|down>.weight`).
  The last fused tensor read is kept, so a layer's experts cost one read."""

  _FUSED = re.compile(r'(.*\.(block_sparse_moe|mlp)\.experts\.)(gate_up_proj|down_proj)$')

  def __init__(self, reader):
    self.reader, self.directory, self.dropped = reader, reader.directory, reader.dropped
    self._virtual, self._cached = {}, (None, None)
    for key in reader.keys():
      m = self._FUSED.fullmatch(key)
      if not m:
        continue
      gate, up, down = EXPERT_NAMES[m.group(2)]
      shape = reader.shape(key)
      if m.group(3) == 'gate_up_proj':
        i = shape[1] // 2
        for e in range(shape[0]):
          self._virtual[f'{m.group(1)}{e}.{gate}.weight'] = (key, e, slice(0, i), (i, shape[2]))
          self._virtual[f'{m.group(1)}{e}.{up}.weight'] = (key, e, slice(i, 2 * i),
                                                          (i, shape[2]))
      else:
        for e in range(shape[0]):
          self._virtual[f'{m.group(1)}{e}.{down}.weight'] = (key, e, slice(None), shape[1:])
    fused = {v[0] for v in self._virtual.values()}
    self._keys = [k for k in reader.keys() if k not in fused] + list(self._virtual)

  def keys(self):
    return self._keys

  def shape(self, key):
    return tuple(self._virtual[key][3]) if key in self._virtual else self.reader.shape(key)

  def read(self, key):
    if key not in self._virtual:
      return self.reader.read(key)
    fused, e, rows, _ = self._virtual[key]
    if self._cached[0] != fused:
      self._cached = (fused, self.reader.read(fused))
    return self._cached[1][e, rows]


def _vision_rename(cfg):   # SigLIP's MAP pooling head (`head.*`) is not part of our tower
  return _renamer(_VISION_LEGACY, _BUFFERS + [r'head\..*'])


def _vision_of_dual_rename(cfg):   # CLIPModel / SiglipModel: the vision tower only
  return _renamer(_VISION_LEGACY, _BUFFERS + [r'head\..*'], keep_only='vision_model.')


def _mllm_rename(cfg):
  tied = [r'language_model\.lm_head\.weight'] if cfg.llm.tie_embeddings else []
  return _moe_renamer(cfg.llm, _renamer(_LLAVA_LAYOUTS, _BUFFERS + [r'vision_tower\.head\..*'] +
                                        tied))


def _text_only(c):
  return MLLMConfig(llm=llm_from_hf(c), vision=None)


FAMILIES: dict[str, Family] = {
    'LlamaForCausalLM': Family('llm', _text_only, _llm_rename),
    'MistralForCausalLM': Family('llm', _text_only, _llm_rename),
    'Qwen2ForCausalLM': Family('llm', _text_only, _llm_rename),
    'Qwen3ForCausalLM': Family('llm', _text_only, _llm_rename),
    'MixtralForCausalLM': Family('llm', _text_only, _llm_rename),
    'Qwen2MoeForCausalLM': Family('llm', _text_only, _llm_rename),
    'Qwen3MoeForCausalLM': Family('llm', _text_only, _llm_rename),
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
