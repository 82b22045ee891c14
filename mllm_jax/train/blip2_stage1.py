"""BLIP-2 stage 1 (representation learning): ITC + ITM + ITG losses, the train step and a
training entry point on the built-in scenes task's captions.

    python -m mllm_jax.train.blip2_stage1 --config configs/demo_blip2_stage1.py --workdir DIR

Losses (LAVIS `Blip2Qformer.forward`; N = batch, Q = queries, E = embed_dim, L = text length):
  ITC  image-text contrastive: sim[i, j] = max_q <img_i,q, txt_j> / temp [N, N]; CE of each
       image over the texts and of each text over the images, averaged
  ITM  image-text matching: N positive pairs, N (sampled hard negative image, text) and N
       (image, hard negative text) pairs through the Q-Former with bidirectional attention;
       2-class CE over the 3N pairs
  ITG  image-grounded text generation: causal next-token CE over the text, pads excluded
loss = itc_weight * ITC + itm_weight * ITM + itg_weight * ITG. The vision tower is frozen by
the stage's `trainable` regex (default: everything but `vision/`): it gets no gradient and no
optimiser state, as in `train.steps`. The stage-1 checkpoint (WORKDIR/stage1: params + model
JSON) starts stage 2: `--config.model.connector.init_from=WORKDIR` in the training job, which
calls `mllm_params_from_stage1` (docs/qformer.md, "Stage 1").
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_jax.models.blip2_stage1 import TEMP_RANGE, QFormerPretrainer
from mllm_jax.models.config import Stage1Config
from mllm_jax.train import optim, steps

STAGE1_JSON = 'stage1_model.json'   # next to `params/` in a stage-1 checkpoint
DEC_TOKEN = '[DEC]'


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def itc_similarity(image_embeds, text_embeds):
  """image_embeds [N, Q, E], text_embeds [M, E] (unit length) -> [N, M]: for each image and
  text the largest cosine similarity over the image's Q query embeddings."""
  return jnp.max(jnp.einsum('nqe,me->nmq', image_embeds, text_embeds), axis=-1)


def _targets(positive, label_smoothing):
  """positive bool [N, N] -> soft targets [N, N]: each row spread over its positives (LAVIS'
  `image_ids` targets), then smoothed as torch's CE label_smoothing does."""
  t = positive.astype(jnp.float32)
  t = t / jnp.sum(t, axis=-1, keepdims=True)
  return optax.smooth_labels(t, label_smoothing) if label_smoothing else t


def itc_loss(sim, temp, positive=None, label_smoothing: float = 0.0):
  """Image-text contrastive loss.

  sim [N, N] (image i, text j; `itc_similarity`), temp [] (> 0), positive bool [N, N] (pairs
  that count as matched; default the diagonal: text i describes image i). Returns
  dict(loss [] = mean of the image->text and text->image cross-entropies of sim / temp,
  i2t_accuracy [] = fraction of images whose best text is a positive)."""
  n = sim.shape[0]
  if positive is None:
    positive = jnp.eye(n, dtype=bool)
  logits = sim.astype(jnp.float32) / temp
  i2t = optax.softmax_cross_entropy(logits, _targets(positive, label_smoothing))
  t2i = optax.softmax_cross_entropy(logits.T, _targets(positive.T, label_smoothing))
  hit = jnp.take_along_axis(positive, jnp.argmax(logits, axis=1)[:, None], axis=1)[:, 0]
  return dict(loss=(jnp.mean(i2t) + jnp.mean(t2i)) / 2, i2t_accuracy=jnp.mean(hit))


def sample_hard_negatives(key, sim, temp, positive=None):
  """For each text a negative image, and for each image a negative text, drawn from the softmax
  of their ITC similarities (sim / temp [N, N], no gradient) with the positives excluded.

  -> (neg_image [N]: image index for text j, neg_text [N]: text index for image i), int32.
  Every row needs a negative: a batch of N >= 2 whose rows aren't all positives."""
  n = sim.shape[0]
  if n < 2:
    raise ValueError(f'ITM hard negatives need a batch of at least 2 pairs, got {n}')
  if positive is None:
    positive = jnp.eye(n, dtype=bool)
  logits = jnp.where(positive, -jnp.inf, jax.lax.stop_gradient(sim) / temp)
  k_img, k_txt = jax.random.split(key)
  neg_image = jax.random.categorical(k_img, logits.T, axis=-1)   # text j -> image
  neg_text = jax.random.categorical(k_txt, logits, axis=-1)      # image i -> text
  return neg_image.astype(jnp.int32), neg_text.astype(jnp.int32)


