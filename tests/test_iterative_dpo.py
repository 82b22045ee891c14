"""Iterative DPO driver: scoring, pair building (ties, identical responses, chosen == rejected
records), two tiny rounds end to end with a user scorer, resumption at round 2 giving the same
pairs, and the reward-model scorer; for a tiny InstructBLIP policy (its own BERT Q-Former
tokenizer): two rounds and a resume, the sampled responses and the round's DPO loss checked
against direct calls with each prompt's instruction, and the reward-model scorer reading it."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from data_files import build_bert_tokenizer
from mllm_jax import generate as gen
from mllm_jax import sharding as shd
from mllm_jax.config import load_config
from mllm_jax.data import tokenizer as tok_lib
from mllm_jax.hf import pretrained
from mllm_jax.models import MLLM, MLLMConfig
from mllm_jax.train import iterative_dpo as it, reward, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exact_match_scorer():
  s = it.prompt_sample(3, 'train', 0, None)
  answer = s.messages[1]['content']
  assert len(s.messages) == 2 and s.messages[0]['content'].startswith('<image>\n')
  assert it.exact_match('', answer, s) == 1.0
  assert it.exact_match('', f' {answer.upper()}. ', s) == 1.0
  assert it.exact_match('', answer + ' maybe', s) == 0.0
  assert it.load_scorer('exact_match') is it.exact_match
  assert it.load_scorer('mllm_jax.train.iterative_dpo:normalise') is it.normalise
  with pytest.raises(ValueError, match='config.iterative.scorer'):
    it.load_scorer('nonsense')


def test_pairs_are_best_vs_worst_and_ties_and_identical_responses_are_counted():
  g = lambda i, responses, scores: dict(id=f'p{i}', split='train', sample=i, prompt=f'q{i}',
                                        responses=responses, scores=scores)
  pairs, counts = it.build_pairs([
      g(0, ['a', 'b', 'c', 'd'], [0.0, 2.0, 2.0, 0.0]),   # first best b, first worst a
      g(1, ['a', 'b', 'c'], [1.0, 1.0, 1.0]),             # tie
      g(2, ['x', 'x', 'y'], [1.0, 0.0, 1.0]),             # the worst is the best's text: skipped
      g(3, ['x', 'z', 'x'], [3.0, 1.0, 1.0]),             # worst with a different text: z
  ])
  assert counts == {'prompts': 4, 'ties': 1, 'identical': 1, 'pairs': 2}
  assert [(p['id'], p['chosen'], p['rejected']) for p in pairs] == [('p0', 'b', 'a'),
                                                                    ('p3', 'x', 'z')]
  assert pairs[1]['chosen_score'] == 3.0 and pairs[1]['rejected_score'] == 1.0


@pytest.fixture(scope='module')
def start(tmp_path_factory):
  """A tiny random policy saved as a params checkpoint, and the demo tokenizer."""
  base = tmp_path_factory.mktemp('start')
  tok = tok_lib.get_or_build_demo_tokenizer(str(base / 'tokenizer'))
  cfg = MLLMConfig.from_dict(dict(
      llm=dict(vocab_size=-(-len(tok) // 8) * 8, hidden=32, depth=1, heads=4, kv_heads=2,
               mlp_dim=64, max_position=128),
      vision=dict(kind='clip', image_size=16, patch_size=8, width=16, depth=1, heads=2,
                  mlp_dim=32, feature_layer=-1),
      image_token_id=tok.convert_tokens_to_ids('<image>')))
  model = MLLM(cfg)
  factory = steps.StateFactory(model, shd.make_mesh({'data': 1}, devices=jax.devices()[:1]),
                               shd.logical_rules('dp'))
  pretrained.save_params(str(base / 'policy'), model, factory.init_params(jax.random.key(0)))
  return str(base / 'policy'), str(base / 'tokenizer'), tok


def _config(start, **over):
  path, tok_dir, _ = start
  o = {'model.init_from': path, 'data.tokenizer': tok_dir, 'data.max_len': 48,
       'iterative.rounds': 2, 'iterative.prompts_per_round': 8,
       'iterative.samples_per_prompt': 4, 'iterative.generate_batch': 32,
       'iterative.max_new_tokens': 4, 'dpo.batch_size': 8, 'dpo.steps': 2,
       'train.eval_examples': 16, 'train.eval_batch_size': 16, 'train.log_every': 1,
       'iterative.eval_prompts': 8}
  o.update(over)
  return load_config(os.path.join(ROOT, 'configs', 'demo_iterative_dpo.py'), o)


def longer_is_better(prompt, response, sample):
  return float(len(response))


def test_sampling_on_one_cpu_device_releases_the_packed_policy(start, monkeypatch):
  """On one CPU device generate packs the policy's weights for its decode kernels and keeps
  them between calls; the sampler drops them when it is done, since the policy trains next."""
  path, _, tok = start
  config = _config(start)
  with open(os.path.join(path, pretrained.MODEL_JSON)) as f:
    mcfg = MLLMConfig.from_dict(json.load(f)['config'])
  factory = steps.StateFactory(MLLM(mcfg),
                               shd.make_mesh({'data': 1}, devices=jax.devices()[:1]),
                               shd.logical_rules('dp'))
  params = factory.init_params(jax.random.key(1))
  assert gen._decode_kernel(factory.model, params, 'unrolled', 'auto') == 'packed'
  packs = []
  real = gen._kept_packed.get
  monkeypatch.setattr(gen._kept_packed, 'get', lambda *a: packs.append(real(*a)) or packs[-1])
  samples = [it.prompt_sample(i, 'train', 0, 16) for i in range(2)]
  out = it.sample_responses((factory, params), tok, samples, config.iterative,
                            config.data.image_norm, (0,), factory.model.cfg.image_tokens, k=2)
  assert [len(r) for r in out] == [2, 2] and packs           # sampled with the packed kernels
  assert gen._kept_packed.entry is None                      # and released, params alive


@pytest.mark.slow
def test_two_rounds_end_to_end_and_resume_at_round_2(start, tmp_path, capsys):
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  hist = it.run(_config(start), a, scorer=longer_is_better)
  assert [m['round'] for m in hist] == [1, 2]
  for r, m in enumerate(hist, 1):
    d = it.round_dir(a, r)
    pairs = it.read_jsonl(os.path.join(d, 'pairs.jsonl'))
    groups = it.read_jsonl(os.path.join(d, 'scores.jsonl'))
    assert len(groups) == 8 and all(len(g['responses']) == 4 for g in groups)
    assert m['pairs'] == len(pairs) > 0 and m['samples'] == 32
    assert m['pairs'] + m['ties'] + m['identical'] == 8
    for p in pairs:
      assert p['chosen_score'] > p['rejected_score'] and p['chosen'] != p['rejected']
      assert len(p['chosen']) == p['chosen_score']
    assert m['dpo_steps'] == 2 and np.isfinite(m['train']['loss'])
    for k in ('preference_accuracy', 'vqa_accuracy', 'generated_accuracy'):
      assert 0 <= m['eval_after'][k] <= 1
    assert os.path.isdir(os.path.join(d, 'policy', 'params'))
  assert hist[1]['start_policy'] == os.path.join('round_1', 'policy')
  assert hist[1]['eval_before'] == hist[0]['eval_after']
  # round 2 sampled from round 1's policy: its responses differ from round 1's start
  out = capsys.readouterr().out
  assert 'preference acc' in out and 'Round 2: held-out preference accuracy' in out

  # interrupted after round 1: a rerun resumes at round 2 with the same pairs
  shutil.copytree(a, b)
  shutil.rmtree(it.round_dir(b, 2))
  hist_b = it.run(_config(start), b, scorer=longer_is_better)
  assert 'Round 1: finished earlier' in capsys.readouterr().out
  with open(os.path.join(it.round_dir(a, 2), 'pairs.jsonl')) as fa, \
       open(os.path.join(it.round_dir(b, 2), 'pairs.jsonl')) as fb:
    assert fa.read() == fb.read()
  assert hist_b[1]['eval_after'] == hist[1]['eval_after']


def test_pair_records_with_chosen_equal_rejected_are_counted_and_skipped(start):
  _, _, tok = start
  recs = []
  for i in range(3):
    s = it.prompt_sample(i, 'train', 0, None)
    recs.append(dict(id=f'r{i}', split='train', sample=i, prompt=s.messages[0]['content'],
                     chosen='red', rejected='red' if i == 1 else 'blue'))
  task = it.PairsTask(recs, tok, image_size=16, num_image_tokens=4, max_len=48)
  assert task.skipped == 1 and len(task) == 2
  b = task.batch(0, 4)   # cycles over the two usable records
  for row in range(4):
    for side, want in (('chosen', 'red'), ('rejected', 'blue')):
      ids = b[f'{side}_input_ids'][row][b[f'{side}_loss_mask'][row] > 0]
      assert tok.decode(ids, skip_special_tokens=True).strip() == want
  bad = dict(recs[0], prompt='what?')
  with pytest.raises(ValueError, match='pair r0: its prompt'):
    it.PairsTask([bad], tok, image_size=16, num_image_tokens=4, max_len=48).batch(0, 1)
  with pytest.raises(ValueError, match='no usable preference pairs'):
    it.PairsTask([recs[1]], tok, image_size=16, num_image_tokens=4, max_len=48)


def saved_reward_model(policy, out, image_norm=None):
  """A reward model on `policy` (params checkpoint) saved at `out`: (model, factory, params)."""
  mcfg, _ = pretrained.saved_model_config(policy)
  rm = reward.RewardModel(mcfg)
  f = steps.StateFactory(rm, shd.make_mesh({'data': 1}, devices=jax.devices()[:1]),
                         shd.logical_rules('dp'))
  params = reward.from_policy(f, policy, jax.random.key(1))
  pretrained.save_params(out, rm, params, image_norm)
  return rm, f, params


def test_the_starts_image_norm_wins_over_the_config(start, tmp_path, capsys):
  """A policy trained on SigLIP-normalised pixels is sampled with them although the iterative
  config says 'clip': the norm recorded in a params checkpoint, or an HF directory's image
  processor; an HF processor with another mean / std is an error naming the directory."""
  import transformers
  path, _, _ = start
  config = _config(start)
  assert config.data.image_norm == 'clip'
  model = MLLM(pretrained.saved_model_config(path)[0])
  params = pretrained.restore_params(path, steps.StateFactory(
      model, shd.make_mesh({'data': 1}, devices=jax.devices()[:1]),
      shd.logical_rules('dp')).abstract_params)
  pretrained.save_params(str(tmp_path / 'sig'), model, params, 'siglip')
  assert pretrained.saved_image_norm(path) is None            # saved without one
  assert pretrained.start_preprocessing(config, path, 'policy') is config
  out = pretrained.start_preprocessing(config, str(tmp_path / 'sig'), 'policy')
  assert out.data.image_norm == 'siglip' and config.data.image_norm == 'clip'
  assert not out.data.pad_to_square                          # recorded: no padding
  assert "trained with image_norm='siglip'" in capsys.readouterr().out
  config.model.init_from = str(tmp_path / 'sig')   # a training run from it warns instead
  assert pretrained.image_norm_warnings(config) == [
      f"config.model.init_from={tmp_path / 'sig'} was trained with image_norm='siglip', but "
      "config.data.image_norm='clip': set --config.data.image_norm=siglip unless the change is "
      'meant']
  # padding to a square travels the same way
  pretrained.save_params(str(tmp_path / 'pad'), model, params, 'clip', True)
  assert pretrained.saved_pad_to_square(path) is None
  out = pretrained.start_preprocessing(config, str(tmp_path / 'pad'), 'policy')
  assert out.data.pad_to_square is True and out.data.image_norm == 'clip'
  assert not config.data.pad_to_square
  assert 'trained with pad_to_square=True' in capsys.readouterr().out
  config.model.init_from = str(tmp_path / 'pad')
  assert pretrained.image_norm_warnings(config) == [
      f'config.model.init_from={tmp_path / "pad"} was trained with pad_to_square=True, but '
      'config.data.pad_to_square=False: set --config.data.pad_to_square=True unless the change '
      'is meant']
  hf = tmp_path / 'hf'
  transformers.LlavaConfig().save_pretrained(hf)
  transformers.SiglipImageProcessor().save_pretrained(hf)
  assert pretrained.saved_image_norm(str(hf)) == 'siglip'
  transformers.CLIPImageProcessor().save_pretrained(hf)
  assert pretrained.saved_image_norm(str(hf)) == 'clip'
  assert pretrained.saved_pad_to_square(str(hf)) is None      # CLIP's processor: unknown
  transformers.LlavaImageProcessor(do_pad=True).save_pretrained(hf)
  assert pretrained.saved_pad_to_square(str(hf)) is True
  transformers.LlavaImageProcessor(do_pad=False).save_pretrained(hf)
  assert pretrained.saved_pad_to_square(str(hf)) is False
  transformers.CLIPImageProcessor(image_mean=[0.4, 0.4, 0.4]).save_pretrained(hf)
  with pytest.raises(ValueError, match=f'{hf}: its image processor'):
    pretrained.saved_image_norm(str(hf))
  config.model.vision.hf_path = str(hf)
  assert pretrained.image_norm_warnings(config)[1].startswith(
      f'config.model.vision.hf_path: {hf}: its image processor')


def test_reward_model_scorer_scores_each_conversation(start, tmp_path):
  """... with the reward model's own image norm (recorded 'siglip'; the call's 'clip' is the
  fallback for a checkpoint that records none)."""
  path, _, tok = start
  rm, f, params = saved_reward_model(path, str(tmp_path / 'rm'), 'siglip')
  score = it.reward_model_scorer(str(tmp_path / 'rm'), tok, f.mesh, f.rules, 48, 'clip', 4)
  s = [it.prompt_sample(i, 'train', 0, 16) for i in range(3)]
  items = [(x.messages[0]['content'], resp, x) for x, resp in zip(s, ['red', 'two', 'no'])]
  got = score(items)
  from mllm_jax.data import conversation, images
  for (prompt, resp, x), g in zip(items, got):   # each conversation alone, unpadded
    ids, _, _ = conversation.tokenize_conversation(
        tok, [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': resp}],
        num_image_tokens=4)
    px = images.normalize(np.stack(x.images)[None], images.SIGLIP_MEAN, images.SIGLIP_STD)
    want = rm.apply({'params': params}, ids[None], px)
    np.testing.assert_allclose(g, want[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# InstructBLIP: the Q-Former reads each sample's instruction everywhere the rounds run a model
# ----------------------------------------------------------------------------------------------
QLEN = 24   # config.data.qformer_max_len of these runs


def bert_tokenizer(path):
  """A BERT (WordPiece) tokenizer over the demo corpus' words, saved at `path` and reloaded:
  InstructBLIP's Q-Former reads BERT tokens, not the LLM's."""
  import transformers
  return transformers.AutoTokenizer.from_pretrained(
      build_bert_tokenizer(path, tok_lib.demo_corpus(200)))


@pytest.fixture(scope='module')
def ib_start(start, tmp_path_factory):
  """A tiny random InstructBLIP policy (params checkpoint) whose Q-Former reads a BERT
  tokenizer of its own: (policy path, LLM tokenizer dir, LLM tokenizer, Q-Former tokenizer dir,
  Q-Former tokenizer)."""
  base = tmp_path_factory.mktemp('ib_start')
  _, tok_dir, tok = start
  qtok = bert_tokenizer(str(base / 'qformer_tokenizer'))
  assert len(qtok) != len(tok)
  cfg = MLLMConfig.from_dict(dict(
      llm=dict(vocab_size=-(-len(tok) // 8) * 8, hidden=32, depth=1, heads=4, kv_heads=2,
               mlp_dim=64, max_position=128),
      vision=dict(kind='blip2', image_size=16, patch_size=8, width=16, depth=1, heads=2,
                  mlp_dim=32, feature_layer=-1, feature_select='full'),
      connector=dict(kind='qformer', qformer=dict(
          num_queries=4, hidden=16, depth=1, heads=2, mlp_dim=32, cross_attention_every=1,
          instruction=True, vocab_size=-(-len(qtok) // 8) * 8, max_position=QLEN)),
      image_token_id=tok.convert_tokens_to_ids('<image>')))
  model = MLLM(cfg)
  factory = steps.StateFactory(model, shd.make_mesh({'data': 1}, devices=jax.devices()[:1]),
                               shd.logical_rules('dp'))
  pretrained.save_params(str(base / 'policy'), model, factory.init_params(jax.random.key(0)))
  return str(base / 'policy'), tok_dir, tok, str(base / 'qformer_tokenizer'), qtok


def _ib_config(ib_start, **over):
  o = {'data.qformer_tokenizer': ib_start[3], 'data.qformer_max_len': QLEN,
       'iterative.prompts_per_round': 4, 'iterative.samples_per_prompt': 4,
       'iterative.generate_batch': 16, 'iterative.eval_prompts': 4, 'dpo.steps': 1,
       'train.eval_examples': 8, 'train.eval_batch_size': 8}
  o.update(over)
  return _config(ib_start[:2] + (None,), **o)


@pytest.fixture(scope='module')
def ib_run(ib_start, tmp_path_factory):
  """Two rounds of a tiny InstructBLIP policy (config: the LLaVA demo's, so the checkpoint's
  architecture must win), then a rerun of a copy whose round 2 was lost."""
  root = tmp_path_factory.mktemp('ib_run')
  a, b = str(root / 'a'), str(root / 'b')
  hist = it.run(_ib_config(ib_start), a, scorer=longer_is_better)
  shutil.copytree(a, b)
  shutil.rmtree(it.round_dir(b, 2))
  return a, hist, b, it.run(_ib_config(ib_start), b, scorer=longer_is_better)


def _instruction_rows(qtok, texts):
  """The Q-Former rows of `texts` as transformers' tokenizer gives them, right-padded."""
  ids = np.full((len(texts), QLEN), qtok.pad_token_id, np.int32)
  for row, t in enumerate(texts):
    q = qtok(t)['input_ids']
    ids[row, :len(q)] = q
  return ids, (np.arange(QLEN)[None] < (ids != qtok.pad_token_id).sum(1, keepdims=True)
               ).astype(np.int32)


