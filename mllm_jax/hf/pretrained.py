"""Where a training run's parameters start, and the orbax parameter checkpoints of `convert`.

  config.model.init_from       every parameter, from
                                 - a params checkpoint written by `python -m mllm_jax.convert`,
                                 - a training workdir or one of its `checkpoints/<step>` dirs,
                                 - or a Hugging Face directory of the whole model (LLaVA, LLM);
  config.model.vision.hf_path  the vision tower, from CLIPVisionModel / SiglipVisionModel /
                               CLIPModel / SiglipModel (vision half) checkpoints;
  config.model.llm.hf_path     the decoder, from Llama / Mistral / Qwen2 / Qwen3 and MoE
                               (Mixtral, Qwen2-MoE, Qwen3-MoE) checkpoints; a larger
                               configured vocabulary (a tokenizer with added tokens such as
                               `<image>`) starts its new rows at the mean embedding, as LLaVA does;
  config.model.connector.init_from  a Q-Former connector and the vision tower, from a BLIP-2
                               stage-1 run (`python -m mllm_jax.train.blip2_stage1`; BLIP-2's
                               stage 2 starts from its stage 1).
Whatever is not loaded (e.g. the connector) keeps its fresh random init. The configured
architecture must equal the checkpoint's: a mismatch is an error listing the
`--config.model.*` values that fit (`config_overrides` computes them).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import flax
import jax
import ml_collections
import orbax.checkpoint as ocp

from mllm_jax.hf import api, families
from mllm_jax.hf.safetensors_io import Checkpoint, CheckpointError
from mllm_jax.models import LLMConfig, MLLMConfig, VisionConfig

MODEL_JSON = 'mllm_jax_model.json'   # next to `params/` in a convert checkpoint
_NOT_ARCH = {'hf_path', 'init_from', 'max_position', 'feature_layer', 'feature_select',
             # how MoE layers run and train, not what the checkpoint holds
             'impl', 'dropless_impl', 'capacity_factor', 'aux_loss_coef', 'z_loss_coef'}
_VOCAB_LEAVES = ('embed_tokens/embedding', 'lm_head/kernel')


# ----------------------------------------------------------------------------------------------
# Architecture checks
# ----------------------------------------------------------------------------------------------
def _flat_fields(cfg, prefix):
  out = {}
  for f in dataclasses.fields(cfg):
    if f.name in _NOT_ARCH:
      continue
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v):
      out.update(_flat_fields(v, f'{prefix}.{f.name}'))
    else:
      out[f'{prefix}.{f.name}'] = v
  return out


def _arch(cfg, prefix):
  flat = _flat_fields(cfg, prefix)
  if isinstance(cfg, VisionConfig):   # '' means the kind's default activation
    flat[f'{prefix}.act'] = cfg.activation
  if isinstance(cfg, LLMConfig) and cfg.rope_scaling.type == 'default':
    flat = {k: v for k, v in flat.items() if '.rope_scaling.' not in k or k.endswith('.type')}
  return flat


def config_overrides(path: str, part: str) -> dict:
  """{'model.llm.hidden': 4096, ...}: the config values that describe the checkpoint at
  `path` as `part` ('llm' or 'vision'), for --config.<key>=<value> overrides."""
  cfg = api.model_config(path)
  sub = cfg if isinstance(cfg, VisionConfig) else getattr(cfg, part)
  if sub is None:
    raise ValueError(f'{path} has no {part} part')
  return {k[len('config.'):]: v for k, v in _arch(sub, f'config.model.{part}').items()}


def check_same_architecture(ours, theirs, prefix: str, path: str):
  a, b = _arch(ours, prefix), _arch(theirs, prefix)
  diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  if diff:
    lines = '\n  '.join(f'{k}={a.get(k)!r}, checkpoint: {b.get(k)!r}' for k in diff)
    fix = ' '.join(f'--{k}={b.get(k)}' for k in diff)
    raise ValueError(f'{prefix} does not match {path}:\n  {lines}\nset them to the checkpoint '
                     f'values, e.g. {fix}')


# ----------------------------------------------------------------------------------------------
# Params checkpoints (orbax)
# ----------------------------------------------------------------------------------------------
def save_params(directory: str, model, params, image_norm: str | None = None,
                pad_to_square: bool | None = None):
  """A params checkpoint: `params/` (orbax) and the model config (JSON) beside it, with the
  image preprocessing the parameters were trained with when known (`config.data.image_norm`,
  `config.data.pad_to_square`), so that whatever runs the model later (iterative DPO,
  generate, convert --to-hf) feeds it the same pixels."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  kind = 'vision' if isinstance(model.cfg, VisionConfig) else 'mllm'
  meta = {'kind': kind, 'config': dataclasses.asdict(model.cfg)}
  if image_norm is not None:
    meta['image_norm'] = image_norm
  if pad_to_square is not None:
    meta['pad_to_square'] = bool(pad_to_square)
  with open(os.path.join(directory, MODEL_JSON), 'w') as f:
    json.dump(meta, f, indent=1)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, 'params'), params, force=True)
  ckptr.wait_until_finished()