def itm_pairs(neg_image, neg_text):
  """-> (image index [3N], text index [3N], label [3N]): N positive pairs (i, i), then
  (neg_image[j], j) and (i, neg_text[i]) with label 0 (LAVIS' order)."""
  n = neg_image.shape[0]
  r = jnp.arange(n, dtype=jnp.int32)
  image = jnp.concatenate([r, neg_image, r])
  text = jnp.concatenate([r, r, neg_text])
  label = jnp.concatenate([jnp.ones(n, jnp.int32), jnp.zeros(2 * n, jnp.int32)])
  return image, text, label


def itm_loss(logits, labels):
  """logits [P, 2] (class 1 = matched), labels int [P] -> dict(loss [] mean CE, accuracy [])."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return dict(loss=jnp.mean(ce), accuracy=jnp.mean(jnp.argmax(logits, -1) == labels))


def itg_loss(logits, input_ids, attention_mask, label_smoothing: float = 0.0):
  """Next-token CE of image-grounded generation: position t predicts input_ids[:, t + 1].

  logits [N, L, V] (fp32), input_ids / attention_mask [N, L] (pad = 0 in the mask, excluded
  as targets). -> dict(loss [] mean over target tokens, tokens [], accuracy [])."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets, mask = input_ids[:, 1:], attention_mask[:, 1:].astype(jnp.float32)
  onehot = jax.nn.one_hot(targets, logits.shape[-1])
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  ce = optax.softmax_cross_entropy(logits, onehot)
  tokens = jnp.maximum(jnp.sum(mask), 1.0)
  right = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return dict(loss=jnp.sum(ce * mask) / tokens, tokens=jnp.sum(mask),
              accuracy=jnp.sum(right * mask) / tokens)


def same_text(input_ids):
  """input_ids [N, L] -> bool [N, N]: rows with identical token ids. The scenes task repeats
  captions, and an identical caption of another image is a positive, not a negative (LAVIS
  does the same with `image_ids`)."""
  return jnp.all(input_ids[:, None, :] == input_ids[None, :, :], axis=-1)


# ----------------------------------------------------------------------------------------------
# The train step
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LossConfig:
  itc_weight: float = 1.0
  itm_weight: float = 1.0
  itg_weight: float = 1.0
  label_smoothing: float = 0.1   # ITC and ITG (LAVIS: 0.1)


def stage1_losses(model: QFormerPretrainer, params, batch, key, lc: LossConfig = LossConfig()):
  """batch: pixel_values [N, H, W, 3], input_ids / attention_mask [N, L] (caption i describes
  image i; first token [CLS]). key: PRNG key of the ITM negatives. -> (loss [], metrics)."""
  run = lambda method, *a: model.apply({'params': params}, *a, method=method)
  ids, mask = jnp.asarray(batch['input_ids']), jnp.asarray(batch['attention_mask'])
  feats = run('features', batch['pixel_values'])
  temp = run('temperature')
  sim = itc_similarity(run('image_embeds', feats), run('text_embeds', ids, mask))
  positive = same_text(ids)
  itc = itc_loss(sim, temp, positive, lc.label_smoothing)
  image, text, labels = itm_pairs(*sample_hard_negatives(key, sim, temp, positive))
  itm = itm_loss(run('itm_logits', feats[image], ids[text], mask[text]), labels)
  itg = itg_loss(run('itg_logits', feats, ids, mask), ids, mask, lc.label_smoothing)
  loss = lc.itc_weight * itc['loss'] + lc.itm_weight * itm['loss'] + lc.itg_weight * itg['loss']
  return loss, {'loss': loss, 'itc_loss': itc['loss'], 'itm_loss': itm['loss'],
                'itg_loss': itg['loss'], 'itc_i2t_accuracy': itc['i2t_accuracy'],
                'itm_accuracy': itm['accuracy'], 'itg_token_accuracy': itg['accuracy'],
                'temp': temp}