def _question(sample):
  return sample.messages[0]['content'].split('\n')[-1]


@pytest.mark.slow
def test_instructblip_rounds_run_write_their_files_and_resume(ib_run):
  a, hist, b, hist_b = ib_run
  assert [m['round'] for m in hist] == [1, 2]
  for r, m in enumerate(hist, 1):
    d = it.round_dir(a, r)
    groups = it.read_jsonl(os.path.join(d, 'scores.jsonl'))
    assert len(groups) == 4 and all(len(g['responses']) == 4 for g in groups)
    assert m['pairs'] == len(it.read_jsonl(os.path.join(d, 'pairs.jsonl'))) > 0
    assert m['dpo_steps'] == 1 and np.isfinite(m['train']['loss'])
    for k in ('preference_accuracy', 'vqa_accuracy', 'generated_accuracy'):
      assert 0 <= m['eval_after'][k] <= 1
    assert os.path.isdir(os.path.join(d, 'policy', 'params'))
  # the saved policy is still InstructBLIP
  mcfg, _ = pretrained.saved_model_config(os.path.join(it.round_dir(a, 2), 'policy'))
  assert it.needs_instruction(mcfg)
  with open(os.path.join(it.round_dir(a, 2), 'pairs.jsonl')) as fa, \
       open(os.path.join(it.round_dir(b, 2), 'pairs.jsonl')) as fb:
    assert fa.read() == fb.read()
  assert hist_b[0] == hist[0] and hist_b[1]['eval_after'] == hist[1]['eval_after']


