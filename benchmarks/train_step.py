"""Train-step throughput of the ~70M LLaVA-like bench model: mllm_jax (JAX) vs transformers (PyTorch).

    python benchmarks/train_step.py            # 3 warmup + 8 timed steps per framework (~3 min)
    python benchmarks/train_step.py --quick    # 1 warmup + 3 timed steps

Both frameworks train the same architecture (see benchmarks/common.py) in fp32 with AdamW
(grad clip 1.0, no weight decay) on the same batch (4 x 512 tokens, 196 image tokens each) with
the same loss (mean next-token CE over the text tokens), using the same number of threads.
MFU = model FLOPs / step time / (f32 matmul rate of a jitted square matmul measured in this run).
The last line printed is machine-readable:
    tokens_per_s=<x> mfu=<x> transformers_tokens_per_s=<x> ratio=<x>
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--steps', type=int, default=8, help='timed steps per framework')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps (after compilation)')
  p.add_argument('--quick', action='store_true', help='1 warmup + 3 timed steps, smaller matmul')
  p.add_argument('--threads', type=int, default=0,
                 help='threads for torch (0 = number of usable cores, which is also what XLA '
                      'sizes its intra-op pool to)')
  p.add_argument('--torch-attn', default='sdpa', choices=['eager', 'sdpa', 'auto'],
                 help="transformers attention; 'auto' times both and keeps the faster one")
  p.add_argument('--no-torch', action='store_true', help='JAX only (ratio reported as nan)')
  p.add_argument('--matmul-size', type=int, default=4096)
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup, args.matmul_size = 3, 1, 2048
  return args


def measure_matmul_peak(size: int, repeats: int = 5):
  """Best f32 GFLOP/s of a jitted [size, size] @ [size, size] (and of 2048 if size > 2048)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  results = {}
  for n in sorted({2048, size}):
    rng = np.random.default_rng(0)
    a = jax.device_put(rng.standard_normal((n, n), np.float32))
    b = jax.device_put(rng.standard_normal((n, n), np.float32))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float('inf')
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    results[n] = 2 * n ** 3 / best / 1e9
  return max(results.values()), results


def run_jax(batch_np, warmup, steps):
  import flax.linen as nn
  import jax
  import ml_collections
  from mllm_jax import sharding as shd
  from mllm_jax.models import MLLM, MLLMConfig
  from mllm_jax.train import optim, steps as steps_lib
  from benchmarks import common

  cfg = MLLMConfig.from_dict(common.model_config_dict())
  model = MLLM(cfg)
  mesh = shd.make_mesh(dict(data=-1))
  rules = shd.logical_rules('dp')
  factory = steps_lib.StateFactory(model, mesh, rules)
  params = factory.init_params(jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  ocfg = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=0, warmup_ratio=0.0, final_lr_ratio=1.0, grad_clip=1.0, b1=0.9,
      b2=0.999, eps=1e-8, weight_decay=0.0))
  tx = optim.make_optimizer(ocfg, total_steps=1000)
  mask = factory.mask('.*', 'trainable')
  state = factory.create_state(params, tx, mask)
  del params
  step_fn = steps_lib.make_train_step(model, tx, mask)
  batch = {k: v[None] for k, v in batch_np.items()}   # grad-accumulation axis of size 1
  jstep = steps_lib.jit_train_step(step_fn, factory.state_shardings(tx, mask), mesh,
                                   {k: v.ndim - 1 for k, v in batch.items()})
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    b = shd.shard_batch(batch, mesh, leading_accum=True)
    t0 = time.perf_counter()
    compiled = jstep.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    holder = {'state': state}
    losses = []

    def one():
      holder['state'], metrics = compiled(holder['state'], b)
      losses.append(float(metrics['loss']))   # blocks

    times = common.time_steps(one, warmup, steps)
  return dict(times=times, losses=losses, compile_s=compile_s, n_params=n_params)


def build_torch_model(attn: str):
  import torch
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
  from benchmarks import common
  v, l = common.VISION, common.LLM
  vision = CLIPVisionConfig(
      hidden_size=v['width'], intermediate_size=v['mlp_dim'], num_hidden_layers=v['depth'],
      num_attention_heads=v['heads'], image_size=v['image_size'], patch_size=v['patch_size'],
      num_channels=3, hidden_act='quick_gelu', layer_norm_eps=1e-5, attention_dropout=0.0)
  text = LlamaConfig(
      vocab_size=l['vocab_size'], hidden_size=l['hidden'], intermediate_size=l['mlp_dim'],
      num_hidden_layers=l['depth'], num_attention_heads=l['heads'],
      num_key_value_heads=l['kv_heads'], rms_norm_eps=l['norm_eps'],
      max_position_embeddings=l['max_position'], tie_word_embeddings=False, hidden_act='silu',
      attention_bias=False, mlp_bias=False, attention_dropout=0.0)
  cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=common.IMAGE_TOKEN_ID,
                    projector_hidden_act='gelu', vision_feature_select_strategy='default',
                    vision_feature_layer=v['feature_layer'], multimodal_projector_bias=True,
                    tie_word_embeddings=False)
  cfg._attn_implementation = attn
  torch.manual_seed(0)
  model = LlavaForConditionalGeneration(cfg).to(torch.float32)
  model.config._attn_implementation = attn
  model.train()
  return model


