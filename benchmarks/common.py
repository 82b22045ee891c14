"""Shared pieces of the CPU benchmarks: the bench model, its inputs, FLOP counts, timers.

The bench model is a ~70M-parameter LLaVA-like model:
  vision: CLIP ViT, 224 px / 16 px patches (196 patches + CLS), 6 layers x 384, 6 heads, MLP 1536,
          features from hidden state -2 (so 5 of the 6 layers are needed), CLS dropped;
  connector: Linear(384, 512) -> GELU -> Linear(512, 512);
  LLM: Llama, 8 layers x 512, 8 heads (head_dim 64), SwiGLU MLP 1376, vocab 32000, untied lm_head.
Inputs: batch 4 x 512 tokens = [BOS, 196 image tokens, 315 text tokens]; loss on the text tokens.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time

import numpy as np

IMAGE_TOKEN_ID = 31999
BOS_ID = 1

LLM = dict(vocab_size=32000, hidden=512, depth=8, heads=8, kv_heads=8, mlp_dim=1376,
           norm_eps=1e-5, max_position=2048)
VISION = dict(kind='clip', image_size=224, patch_size=16, width=384, depth=6, heads=6,
              mlp_dim=1536, feature_layer=-2, feature_select='patch')
CONNECTOR = dict(kind='mlp', depth=2, act='gelu')
BATCH, SEQ = 4, 512


def model_config_dict(attention='einsum', remat_policy='none', attention_blocks=1):
  return dict(llm=dict(LLM), vision=dict(VISION), connector=dict(CONNECTOR),
              image_token_id=IMAGE_TOKEN_ID, attention=attention, remat_policy=remat_policy,
              attention_blocks=attention_blocks)


def num_image_tokens():
  return (VISION['image_size'] // VISION['patch_size']) ** 2


def make_batch(batch=BATCH, seq=SEQ, seed=0):
  """numpy batch: input_ids [B,T] int32, attention_mask [B,T] int32, loss_mask [B,T] f32,
  pixel_values [B, 1, H, W, 3] f32 (channels-last, one image slot per sample)."""
  rng = np.random.default_rng(seed)
  n_img = num_image_tokens()
  ids = rng.integers(2, IMAGE_TOKEN_ID - 1, size=(batch, seq)).astype(np.int32)
  ids[:, 0] = BOS_ID
  ids[:, 1:1 + n_img] = IMAGE_TOKEN_ID
  loss_mask = np.zeros((batch, seq), np.float32)
  loss_mask[:, 1 + n_img:] = 1.0
  s = VISION['image_size']
  pixels = rng.standard_normal((batch, 1, s, s, 3)).astype(np.float32)
  return dict(input_ids=ids, attention_mask=np.ones((batch, seq), np.int32),
              loss_mask=loss_mask, pixel_values=pixels)


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Flops:
  """Training FLOPs of one step (forward + backward = 3x forward), by part."""
  vit_matmul: float
  vit_attention: float
  connector: float
  llm_matmul: float       # decoder layers only (q,k,v,o, gate, up, down)
  llm_attention: float
  lm_head: float
  n_matmul_params: int    # the weights multiplying activations (incl. patch embed and lm_head)

  @property
  def total(self):
    return (self.vit_matmul + self.vit_attention + self.connector + self.llm_matmul +
            self.llm_attention + self.lm_head)


def step_flops(batch=BATCH, seq=SEQ, causal_half=False, needed_only=False) -> Flops:
  """Model FLOPs of one training step: 6 * N_matmul * tokens for every weight matmul (each weight
  counted on the tokens it actually sees) plus attention score/value matmuls, 12 * L * T^2 * d per
  sequence (2 matmuls x 2 FLOP/MAC x 3 for fwd+bwd). Convention: the full T x T score matrix
  is counted for the causal LLM (as PaLM's MFU does; `causal_half=True` halves it). The ViT counts
  the layers LLaVA needs (hidden state -2: 5 of 6) on 197 tokens (196 patches + CLS) per image.
  Embedding lookups, norms, softmax, RoPE, biases and the optimizer are not counted.
  `needed_only=True` counts only the work the loss needs: causal-half attention and the lm_head
  at the positions that predict a text token (not at BOS and the image positions).
  """
  v, c, l = VISION, CONNECTOR, LLM
  n_patch = num_image_tokens()
  vt = n_patch + 1                                   # + CLS
  d = v['width']
  v_layers = v['depth'] + 1 + v['feature_layer'] if v['feature_layer'] < 0 else v['feature_layer']
  v_layer_params = 4 * d * d + 2 * d * v['mlp_dim']
  patch_params = 3 * v['patch_size'] ** 2 * d
  n_img = batch
  vit_matmul = 6 * n_img * (v_layers * v_layer_params * vt + patch_params * n_patch)
  vit_attention = 12 * n_img * v_layers * vt * vt * d
  e = l['hidden']
  conn_params = d * e + (c['depth'] - 1) * e * e
  connector = 6 * n_img * n_patch * conn_params
  hd = e // l['heads']
  kv = l['kv_heads'] * hd
  llm_layer_params = e * e * 2 + 2 * e * kv + 3 * e * l['mlp_dim']
  tokens = batch * seq
  llm_matmul = 6 * tokens * l['depth'] * llm_layer_params
  llm_attention = 12 * batch * l['depth'] * seq * seq * l['heads'] * hd
  if causal_half or needed_only:
    llm_attention /= 2
  head_positions = batch * (seq - 1 - n_patch) if needed_only else tokens
  lm_head = 6 * head_positions * e * l['vocab_size']
  n = (v['depth'] * v_layer_params + patch_params + conn_params +
       l['depth'] * llm_layer_params + e * l['vocab_size'])
  return Flops(vit_matmul, vit_attention, connector, llm_matmul, llm_attention, lm_head, n)


# ------------------------------------------------------------------------------------------------
# Timing / environment
# ------------------------------------------------------------------------------------------------
def _proc_stat_total():
  """(all jiffies, idle jiffies) summed over CPUs, from /proc/stat."""
  with open('/proc/stat') as f:
    v = [int(x) for x in f.readline().split()[1:]]
  return sum(v[:8]), v[3] + v[4]


def _self_stat():
  """(utime + stime jiffies, minor page faults) of this process."""
  with open('/proc/self/stat') as f:
    fields = f.read().rsplit(')', 1)[1].split()
  return int(fields[11]) + int(fields[12]), int(fields[7])


class Timed:
  """Times a block and measures, from /proc, the share of all CPUs that *other* processes used
  meanwhile (`others`, 0..1) and this process's minor page faults. On a shared machine a step
  with others > CONTENDED is not a clean measurement.  Linux only; elsewhere others = 0."""
  CONTENDED = 0.05

  def __enter__(self):
    try:
      self._sys, self._me = _proc_stat_total(), _self_stat()
    except OSError:
      self._sys = None
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self._t0
    self.others, self.minflt = 0.0, 0
    if self._sys is not None:
      (tot, idle), (cpu, flt) = _proc_stat_total(), _self_stat()
      dt = max(tot - self._sys[0], 1)
      busy = dt - (idle - self._sys[1])
      mine = cpu - self._me[0]
      self.others = max(0.0, (busy - mine) / dt)
      self.minflt = flt - self._me[1]
    return False


@dataclasses.dataclass
class StepStats:
  seconds: list = dataclasses.field(default_factory=list)
  others: list = dataclasses.field(default_factory=list)
  minflt: list = dataclasses.field(default_factory=list)

  def add(self, t: Timed):
    self.seconds.append(t.seconds)
    self.others.append(t.others)
    self.minflt.append(t.minflt)

  @property
  def clean(self):
    return [s for s, o in zip(self.seconds, self.others) if o <= Timed.CONTENDED]

  def step_time(self):
    """Median of the clean steps (all steps if none is clean)."""
    return statistics.median(self.clean or self.seconds)

  def describe(self):
    c = self.clean
    return (f'median {self.step_time() * 1e3:.0f} ms over {len(c) or len(self.seconds)} '
            f'{"clean" if c else "CONTENDED"} of {len(self.seconds)} steps (min '
            f'{min(self.seconds) * 1e3:.0f}, max {max(self.seconds) * 1e3:.0f}; other processes '
            f'used up to {max(self.others):.0%} of the CPUs; '
            f'{statistics.median(self.minflt) / 1e3:.0f}k page faults/step)')


def cpu_model_name():
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or 'unknown'


def cpu_count():
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count()
