"""`load_hf` / `save_hf`: Hugging Face checkpoint directories <-> (Flax module, params).

Loading reads one tensor at a time and places it straight into its destination sharding:
a tensor is converted on the host (transpose / reshape / dtype) and handed to
`jax.make_array_from_callback`, which copies only each device's slice; per-layer tensors are
placed layer by layer and stacked on device. Host memory therefore peaks at about one tensor
(the largest one, usually the embedding), never at the model.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from mllm_jax import sharding as shd
from mllm_jax.hf import families
from mllm_jax.hf.families import FAMILIES, Rule, rules_for
from mllm_jax.hf.safetensors_io import Checkpoint, CheckpointError, write_checkpoint
from mllm_jax.models import MLLM, Decoder, MLLMConfig, VisionConfig, VisionEncoder

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Configs and models
# ----------------------------------------------------------------------------------------------
def read_config(path: str):
  """-> (architecture, transformers config) of a local HF directory; unsupported -> error."""
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.exists(cfg_path):
    raise CheckpointError(f'{path}: no config.json (expected a Hugging Face model directory)')
  try:
    with open(cfg_path) as f:
      archs = json.load(f).get('architectures') or []
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{cfg_path}: not valid JSON ({e})') from None
  known = [a for a in archs if a in FAMILIES]
  if not known:
    raise ValueError(f'{cfg_path}: architectures={archs} is not supported; supported: '
                     f'{sorted(FAMILIES)}')
  # A local directory: no network, and never trust_remote_code.
  return known[0], transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)


def model_config(path: str):
  """Our config for a HF directory: an MLLMConfig (LLaVA or text-only) or a VisionConfig."""
  arch, hf = read_config(path)
  return FAMILIES[arch].config(hf)


def build_model(cfg, dtype=jnp.float32):
  """MLLM for an MLLMConfig, VisionEncoder for a VisionConfig; params and compute in `dtype`."""
  name = jnp.dtype(dtype).name
  if isinstance(cfg, VisionConfig):
    return VisionEncoder(cfg, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
  return MLLM(dataclasses.replace(cfg, dtype=name, param_dtype=name))


def _init_inputs(model):
  if isinstance(model, VisionEncoder):
    s = model.cfg.image_size
    return (jnp.zeros((1, s, s, 3), jnp.float32),)
  return (jnp.zeros((1, 8), jnp.int32),)


def param_targets(model, mesh=None, rules='fsdp') -> dict:
  """{'a/b/c': ShapeDtypeStruct with its sharding}: NamedShardings from the params' logical axis
  names and `rules` on `mesh` (as StateFactory derives them), else the default device."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *_init_inputs(model))['params'])
  if mesh is None:
    dev = SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: dev, boxed,
                             is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  else:
    shardings = shd.shardings_from_boxed(boxed, mesh, shd.logical_rules(rules))
  return _targets(nn.meta.unbox(boxed), shardings)


def _targets(abstract, shardings) -> dict:
  flat_a = flax.traverse_util.flatten_dict(abstract, sep='/')
  flat_s = flax.traverse_util.flatten_dict(shardings, sep='/')
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_s[k]) for k, v in flat_a.items()}


