"""Reward model: the MLLM with a scalar `score` head, the Bradley-Terry loss, jitted sharded
train / eval steps, Hugging Face export, and a training entry point.

    RewardModel(cfg).apply({'params': p}, input_ids, pixel_values, attention_mask) -> r [B]

The reward of a sequence is `score(h_last)`: a bias-free Dense hidden -> 1 (HF
*ForSequenceClassification's `score`) on the final-normed hidden state of its last non-pad token
(the last position with attention_mask 1, so left and right padding give the same reward).
Parameters are the policy's tree (the same layout, `llm/lm_head` kept but unused) plus
`score/kernel` [E, 1], so a reward model starts from any SFT checkpoint.

Loss (TRL `RewardTrainer`): per pair `-log s(r_w - r_l - margin)` (margin optional, per pair),
mean over pairs, plus `center_rewards_coefficient * mean((r_w + r_l)^2)` when asked. Chosen and
rejected go through ONE forward, concatenated on the batch axis (images repeated).

    python -m mllm_jax.train.reward --config configs/demo_reward.py --workdir DIR

trains one on the built-in preference pairs (`mllm_jax/data/preference.py`) starting from an SFT
model (`--config.model.init_from=DIR`: a training workdir or params checkpoint - convert an HF
directory with `python -m mllm_jax.convert` first -, or the config's pretrain + sft stages run
first in DIR/sft) and reports held-out pairwise accuracy (pairs with r(chosen) > r(rejected)).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_jax import distributed, sharding as shd
from mllm_jax.models import MLLM, MLLMConfig
from mllm_jax.models import layers as L
from mllm_jax.train.dpo import SHARED, concat_sides
from mllm_jax.train.optim import merge_params, split_params
from mllm_jax.train.steps import TrainState, accumulate_grads, guarded_update, optimizer_step

SCORE_FILE = 'score.safetensors'     # the head beside an HF LLaVA export
SCORE_KEY = 'score.weight'           # [1, hidden], as in HF *ForSequenceClassification
SEQ_CLS = {'llama': 'LlamaForSequenceClassification', 'qwen2': 'Qwen2ForSequenceClassification',
           'mistral': 'MistralForSequenceClassification'}
# Everything the reward depends on except the vision tower (frozen as in SFT); lm_head unused.
DEFAULT_TRAINABLE = '(connector|score|llm/(embed_tokens|layers|norm))/.*'


# ----------------------------------------------------------------------------------------------
# Model and loss
# ----------------------------------------------------------------------------------------------
def last_token_index(attention_mask):
  """[B, T] -> [B]: the last position with mask 1 (T - 1 for an all-zero row)."""
  t = attention_mask.shape[-1]
  return t - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=-1)


class RewardModel(MLLM):
  """`apply({'params': p}, input_ids, pixel_values=None, attention_mask=None, ...)` -> rewards
  fp32 [B]. Same inputs as `MLLM`; every MLLM method (hidden_states, logits, ...) still works."""

  def setup(self):
    super().setup()
    self.score = L.DenseGeneral(1, ('embed', None), dtype=jnp.float32,
                                param_dtype=self.cfg.weight_dtype, name='score')

  def reward(self, hidden, attention_mask=None):
    """Final hidden states [B, T, E] -> the score of each row's last non-pad token [B]."""
    b, t, _ = hidden.shape
    idx = (jnp.full((b,), t - 1) if attention_mask is None else last_token_index(attention_mask))
    last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]       # [B, E]
    return self.score(last.astype(jnp.float32))[:, 0]

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, positions=None,
               segment_ids=None, image_sizes=None, qformer_input_ids=None,
               qformer_attention_mask=None):
    h = self.hidden_states(input_ids, pixel_values, attention_mask, positions, segment_ids,
                           image_sizes, qformer_input_ids=qformer_input_ids,
                           qformer_attention_mask=qformer_attention_mask)
    if self.is_initializing():   # create lm_head too: the tree stays the policy's plus `score`
      self.logits(h[:, :1])
    return self.reward(h, attention_mask)


def bt_losses(chosen_rewards, rejected_rewards, margin=None):
  """Bradley-Terry per pair [B]: -log sigmoid(r_w - r_l - margin)."""
  d = chosen_rewards - rejected_rewards
  if margin is not None:
    d = d - margin
  return -jax.nn.log_sigmoid(d)