def run_torch(batch_np, warmup, steps, attn):
  import numpy as np
  import torch
  from benchmarks import common
  model = build_torch_model(attn)
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.0, foreach=True)
  ids = torch.from_numpy(batch_np['input_ids'].astype(np.int64))
  labels = ids.clone()
  labels[torch.from_numpy(batch_np['loss_mask']) == 0] = -100   # HF shifts labels internally
  attn_mask = torch.from_numpy(batch_np['attention_mask'].astype(np.int64))
  pixels = torch.from_numpy(np.ascontiguousarray(
      batch_np['pixel_values'][:, 0].transpose(0, 3, 1, 2)))   # [B, 3, H, W]
  losses = []

  def one():
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=ids, pixel_values=pixels, attention_mask=attn_mask, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    losses.append(float(out.loss.detach()))

  times = common.time_steps(one, warmup, steps)
  return dict(times=times, losses=losses, n_params=n_params)


def main(argv=None):
  args = parse_args(argv)
  from benchmarks import common
  threads = args.threads or common.cpu_count()

  import jax
  import numpy as np
  import torch
  import transformers
  import flax
  torch.set_num_threads(threads)

  flops = common.step_flops()
  flops_causal = common.step_flops(causal_half=True)
  tokens = common.BATCH * common.SEQ
  print(f'machine: {common.cpu_model_name()}, {common.cpu_count()} usable cores; '
        f'jax {jax.__version__} ({jax.devices()[0].platform}), flax {flax.__version__}, '
        f'torch {torch.__version__}, transformers {transformers.__version__}')
  print(f'threads: torch.set_num_threads({threads}) (interop {torch.get_num_threads()} intra); '
        f'XLA CPU: Eigen intra-op pool = {common.cpu_count()} usable cores (default), '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(f'batch {common.BATCH} x {common.SEQ} tokens ({common.num_image_tokens()} image tokens '
        f'per sample), fp32, AdamW; steps: {args.warmup} warmup + {args.steps} timed')

  peak, per_size = measure_matmul_peak(args.matmul_size)
  print('f32 matmul (jitted, best of 5): ' +
        ', '.join(f'{n}^3: {g:.1f} GFLOP/s' for n, g in per_size.items()) +
        f' -> peak {peak:.1f} GFLOP/s')

  print(f'model FLOPs/step (fwd+bwd = 3x fwd): total {flops.total / 1e9:.1f} GFLOP '
        f'[vit matmul {flops.vit_matmul / 1e9:.1f}, vit attn {flops.vit_attention / 1e9:.1f}, '
        f'connector {flops.connector / 1e9:.1f}, llm layers matmul {flops.llm_matmul / 1e9:.1f}, '
        f'llm attn {flops.llm_attention / 1e9:.1f} (full T x T; causal-half would be '
        f'{flops_causal.llm_attention / 1e9:.1f}), lm_head {flops.lm_head / 1e9:.1f}]; '
        f'N_matmul_params {flops.n_matmul_params / 1e6:.2f}M')

  batch = common.make_batch()
  j = run_jax(batch, args.warmup, args.steps)
  js = common.summarize(j['times'])
  jtps = tokens / js['median']
  mfu = flops.total / js['median'] / (peak * 1e9)
  print(f'jax: {j["n_params"] / 1e6:.2f}M params, compile {j["compile_s"]:.1f}s, step median '
        f'{js["median"] * 1e3:.0f} ms (min {js["min"] * 1e3:.0f}, mean {js["mean"] * 1e3:.0f}), '
        f'{jtps:.0f} tokens/s, {flops.total / js["median"] / 1e9:.1f} GFLOP/s, MFU {mfu:.3f} '
        f'(causal-half convention: {flops_causal.total / js["median"] / (peak * 1e9):.3f}), '
        f'initial loss {j["losses"][0]:.4f}')

  ttps, ratio = float('nan'), float('nan')
  if not args.no_torch:
    attns = ['eager', 'sdpa'] if args.torch_attn == 'auto' else [args.torch_attn]
    best = None
    for attn in attns:
      t = run_torch(batch, args.warmup, args.steps, attn)
      ts = common.summarize(t['times'])
      tps = tokens / ts['median']
      print(f'torch ({attn}): {t["n_params"] / 1e6:.2f}M params, step median '
            f'{ts["median"] * 1e3:.0f} ms (min {ts["min"] * 1e3:.0f}, mean {ts["mean"] * 1e3:.0f}), '
            f'{tps:.0f} tokens/s, MFU {flops.total / ts["median"] / (peak * 1e9):.3f}, '
            f'initial loss {t["losses"][0]:.4f}')
      if best is None or tps > best[1]:
        best = (attn, tps)
    ttps = best[1]
    ratio = jtps / ttps
    print(f'transformers attention used for the ratio: {best[0]}; ratio jax/torch = {ratio:.3f}')
  print(f'tokens_per_s={jtps:.1f} mfu={mfu:.4f} transformers_tokens_per_s={ttps:.1f} '
        f'ratio={ratio:.4f}')


if __name__ == '__main__':
  main()