def make_train_step(model: QFormerPretrainer, tx, mask: dict, lc: LossConfig = LossConfig()):
  """-> step(state: steps.TrainState, batch, key) -> (state, metrics), for jax.jit.

  Only the parameters `mask` marks train (the tower is frozen by leaving `vision/` out): the
  rest gets no gradient and no optimiser state. A non-finite step changes nothing
  (`steps.guarded_update`). After the update `temp` is clamped to TEMP_RANGE, as LAVIS clamps
  it in place before each use. No gradient accumulation: ITC's negatives are the batch."""
  def step(state, batch, key):
    trainable, frozen = optim.split_params(state.params, mask)
    grad_fn = jax.value_and_grad(
        lambda tp: stage1_losses(model, optim.merge_params(tp, frozen), batch, key, lc),
        has_aux=True)
    (loss, metrics), grads = grad_fn(trainable)
    new, m = steps.guarded_update(state, trainable, frozen, grads, loss, tx)
    if 'temp' in new.params:
      new = new.replace(params=dict(new.params, temp=jnp.clip(new.params['temp'], *TEMP_RANGE)))
    return new, {**metrics, **m}
  return step


def retrieval_metrics(model, params, batch) -> dict:
  """Held-out ITC retrieval over one batch (N images and their N captions): recall@1 image ->
  text and text -> image (a retrieved identical caption counts as right), and the recall@1 of
  a random ranking (the mean fraction of positives per row)."""
  run = lambda method, *a: model.apply({'params': params}, *a, method=method)
  ids = batch['input_ids']
  sim = itc_similarity(run('image_embeds', run('features', batch['pixel_values'])),
                       run('text_embeds', ids, batch['attention_mask']))
  positive = same_text(ids)
  i2t = jnp.take_along_axis(positive, jnp.argmax(sim, 1)[:, None], 1)
  t2i = jnp.take_along_axis(positive.T, jnp.argmax(sim, 0)[:, None], 1)
  return {'eval/i2t_r1': jnp.mean(i2t), 'eval/t2i_r1': jnp.mean(t2i),
          'eval/chance_r1': jnp.mean(positive)}


# ----------------------------------------------------------------------------------------------
# Data: the scenes task's captions, tokenised with a BERT WordPiece tokenizer
# ----------------------------------------------------------------------------------------------
def build_qformer_tokenizer(out_dir: str):
  """A BERT WordPiece tokenizer (the Q-Former's class: lower case, [CLS] ... [SEP], [PAD] = 0)
  over the scenes task's words, with LAVIS' decoder BOS `[DEC]` added as bos_token; saved in
  `out_dir` (once) and loaded."""
  import transformers
  from mllm_jax.data import tokenizer as tok_lib
  if not os.path.exists(os.path.join(out_dir, 'tokenizer_config.json')):
    words = sorted({w for t in tok_lib.demo_corpus(500)
                    for w in re.findall(r'\w+|[^\w\s]', t.lower())})
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tok.add_special_tokens({'bos_token': DEC_TOKEN})
    tok.save_pretrained(out_dir)
  return load_qformer_tokenizer(out_dir)


def load_qformer_tokenizer(path: str):
  """AutoTokenizer at `path`, checked to have a pad token and a decoder BOS ([DEC])."""
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(path)
  if tok.pad_token_id is None or tok.bos_token_id is None:
    raise ValueError(f'config.data.tokenizer={path!r}: the Q-Former tokenizer needs a pad '
                     f'token and a decoder BOS token (bos_token, {DEC_TOKEN} in LAVIS)')
  return tok


