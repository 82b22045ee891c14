"""Iterative DPO: rounds of sample -> score -> pairs -> DPO, each round's policy the next one's
policy and reference (Insight-V's reasoning agent, Xiong et al.'s iterative DPO).

    python -m mllm_jax.train.iterative_dpo --config configs/demo_iterative_dpo.py --workdir DIR

Round r (1-based) of `config.iterative.rounds`:
  1. prompts: the first question of train samples [prompt_start + (r-1) P, prompt_start + r P)
     of the built-in scenes task (P = prompts_per_round), each with its image;
  2. sample `samples_per_prompt` responses per prompt from the round's starting policy with
     `mllm_jax.generate` (temperature > 0, top-k / top-p; seeds a function of (seed, round));
  3. score every response: `exact_match` (normalised response == the task's answer: 1 / 0),
     `reward_model` (a `mllm_jax.train.reward` model at `iterative.reward_model`), or a user
     callable `score(prompt, response, sample) -> float` (`run(..., scorer=fn)`, or
     `--config.iterative.scorer=package.module:function`);
  4. pairs: per prompt, chosen = the first best-scored response, rejected = the first
     worst-scored one with a different text; a prompt whose scores all tie, or whose worst
     responses all equal the chosen text, gives no pair (counted: `ties`, `identical`);
  5. DPO (`mllm_jax.train.dpo`, stage config `config.dpo`: loss, beta, alpha, gamma, lr,
     batch) on the pairs, the reference frozen at the round's starting policy;
  6. the policy is saved (orbax params checkpoint) and becomes round r+1's policy and reference.

WORKDIR/round_<r>/ holds pairs.jsonl (TRL-style records: prompt, chosen, rejected, scores,
the scenes sample index), scores.jsonl (every response and its score), policy/ (the trained
policy) and metrics.json (written last: a round is finished exactly when it exists). A rerun
resumes at the first unfinished round (a round is the unit of resumption: an interrupted round
is redone, from its saved pairs if they were written). Each round reports the held-out
preference accuracy (built-in eval pairs ranked right by log pi), the VQA accuracy (teacher
forced) and the accuracy of the policy's greedy answers to `eval_prompts` held-out questions
(exact match: what the rounds optimise), before and after its DPO.

The starting policy is `config.model.init_from` (a training workdir, params checkpoint or
HF directory), else the config's stages (e.g. pretrain,sft) trained first in WORKDIR/sft; its
architecture is the checkpoint's, and so is its image normalisation where the start records one
(a training run's `data.image_norm`, a params checkpoint's saved norm, an HF image processor's
mean / std: `pretrained.saved_image_norm`); a reward model is fed its own recorded norm.

InstructBLIP (an instruction-aware Q-Former policy or reward model): every forward the rounds
run - sampling, the greedy held-out answers, the preference / VQA evaluations, the DPO batches
(`PairsTask`) and the reward-model scorer - gets each sample's instruction as its SFT data did
(`synthetic.instruction`, tokenised by `synthetic.QFormerInstructions` to
`config.data.qformer_max_len`) with the Q-Former tokenizer `config.data.qformer_tokenizer`, else
an HF start's `qformer_tokenizer/`, else the starting training run's, else the LLM tokenizer.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import time
from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from mllm_jax import generate as gen
from mllm_jax import sharding as shd
from mllm_jax.data import conversation, images as image_utils, preference, synthetic
from mllm_jax.data import tokenizer as tok_lib
from mllm_jax.train.reward import needs_instruction

Scorer = Callable[[str, str, synthetic.Sample], float]


# ----------------------------------------------------------------------------------------------
# Prompts, sampling, scoring, pairs
# ----------------------------------------------------------------------------------------------
def prompt_sample(index: int, split: str, seed: int, image_size: int | None):
  """Scenes sample `index` reduced to its first question and answer (one image)."""
  s = synthetic.make_sample(index, split=split, seed=seed, image_size=image_size,
                            two_image_fraction=0.0)
  return dataclasses.replace(s, messages=s.messages[:2], kinds=s.kinds[:1])


def normalise(text: str) -> str:
  return ' '.join(re.sub(r'[^\w\s]', ' ', text.lower()).split())


def exact_match(prompt: str, response: str, sample) -> float:
  """1.0 when the response is the sample's answer (case, punctuation and spaces ignored)."""
  return float(normalise(response) == normalise(sample.messages[1]['content']))