def _train_step_dir(path: str) -> str | None:
  """A training workdir or checkpoints dir -> its latest `<step>` dir (None if not one)."""
  if os.path.isdir(os.path.join(path, 'state')):
    return path
  for ckdir in (os.path.join(path, 'checkpoints'), path):
    if os.path.isdir(ckdir):
      steps = [int(d) for d in os.listdir(ckdir) if d.isdigit() and
               os.path.isdir(os.path.join(ckdir, d, 'state'))]
      if steps:
        return os.path.join(ckdir, str(max(steps)))
  return None


def run_config(path: str):
  """The training config (ConfigDict) saved with the latest checkpoint of a training run (a
  workdir, its checkpoints dir or one of its step directories); None for anything else (e.g. a
  params checkpoint written by convert)."""
  step_dir = _train_step_dir(path)
  if step_dir is None:
    return None
  with open(os.path.join(step_dir, 'meta', 'metadata')) as f:
    return ml_collections.ConfigDict(json.load(f)['config'])


def saved_image_norm(path: str) -> str | None:
  """The image normalisation (`config.data.image_norm` value) the model at `path` expects: a
  params checkpoint's recorded one, a training run's `data.image_norm`, or a Hugging Face
  directory's image processor mean / std; None when `path` records none (a params checkpoint
  saved without it). An HF processor whose mean / std is no known norm is an error."""
  meta = os.path.join(path, MODEL_JSON)
  if os.path.exists(meta):
    with open(meta) as f:
      return json.load(f).get('image_norm')
  if os.path.exists(os.path.join(path, 'config.json')):
    from mllm_jax.data import images
    pp = images.hf_processor_config(path)
    if pp is None or pp.get('image_mean') is None:
      return None
    name = images.norm_name(pp['image_mean'], pp.get('image_std', ()))
    if name is None:
      raise ValueError(f"{path}: its image processor's image_mean={pp['image_mean']} / "
                       f"image_std={pp.get('image_std')} is none of config.data.image_norm's "
                       f'{sorted(images.NORMALIZATION)}')
    return name
  config = run_config(path)
  return None if config is None else config.data.image_norm


def saved_pad_to_square(path: str) -> bool | None:
  """Whether the model at `path` saw images padded to a square before resizing (LLaVA-1.5's
  `image_aspect_ratio='pad'`): a params checkpoint's record, a training run's
  `data.pad_to_square`, or a Hugging Face directory's `LlavaImageProcessor` (`do_pad`) or
  `image_aspect_ratio`; None when `path` records nothing. Other HF processors (CLIP's, also in
  the llava-hf ports of models trained with padding) say nothing about it."""
  meta = os.path.join(path, MODEL_JSON)
  if os.path.exists(meta):
    with open(meta) as f:
      return json.load(f).get('pad_to_square')
  if os.path.exists(os.path.join(path, 'config.json')):
    from mllm_jax.data import images
    pp = images.hf_processor_config(path) or {}
    if 'image_aspect_ratio' in pp:
      return pp['image_aspect_ratio'] == 'pad'
    if images.hf_processor_class(pp) == 'LlavaImageProcessor':
      return bool(pp.get('do_pad', False))
    return None
  config = run_config(path)
  return None if config is None else bool(config.data.get('pad_to_square', False))