class CaptionTask:
  """(image, caption) pairs of the scenes task (`data.synthetic`, kind='caption').

  batch(start, n) -> pixel_values float32 [n, S, S, 3] (normalised), input_ids / attention_mask
  int32 [n, max_len] ([CLS] caption [SEP], right-padded): samples start .. start + n - 1."""

  def __init__(self, tokenizer, split: str, seed: int, image_size: int, max_len: int,
               image_norm: str = 'clip'):
    from mllm_jax.data import images
    if image_norm not in images.NORMALIZATION:
      raise ValueError(f'config.data.image_norm={image_norm!r}: expected one of '
                       f'{sorted(images.NORMALIZATION)}')
    self.tokenizer, self.split, self.seed = tokenizer, split, seed
    self.image_size, self.max_len = image_size, max_len
    self.mean, self.std = images.NORMALIZATION[image_norm]

  def batch(self, start: int, n: int) -> dict:
    from mllm_jax.data import images, synthetic
    samples = [synthetic.make_sample(i, kind='caption', split=self.split, seed=self.seed,
                                     image_size=self.image_size) for i in range(start, start + n)]
    ids = np.full((n, self.max_len), self.tokenizer.pad_token_id, np.int32)
    mask = np.zeros((n, self.max_len), np.int32)
    for row, s in enumerate(samples):
      t = self.tokenizer(s.caption)['input_ids']
      if len(t) > self.max_len:
        raise ValueError(f'caption of sample {s.index} ({self.split}) has {len(t)} tokens > '
                         f'config.data.max_len={self.max_len}')
      ids[row, :len(t)], mask[row, :len(t)] = t, 1
    pixels = np.stack([s.images[0] for s in samples])
    return {'pixel_values': images.normalize(pixels, self.mean, self.std), 'input_ids': ids,
            'attention_mask': mask}


# ----------------------------------------------------------------------------------------------
# Checkpoints, and stage 2's start
# ----------------------------------------------------------------------------------------------
def save_stage1(directory: str, model: QFormerPretrainer, params, tokenizer_dir: str = ''):
  """WORKDIR/stage1: `params/` (orbax) and STAGE1_JSON (the Stage1Config; the tokenizer dir
  relative to the checkpoint when inside its workdir)."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  if tokenizer_dir:
    tokenizer_dir = os.path.relpath(os.path.abspath(tokenizer_dir), directory)
  with open(os.path.join(directory, STAGE1_JSON), 'w') as f:
    json.dump({'config': model.cfg.to_dict(), 'tokenizer': tokenizer_dir}, f, indent=1)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, 'params'), params, force=True)
  ckptr.wait_until_finished()


def load_stage1(path: str):
  """A stage-1 checkpoint (its directory, or the run's workdir) -> (QFormerPretrainer, params,
  tokenizer dir or '')."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if not os.path.exists(os.path.join(path, STAGE1_JSON)):
    path = os.path.join(path, 'stage1')
  if not os.path.exists(os.path.join(path, STAGE1_JSON)):
    raise FileNotFoundError(f'{path}: no {STAGE1_JSON} (not a BLIP-2 stage-1 checkpoint)')
  with open(os.path.join(path, STAGE1_JSON)) as f:
    meta = json.load(f)
  model = QFormerPretrainer(Stage1Config.from_dict(meta['config'], f'{path}/{STAGE1_JSON}'))
  params = ocp.StandardCheckpointer().restore(os.path.join(path, 'params'))
  tok = os.path.normpath(os.path.join(path, meta['tokenizer'])) if meta['tokenizer'] else ''
  return model, params, tok


_QFORMER_ARCH = ('num_queries', 'hidden', 'depth', 'heads', 'mlp_dim', 'norm_eps', 'act',
                 'cross_attention_every')