def targets_from_abstract(abstract_params, prefix: str = '') -> dict:
  """Flat targets from a tree of sharded ShapeDtypeStructs (e.g. StateFactory.abstract_params),
  optionally only the subtree under `prefix` ('vision/', 'llm/')."""
  flat = flax.traverse_util.flatten_dict(abstract_params, sep='/')
  return {k: v for k, v in flat.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _natural(key):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', key)]


def summarize_keys(keys, limit: int = 20) -> str:
  """Keys grouped over layer indices: 'model.layers.{i}.mlp.up_proj.weight (i in 0..31)'."""
  groups: dict[str, list[int]] = {}
  for k in sorted(keys, key=_natural):
    m = re.search(r'\.(\d+)\.', k)
    pattern = k[:m.start()] + '.{i}.' + k[m.end():] if m else k
    groups.setdefault(pattern, []).append(int(m.group(1)) if m else -1)
  lines = []
  for pattern, idx in groups.items():
    if idx[0] < 0:
      lines.append(pattern)
    else:
      span = f'{idx[0]}..{idx[-1]}' if idx == list(range(idx[0], idx[-1] + 1)) else str(idx)
      lines.append(f'{pattern} (i in {span})')
  more = f'\n    ... ({len(lines) - limit} more)' if len(lines) > limit else ''
  return '\n    ' + '\n    '.join(lines[:limit]) + more


def check_keys(ckpt: Checkpoint, rules: list[Rule], targets: dict, what: str):
  """Every tensor the rules need is present with its shape, and nothing else is: one error
  listing all missing, unexpected and mis-shaped tensors (never a silent random init)."""
  expected = {}
  for r in rules:
    for key, shape, _ in r.hf_tensors(targets[r.path].shape):
      expected[key] = shape
  present = set(ckpt.keys())
  missing = set(expected) - present
  unexpected = present - set(expected)
  misshaped = [f'{k}: {list(ckpt.shape(k))}, expected {list(expected[k])}'
               for k in sorted(set(expected) & present, key=_natural)
               if tuple(ckpt.shape(k)) != tuple(expected[k])]
  if missing or unexpected or misshaped:
    parts = [f'{ckpt.directory} does not fit {what}:']
    if missing:
      parts.append(f'  missing {len(missing)} tensor(s):' + summarize_keys(missing))
    if unexpected:
      parts.append(f'  unexpected {len(unexpected)} tensor(s):' + summarize_keys(unexpected))
    if misshaped:
      parts.append(f'  {len(misshaped)} mis-shaped tensor(s):\n    ' +
                   '\n    '.join(misshaped[:20]))
    raise CheckpointError('\n'.join(parts))


def load_params(ckpt: Checkpoint, rules: list[Rule], targets: dict, what: str = 'the model'):
  """Checkpoint tensors -> {path: jax.Array} placed as `targets` ({path: ShapeDtypeStruct})."""
  covered = {r.path for r in rules}
  if covered != set(targets):   # a mapping bug, not a user error
    raise RuntimeError(f'key rules and model parameters differ: rules only '
                       f'{sorted(covered - set(targets))}, params only '
                       f'{sorted(set(targets) - covered)}')
  check_keys(ckpt, rules, targets, what)
  if ckpt.dropped:
    log.info('%s: not loaded on purpose (%d tensors):%s', ckpt.directory, len(ckpt.dropped),
             summarize_keys(ckpt.dropped, limit=8))
  out = {}
  for r in rules:
    t = targets[r.path]
    if r.stacked:
      out[r.path] = _place_stacked(lambda i, r=r, t=t: r.read(ckpt, t.shape[1:], i), t)
    else:
      out[r.path] = _place(r.read(ckpt, t.shape), t)
  return out


def _place(x: np.ndarray, target) -> jax.Array:
  """One host tensor -> a jax.Array laid out as `target`; each device copies only its slice."""
  x = np.asarray(x).astype(target.dtype, copy=False)
  return jax.make_array_from_callback(x.shape, target.sharding, lambda index: x[index])


def _place_stacked(read_layer, target) -> jax.Array:
  """Layers read one at a time, each placed sharded like a slice of the stack, then stacked on
  device: the host holds one layer; each device briefly holds its share twice."""
  sh = target.sharding
  layer_sh = NamedSharding(sh.mesh, P(*tuple(sh.spec)[1:])) if isinstance(sh, NamedSharding) else sh
  layer = jax.ShapeDtypeStruct(target.shape[1:], target.dtype, sharding=layer_sh)
  return _stacker(sh)([_place(read_layer(i), layer) for i in range(target.shape[0])])


@functools.lru_cache(maxsize=None)
def _stacker(sharding):
  return jax.jit(lambda xs: jnp.stack(xs), out_shardings=sharding)


def load_hf(path: str, dtype=jnp.float32, mesh=None, rules='fsdp'):
  """Load a local Hugging Face checkpoint directory as (model, params).

  Args:
    path: directory with config.json and safetensors weights (`model.safetensors`, or shards
      listed in `model.safetensors.index.json`). Supported `architectures`: see
      `mllm_jax.hf.FAMILIES`.
    dtype: parameter and compute dtype (fp32 for parity, bf16 for memory).
    mesh: a jax Mesh to shard the params on (`rules`: a preset of `mllm_jax.sharding` or a list
      of (logical name, mesh axes)); None puts them on the default device.
  Returns:
    (model, params): an `MLLM` for LLaVA / LLaVA-NeXT and for text-only LLMs (then
    `vision=None`: `apply({'params': p}, input_ids, attention_mask=...)` -> logits
    [B, T, vocab]); a `VisionEncoder` (feature_layer=-1, feature_select='full') for
    CLIP / SigLIP towers, whose apply returns the last encoder layer's output [N, tokens, D]
    (CLIP's last_hidden_state; SigLIP's last_hidden_state is `post_norm` of it).
  """
  arch, hf_cfg = read_config(path)
  family = FAMILIES[arch]
  cfg = family.config(hf_cfg)
  model = build_model(cfg, dtype)
  targets = param_targets(model, mesh, rules)
  with Checkpoint(path, family.rename(cfg)) as ckpt:
    flat = load_params(families.FusedExperts(ckpt), rules_for(cfg), targets,
                       f'{arch} as described by its config.json')
  return model, flax.traverse_util.unflatten_dict(flat, sep='/')


class StateDict:
  """An in-memory state dict ({key: numpy / torch tensor}) read like a `Checkpoint`."""

  def __init__(self, state_dict, rename, name='state_dict'):
    self.directory, self.dropped, self._d = name, [], {}
    for k, v in state_dict.items():
      key = rename(k)
      if key is None:
        self.dropped.append(k)
      elif key in self._d:
        raise CheckpointError(f'{name}: two keys mean {key!r} (a mix of key layouts?)')
      else:
        self._d[key] = v

  def keys(self):
    return list(self._d)

  def shape(self, key):
    return tuple(self._d[key].shape)

  def read(self, key):
    x = self._d[key]
    if hasattr(x, 'detach'):   # torch; numpy has no bfloat16, so bf16 goes through fp32 (exact)
      x = x.detach().cpu()
      x = x.float() if str(x.dtype) == 'torch.bfloat16' else x
      return x.numpy()
    return np.asarray(x)


def _rename_for(model):
  """The key renamer of the family a model instance belongs to."""
  cfg = model.cfg
  if isinstance(model, VisionEncoder):
    return FAMILIES['CLIPVisionModel'].rename(cfg)
  if isinstance(model, Decoder):
    return FAMILIES['LlamaForCausalLM'].rename(MLLMConfig(llm=cfg, vision=None))
  if cfg.vision is None:
    return FAMILIES['LlamaForCausalLM'].rename(cfg)
  return FAMILIES[families.mllm_arch(cfg)].rename(cfg)


def _rules_for_model(model):
  return families.decoder_rules(model.cfg) if isinstance(model, Decoder) else rules_for(model.cfg)


def params_from_state_dict(model, state_dict, mesh=None, rules='fsdp'):
  """A transformers model's `state_dict()` (or any {key: tensor}) -> params of `model` (MLLM,
  Decoder or VisionEncoder). Accepts the same key layouts as checkpoint files."""
  flat = load_params(families.FusedExperts(StateDict(state_dict, _rename_for(model))),
                     _rules_for_model(model),
                     param_targets(model, mesh, rules), type(model).__name__)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def hf_config_for(model, dtype: str = 'float32'):
  """-> (architecture, transformers config) describing `model`."""
  cfg = model.cfg
  if isinstance(model, VisionEncoder):
    arch = 'CLIPVisionModel' if cfg.kind == 'clip' else 'SiglipVisionModel'
    hf = families.vision_to_hf(cfg, dtype)
  elif isinstance(model, Decoder) or cfg.vision is None:
    llm = cfg if isinstance(model, Decoder) else cfg.llm
    hf = families.llm_to_hf(llm, dtype)
    arch = families.llm_architecture(hf)
  else:
    arch = families.mllm_arch(cfg)
    hf = families.mllm_to_hf(cfg, dtype)
  hf.architectures = [arch]
  return arch, hf


def save_hf(model, params, path: str, max_shard_size: int = 5 * 2 ** 30) -> str:
  """Write `params` of `model` (MLLM, Decoder or VisionEncoder) as a Hugging Face directory.

  config.json + safetensors (sharded with an index beyond `max_shard_size` bytes) in the layout
  transformers 5.x `save_pretrained` writes, so `<Architecture>.from_pretrained(path)` /
  AutoModel load it and give the same logits. Text-only models export as LlamaForCausalLM
  (Qwen2 with q/k/v biases, Mistral with a sliding window, Qwen3 with q/k norms; MoE decoders
  as Mixtral, Qwen2-MoE or Qwen3-MoE: `families.llm_to_hf`); LLaVA-NeXT when
  `image_grid_pinpoints` is set; BLIP-2 / InstructBLIP for a Q-Former connector
  (`mllm_jax.hf.blip2`).
  Tensors are fetched and written one at a time. Returns `path`.
  """
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  rules = _rules_for_model(model)
  expected = param_targets(model)
  bad = sorted(set(flat) ^ set(expected)) + sorted(
      f'{k}: {list(flat[k].shape)}, expected {list(expected[k].shape)}'
      for k in set(flat) & set(expected) if tuple(flat[k].shape) != tuple(expected[k].shape))
  if bad:
    raise ValueError(f'params do not fit the model: {bad[:20]}')
  dtypes = {jnp.dtype(v.dtype).name for v in flat.values()}
  _, hf = hf_config_for(model, dtypes.pop() if len(dtypes) == 1 else 'float32')

  plan, source = [], {}
  for r in rules:
    x = flat[r.path]
    for key, shape, index in r.hf_tensors(x.shape):
      plan.append((key, shape, x.dtype))
      source[key] = (r, x, index)

  def fetch(key):
    r, x, index = source[key]
    return r.to_hf(np.asarray(jax.device_get(x[index] if index else x)))

  os.makedirs(path, exist_ok=True)
  write_checkpoint(path, plan, fetch, max_shard_size)
  hf.save_pretrained(path)
  return path