@pytest.mark.slow
def test_instructblip_sampling_and_dpo_loss_read_the_instruction(ib_start, ib_run):
  """Round 1's sampled responses are `mllm_jax.generate` given each prompt's question through
  the Q-Former tokenizer (and not what an empty instruction gives); round 1's DPO loss on its
  batch is the hand computation from log-probs with the instruction."""
  from mllm_jax.data import conversation, images
  path, _, tok, _, qtok = ib_start
  a, hist = ib_run[:2]
  config = _ib_config(ib_start)
  mcfg, _ = pretrained.saved_model_config(path)
  model = MLLM(mcfg)
  factory = steps.StateFactory(model, shd.make_mesh(config.mesh.to_dict()),
                               shd.logical_rules(config.sharding.rules))
  params = pretrained.restore_params(path, factory.abstract_params)
  mean, std = images.NORMALIZATION[config.data.image_norm]
  groups = it.read_jsonl(os.path.join(it.round_dir(a, 1), 'scores.jsonl'))
  samples = [it.prompt_sample(g['sample'], 'train', config.seed, 16) for g in groups]
  assert [s.messages[0]['content'] for s in samples] == [g['prompt'] for g in groups]

  # sampling: one chunk of 4 prompts x 4 samples, left-padded, seed from (seed, round 1, chunk 0)
  prompts = [it.prompt_ids(tok, s, 4) for s in samples]
  width = max(map(len, prompts))
  ids = np.full((16, width), tok.pad_token_id, np.int32)
  mask = np.zeros((16, width), np.int32)
  for row in range(16):
    p = prompts[row // 4]
    ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
  pixels = images.normalize(np.stack([samples[row // 4].images[:1] for row in range(16)]),
                            mean, std)
  seed = int(np.random.SeedSequence([config.seed, 1, 0]).generate_state(1)[0] >> 1)
  stops = tok_lib.stop_token_ids(tok)

  def sample(texts):
    q, qm = _instruction_rows(qtok, [texts[row // 4] for row in range(16)])
    with jax.set_mesh(factory.mesh):
      return np.asarray(gen.generate(
          model, params, ids, mask, pixels, max_new_tokens=4, temperature=1.0,
          stop_tokens=stops, pad_token_id=tok.pad_token_id, seed=seed, qformer_input_ids=q,
          qformer_attention_mask=qm))

  def text(toks):
    toks = toks.tolist()
    ends = [j for j, t in enumerate(toks) if t in stops]
    return tok.decode(toks[:ends[0]] if ends else toks, skip_special_tokens=True).strip()

  new = sample([_question(s) for s in samples])
  assert [[text(new[4 * j + i]) for i in range(4)] for j in range(4)] == \
      [g['responses'] for g in groups]
  assert (sample([''] * 4) != new).any()   # the instruction reaches the sampled tokens

  # DPO, step 1: policy = reference, so each pair's DPO term is -log s(0) = log 2, and the SFT
  # term is the chosen answers' mean negative log-likelihood under the instruction
  pairs = it.read_jsonl(os.path.join(it.round_dir(a, 1), 'pairs.jsonl'))
  rows = [pairs[i % len(pairs)] for i in range(config.dpo.batch_size)]
  pix = images.normalize(np.stack([it.prompt_sample(p['sample'], 'train', config.seed, 16)
                                   .images[:1] for p in rows]), mean, std)

  fwd = jax.jit(lambda p, i, m, x, q, qm: model.apply(
      {'params': p}, i, x, m, qformer_input_ids=q, qformer_attention_mask=qm))

  def logps(side, texts):   # summed log-probs of each row's answer tokens, answer token count
    t = config.data.max_len
    seq = np.full((len(rows), t), tok.pad_token_id, np.int32)
    att, loss = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.float32)
    for row, p in enumerate(rows):
      ids, lm, _ = conversation.tokenize_conversation(
          tok, [{'role': 'user', 'content': p['prompt']},
                {'role': 'assistant', 'content': p[side]}],
          num_image_tokens=4, max_len=t, truncate=True)
      seq[row, :len(ids)], att[row, :len(ids)], loss[row, :len(ids)] = ids, 1, lm
    with jax.set_mesh(factory.mesh):
      logits = np.asarray(fwd(params, seq, att, pix, *_instruction_rows(qtok, texts)),
                          np.float32)[:, :-1]
    lp = np.take_along_axis(jax.nn.log_softmax(logits, -1), seq[:, 1:, None], -1)[..., 0]
    return (lp * loss[:, 1:]).sum(1), loss[:, 1:].sum()

  questions = [p['prompt'].split('\n')[-1] for p in rows]
  pc, n_sft = logps('chosen', questions)
  pr, _ = logps('rejected', questions)
  pref = config.dpo.preference
  want = pref.alpha * np.log(2.0) + pref.gamma * -pc.sum() / n_sft
  got = hist[0]['train']
  np.testing.assert_allclose(got['logps/chosen'], pc.mean(), rtol=1e-4)
  np.testing.assert_allclose(got['logps/rejected'], pr.mean(), rtol=1e-4)
  np.testing.assert_allclose(got['loss'], want, rtol=1e-4)
  # ... which an empty instruction would not give
  assert abs(logps('chosen', [''] * len(rows))[0].mean() - pc.mean()) > 1e-3 * abs(pc.mean())


def test_reward_model_scorer_reads_the_instruction(ib_start, tmp_path):
  from mllm_jax.data import conversation, images
  path, _, tok, _, qtok = ib_start
  rm, f, params = saved_reward_model(path, str(tmp_path / 'rm'))
  mcfg = rm.cfg
  s = [it.prompt_sample(i, 'train', 0, 16) for i in range(2)]
  items = [(x.messages[0]['content'], resp, x) for x, resp in zip(s, ['red', 'two'])]
  assert len(tok) > mcfg.connector.qformer.vocab_size   # not the Q-Former's tokenizer: an error
  with pytest.raises(ValueError, match='Q-Former vocabulary'):
    it.reward_model_scorer(str(tmp_path / 'rm'), tok, f.mesh, f.rules, 48, 'clip', 4)
  score = it.reward_model_scorer(str(tmp_path / 'rm'), tok, f.mesh, f.rules, 48, 'clip', 4,
                                 qformer_tokenizer=qtok, qformer_max_len=QLEN)
  got = score(items)

  # directly: the conversations and instructions padded differently (to their longest), one call
  # with each prompt's question, and again with another instruction
  rows = [(p, r, x, _question(x)) for p, r, x in items]
  rows += [(p, r, x, 'how many') for p, r, x in items]
  convs = [conversation.tokenize_conversation(
      tok, [{'role': 'user', 'content': p}, {'role': 'assistant', 'content': r}],
      num_image_tokens=4)[0] for p, r, _, _ in rows]
  qs = [qtok(t)['input_ids'] for *_, t in rows]
  ids, att = np.zeros((4, max(map(len, convs))), np.int32), np.zeros((4, max(map(len, convs))))
  q, qm = np.zeros((4, max(map(len, qs))), np.int32), np.zeros((4, max(map(len, qs))), np.int32)
  for row, (c, qi) in enumerate(zip(convs, qs)):
    ids[row, :len(c)], att[row, :len(c)], q[row, :len(qi)], qm[row, :len(qi)] = c, 1, qi, 1
  px = images.normalize(np.stack([x.images[:1] for _, _, x, _ in rows]), images.CLIP_MEAN,
                        images.CLIP_STD)
  want = np.asarray(jax.jit(lambda p: rm.apply(
      {'params': p}, ids, px, att.astype(np.int32), qformer_input_ids=q,
      qformer_attention_mask=qm))(params))
  np.testing.assert_allclose(got, want[:2], rtol=1e-5, atol=1e-6)
  assert (abs(want[2:] - want[:2]) > 1e-4).all()   # the instruction moves the score
