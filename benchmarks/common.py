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


def model_config_dict(attention='einsum', remat_policy='none'):
  return dict(llm=dict(LLM), vision=dict(VISION), connector=dict(CONNECTOR),
              image_token_id=IMAGE_TOKEN_ID, attention=attention, remat_policy=remat_policy)


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


def step_flops(batch=BATCH, seq=SEQ, causal_half=False) -> Flops:
  """Model FLOPs of one training step: 6 * N_matmul * tokens for every weight matmul (each weight
  counted on the tokens it actually sees) plus attention score/value matmuls, 12 * L * T^2 * d per
  sequence (2 matmuls x 2 FLOP/MAC x 3 for fwd+bwd). Convention: the full T x T score matrix
  is counted for the causal LLM (as PaLM's MFU does; `causal_half=True` halves it). The ViT counts
  the layers LLaVA needs (hidden state -2: 5 of 6) on 197 tokens (196 patches + CLS) per image.
  Embedding lookups, norms, softmax, RoPE, biases and the optimizer are not counted.
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
  if causal_half:
    llm_attention /= 2
  lm_head = 6 * tokens * e * l['vocab_size']
  n = (v['depth'] * v_layer_params + patch_params + conn_params +
       l['depth'] * llm_layer_params + e * l['vocab_size'])
  return Flops(vit_matmul, vit_attention, connector, llm_matmul, llm_attention, lm_head, n)


# ------------------------------------------------------------------------------------------------
# Timing / environment
# ------------------------------------------------------------------------------------------------
def time_steps(fn, warmup: int, steps: int):
  """Calls fn() warmup + steps times (fn must block); returns the list of timed durations."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def summarize(times):
  return dict(median=statistics.median(times), min=min(times), mean=statistics.fmean(times))


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