def load_scorer(name: str) -> Scorer | None:
  """'exact_match' -> `exact_match`; 'reward_model' -> None (built by the driver);
  'package.module:function' -> that function."""
  if name == 'exact_match':
    return exact_match
  if name == 'reward_model':
    return None
  if ':' not in name:
    raise ValueError(f"config.iterative.scorer={name!r}: expected 'exact_match', "
                     "'reward_model' or 'package.module:function'")
  module, fn = name.split(':', 1)
  try:
    return getattr(importlib.import_module(module), fn)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'config.iterative.scorer={name!r}: cannot load it ({e})') from None


def build_pairs(groups: list[dict]) -> tuple[list[dict], dict]:
  """Per-prompt groups {'sample', 'prompt', 'responses', 'scores'} -> (pair records, counts).

  chosen = first response with the highest score; rejected = first response with the lowest
  score whose text differs from chosen. All scores equal -> `ties`; every lowest-scored
  response equal to the chosen text -> `identical`; both skipped.
  """
  pairs, counts = [], {'prompts': len(groups), 'ties': 0, 'identical': 0}
  for g in groups:
    s = np.asarray(g['scores'], np.float64)
    if s.max() == s.min():
      counts['ties'] += 1
      continue
    best = int(np.argmax(s))
    chosen = g['responses'][best]
    worst = [i for i in np.flatnonzero(s == s.min()) if g['responses'][i] != chosen]
    if not worst:
      counts['identical'] += 1
      continue
    w = int(worst[0])
    pairs.append({'id': g['id'], 'split': g['split'], 'sample': g['sample'],
                  'prompt': g['prompt'], 'chosen': chosen, 'rejected': g['responses'][w],
                  'chosen_score': float(s[best]), 'rejected_score': float(s[w])})
  counts['pairs'] = len(pairs)
  return pairs, counts


class PairsTask(preference.PreferenceTask):
  """Preference batches (the `mllm_jax.data.preference` format) from pair records; batch `start`
  cycles through the records (epochs). A record whose chosen equals its rejected is skipped and
  counted (`skipped`); a record whose conversation exceeds max_len is truncated. With a
  `qformer_tokenizer` (InstructBLIP), each pair also carries its prompt's instruction, as the
  built-in pairs do (`preference.PreferenceTask.batch_of`)."""

  def __init__(self, records: list[dict], tokenizer, **kw):
    super().__init__(tokenizer, **kw)
    self.records = [r for r in records if r['chosen'] != r['rejected']]
    self.skipped = len(records) - len(self.records)
    if not self.records:
      raise ValueError(f'no usable preference pairs ({len(records)} records, '
                       f'{self.skipped} with chosen == rejected)')

  def __len__(self):
    return len(self.records)

  def pair(self, index: int, with_image: bool = True):
    r = self.records[index % len(self.records)]
    s = prompt_sample(r['sample'], r['split'], self.seed,
                      self.image_size if with_image else None)
    if r['prompt'] != s.messages[0]['content']:
      raise ValueError(f"pair {r['id']}: its prompt {r['prompt']!r} is not the question of "
                       f"{r['split']} sample {r['sample']} ({s.messages[0]['content']!r})")
    return s, r['chosen'], r['rejected']

  def _tokens(self, user: str, answer: str):
    key = (user, answer)
    if key not in self._cache:
      self._cache[key] = conversation.tokenize_conversation(
          self.tokenizer, [{'role': 'user', 'content': user},
                           {'role': 'assistant', 'content': answer}],
          image_token=self.image_token, num_image_tokens=self.num_image_tokens,
          max_len=self.max_len, truncate=True)[:2]
    return self._cache[key]