def start_preprocessing(config, path: str, what: str):
  """A copy of `config` whose data.image_norm and data.pad_to_square are those the model at
  `path` (`what`, e.g. 'policy') was trained with (`saved_image_norm`, `saved_pad_to_square`),
  so it is fed the pixels it knows; a config that said otherwise is told so. `config` itself
  when `path` records nothing else."""
  out = config
  for key, saved in (('image_norm', saved_image_norm(path)),
                     ('pad_to_square', saved_pad_to_square(path))):
    if saved is None or saved == config.data.get(key):
      continue
    print(f'{what} {path} was trained with {key}={saved!r}: using it (not '
          f'config.data.{key}={config.data.get(key)!r})')
    if out is config:
      out = copy.deepcopy(config)
    out.data[key] = saved
  return out


def image_norm_warnings(config) -> list[str]:
  """Where the weights a training run starts from (`config.model.init_from`,
  `config.model.vision.hf_path`) were trained on pixels normalised otherwise than
  `config.data.image_norm`: one message each (the run keeps the config's norm; almost always a
  forgotten `--config.data.image_norm`)."""
  out = []
  for key, path in (('model.init_from', config.model.init_from),
                    ('model.vision.hf_path', config.model.vision.get('hf_path', ''))):
    if not path or not os.path.isdir(path):
      continue
    try:
      norm = saved_image_norm(path)
    except ValueError as e:
      out.append(f'config.{key}: {e}')
      continue
    if norm is not None and norm != config.data.image_norm:
      out.append(f'config.{key}={path} was trained with image_norm={norm!r}, but '
                 f'config.data.image_norm={config.data.image_norm!r}: set '
                 f'--config.data.image_norm={norm} unless the change is meant')
    pad, ours = saved_pad_to_square(path), bool(config.data.get('pad_to_square', False))
    if pad is not None and pad != ours:
      out.append(f'config.{key}={path} was trained with pad_to_square={pad}, but '
                 f'config.data.pad_to_square={ours}: set --config.data.pad_to_square={pad} '
                 'unless the change is meant')
  return out


def saved_model_config(path: str):
  """(model config, tokenizer dir or None) of a params checkpoint or a training run."""
  if os.path.exists(os.path.join(path, MODEL_JSON)):
    with open(os.path.join(path, MODEL_JSON)) as f:
      d = json.load(f)
    if d['kind'] == 'vision':
      return VisionConfig(**d['config']), None
    return MLLMConfig.from_dict(d['config']), None
  step_dir = _train_step_dir(path)
  if step_dir is None:
    raise CheckpointError(f'{path}: neither a params checkpoint ({MODEL_JSON} + params/) nor a '
                          'training workdir / checkpoint step directory')
  from mllm_jax.train import loop   # the training job's own config -> model translation
  config = run_config(step_dir)
  workdir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
  tok_dir = config.data.tokenizer or os.path.join(workdir, 'tokenizer')
  return loop.model_config(config, loop.load_tokenizer(config, workdir)), tok_dir


def _saved_tree(directory: str) -> dict:
  """The parameter tree (array metadata: shape, dtype) of an orbax pytree directory."""
  from etils import epath
  return dict(ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory)).tree)


def check_layout(path: str, saved: dict, abstract_params):
  """Saved parameter tree (orbax metadata) vs the model's: an error naming `path`, the first
  mismatching key and how many differ (never an orbax traceback about tree structures)."""
  flat_s = flax.traverse_util.flatten_dict(saved, sep='/')
  flat_m = flax.traverse_util.flatten_dict(abstract_params, sep='/')
  diff = []
  for k in sorted(set(flat_s) | set(flat_m)):
    if k not in flat_s:
      diff.append(f'{k}: in the model, not in the checkpoint')
    elif k not in flat_m:
      diff.append(f'{k}: in the checkpoint, not in the model')
    elif tuple(flat_s[k].shape) != tuple(flat_m[k].shape):
      diff.append(f'{k}: checkpoint shape {list(flat_s[k].shape)}, model shape '
                  f'{list(flat_m[k].shape)}')
  if diff:
    raise CheckpointError(f'{path}: its parameter layout differs from the model\'s in '
                          f'{len(diff)} key(s); first: {diff[0]}')


