"""Train-step throughput of the ~70M LLaVA-like bench model: mllm_jax (JAX) vs transformers (PyTorch).

    python benchmarks/train_step.py            # 2 warmup + 8 timed steps per framework (~3 min)
    python benchmarks/train_step.py --quick    # 1 warmup + 3 timed steps (~1.5 min)

Both frameworks train the same architecture (benchmarks/common.py) in fp32 with AdamW (grad clip
1.0, no weight decay) on the same batch (4 x 512 tokens, 196 image tokens each) with the same loss
(mean next-token CE over the text tokens), with the same number of threads, in one process. Their
steps alternate in turns (JAX x (2 + 2), torch x (2 + 2), ...; the first two steps of a turn are
untimed: after the other framework ran, the first step is ~2.5x and the second ~1.2x a steady
step) so that load from other processes on a shared
machine hits both alike; every step records how much CPU other processes used meanwhile and only
clean steps (others <= 5% of the CPUs) enter the medians, unless none is clean.
MFU = model FLOPs / step time / (best f32 GFLOP/s of a jitted square matmul measured in this run).

By default the process re-executes itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35:
malloc asks for transparent huge pages). XLA and PyTorch allocate their large per-step buffers
with fresh mmaps, and on this VM faulting them in 4 KiB pages costs ~20% of a step; with huge
pages the faults all but vanish. `--no-hugepages` keeps the environment as it is.

The last line printed is machine-readable:
    tokens_per_s=<x> mfu=<x> transformers_tokens_per_s=<x> ratio=<x>
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mllm_jax.hostmem import TUNABLE as HUGEPAGE_TUNABLE  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--steps', type=int, default=8, help='timed steps per framework')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps per framework after the '
                 'first (compiling) one')
  p.add_argument('--quick', action='store_true', help='1 warmup + 3 timed steps, 2048^3 matmul')
  p.add_argument('--threads', type=int, default=0,
                 help='torch intra-op threads (0 = usable cores, the size XLA gives its pool)')
  p.add_argument('--torch-attn', default='sdpa', choices=['eager', 'sdpa', 'auto'],
                 help="transformers attention implementation; 'auto' runs both and uses the "
                      'faster one for the ratio (sdpa: measured faster on CPU)')
  p.add_argument('--no-torch', action='store_true', help='JAX only (ratio reported as nan)')
  p.add_argument('--no-hugepages', action='store_true',
                 help=f'do not re-exec with GLIBC_TUNABLES={HUGEPAGE_TUNABLE}')
  p.add_argument('--max-steps', type=int, default=0,
                 help='if fewer than half of the timed steps are clean (other processes busy), '
                      'keep stepping up to this many (default 2 x --steps) or until --budget')
  p.add_argument('--budget', type=float, default=300.0,
                 help='seconds after which no extra steps are added')
  p.add_argument('--matmul-size', type=int, default=4096)
  p.add_argument('--per-turn', type=int, default=2,
                 help='timed steps per framework turn (after --settle untimed ones)')
  p.add_argument('--settle', type=int, default=2,
                 help='untimed steps at the start of each turn (the steps just after the other '
                      'framework ran are slow; training runs steps back to back)')
  p.add_argument('--attention-blocks', type=int, default=4,
                 help='config.model.attention_blocks of the JAX model (causal query blocks)')
  p.add_argument('--logits-chunk', type=int, default=0,
                 help='config.train.logits_chunk of the JAX step (0 = full logits)')
  p.add_argument('--logits-width', type=int, default=320,
                 help='config.train.logits_width of the JAX step (0 = every position); default: '
                      "the batch's most loss tokens per row (315) rounded up to 64, as a user "
                      'sets it for such data')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup, args.matmul_size = 3, 1, 2048
    args.budget = min(args.budget, 120.0)
  args.max_steps = args.max_steps or 2 * args.steps
  return args


def maybe_reexec_with_hugepages(args):
  """glibc reads tunables at start-up, so setting them means starting again (once)."""
  if not args.no_hugepages:
    from mllm_jax import hostmem
    hostmem.reexec_with_huge_pages()


class MatmulPeak:
  """f32 GFLOP/s of jitted [n, n] @ [n, n] products (n = 2048 and `size`), sampled repeatedly
  during the run; the peak is the best sample taken while other processes were idle (the best
  of all samples if none was)."""

  def __init__(self, size: int):
    import jax
    import numpy as np
    self.fns = {}
    for n in sorted({2048, size}):
      rng = np.random.default_rng(0)
      a = jax.device_put(rng.standard_normal((n, n), np.float32))
      b = jax.device_put(rng.standard_normal((n, n), np.float32))
      f = jax.jit(lambda x, y: x @ y)
      f(a, b).block_until_ready()
      self.fns[n] = (f, a, b)
    self.samples = {n: [] for n in self.fns}   # (GFLOP/s, clean)

  def sample(self, sizes=None, repeats: int = 3):
    from benchmarks import common
    for n in sizes or self.fns:
      f, a, b = self.fns[n]
      for _ in range(repeats):
        with common.Timed() as t:
          f(a, b).block_until_ready()
        self.samples[n].append((2 * n ** 3 / t.seconds / 1e9, t.others <= t.CONTENDED))

  def best(self, n=None):
    rows = [r for k in ([n] if n else self.samples) for r in self.samples[k]]
    clean = [g for g, ok in rows if ok]
    return max(clean or [g for g, _ in rows]), bool(clean)


class JaxRunner:
  """The mllm_jax train step on the bench model; `step()` runs one step and blocks."""

  def __init__(self, batch_np, attention_blocks=1, logits_chunk=0, logits_width=0):
    import flax.linen as nn
    import jax
    import ml_collections
    from mllm_jax import sharding as shd
    from mllm_jax.models import MLLM, MLLMConfig
    from mllm_jax.train import optim, steps as steps_lib
    from benchmarks import common

    cfg = MLLMConfig.from_dict(common.model_config_dict(attention_blocks=attention_blocks))
    model = MLLM(cfg)
    mesh = shd.make_mesh(dict(data=-1))
    rules = shd.logical_rules('dp')
    factory = steps_lib.StateFactory(model, mesh, rules)
    params = factory.init_params(jax.random.key(0))
    self.n_params = sum(x.size for x in jax.tree.leaves(params))
    ocfg = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=0, warmup_ratio=0.0, final_lr_ratio=1.0, grad_clip=1.0, b1=0.9,
        b2=0.999, eps=1e-8, weight_decay=0.0))
    tx = optim.make_optimizer(ocfg, total_steps=1000)
    mask = factory.mask('.*', 'trainable')
    self.state = factory.create_state(params, tx, mask)
    del params
    step_fn = steps_lib.make_train_step(model, tx, mask, logits_chunk=logits_chunk,
                                         logits_width=logits_width)
    batch = {k: v[None] for k, v in batch_np.items()}   # grad-accumulation axis of size 1
    jstep = steps_lib.jit_train_step(step_fn, factory.state_shardings(tx, mask), mesh,
                                     {k: v.ndim - 1 for k, v in batch.items()})
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      self.batch = shd.shard_batch(batch, mesh, leading_accum=True)
      t0 = time.perf_counter()
      self.compiled = jstep.lower(self.state, self.batch).compile()
      self.compile_s = time.perf_counter() - t0
    self.losses = []

  def step(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    self.losses.append(float(metrics['loss']))   # blocks until the step is done


def build_torch_model(attn: str):
  import torch
  from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                            LlavaForConditionalGeneration)
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
  cfg = LlavaConfig(vision_config=vision, text_config=text,
                    image_token_index=common.IMAGE_TOKEN_ID, projector_hidden_act='gelu',
                    vision_feature_select_strategy='default',
                    vision_feature_layer=v['feature_layer'], multimodal_projector_bias=True,
                    tie_word_embeddings=False)
  cfg._attn_implementation = attn
  torch.manual_seed(0)
  model = LlavaForConditionalGeneration(cfg).to(torch.float32)
  model.config._attn_implementation = attn
  model.train()
  return model


class TorchRunner:
  """transformers' LlavaForConditionalGeneration + torch.optim.AdamW on the same batch."""

  def __init__(self, batch_np, attn):
    import numpy as np
    import torch
    self.attn = attn
    self.model = build_torch_model(attn)
    self.n_params = sum(p.numel() for p in self.model.parameters())
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.0, foreach=True)
    self.ids = torch.from_numpy(batch_np['input_ids'].astype(np.int64))
    self.labels = self.ids.clone()
    self.labels[torch.from_numpy(batch_np['loss_mask']) == 0] = -100   # HF shifts internally
    self.attention_mask = torch.from_numpy(batch_np['attention_mask'].astype(np.int64))
    self.pixels = torch.from_numpy(np.ascontiguousarray(
        batch_np['pixel_values'][:, 0].transpose(0, 3, 1, 2)))   # [B, 3, H, W]
    self.losses = []

  def step(self):
    import torch
    self.opt.zero_grad(set_to_none=True)
    out = self.model(input_ids=self.ids, pixel_values=self.pixels,
                     attention_mask=self.attention_mask, labels=self.labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.losses.append(float(out.loss.detach()))


def main(argv=None):
  args = parse_args(argv)
  maybe_reexec_with_hugepages(args)
  from benchmarks import common
  threads = args.threads or common.cpu_count()
  t_start = time.perf_counter()

  import flax
  import jax
  import torch
  import transformers
  torch.set_num_threads(threads)

  flops = common.step_flops()
  flops_causal = common.step_flops(causal_half=True)
  flops_needed = common.step_flops(needed_only=True)
  tokens = common.BATCH * common.SEQ
  print(f'machine: {common.cpu_model_name()}, {common.cpu_count()} usable cores; '
        f'jax {jax.__version__} ({jax.devices()[0].platform}), flax {flax.__version__}, '
        f'torch {torch.__version__}, transformers {transformers.__version__}', flush=True)
  print(f'threads: torch intra-op {torch.get_num_threads()} (set_num_threads), interop '
        f'{torch.get_num_interop_threads()}; XLA:CPU intra-op pool = usable cores = '
        f'{common.cpu_count()} (default); XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; '
        f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r}')
  print(f'batch {common.BATCH} x {common.SEQ} tokens ({common.num_image_tokens()} image tokens '
        f'per sample), fp32, AdamW; steps per framework: 1 compile/first + {args.warmup} warmup + '
        f'{args.steps} timed, JAX and torch alternating in turns of {args.settle} untimed + '
        f'{args.per_turn} timed')
  print(f'model FLOPs/step (fwd+bwd = 3x fwd): total {flops.total / 1e9:.1f} GFLOP '
        f'[vit matmul {flops.vit_matmul / 1e9:.1f}, vit attn {flops.vit_attention / 1e9:.1f}, '
        f'connector {flops.connector / 1e9:.1f}, llm layers matmul {flops.llm_matmul / 1e9:.1f}, '
        f'llm attn {flops.llm_attention / 1e9:.1f} (full T x T; causal-half: '
        f'{flops_causal.llm_attention / 1e9:.1f}), lm_head {flops.lm_head / 1e9:.1f}]; '
        f'N_matmul_params {flops.n_matmul_params / 1e6:.2f}M; only the work the loss needs '
        f'(causal-half attention, lm_head at the text-predicting positions): '
        f'{flops_needed.total / 1e9:.1f} GFLOP', flush=True)
  print(f'jax model: attention einsum, attention_blocks {args.attention_blocks}, '
        f'logits_chunk {args.logits_chunk}, logits_width {args.logits_width}', flush=True)

  peak_meter = MatmulPeak(args.matmul_size)
  peak_meter.sample(repeats=5)

  batch = common.make_batch()
  jr = JaxRunner(batch, args.attention_blocks, args.logits_chunk, args.logits_width)
  jr.step()   # first call (allocations, one-off work)
  runners = [('jax', jr)]
  if not args.no_torch:
    for attn in (['sdpa', 'eager'] if args.torch_attn == 'auto' else [args.torch_attn]):
      tr = TorchRunner(batch, attn)
      tr.step()
      runners.append((f'torch ({attn})', tr))
  for _ in range(args.warmup):
    for _, r in runners:
      r.step()
  stats = {name: common.StepStats() for name, _ in runners}
  max_steps = max(args.max_steps, args.steps)
  want_clean = (args.steps + 1) // 2
  while True:
    done = min(len(st.seconds) for st in stats.values())
    enough = all(len(st.clean) >= want_clean for st in stats.values())
    if done >= max_steps or (done >= args.steps and
                             (enough or time.perf_counter() - t_start > args.budget)):
      break
    for name, r in runners:
      # Training runs steps back to back, but the steps just after the other framework ran
      # are slow (their buffers re-faulted, caches and thread pools cold): measured for JAX in
      # one process, the 1st step after 3 torch steps 5.6-6.9 s, the 2nd 2.7-3.5 s, then
      # 2.5 s. So each turn starts with `settle` untimed steps.
      for _ in range(args.settle):
        r.step()
      for _ in range(args.per_turn):
        with common.Timed() as t:
          r.step()
        stats[name].add(t)
    peak_meter.sample(sizes=[2048], repeats=2)
  peak_meter.sample(repeats=5)
  peak, peak_clean = peak_meter.best()
  print('f32 matmul (jitted, best sample): ' +
        ', '.join(f'{n}^3: {peak_meter.best(n)[0]:.1f} GFLOP/s' for n in peak_meter.fns) +
        f' -> peak {peak:.1f} GFLOP/s' + ('' if peak_clean else ' (CONTENDED: every sample '
                                             'overlapped other processes; MFU overstated)'))

  js = stats['jax']
  jt = js.step_time()
  jtps = tokens / jt
  mfu = flops.total / jt / (peak * 1e9)
  print(f'jax: {jr.n_params / 1e6:.2f}M params, compile {jr.compile_s:.1f}s; step {js.describe()}')
  print(f'jax: {jtps:.1f} tokens/s, {flops.total / jt / 1e9:.1f} GFLOP/s, MFU {mfu:.3f} '
        f'(causal-half convention: {flops_causal.total / jt / (peak * 1e9):.3f}; needed-work '
        f'convention: {flops_needed.total / jt / (peak * 1e9):.3f}); loss first '
        f'{jr.losses[0]:.4f} last {jr.losses[-1]:.4f}')

  ttps, ratio, best = float('nan'), float('nan'), None
  for name, r in runners[1:]:
    ts = stats[name]
    tt = ts.step_time()
    tps = tokens / tt
    print(f'{name}: {r.n_params / 1e6:.2f}M params; step {ts.describe()}')
    print(f'{name}: {tps:.1f} tokens/s, {flops.total / tt / 1e9:.1f} GFLOP/s, MFU '
          f'{flops.total / tt / (peak * 1e9):.3f}; loss first {r.losses[0]:.4f} last '
          f'{r.losses[-1]:.4f}')
    if best is None or tps > ttps:
      best, ttps = name, tps
  if best is not None:
    ratio = jtps / ttps
    print(f'ratio uses {best}: jax / torch = {ratio:.3f}')
  print(f'total benchmark time {time.perf_counter() - t_start:.0f}s')
  print(f'tokens_per_s={jtps:.1f} mfu={mfu:.4f} transformers_tokens_per_s={ttps:.1f} '
        f'ratio={ratio:.4f}')


if __name__ == '__main__':
  main()