def qformer_instructions(mcfg, qformer_tokenizer, max_len: int, what: str):
  """The Q-Former input builder of an instruction-aware model config `mcfg` (None for any other
  model): `synthetic.QFormerInstructions`, the tokenisation the SFT data used, with
  `qformer_tokenizer`; a tokenizer larger than the Q-Former's vocabulary is an error naming
  `what` (the model)."""
  if not needs_instruction(mcfg):
    return None
  vocab = mcfg.connector.qformer.vocab_size
  if len(qformer_tokenizer) > vocab:
    raise ValueError(f'{what}: its Q-Former vocabulary ({vocab}) is smaller than the Q-Former '
                     f'tokenizer ({len(qformer_tokenizer)} tokens): config.data.qformer_tokenizer '
                     'must be the tokenizer the model was trained with')
  return synthetic.QFormerInstructions(qformer_tokenizer, max_len)


def _instruction_rows(mcfg, instructions, samples, split: str) -> dict[str, np.ndarray]:
  """{'qformer_input_ids', 'qformer_attention_mask'} [len(samples), L] of the samples'
  instructions for an instruction-aware model, else {}."""
  if not needs_instruction(mcfg):
    return {}
  if instructions is None:
    raise ValueError('an instruction-aware Q-Former (InstructBLIP) needs its instruction: pass '
                     '`instructions` (qformer_instructions)')
  return instructions([synthetic.instruction(s) for s in samples],
                      [f'{split} sample {s.index}' for s in samples])


def prompt_ids(tokenizer, sample, num_image_tokens: int) -> np.ndarray:
  """Token ids of the user turn + the generation prompt (image tags expanded): the tokens
  before the answer in the training conversation, so sampling sees what SFT saw."""
  ids, loss, _ = conversation.tokenize_conversation(
      tokenizer, sample.messages[:2], num_image_tokens=num_image_tokens)
  return ids[:int(np.argmax(loss > 0))]


def sample_responses(policy, tokenizer, samples, it, image_norm: str, seed: tuple,
                     num_image_tokens: int, k: int | None = None,
                     temperature: float | None = None,
                     instructions: synthetic.QFormerInstructions | None = None,
                     split: str = 'train') -> list[list[str]]:
  """`k` (default `it.samples_per_prompt`) responses (text) per sample at `temperature`
  (default `it.temperature`; 0 = greedy), from batches of `it.generate_batch` rows; row chunk
  c is sampled with a seed drawn from (*seed, c). An instruction-aware Q-Former (InstructBLIP)
  reads each sample's instruction (`synthetic.instruction`: its question, as in SFT) through
  `instructions` (`qformer_instructions`); `split` names the samples in its errors."""
  factory, params = policy
  k = it.samples_per_prompt if k is None else k
  temperature = it.temperature if temperature is None else temperature
  mean, std = image_utils.NORMALIZATION[image_norm]
  stops = tok_lib.stop_token_ids(tokenizer)
  rows = [(i, s) for i, s in enumerate(samples) for _ in range(k)]
  out: list[list[str]] = [[] for _ in samples]
  prompts = [prompt_ids(tokenizer, s, num_image_tokens) for s in samples]
  width = max(len(p) for p in prompts)
  q = _instruction_rows(factory.model.cfg, instructions, samples, split)   # [len(samples), L]
  # generate's shape probe (lru-cached) fails inside a mesh context: run it outside first
  gen.tokens_per_image(factory.model)
  with jax.set_mesh(factory.mesh), nn.logical_axis_rules(factory.rules):
    for c, start in enumerate(range(0, len(rows), it.generate_batch)):
      chunk = rows[start:start + it.generate_batch]
      n = it.generate_batch   # fixed shape (one compile): the last chunk is padded with row 0
      ids = np.full((n, width), tokenizer.pad_token_id, np.int32)
      mask = np.zeros((n, width), np.int32)
      pixels = np.zeros((n, 1) + samples[0].images[0].shape, np.uint8)
      which = np.zeros(n, np.int64)   # row -> sample
      for r in range(n):
        i, s = chunk[r] if r < len(chunk) else chunk[0]
        p = prompts[i]
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1   # left padding
        pixels[r, 0], which[r] = s.images[0], i
      new = np.asarray(gen.generate(
          factory.model, params, ids, mask, image_utils.normalize(pixels, mean, std),
          max_new_tokens=it.max_new_tokens, temperature=temperature, top_k=it.top_k,
          top_p=it.top_p, stop_tokens=stops, pad_token_id=tokenizer.pad_token_id,
          seed=int(np.random.SeedSequence([*seed, c]).generate_state(1)[0] >> 1),
          **{key: x[which] for key, x in q.items()}))
      for r, (i, _) in enumerate(chunk):
        toks = new[r].tolist()
        ends = [j for j, t in enumerate(toks) if t in stops]
        toks = toks[:ends[0]] if ends else toks
        out[i].append(tokenizer.decode(toks, skip_special_tokens=True).strip())
  gen.release_packed()   # the policy trains next: don't hold a packed copy of its weights
  return out