def mllm_params_from_stage1(stage1, mllm, params):
  """Stage 2's start: the MLLM's `params` with its tower and Q-Former connector (queries,
  Q-Former; with `instruction=True` also the text embeddings and text FFNs) taken from the
  stage-1 checkpoint `stage1` (a path, or a (QFormerPretrainer, params) pair). The connector's
  `language_projection` and the LLM keep their values. Architectures that differ are an error
  naming the config key."""
  from mllm_jax.hf import pretrained
  model1, p1 = (load_stage1(stage1)[:2] if isinstance(stage1, str) else stage1)
  cfg = mllm.cfg
  if cfg.connector.kind != 'qformer':
    raise ValueError(f"config.model.connector.kind={cfg.connector.kind!r}: a stage-1 Q-Former "
                     "starts a connector of kind 'qformer'")
  ours, theirs = cfg.connector.qformer, model1.cfg.qformer
  for k in _QFORMER_ARCH + (('vocab_size', 'max_position') if ours.instruction else ()):
    if getattr(ours, k) != getattr(theirs, k):
      raise ValueError(f'config.model.connector.qformer.{k}={getattr(ours, k)!r}, the stage-1 '
                       f'Q-Former has {getattr(theirs, k)!r}')
  pretrained.check_same_architecture(cfg.vision, model1.cfg.vision, 'config.model.vision',
                                     'the stage-1 checkpoint')
  for k in ('feature_layers', 'feature_select'):   # the features the Q-Former learned to read
    if getattr(cfg.vision, k) != getattr(model1.cfg.vision, k):
      raise ValueError(f'config.model.vision.{k.replace("layers", "layer")}: '
                       f'{getattr(cfg.vision, k)!r}, the stage-1 Q-Former read '
                       f'{getattr(model1.cfg.vision, k)!r}')
  flat1 = flax.traverse_util.flatten_dict(p1, sep='/')
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  for k, v in flat.items():
    src = ('qformer/' + k[len('connector/'):] if k.startswith('connector/') else
           k if k.startswith('vision/') else None)
    if src is None or k.startswith('connector/language_projection/'):
      continue
    if src not in flat1 or tuple(flat1[src].shape) != tuple(v.shape):
      raise ValueError(f'{k}: no stage-1 parameter {src} of shape {list(v.shape)}')
    x = np.asarray(flat1[src]).astype(v.dtype)
    flat[k] = jax.device_put(x, v.sharding) if isinstance(v, jax.Array) else x
  return flax.traverse_util.unflatten_dict(flat, sep='/')


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
def model_config(config, tokenizer) -> Stage1Config:
  """`config.model` as a Stage1Config, with the tokenizer's values filled in (vocab_size 0: its
  size rounded up to a multiple of 8; decoder_bos_id -1: its bos_token) and checked against it
  and `config.data.max_len`."""
  m = config.model.to_dict()
  q = m.setdefault('qformer', {})
  if q.get('vocab_size', 0) == 0:
    q['vocab_size'] = -(-len(tokenizer) // 8) * 8
  if m.get('decoder_bos_id', -1) == -1:
    m['decoder_bos_id'] = tokenizer.bos_token_id
  cfg = Stage1Config.from_dict(m)
  if cfg.qformer.vocab_size < len(tokenizer):
    raise ValueError(f'config.model.qformer.vocab_size={cfg.qformer.vocab_size} < the '
                     f'tokenizer\'s {len(tokenizer)} tokens (0 = the tokenizer\'s size)')
  if config.data.max_len > cfg.qformer.max_position:
    raise ValueError(f'config.data.max_len={config.data.max_len} > '
                     f'config.model.qformer.max_position={cfg.qformer.max_position}')
  return cfg


def run(config, workdir: str) -> dict | None:
  """Train stage 1 as `config` says (configs/demo_blip2_stage1.py documents the keys); save
  WORKDIR/stage1; returns the final held-out retrieval metrics.

  Resumable like the training job: train states go to WORKDIR/stage1_checkpoints every
  `train.checkpoint_every` steps (batches and ITM negatives are functions of the step, so a
  resumed run continues exactly); SIGTERM / SIGINT save the step and raise `loop.Interrupted`;
  `train.max_steps_per_run` saves and returns None. A rerun after the end reports the saved
  model's metrics."""
  from mllm_jax.checkpoint import Checkpointer, RunPosition
  from mllm_jax.train import loop
  from mllm_jax.train.metrics import MetricsWriter
  os.makedirs(workdir, exist_ok=True)
  tc, dc = config.train, config.data
  tok_dir = dc.tokenizer or os.path.join(workdir, 'tokenizer')
  tok = (load_qformer_tokenizer(tok_dir) if dc.tokenizer else build_qformer_tokenizer(tok_dir))
  model = QFormerPretrainer(model_config(config, tok))
  cfg = model.cfg
  if tc.batch_size < 2:
    raise ValueError(f'config.train.batch_size={tc.batch_size}: ITC / ITM need >= 2')
  train = CaptionTask(tok, 'train', config.seed, cfg.vision.image_size, dc.max_len, dc.image_norm)
  held_out = CaptionTask(tok, 'eval', config.seed, cfg.vision.image_size, dc.max_len,
                         dc.image_norm).batch(0, tc.eval_examples)
  b0 = train.batch(0, 2)
  params = jax.jit(lambda r: nn.meta.unbox(model.init(
      r, b0['pixel_values'], b0['input_ids'], b0['attention_mask'])['params']))(
          jax.random.key(config.seed))
  mask = optim.trainable_mask(params, tc.trainable, 'config.train.trainable')
  tx = optim.make_optimizer(config.optim, tc.steps)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(optim.split_params(params, mask)[0]))
  lc = LossConfig(**config.loss.to_dict())
  jstep = jax.jit(make_train_step(model, tx, mask, lc), donate_argnums=(0,))
  jeval = jax.jit(lambda p, b: retrieval_metrics(model, p, b))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_train = sum(x.size for x in jax.tree.leaves(optim.split_params(params, mask)[0]))
  print(f'BLIP-2 stage 1: {n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable '
        f'({tc.trainable}); {tc.steps} steps of {tc.batch_size} captions')
  final = os.path.join(workdir, 'stage1')
  if os.path.exists(os.path.join(final, STAGE1_JSON)):
    _, saved, _ = load_stage1(final)
    res = {k: float(v) for k, v in jax.device_get(jeval(saved, held_out)).items()}
    print(f'Stage 1 already trained in {final}; held-out ' +
          ', '.join(f'{k} {v:.3f}' for k, v in res.items()))
    return res
  ckpt = Checkpointer(os.path.join(workdir, 'stage1_checkpoints'),
                      tc.get('keep_checkpoints', 2),
                      async_save=tc.get('async_checkpoint', True))
  pos = ckpt.latest()
  start = 0
  if pos is not None:
    state = ckpt.restore_state(pos.global_step, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    start = pos.global_step
    print(f'Resumed stage 1 from {ckpt.directory} at step {start}')
  writer = MetricsWriter(workdir, resume_step=start if pos is not None else None)
  key = jax.random.key(config.seed + 1)
  budget = tc.get('max_steps_per_run', 0) or None
  every = tc.get('checkpoint_every', 0)

  def evaluate(step):
    res = {k: float(v) for k, v in jax.device_get(jeval(state.params, held_out)).items()}
    writer.write(step, res)
    print(f'step {step}: held-out ' + ', '.join(f'{k} {v:.3f}' for k, v in res.items()),
          flush=True)
    return res

  try:
    if start == 0:
      evaluate(0)
    t0 = time.time()
    with loop.StopSignals() as stop:
      for s in range(start, tc.steps):
        state, metrics = jstep(state, train.batch(s * tc.batch_size, tc.batch_size),
                               jax.random.fold_in(key, s))
        done = s + 1
        if done % tc.log_every == 0 or done == tc.steps:
          mt = {k: float(v) for k, v in jax.device_get(metrics).items()}
          mt['steps_per_s'] = tc.log_every / max(time.time() - t0, 1e-9)
          writer.write(done, mt)
          print(f"step {done}: loss {mt['loss']:.4f} (itc {mt['itc_loss']:.4f}, itm "
                f"{mt['itm_loss']:.4f}, itg {mt['itg_loss']:.4f}), temp {mt['temp']:.4f}",
                flush=True)
          t0 = time.time()
        if tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
          evaluate(done)
        save = lambda: ckpt.save(RunPosition('stage1', 0, done, False, done), state)  # noqa: E731
        if loop.checkpoint_or_stop(ckpt, stop, save, done, tc.steps, start, budget, every):
          return None
    results = evaluate(tc.steps)
  finally:
    writer.close()
    ckpt.close()
  save_stage1(os.path.join(workdir, 'stage1'), model, jax.device_get(state.params), tok_dir)
  print(f'Saved the stage-1 model in {os.path.join(workdir, "stage1")}')
  return results


def _job(config, workdir):
  run(config, workdir)


if __name__ == '__main__':
  from absl import app
  from mllm_jax.train.__main__ import job_main, parse_flags
  app.run(job_main(_job), flags_parser=parse_flags)
