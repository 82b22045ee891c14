"""Typed, hashable model configs built from the `config.model` ConfigDict.

Modules take these frozen dataclasses (hashable, so they are valid Linen attributes and jit
static arguments). `from_dict` rejects unknown keys, naming them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp


def _build(cls, d: Mapping[str, Any] | None, where: str):
  d = dict(d or {})
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f'{where}: unknown key(s) {unknown}; known keys: {sorted(names)}')
  return cls(**d)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  type: str = 'default'           # 'default' | 'linear' | 'llama3'
  factor: float = 1.0
  low_freq_factor: float = 1.0    # llama3
  high_freq_factor: float = 4.0   # llama3
  original_max_position: int = 8192   # llama3

  def as_dict(self):
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-Experts feed-forward (mllm_jax.models.moe); num_experts=0 means dense everywhere.

  Layer i (0-based) is an MoE layer when (i + 1) % every == 0 and i is not in dense_layers
  (Qwen2-MoE's decoder_sparse_step / mlp_only_layers; Mixtral: every=1).
  """
  num_experts: int = 0
  experts_per_token: int = 2
  every: int = 1                  # MoE block on every `every`-th layer
  dense_layers: tuple[int, ...] = ()   # layers kept dense regardless of `every`
  mlp_dim: int = 0                # expert intermediate size (0 -> the LLM's mlp_dim)
  shared_mlp_dim: int = 0         # Qwen2-MoE shared expert (sigmoid-gated); 0 = none
  norm_topk_prob: bool = True     # renormalise the top-k weights (Mixtral; Qwen option)
  impl: str = 'dropless'          # 'dropless' | 'capacity' (token dropping, fixed shapes)
  dropless_impl: str = 'auto'     # 'ragged_dot' | 'blocks' | 'auto' (blocks on CPU)
  capacity_factor: float = 1.25   # capacity = ceil(factor * tokens * k / num_experts)
  aux_loss_coef: float = 0.001    # Switch load-balancing loss (transformers' router_aux_loss_coef)
  z_loss_coef: float = 0.0        # ST-MoE router z-loss

  def __post_init__(self):
    object.__setattr__(self, 'dense_layers', tuple(int(i) for i in self.dense_layers))
    if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
      raise ValueError(f'config.model.llm.moe.experts_per_token={self.experts_per_token} must '
                       f'be in [1, num_experts={self.num_experts}]')
    if self.every < 1:
      raise ValueError(f'config.model.llm.moe.every={self.every} must be >= 1')


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Llama / Qwen2 / Mistral-family decoder."""
  vocab_size: int = 32000
  hidden: int = 4096
  depth: int = 32
  heads: int = 32
  kv_heads: int = 0               # 0 -> heads (no GQA)
  head_dim: int = 0               # 0 -> hidden // heads
  mlp_dim: int = 11008
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  max_position: int = 4096
  qkv_bias: bool = False          # Qwen2
  qk_norm: bool = False           # Qwen3: per-head RMSNorm of queries and keys before RoPE
  sliding_window: int = 0         # Mistral: attend to the last `sliding_window` tokens (0 = all)
  tie_embeddings: bool = False
  act: str = 'silu'
  moe: MoEConfig = MoEConfig()
  hf_path: str = ''               # HF checkpoint dir to start from (mllm_jax.hf.pretrained)

  def __post_init__(self):   # accept plain dicts for the nested configs
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, 'rope_scaling',
                         _build(RopeScaling, self.rope_scaling, 'config.model.llm.rope_scaling'))
    if isinstance(self.moe, dict):
      object.__setattr__(self, 'moe', _build(MoEConfig, self.moe, 'config.model.llm.moe'))
    if self.moe.num_experts and not self.moe.mlp_dim:
      object.__setattr__(self, 'moe', dataclasses.replace(self.moe, mlp_dim=self.mlp_dim))

  @property
  def moe_layers(self) -> tuple[bool, ...]:
    """Per layer: True where the feed-forward is an MoE block."""
    m = self.moe
    return tuple(bool(m.num_experts) and (i + 1) % m.every == 0 and i not in m.dense_layers
                 for i in range(self.depth))

  @property
  def num_kv_heads(self):
    return self.kv_heads or self.heads

  @property
  def dim_per_head(self):
    return self.head_dim or self.hidden // self.heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """ViT image encoder: `clip` (class token, pre-LN, quick_gelu), `siglip` (no class token) or
  `blip2` (BLIP-2's EVA ViT: class token, no pre-LN, fused qkv, features through post-LN)."""
  kind: str = 'clip'
  image_size: int = 336
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  heads: int = 16
  mlp_dim: int = 4096
  norm_eps: float = 1e-5
  act: str = ''                   # '' -> quick_gelu (clip) / gelu_tanh (siglip)
  # Index into hidden states [embeddings, layer_1, ..., layer_L]; a tuple of indices
  # concatenates those hidden states on the feature axis (HF `vision_feature_layer` list).
  feature_layer: int | tuple[int, ...] = -2
  feature_select: str = 'patch'   # 'patch' drops the class token (LLaVA 'default'); 'full' keeps all
  qkv_bias: bool = True           # blip2: q and v biases (k's slice too, as HF stores one tensor)
  hf_path: str = ''               # HF checkpoint dir to start from (mllm_jax.hf.pretrained)

  def __post_init__(self):   # a list from a ConfigDict / JSON -> hashable tuple
    if isinstance(self.feature_layer, list):
      object.__setattr__(self, 'feature_layer', tuple(self.feature_layer))

  @property
  def feature_layers(self) -> tuple[int, ...]:
    """`feature_layer` as non-negative hidden-state indices."""
    layers = self.feature_layer if isinstance(self.feature_layer, tuple) else (self.feature_layer,)
    out = []
    for f in layers:
      n = f if f >= 0 else self.depth + 1 + f
      if not 0 <= n <= self.depth:
        raise ValueError(f'config.model.vision.feature_layer={self.feature_layer} is outside '
                         f'[-{self.depth + 1}, {self.depth}] for a {self.depth}-layer tower')
      out.append(n)
    if not out:
      raise ValueError('config.model.vision.feature_layer is an empty list')
    return tuple(out)

  @property
  def num_patches(self):
    return (self.image_size // self.patch_size) ** 2

  @property
  def has_cls(self):
    return self.kind in ('clip', 'blip2')

  @property
  def norm_features(self):
    """blip2: the features pass through `post_norm` (LAVIS `ln_vision`, HF last_hidden_state)."""
    return self.kind == 'blip2'

  @property
  def num_tokens(self):
    """Image tokens per image that reach the connector."""
    return self.num_patches + (1 if self.has_cls and self.feature_select == 'full' else 0)

  @property
  def activation(self):
    return self.act or {'clip': 'quick_gelu', 'siglip': 'gelu_tanh', 'blip2': 'gelu'}[self.kind]

  @property
  def layers_used(self):
    """Number of encoder layers whose output is needed for `feature_layer`."""
    return max(self.feature_layers)


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """BLIP-2 / InstructBLIP Querying Transformer (BERT-base sized by default)."""
  num_queries: int = 32           # learned query tokens = image tokens per image in the LLM
  hidden: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  norm_eps: float = 1e-12
  act: str = 'gelu'
  cross_attention_every: int = 2  # layer i cross-attends to the image iff i % every == 0
  # InstructBLIP: instruction tokens (qformer_input_ids) share self-attention with the queries
  instruction: bool = False
  vocab_size: int = 30522         # instruction: the Q-Former tokenizer's vocabulary (0: demo's)
  max_position: int = 512         # instruction: learned positions of the instruction tokens


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
  kind: str = 'mlp'               # 'mlp' (LLaVA mlp{depth}x_gelu) | 'linear' | 'qformer'
  depth: int = 2                  # mlp only
  act: str = 'gelu'               # mlp only
  bias: bool = True               # mlp / linear only
  qformer: QFormerConfig = QFormerConfig()   # kind='qformer' only
  # kind='qformer': a BLIP-2 stage-1 checkpoint (mllm_jax.train.blip2_stage1) that starts the
  # Q-Former and the vision tower (stage 2); the LLM and language_projection start as usual
  init_from: str = ''

  def __post_init__(self):
    if isinstance(self.qformer, dict):
      object.__setattr__(self, 'qformer',
                         _build(QFormerConfig, self.qformer, 'config.model.connector.qformer'))


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
  llm: LLMConfig = LLMConfig()
  vision: VisionConfig | None = VisionConfig()
  connector: ConnectorConfig = ConnectorConfig()
  image_token_id: int = -1
  dtype: str = 'float32'          # compute dtype
  param_dtype: str = 'float32'
  attention: str = 'einsum'       # 'einsum' | 'xla'
  # einsum only: causal attention in this many query blocks, each skipping the keys after its
  # last query (~(n+1)/(2n) of the score work; see layers.dot_product_attention)
  attention_blocks: int = 1
  remat_policy: str = 'none'      # see mllm_jax.models.llm.REMAT_POLICIES
  vision_remat_policy: str = 'none'
  # The vision tower's layers: 'scan' (nn.scan over the stacked weights) or 'unrolled' (a Python
  # loop over the layers it needs, on static slices of the same weights). `generate` picks
  # 'unrolled' for bf16 with its unrolled LLM loop: the loop takes ~28% off XLA:CPU's scanned
  # bf16 tower (BENCHMARKS.md, session 10); the parameters are the same either way.
  vision_layer_loop: str = 'scan'
  # LLaVA-NeXT AnyRes: candidate (height, width) resolutions; () = one tile per image (LLaVA).
  # Tiles are packed with unpadding and a learned `image_newline` after every feature row.
  image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
  init_from: str = ''             # all params from a convert / training / HF checkpoint dir

  def __post_init__(self):
    if not isinstance(self.image_grid_pinpoints, tuple) or any(
        not isinstance(p, tuple) for p in self.image_grid_pinpoints):
      object.__setattr__(self, 'image_grid_pinpoints',
                         tuple(tuple(int(v) for v in p) for p in self.image_grid_pinpoints))

  @property
  def image_tokens(self) -> int:
    """Sequence tokens per image: the Q-Former's queries, else the tower's tokens (LLaVA-NeXT
    images vary with their size: see `mllm.anyres_layout`)."""
    if self.connector.kind == 'qformer':
      return self.connector.qformer.num_queries
    return self.vision.num_tokens

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'MLLMConfig':
    d = dict(d)
    llm = dict(d.pop('llm', {}) or {})
    vision = d.pop('vision', None)
    out = dict(
        llm=_build(LLMConfig, llm, 'config.model.llm'),
        vision=_build(VisionConfig, vision, 'config.model.vision') if vision else None,
        connector=_build(ConnectorConfig, d.pop('connector', {}), 'config.model.connector'))
    out.update(d)
    return _build(cls, out, 'config.model')

  def to_dict(self):
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Stage1Config:
  """BLIP-2 stage 1 (representation learning, `mllm_jax.models.blip2_stage1`): a frozen ViT and
  a Q-Former with text input, trained with ITC / ITM / ITG. The Q-Former's `vocab_size` is its
  (BERT) tokenizer's, [DEC] included; `max_position` bounds the text length."""
  vision: VisionConfig = VisionConfig(kind='blip2')
  qformer: QFormerConfig = QFormerConfig()
  embed_dim: int = 256            # ITC space of vision_proj / text_proj (HF image_text_hidden_size)
  decoder_bos_id: int = -1        # ITG: id replacing the first text token ([DEC] in LAVIS)
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention: str = 'einsum'

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = 'config.model') -> 'Stage1Config':
    d = dict(d)
    vision = _build(VisionConfig, d.pop('vision', {}), f'{where}.vision')
    qformer = _build(QFormerConfig, d.pop('qformer', {}), f'{where}.qformer')
    return _build(cls, dict(d, vision=vision, qformer=qformer), where)

  def to_dict(self):
    return dataclasses.asdict(self)