def restore_params(path: str, abstract_params):
  """Params from a convert checkpoint or a training run (latest step; params only, no
  optimiser state), placed as the sharded ShapeDtypeStructs `abstract_params`. A checkpoint
  whose tree or shapes differ from `abstract_params` is a `CheckpointError` (`check_layout`)."""
  if os.path.exists(os.path.join(path, MODEL_JSON)):
    params_dir = os.path.join(path, 'params')
    check_layout(path, _saved_tree(params_dir), abstract_params)
    return ocp.StandardCheckpointer().restore(params_dir, abstract_params)
  step_dir = _train_step_dir(path)
  if step_dir is None:
    raise CheckpointError(f'{path}: neither a params checkpoint nor a training checkpoint')
  check_layout(step_dir, _saved_tree(os.path.join(step_dir, 'state')).get('params', {}),
               abstract_params)
  args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                                     dtype=s.dtype), abstract_params)
  out = ocp.PyTreeCheckpointer().restore(
      os.path.join(step_dir, 'state'), args=ocp.args.PyTreeRestore(
          item={'params': abstract_params}, restore_args={'params': args}, partial_restore=True))
  return out['params']


# ----------------------------------------------------------------------------------------------
# The train loop's starting point
# ----------------------------------------------------------------------------------------------
def _check_part(path: str, part: str, sub_cfg):
  """-> (family, its config, checkpoint vocabulary rows if ours is larger else 0) of the HF
  directory that provides `part` ('vision' / 'llm')."""
  arch, hf = api.read_config(path)
  family = families.FAMILIES[arch]
  if family.kind != part:
    raise ValueError(f'config.model.{part}.hf_path={path}: a {arch} checkpoint cannot provide '
                     f'the {part}; expected one of '
                     f'{sorted(a for a, f in families.FAMILIES.items() if f.kind == part)}')
  theirs = family.config(hf)
  sub = theirs if part == 'vision' else theirs.llm
  rows = 0
  if part == 'llm' and sub_cfg.vocab_size > sub.vocab_size:   # added tokens, e.g. <image>
    rows, sub = sub.vocab_size, dataclasses.replace(sub, vocab_size=sub_cfg.vocab_size)
    print(f'config.model.llm.vocab_size={sub_cfg.vocab_size} > {rows} in {path}: the new '
          'embedding (and lm_head) rows start as the mean of the others')
  check_same_architecture(sub_cfg, sub, f'config.model.{part}', path)
  return family, theirs, rows