def reward_model_scorer(path: str, tokenizer, mesh, rules, max_len: int, image_norm: str,
                        batch_size: int, qformer_tokenizer=None, qformer_max_len: int = 32):
  """A batched scorer: the reward model at `path` scores (prompt, response) conversations,
  its images normalised as it was trained (its recorded image_norm; `image_norm` if it records
  none). An instruction-aware Q-Former reward model (InstructBLIP) reads each sample's
  instruction as its SFT / reward data did, tokenised with the Q-Former tokenizer saved beside
  it by the reward trainer, else `qformer_tokenizer`, else `tokenizer`."""
  import transformers
  from mllm_jax.hf import pretrained
  from mllm_jax.train import reward
  factory, params = reward.load_reward(path, mesh, rules)
  if os.path.isdir(os.path.join(path, reward.QFORMER_TOKENIZER)):
    qformer_tokenizer = transformers.AutoTokenizer.from_pretrained(
        os.path.join(path, reward.QFORMER_TOKENIZER))
  mcfg = factory.model.cfg
  mean, std = image_utils.NORMALIZATION[pretrained.saved_image_norm(path) or image_norm]
  n_img = mcfg.image_tokens if mcfg.vision else 0
  instructions = qformer_instructions(mcfg, qformer_tokenizer or tokenizer, qformer_max_len,
                                      f'reward model {path}')

  def score_all(items):   # [(prompt, response, sample)] -> [float]
    out = []
    for start in range(0, len(items), batch_size):
      chunk = items[start:start + batch_size]
      ids = np.full((batch_size, max_len), tokenizer.pad_token_id, np.int32)
      mask = np.zeros((batch_size, max_len), np.int32)
      pixels = np.zeros((batch_size, 1) + chunk[0][2].images[0].shape, np.uint8)
      for r, (prompt, response, s) in enumerate(chunk):
        t, _, _ = conversation.tokenize_conversation(
            tokenizer, [{'role': 'user', 'content': prompt},
                        {'role': 'assistant', 'content': response}],
            num_image_tokens=n_img, max_len=max_len, truncate=True)
        ids[r, :len(t)], mask[r, :len(t)] = t, 1
        pixels[r, 0] = s.images[0]
      mask[len(chunk):, 0] = 1    # unused rows: one token, ignored
      q = {}
      if instructions is not None:   # the prompt's question, image tags removed (as in SFT)
        texts = [synthetic.questions([{'role': 'user', 'content': x[0]}]) for x in chunk]
        q = instructions(texts + texts[:1] * (batch_size - len(chunk)),   # unused rows: row 0's
                         [f'scored prompt {start + j}' for j in range(batch_size)])
      r = reward.score_sequences(factory, params, ids, mask,
                                 image_utils.normalize(pixels, mean, std), **q)
      out += r[:len(chunk)].tolist()
    return out

  return score_all


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def _write_json(path: str, obj, lines: bool = False):
  """Write to a temporary file and rename: a file that exists is complete."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    if lines:
      f.writelines(json.dumps(o) + '\n' for o in obj)
    else:
      json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{n}: not a JSON record ({e})') from None
  return out


def round_dir(workdir: str, r: int) -> str:
  return os.path.join(workdir, f'round_{r}')


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def _start_policy(config, workdir):
  """(tokenizer, model config, path of a params / training checkpoint) of the start."""
  from mllm_jax.hf import api, pretrained
  from mllm_jax.train import reward
  path = config.model.init_from
  if path and os.path.exists(os.path.join(path, 'config.json')):   # HF directory: convert once
    out = os.path.join(workdir, 'start_policy')
    tokenizer = tok_lib.load_tokenizer(config.data.tokenizer or path)
    if not os.path.exists(os.path.join(out, pretrained.MODEL_JSON)):
      model, params = api.load_hf(path)
      pretrained.save_params(out, model, params, pretrained.saved_image_norm(path),
                             pretrained.saved_pad_to_square(path))
    return tokenizer, api.model_config(path), out
  return reward.setup_from_policy(config, workdir)


def run(config, workdir: str, scorer: Scorer | None = None) -> list[dict]:
  """Every round of `config.iterative` (resuming at the first unfinished one); returns the
  per-round metrics. `scorer` overrides config.iterative.scorer."""
  from mllm_jax.hf import pretrained
  from mllm_jax.models import MLLM
  from mllm_jax.train import dpo, loop, optim, reward, steps
  it = config.iterative
  os.makedirs(workdir, exist_ok=True)
  if it.temperature <= 0:
    raise ValueError(f'config.iterative.temperature={it.temperature}: sampling several '
                     'responses per prompt needs temperature > 0')
  if it.samples_per_prompt < 2:
    raise ValueError(f'config.iterative.samples_per_prompt={it.samples_per_prompt}: a pair '
                     'needs at least 2')
  batch_scorer = None
  if scorer is None:
    scorer = load_scorer(it.scorer)
  tokenizer, mcfg, start = _start_policy(config, workdir)
  # InstructBLIP: every forward of the policy (sampling, evaluation, DPO) and of the reward
  # model reads the sample's instruction, tokenised as its SFT data was; and every image is
  # normalised as the policy's training data was
  config = reward.policy_config(config, mcfg, start, workdir)
  qpath = config.data.qformer_tokenizer

  qlen = config.data.qformer_max_len
  qtok = loop.load_qformer_tokenizer(config, tokenizer)   # None unless the policy reads one
  instructions = (None if qtok is None else
                  qformer_instructions(mcfg, qtok, qlen, f'policy {start}'))
  mesh = shd.make_mesh(config.mesh.to_dict())
  rules = shd.logical_rules(config.sharding.rules)
  factory = steps.StateFactory(MLLM(mcfg), mesh, rules)
  if scorer is None:
    if not it.reward_model:
      raise ValueError("config.iterative.scorer='reward_model' needs "
                       'config.iterative.reward_model (a reward model saved by '
                       'python -m mllm_jax.train.reward, e.g. WORKDIR/reward/model)')
    import transformers   # the reward model's own Q-Former tokenizer, for a LLaVA policy
    batch_scorer = reward_model_scorer(
        it.reward_model, tokenizer, mesh, rules, config.data.max_len, config.data.image_norm,
        it.generate_batch, qformer_max_len=qlen, qformer_tokenizer=qtok or (
            transformers.AutoTokenizer.from_pretrained(qpath) if qpath else None))
  if mcfg.vision is None or mcfg.image_grid_pinpoints:
    raise ValueError(f'{start}: the iterative driver samples on the built-in scenes task, which '
                     'needs a model with a single-tile vision tower')
  sc = config.dpo
  shd.check_batch_divisible(sc.batch_size // sc.grad_accum, mesh,
                            'config.dpo.batch_size / config.dpo.grad_accum')
  v = mcfg.vision
  eval_task = loop.make_task(config, tokenizer, mcfg, 'dpo', 'eval')
  task_kw = dict(split='train', seed=config.seed, image_size=v.image_size,
                 num_image_tokens=mcfg.image_tokens, max_len=config.data.max_len,
                 image_mean=eval_task.image_mean, image_std=eval_task.image_std,
                 qformer_tokenizer=instructions and instructions.tokenizer, qformer_max_len=qlen)
  history = []
  mask = factory.mask(sc.trainable, 'config.dpo.trainable')
  compiled: dict = {}

  held_out = [prompt_sample(i, 'eval', config.seed, v.image_size) for i in range(it.eval_prompts)]

  def evaluate(params):
    res = loop.evaluate(config, factory, params, eval_task, mesh, rules)
    out = {'preference_accuracy': res['eval/preference_accuracy'],
           'vqa_accuracy': res['eval/accuracy']}
    if held_out:   # what the rounds optimise: answers the policy generates (greedy) are right
      answers = sample_responses((factory, params), tokenizer, held_out, it,
                                 config.data.image_norm, (config.seed,), mcfg.image_tokens,
                                 k=1, temperature=0.0, instructions=instructions, split='eval')
      out['generated_accuracy'] = float(np.mean(
          [exact_match('', a[0], s) for a, s in zip(answers, held_out)]))
    return out

  before = None
  for r in range(1, it.rounds + 1):
    rdir = round_dir(workdir, r)
    if os.path.exists(os.path.join(rdir, 'metrics.json')):
      with open(os.path.join(rdir, 'metrics.json')) as f:
        m = json.load(f)
      history.append(m)
      before = m['eval_after']
      start = os.path.join(rdir, 'policy')
      print(f'Round {r}: finished earlier ({rdir})')
      continue
    os.makedirs(rdir, exist_ok=True)
    t0 = time.time()
    policy = pretrained.restore_params(start, factory.abstract_params)
    if before is None:
      before = evaluate(policy)
      print(f'Starting policy ({start}): held-out ' +
            ', '.join(f'{k_.replace("_", " ")} {x:.4f}' for k_, x in before.items()))
    pairs_path = os.path.join(rdir, 'pairs.jsonl')
    counts_path = os.path.join(rdir, 'counts.json')
    if os.path.exists(pairs_path) and os.path.exists(counts_path):
      pairs = read_jsonl(pairs_path)
      with open(counts_path) as f:
        counts = json.load(f)
      print(f'Round {r}: reusing the {len(pairs)} pairs in {pairs_path}')
    else:
      first = it.prompt_start + (r - 1) * it.prompts_per_round
      samples = [prompt_sample(i, 'train', config.seed, v.image_size)
                 for i in range(first, first + it.prompts_per_round)]
      responses = sample_responses((factory, policy), tokenizer, samples, it,
                                   config.data.image_norm, seed=(config.seed, r),
                                   num_image_tokens=mcfg.image_tokens,
                                   instructions=instructions)
      items = [(s.messages[0]['content'], resp, s) for s, rs in zip(samples, responses)
               for resp in rs]
      flat = (batch_scorer(items) if batch_scorer is not None
              else [float(scorer(p, resp, s)) for p, resp, s in items])
      k = it.samples_per_prompt
      groups = [{'id': f'round{r}-train{s.index}', 'split': 'train', 'sample': s.index,
                 'prompt': s.messages[0]['content'], 'answer': s.messages[1]['content'],
                 'responses': rs, 'scores': flat[j * k:(j + 1) * k]}
                for j, (s, rs) in enumerate(zip(samples, responses))]
      pairs, counts = build_pairs(groups)
      counts['samples'] = len(items)
      counts['mean_score'] = float(np.mean(flat))
      _write_json(os.path.join(rdir, 'scores.jsonl'), groups, lines=True)
      _write_json(pairs_path, pairs, lines=True)
      _write_json(counts_path, counts)
    print(f"Round {r}: {counts['samples']} responses to {counts['prompts']} prompts, mean score "
          f"{counts['mean_score']:.3f}; {counts['pairs']} pairs ({counts['ties']} prompts "
          f"with tied scores, {counts['identical']} with identical responses skipped)")

    train_metrics, n_steps = {}, 0
    if pairs:
      task = PairsTask(pairs, tokenizer, **task_kw)
      counts['skipped_records'] = task.skipped
      n_steps = sc.steps or math.ceil(it.epochs * len(task) / sc.batch_size)
      if n_steps not in compiled:   # rounds with as many steps share one compiled step
        tx = optim.make_optimizer(sc.optim, n_steps)
        step_fn = dpo.make_dpo_train_step(factory.model, tx, mask, **sc.preference.to_dict())
        compiled[n_steps] = tx, None, step_fn
      tx, jstep, step_fn = compiled[n_steps]
      ref = pretrained.restore_params(start, factory.abstract_params)   # its own buffers
      state = factory.create_state(policy, tx, mask)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for s, host in zip(range(n_steps), loop.train_batches(task, 0, sc.batch_size,
                                                               sc.grad_accum)):
          if jstep is None:
            jstep = dpo.jit_dpo_step(step_fn, factory.state_shardings(tx, mask),
                                     factory.param_shardings, mesh,
                                     {k_: x.ndim - 1 for k_, x in host.items()})
            compiled[n_steps] = tx, jstep, step_fn
          state, metrics = jstep(state, shd.shard_batch(host, mesh, leading_accum=True), ref)
          if (s + 1) % config.train.log_every == 0 or s + 1 == n_steps:
            train_metrics = {k_: float(x) for k_, x in jax.device_get(metrics).items()}
            print(f"  DPO step {s + 1}/{n_steps}: loss {train_metrics['loss']:.4f}, reward "
                  f"accuracy {train_metrics['rewards/accuracies']:.3f}, margin "
                  f"{train_metrics['rewards/margins']:.3f}")
            if not np.isfinite(train_metrics['loss']):
              raise FloatingPointError(f'round {r}: non-finite DPO loss at step {s + 1}')
      policy = state.params
    else:
      print(f'Round {r}: no pairs, the policy is unchanged')
    after = evaluate(policy)
    pretrained.save_params(os.path.join(rdir, 'policy'), factory.model, policy,
                           config.data.image_norm, config.data.get('pad_to_square', False))
    inside = os.path.abspath(start).startswith(os.path.abspath(workdir) + os.sep)
    m = {'round': r, 'start_policy': os.path.relpath(start, workdir) if inside else start,
         **counts, 'dpo_steps': n_steps, 'train': train_metrics, 'eval_before': before,
         'eval_after': after, 'seconds': time.time() - t0}
    _write_json(os.path.join(rdir, 'metrics.json'), m)
    history.append(m)
    print(f'Round {r}: held-out ' + ', '.join(
        f'{k_.replace("_", " ")} {before[k_]:.4f} -> {after[k_]:.4f}' for k_ in after) +
        f" ({m['seconds']:.0f}s)")
    before, start = after, os.path.join(rdir, 'policy')
  print('held-out after each round (round 0: the starting policy); mean score: the sampled '
        "responses of the round's starting policy")
  print('round  pairs  mean score  preference acc  VQA acc  generated acc')
  rows = [(0, '', '', history[0]['eval_before'])] if history else []
  rows += [(m['round'], m['pairs'], f"{m['mean_score']:.3f}", m['eval_after']) for m in history]
  for r, n, score, e in rows:
    print(f"{r:5d}  {n:>5}  {score:>10}  {e['preference_accuracy']:14.4f}  "
          f"{e['vqa_accuracy']:7.4f}  {e.get('generated_accuracy', float('nan')):13.4f}")
  return history


if __name__ == '__main__':
  from mllm_jax import hostmem
  hostmem.reexec_with_huge_pages()
  from absl import app
  from mllm_jax.train.__main__ import job_main, parse_flags   # defines --config / --workdir
  app.run(job_main(run), flags_parser=parse_flags)