def bt_loss(chosen_rewards, rejected_rewards, margin=None, center_rewards_coefficient=0.0):
  """TRL's reward loss: mean Bradley-Terry loss (+ coefficient * mean((r_w + r_l)^2))."""
  loss = bt_losses(chosen_rewards, rejected_rewards, margin).mean()
  if center_rewards_coefficient:
    loss = loss + center_rewards_coefficient * jnp.mean((chosen_rewards + rejected_rewards) ** 2)
  return loss


def pair_rewards(model, params, batch):
  """Preference batch [b, ...] -> (r(chosen), r(rejected)) each [b], in one forward."""
  inputs = concat_sides(batch)
  kw = {k: inputs[k] for k in ('input_ids', 'attention_mask') + SHARED if k in inputs}
  r = model.apply({'params': params}, **kw)
  return r[:r.shape[0] // 2], r[r.shape[0] // 2:]


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------
def make_reward_train_step(model: RewardModel, tx: optax.GradientTransformation, mask: dict, *,
                           center_rewards_coefficient: float = 0.0,
                           schedule: Callable | None = None):
  """step(state, batch) -> (state, metrics); preference batch leaves [accum, b, ...] (keys of
  `mllm_jax.data.preference`, optionally `margin` [accum, b]). The loss is normalised over the
  global batch, so accumulation and sharding don't change the step."""

  def step(state: TrainState, batch):
    trainable, frozen = split_params(state.params, mask)
    n_pairs = batch['chosen_input_ids'].shape[0] * batch['chosen_input_ids'].shape[1]

    def loss_fn(tp, mb):
      rc, rr = pair_rewards(model, merge_params(tp, frozen), mb)
      losses = bt_losses(rc, rr, mb.get('margin'))
      center = ((rc + rr) ** 2).sum()
      total = (losses.sum() + center_rewards_coefficient * center) / n_pairs
      return total, dict(bt=losses.sum(), chosen=rc.sum(), rejected=rr.sum(),
                         right=(rc > rr).sum().astype(jnp.float32))

    grads, out = accumulate_grads(loss_fn, trainable, batch)
    new, metrics = guarded_update(state, trainable, frozen, grads, out['loss'], tx)
    metrics.update({'loss': out['loss'], 'bt_loss': out['bt'] / n_pairs,
                    'rewards/chosen': out['chosen'] / n_pairs,
                    'rewards/rejected': out['rejected'] / n_pairs,
                    'rewards/margins': (out['chosen'] - out['rejected']) / n_pairs,
                    'accuracy': out['right'] / n_pairs})
    if schedule is not None:
      metrics['lr'] = schedule(optimizer_step(state))
    return new, metrics

  return step


def reward_eval_step(model: RewardModel):
  """(params, batch [b, ...]) -> sums: pairs, right (r_w > r_l), bt_loss, chosen, rejected."""

  def fn(params, batch):
    rc, rr = pair_rewards(model, params, batch)
    return dict(pairs=jnp.float32(rc.shape[0]), right=(rc > rr).sum().astype(jnp.float32),
                bt_loss=bt_losses(rc, rr, batch.get('margin')).sum(), chosen=rc.sum(),
                rejected=rr.sum())

  return fn


def evaluate_rewards(factory, params, task, examples: int, batch_size: int) -> dict:
  """Held-out pairwise accuracy and mean rewards of the first `examples` pairs of `task`."""
  from mllm_jax.train import steps
  mesh = factory.mesh
  shd.check_batch_divisible(batch_size, mesh, 'config.train.eval_batch_size')
  totals: dict = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
    for start in range(0, examples, batch_size):
      b = task.batch(start, batch_size)
      eval_fn = factory.compiled_eval_step('reward', reward_eval_step, b)
      out = jax.device_get(eval_fn(params, shd.shard_batch(b, mesh)))
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
  n = max(totals['pairs'], 1)
  return {'eval/accuracy': totals['right'] / n, 'eval/bt_loss': totals['bt_loss'] / n,
          'eval/rewards/chosen': totals['chosen'] / n,
          'eval/rewards/rejected': totals['rejected'] / n}


def score_sequences(factory, params, input_ids, attention_mask, pixel_values=None,
                    qformer_input_ids=None, qformer_attention_mask=None):
  """Rewards [B] of ready-made sequences (numpy); jitted once per shape. An instruction-aware
  Q-Former (InstructBLIP) reads qformer_input_ids / qformer_attention_mask [B, L]."""
  qformer = {k: v for k, v in (('qformer_input_ids', qformer_input_ids),
                               ('qformer_attention_mask', qformer_attention_mask))
             if v is not None}
  key = ('score', pixel_values is None, tuple(qformer))
  if key not in factory.compiled:
    factory.compiled[key] = jax.jit(lambda p, i, m, x, q: factory.model.apply(
        {'params': p}, input_ids=i, attention_mask=m, pixel_values=x, **q))
  with jax.set_mesh(factory.mesh), nn.logical_axis_rules(factory.rules):
    return np.asarray(jax.device_get(
        factory.compiled[key](params, input_ids, attention_mask, pixel_values, qformer)))


# ----------------------------------------------------------------------------------------------
# Parameters: from a policy, saved, loaded
# ----------------------------------------------------------------------------------------------
def init_score(factory, rng):
  """A fresh `score/kernel` [E, 1] (normal, std E^-1/2), placed with its sharding."""
  target = factory.abstract_params['score']['kernel']
  e = target.shape[0]
  fn = lambda r: (jax.random.normal(r, target.shape, jnp.float32) * e ** -0.5).astype(target.dtype)
  return {'kernel': jax.jit(fn, out_shardings=target.sharding)(rng)}


def policy_abstract(factory) -> dict:
  """The reward model's abstract params without `score`: the policy's layout."""
  return {k: v for k, v in factory.abstract_params.items() if k != 'score'}


def from_policy(factory, path: str, rng) -> dict:
  """Reward params: every policy parameter from the checkpoint at `path` (params checkpoint or
  training run), plus a fresh score head."""
  from mllm_jax.hf import pretrained
  params = dict(pretrained.restore_params(path, policy_abstract(factory)))
  params['score'] = init_score(factory, rng)
  return params


# The Q-Former tokenizer's directory beside a model: InstructBlipProcessor's, and the reward
# trainer's beside a saved InstructBLIP reward model
QFORMER_TOKENIZER = 'qformer_tokenizer'


def load_reward(path: str, mesh=None, rules='fsdp'):
  """(factory, params) of a reward model saved with `pretrained.save_params` (e.g. by the
  training entry point in DIR/reward/model); `mesh` defaults to one device."""
  from mllm_jax.hf import pretrained
  from mllm_jax.train import steps
  mcfg, _ = pretrained.saved_model_config(path)
  mesh = mesh or shd.make_mesh({'data': 1}, devices=jax.devices()[:1])
  factory = steps.StateFactory(RewardModel(mcfg), mesh, shd.logical_rules(rules))
  return factory, pretrained.restore_params(path, factory.abstract_params)


def _seq_cls_rules(cfg: MLLMConfig):
  from mllm_jax.hf import families
  rules = [r for r in families.decoder_rules(cfg.llm, 'llm/') if r.path != 'llm/lm_head/kernel']
  return rules + [families.Rule('score/kernel', SCORE_KEY, 'linear')]


def save_reward_hf(model: RewardModel, params, path: str, pad_token_id: int | None = None,
                   max_shard_size: int = 5 * 2 ** 30) -> str:
  """Export a reward model as a Hugging Face directory.

  Text-only (vision None): `LlamaForSequenceClassification` / `Qwen2...` / `Mistral...` with
  num_labels 1 and `score.weight` [1, E] (`pad_token_id` is needed by transformers to find the
  last token of padded rows). LLaVA: `save_hf` of the MLLM, plus `score.safetensors` holding
  `score.weight` and `"reward_head": "score.safetensors"` in config.json. Returns `path`.
  """
  from mllm_jax.hf import api, families
  from mllm_jax.hf.safetensors_io import write_checkpoint
  import safetensors.numpy
  cfg = model.cfg
  kernel = np.asarray(jax.device_get(params['score']['kernel']))     # [E, 1]
  if cfg.vision is not None:
    api.save_hf(MLLM(cfg), {k: v for k, v in params.items() if k != 'score'}, path,
                max_shard_size)
    safetensors.numpy.save_file({SCORE_KEY: np.ascontiguousarray(kernel.T)},
                                os.path.join(path, SCORE_FILE))
    with open(os.path.join(path, 'config.json')) as f:
      hf = json.load(f)
    hf['reward_head'] = SCORE_FILE
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump(hf, f, indent=2, sort_keys=True)
    return path
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  dtypes = {jnp.dtype(v.dtype).name for v in flat.values()}
  hf = families.llm_to_hf(cfg.llm, dtypes.pop() if len(dtypes) == 1 else 'float32')
  hf.architectures = [SEQ_CLS[hf.model_type]]
  hf.num_labels = 1
  hf.pad_token_id = pad_token_id
  plan, source = [], {}
  for r in _seq_cls_rules(cfg):
    x = flat[r.path]
    for i in (range(x.shape[0]) if r.stacked else [None]):
      key = r.key.format(i=i) if r.stacked else r.key
      plan.append((key, r.hf_shape(x.shape[1:] if r.stacked else x.shape), x.dtype))
      source[key] = (r, x, i)

  def fetch(key):
    r, x, i = source[key]
    return r.to_hf(np.asarray(jax.device_get(x if i is None else x[i])))

  os.makedirs(path, exist_ok=True)
  write_checkpoint(path, plan, fetch, max_shard_size)
  hf.save_pretrained(path)
  return path


def load_reward_hf(path: str, dtype=jnp.float32):
  """(RewardModel, params) from `save_reward_hf`'s output (or any Llama / Qwen2 / Mistral
  *ForSequenceClassification with num_labels 1). A sequence-classification checkpoint has no
  LM head: `llm/lm_head/kernel` is zeros there (the reward never reads it)."""
  from mllm_jax.hf import api, families
  from mllm_jax.hf.safetensors_io import Checkpoint, CheckpointError
  with open(os.path.join(path, 'config.json')) as f:
    raw = json.load(f)
  archs = raw.get('architectures') or []
  if raw.get('reward_head'):   # LLaVA + score.safetensors
    model, params = api.load_hf(path, dtype)
    head = os.path.join(path, raw['reward_head'])
    if not os.path.exists(head):
      raise CheckpointError(f'{path}/config.json names reward_head {raw["reward_head"]!r}, '
                            f'but {head} does not exist')
    import safetensors.numpy
    w = safetensors.numpy.load_file(head)
    if SCORE_KEY not in w or w[SCORE_KEY].shape != (1, model.cfg.llm.hidden):
      got = {k: list(v.shape) for k, v in w.items()}
      raise CheckpointError(f'{head}: expected {SCORE_KEY} of shape [1, '
                            f'{model.cfg.llm.hidden}], got {got}')
    params = dict(params, score={'kernel': jnp.asarray(w[SCORE_KEY].T, dtype)})
    return RewardModel(model.cfg), params
  if not any(a in SEQ_CLS.values() for a in archs):
    raise ValueError(f'{path}/config.json: architectures={archs} is neither one of '
                     f'{sorted(SEQ_CLS.values())} nor a LLaVA export with "reward_head"')
  if raw.get('num_labels', len(raw.get('id2label') or {0: 0, 1: 1})) != 1:
    raise ValueError(f'{path}/config.json: a reward model has one label (a scalar score)')
  import transformers
  hf = transformers.AutoConfig.from_pretrained(path)
  cfg = MLLMConfig(llm=families.llm_from_hf(hf), vision=None)
  model = api.build_model(cfg, dtype)
  model = RewardModel(model.cfg)
  targets = api.param_targets(model)
  rules = _seq_cls_rules(cfg)
  with Checkpoint(path, families._llm_rename(cfg)) as ckpt:
    flat = api.load_params(ckpt, rules, {r.path: targets[r.path] for r in rules},
                           f'{archs[0]} as described by its config.json')
  if 'llm/lm_head/kernel' in targets:
    flat['llm/lm_head/kernel'] = jnp.zeros(targets['llm/lm_head/kernel'].shape, dtype)
  return model, flax.traverse_util.unflatten_dict(flat, sep='/')


# ----------------------------------------------------------------------------------------------
# Training entry point
# ----------------------------------------------------------------------------------------------
def policy_start(config, workdir: str) -> str:
  """Where the SFT policy is: `config.model.init_from`, else the config's stages (e.g.
  pretrain,sft) trained (or resumed) by the training job in WORKDIR/sft."""
  from mllm_jax.train import loop
  if config.model.init_from:
    return config.model.init_from
  path = os.path.join(workdir, 'sft')
  print(f'Training the starting policy (stages {config.train.stages}) in {path}')
  loop.run(config, path)
  return path


def needs_instruction(mcfg) -> bool:
  """Whether the model (config) has an instruction-aware Q-Former (InstructBLIP)."""
  c = mcfg.connector
  return mcfg.vision is not None and c.kind == 'qformer' and c.qformer.instruction


def qformer_tokenizer_path(config, workdir: str) -> str:
  """Where the Q-Former tokenizer of an InstructBLIP start is ('' = the LLM tokenizer):
  `config.data.qformer_tokenizer`, else the `qformer_tokenizer/` of an HF start
  (InstructBlipProcessor's), else the starting training run's own `data.qformer_tokenizer` (so
  the policy's instructions are tokenised as its SFT did)."""
  from mllm_jax.hf.pretrained import run_config
  if config.data.qformer_tokenizer:
    return config.data.qformer_tokenizer
  init = config.model.init_from
  if init and os.path.isdir(os.path.join(init, QFORMER_TOKENIZER)):
    return os.path.join(init, QFORMER_TOKENIZER)
  run = run_config(init or os.path.join(workdir, 'sft'))
  return (run.data.get('qformer_tokenizer', '') or '') if run is not None else ''


def policy_config(config, mcfg, path: str, workdir: str):
  """A copy of `config` describing the starting policy at `path` (model config `mcfg`) as its
  training did, for the jobs that start from one (reward model, iterative DPO): its connector
  kind and Q-Former instruction flag (its architecture wins over config.model, so the tasks
  `loop` builds give an InstructBLIP policy its instruction and no other policy one), its
  Q-Former tokenizer (`qformer_tokenizer_path`) and its image preprocessing
  (`pretrained.start_preprocessing`)."""
  import copy
  from mllm_jax.hf import pretrained
  out = copy.deepcopy(config)
  out.model.connector.kind = mcfg.connector.kind
  out.model.connector.qformer.instruction = bool(needs_instruction(mcfg))
  out.data.qformer_tokenizer = qformer_tokenizer_path(config, workdir)
  return pretrained.start_preprocessing(out, path, 'policy')


def setup_from_policy(config, workdir: str, model_cls=None):
  """(tokenizer, model config, policy path) of the run's starting policy. The model config is
  the policy checkpoint's own (its architecture wins over config.model)."""
  from mllm_jax.data import tokenizer as tok_lib
  from mllm_jax.hf import pretrained
  from mllm_jax.train import loop
  path = policy_start(config, workdir)
  mcfg, tok_dir = pretrained.saved_model_config(path)
  if config.data.tokenizer:
    tokenizer = tok_lib.load_tokenizer(config.data.tokenizer)
  elif tok_dir is not None:
    tokenizer = tok_lib.load_tokenizer(tok_dir)
  else:
    tokenizer = loop.load_tokenizer(config, workdir)
  return tokenizer, dataclasses.replace(mcfg, init_from=''), path


def train_reward(config, workdir: str) -> dict | None:
  """Train stage `config.reward` (a stage config; `center_rewards_coefficient`) from the SFT
  policy; checkpoints in WORKDIR/reward/checkpoints (resumable), the final model in
  WORKDIR/reward/model (params checkpoint, `load_reward`). Returns held-out metrics, or None
  when it stopped after `config.train.max_steps_per_run` steps (saved; rerun to continue).
  SIGTERM / SIGINT save the step and raise `loop.Interrupted`, as in the training job."""
  from mllm_jax.checkpoint import Checkpointer, RunPosition
  from mllm_jax.hf import pretrained
  from mllm_jax.train import loop, optim, steps
  from mllm_jax.train.metrics import MetricsWriter
  tokenizer, mcfg, start_path = setup_from_policy(config, workdir)
  config = policy_config(config, mcfg, start_path, workdir)   # its instructions and pixels
  mesh = shd.make_mesh(config.mesh.to_dict())
  rules = shd.logical_rules(config.sharding.rules)
  factory = steps.StateFactory(RewardModel(mcfg), mesh, rules)
  sc, tx, mask = loop.stage_setup(config, factory, 'reward')
  out_dir = os.path.join(workdir, 'reward')
  final = os.path.join(out_dir, 'model')
  train_task = loop.make_task(config, tokenizer, mcfg, 'dpo', 'train')
  eval_task = loop.make_task(config, tokenizer, mcfg, 'dpo', 'eval')
  evaluate = lambda p: evaluate_rewards(factory, p, eval_task, config.train.eval_examples,
                                        config.train.eval_batch_size)
  if os.path.exists(os.path.join(final, pretrained.MODEL_JSON)):
    res = evaluate(pretrained.restore_params(final, factory.abstract_params))
    print(f'Reward model already trained in {final}; held-out pairwise accuracy '
          f"{res['eval/accuracy']:.4f}")
    return res
  ckpt = Checkpointer(os.path.join(out_dir, 'checkpoints'), config.train.keep_checkpoints,
                      async_save=config.train.get('async_checkpoint', True))
  pos = ckpt.latest()
  writer = MetricsWriter(out_dir, resume_step=pos.global_step if pos else None)
  data_state = None
  try:
    if pos is None:
      state = factory.create_state(from_policy(factory, start_path, jax.random.key(config.seed)),
                                   tx, mask)
      res = evaluate(state.params)
      writer.write(0, res)
      print(f"Reward model before training: held-out pairwise accuracy {res['eval/accuracy']:.4f}")
    else:
      state = ckpt.restore_state(pos.global_step, factory.abstract_state(tx, mask))
      data_state = ckpt.restore_data_state(pos.global_step)
      print(f'Resumed the reward model at step {pos.global_step}')
    start = int(jax.device_get(state.step))
    step_fn = make_reward_train_step(
        factory.model, tx, mask, schedule=optim.learning_rate_schedule(sc.optim, sc.steps),
        center_rewards_coefficient=sc.center_rewards_coefficient)
    # the training job's stream: built-in pairs by index, or files shuffled epoch after epoch;
    # each checkpoint keeps the iterator state after the last batch a step consumed
    batches = loop.prefetch(loop.train_iterator(train_task, sc, 'reward', mesh, start,
                                                data_state), config.data.prefetch)
    consumed = data_state
    micro = sc.batch_size // sc.grad_accum
    config_json = config.to_json_best_effort()
    jstep, t0 = None, time.time()
    budget = config.train.max_steps_per_run or None
    with loop.StopSignals() as stop, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for s in range(start, sc.steps):
        host, consumed = next(batches)
        if jstep is None:
          jstep = steps.jit_train_step(step_fn, factory.state_shardings(tx, mask), mesh,
                                       {k: v.ndim - 1 for k, v in host.items()})
        state, metrics = jstep(state, distributed.global_batch(host, mesh, micro))
        done = s + 1
        if done % config.train.log_every == 0 or done == sc.steps:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          writer.write(done, dict(m, stage='reward'))
          print(f"reward step {done}/{sc.steps}: loss {m['loss']:.4f} accuracy "
                f"{m['accuracy']:.3f} ({time.time() - t0:.0f}s)")
          if not np.isfinite(m['loss']):
            raise FloatingPointError(f'reward model: non-finite loss {m["loss"]} at step {done}')
        # SIGTERM / SIGINT or the per-run step budget: save, then stop (a rerun resumes here)
        save = lambda: ckpt.save(RunPosition('reward', 0, done, False, done),  # noqa: E731
                                 state, config_json, data_state=consumed)
        if loop.checkpoint_or_stop(ckpt, stop, save, done, sc.steps, start, budget,
                                   config.train.checkpoint_every):
          return None
    res = evaluate(state.params)
    writer.write(sc.steps, res)
    pretrained.save_params(final, factory.model, state.params, config.data.image_norm,
                           config.data.get('pad_to_square', False))
    if needs_instruction(mcfg):   # its Q-Former tokenizer travels with it (reward_model_scorer)
      loop.load_qformer_tokenizer(config, tokenizer).save_pretrained(
          os.path.join(final, QFORMER_TOKENIZER))
    print(f"Reward model held-out: pairwise accuracy {res['eval/accuracy']:.4f}, rewards "
          f"chosen {res['eval/rewards/chosen']:.3f} / rejected "
          f"{res['eval/rewards/rejected']:.3f}; saved to {final}")
    return res
  finally:
    writer.close()
    ckpt.close()


if __name__ == '__main__':
  from mllm_jax import hostmem
  hostmem.reexec_with_huge_pages()
  from absl import app
  from mllm_jax.train.__main__ import job_main, parse_flags   # defines --config / --workdir
  app.run(job_main(train_reward), flags_parser=parse_flags)