def _load_part(path: str, part: str, sub_cfg, family, theirs, rows, abstract_params):
  """The `part` subtree of the params from a HF directory, placed like `abstract_params`."""
  prefix = part + '/'
  targets = {k[len(prefix):]: v
             for k, v in api.targets_from_abstract(abstract_params, prefix).items()}
  rules = families.vision_rules(sub_cfg) if part == 'vision' else families.decoder_rules(sub_cfg)
  if rows:
    rules = [dataclasses.replace(r, rows=rows) if r.path in _VOCAB_LEAVES else r for r in rules]
  with Checkpoint(path, family.rename(theirs)) as ckpt:
    flat = api.load_params(families.FusedExperts(ckpt), rules, targets, f'config.model.{part}')
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def init_params(factory, rng):
  """The train loop's fresh parameters: `factory.init_params(rng)`, with whatever
  `init_from` / `vision.hf_path` / `llm.hf_path` name loaded over it (sharded like the rest)."""
  cfg: MLLMConfig = factory.model.cfg
  vision_path = cfg.vision.hf_path if cfg.vision is not None else ''
  stage1 = cfg.connector.init_from
  if stage1 and (cfg.vision is None or cfg.connector.kind != 'qformer'):
    raise ValueError(f'config.model.connector.init_from={stage1!r} (a BLIP-2 stage-1 '
                     f"checkpoint) needs config.model.connector.kind='qformer' and a vision tower")
  if cfg.init_from:
    if vision_path or cfg.llm.hf_path or stage1:
      raise ValueError('config.model.init_from loads every parameter; leave '
                       'config.model.vision.hf_path, config.model.llm.hf_path and '
                       'config.model.connector.init_from empty')
    return _init_from(cfg, factory)
  if stage1 and vision_path:
    raise ValueError('config.model.connector.init_from (a BLIP-2 stage-1 checkpoint) also holds '
                     'the vision tower the Q-Former was trained on; leave '
                     'config.model.vision.hf_path empty')
  parts = [(path, part, _check_part(path, part, getattr(cfg, part)))   # fail before the init
           for path, part in ((vision_path, 'vision'), (cfg.llm.hf_path, 'llm')) if path]
  params = factory.init_params(rng)
  for path, part, (family, theirs, rows) in parts:
    for leaf in jax.tree.leaves(params[part]):   # free the random init first
      leaf.delete()
    params[part] = _load_part(path, part, getattr(cfg, part), family, theirs, rows,
                              factory.abstract_params)
    print(f'Loaded config.model.{part} from {path}')
  if stage1:   # BLIP-2 stage 2 starts from stage 1
    from mllm_jax.train import blip2_stage1
    params = blip2_stage1.mllm_params_from_stage1(stage1, factory.model, params)
    print(f'Loaded the Q-Former and vision tower from config.model.connector.init_from={stage1}')
  return params


def _init_from(cfg: MLLMConfig, factory):
  path = cfg.init_from
  if os.path.exists(os.path.join(path, 'config.json')):   # a HF directory of the whole model
    arch, hf = api.read_config(path)
    family = families.FAMILIES[arch]
    theirs = family.config(hf)
    if family.kind != 'mllm' and family.kind != 'llm':
      raise ValueError(f'config.model.init_from={path}: a {arch} checkpoint is not a whole model')
    _check_whole(cfg, theirs, path)
    with Checkpoint(path, family.rename(theirs)) as ckpt:
      flat = api.load_params(ckpt, families.rules_for(cfg),
                             api.targets_from_abstract(factory.abstract_params),
                             'config.model')
    params = flax.traverse_util.unflatten_dict(flat, sep='/')
  else:
    theirs, _ = saved_model_config(path)
    if isinstance(theirs, MLLMConfig):
      _check_whole(cfg, theirs, path)
    params = restore_params(path, factory.abstract_params)
  print(f'Loaded every parameter from config.model.init_from={path}')
  return params


def _check_whole(ours: MLLMConfig, theirs: MLLMConfig, path: str):
  check_same_architecture(ours.llm, theirs.llm, 'config.model.llm', path)
  if (ours.vision is None) != (theirs.vision is None):
    raise ValueError(f'config.model.init_from={path}: the checkpoint '
                     f'{"has no" if theirs.vision is None else "has a"} vision tower, the config '
                     f'{"has none" if ours.vision is None else "has one"}')
  if ours.vision is not None:
    check_same_architecture(ours.vision, theirs.vision, 'config.model.vision', path)
    oc = ours.connector
    if oc.kind != 'qformer' and theirs.connector.kind != 'qformer':   # its Q-Former fields unused
      oc = dataclasses.replace(oc, qformer=theirs.connector.qformer)
    check_same_architecture(oc, theirs.connector, 'config.model.connector', path)
    if tuple(ours.image_grid_pinpoints) != tuple(theirs.image_grid_pinpoints):
      want = ','.join(f'{h}x{w}' for h, w in theirs.image_grid_pinpoints)
      raise ValueError(f'config.model.image_grid_pinpoints={ours.image_grid_pinpoints} does not '
                       f'match {path}: {theirs.image_grid_pinpoints} '
                       f"(--config.model.image_grid_pinpoints='{want}')")
