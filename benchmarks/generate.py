"""Generation throughput of the bench model: mllm_jax.generate vs transformers' generate.

    python benchmarks/generate.py           # batch 1 and 8, 64 new tokens, 5 timed repeats
    python benchmarks/generate.py --quick   # 16 new tokens, 2 timed repeats
    python benchmarks/generate.py --dtype bfloat16   # both frameworks in bf16 (default fp32)

The bench model of benchmarks/train_step.py (benchmarks/common.py) is built in transformers
(LlavaForConditionalGeneration, fp32, sdpa attention), saved with save_pretrained and loaded
into mllm_jax with mllm_jax.load_hf, so both decode the same weights; prompts are BOS + 196
image tokens + text (256 tokens), greedy, no stop token, in one process with the same threads.
Prefill time = a run with max_new_tokens=1 (the prompt and the first token, no decode step;
the CPU kernels' packed weights are kept from the warm-up calls, as in any loop of generate
calls with the same params: generate's keep_packed); decode tokens/s = batch x (N - 1) / median over
repeats of (time(N) - time(1)), both timed back to back in each repeat, frameworks in turn;
each turn starts with --settle untimed calls (alternately 1 and N new tokens), since the first
calls after the other framework ran are slow ones a generation server never sees.
Runs re-exec with glibc.malloc.hugetlb=1 like the training CLI (`--no-hugepages`: don't).
Each batch also prints its decode step's memory roofline: the bytes a step must read (the LLM
weights it multiplies and the KV cache) at the read bandwidth measured in the run, the ratio to
transformers that reading alone allows, and the fraction of it our step reaches.
Batch 8 also prints the decode kernel's 8-row arithmetic rate (its multiply-adds on weights
already in L2) and what the step's matmuls need of it.
Last line (batch 8):
    decode_tokens_per_s=<x> transformers_decode_tokens_per_s=<x> ratio=<x>
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT_LEN = 256


def stopwatch(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def timed(fn, repeats):
  """Median seconds of `repeats` calls after a warm-up call."""
  fn()
  return statistics.median(stopwatch(fn) for _ in range(repeats))


def kernel_arithmetic(k, n, dtype):
  """Weight bytes per second the CPU decode kernel's 8-row tile multiplies when its panels come
  from L2, or None without the kernels: a 64-row call passes over each panel 8 times, the last
  7 from L2, so 7 x bytes / (time(64 rows) - time(8 rows)) on a [k, n] kernel."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mllm_jax.kernels import cpu
  if jax.default_backend() != 'cpu' or not cpu.available():
    return None
  rng = np.random.default_rng(0)
  packed = cpu.pack(jnp.asarray(rng.standard_normal((k, n)) * 0.02, dtype))
  mm = jax.jit(lambda x, p: cpu.packed_matmul(x, p, n))
  xs = {m: jnp.asarray(rng.standard_normal((m, k)), dtype) for m in (8, 64)}
  times = {m: [] for m in xs}
  for m in xs:
    mm(xs[m], packed).block_until_ready()
  for _ in range(15):
    for m in xs:
      times[m].append(stopwatch(lambda: mm(xs[m], packed).block_until_ready()))
  # fastest of each: a ceiling, and a moment when the machine's other work held a core (calls at
  # half speed are seen) only slows a call
  return 7 * packed.nbytes / (min(times[64]) - min(times[8]))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--new-tokens', type=int, default=64)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--quick', action='store_true')
  p.add_argument('--settle', type=int, default=2,
                 help='untimed calls at the start of each turn (1, N, 1, ... new tokens)')
  p.add_argument('--scan-too', action='store_true',
                 help="also time layer_loop='scan' (the TPU/GPU default) in the same run")
  p.add_argument('--xla-too', action='store_true',
                 help="also time decode_kernel='xla' (XLA's dots instead of the CPU decode "
                      "kernel) in the same run")
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='parameters, activations and KV cache of both frameworks (default float32; '
                      'bfloat16 changes the numbers, so the tokens may differ)')
  p.add_argument('--no-hugepages', action='store_true',
                 help='keep the environment (default: re-exec with glibc.malloc.hugetlb=1, as the '
                      'training CLI does; mllm_jax/hostmem.py)')
  args = p.parse_args(argv)
  if not args.no_hugepages:
    from mllm_jax import hostmem
    hostmem.reexec_with_huge_pages()
  if args.quick:
    args.new_tokens, args.repeats = 16, 2

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import mllm_jax
  from benchmarks import common
  from benchmarks.train_step import build_torch_model
  torch.set_num_threads(common.cpu_count())
  print(f'machine: {common.cpu_model_name()}, {common.cpu_count()} usable cores; jax '
        f'{jax.__version__}, torch {torch.__version__}; prompt {PROMPT_LEN} tokens (196 image), '
        f'{args.new_tokens} new tokens, greedy, {args.dtype}', flush=True)

  hf = build_torch_model('sdpa').eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    model, params = mllm_jax.load_hf(tmp, dtype=jnp.dtype(args.dtype))
  hf = hf.to(getattr(torch, args.dtype))

  # Roofline: a decode step must read every LLM weight it multiplies (not the vision tower, and
  # only one embedding row per token) plus the KV cache; measure the read bandwidth of a jitted
  # reduction over 256 MiB in this run.
  big = jax.device_put(np.ones((64 << 20,), np.float32))
  read = jax.jit(lambda x: x.sum())
  bandwidth = (256 << 20) / timed(lambda: read(big).block_until_ready(), 5)
  llm = params['llm']
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(llm)) - llm['embed_tokens']['embedding'].nbytes
  print(f'read bandwidth {bandwidth / 1e9:.1f} GB/s; LLM weights read per decode step '
        f'{weight_bytes / 1e6:.0f} MB -> at most {bandwidth / weight_bytes:.0f} steps/s '
        f'(memory roofline, before the KV cache)', flush=True)
  del big
  c = model.cfg.llm
  arithmetic = kernel_arithmetic(c.hidden, c.vocab_size, args.dtype)   # the lm_head's shape
  results = {}
  for batch in (1, 8):
    b = common.make_batch(batch=batch, seq=PROMPT_LEN, seed=1)
    ids, mask = b['input_ids'], b['attention_mask']
    pixels = b['pixel_values'][:, 0].astype(jnp.dtype(args.dtype))    # [B, H, W, 3]
    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    t_px = torch.from_numpy(np.ascontiguousarray(
        b['pixel_values'][:, 0].transpose(0, 3, 1, 2))).to(getattr(torch, args.dtype))

    def ours(n, **kw):
      return lambda: np.asarray(mllm_jax.generate(model, params, ids, mask, pixels,
                                                  max_new_tokens=n, **kw))

    def theirs(n):
      def run():
        with torch.no_grad():
          return hf.generate(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_px,
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
      return run

    n = args.new_tokens
    same = float(np.mean(ours(n)() == theirs(n)()[:, PROMPT_LEN:].numpy()))   # token fraction
    row = {}
    runs = [('mllm_jax', ours), ('transformers', theirs)]
    if args.scan_too:
      runs.append(('mllm_jax scan', lambda n: ours(n, layer_loop='scan')))
    if args.xla_too:
      runs.append(('mllm_jax xla dots', lambda n: ours(n, decode_kernel='xla')))
    # Paired, interleaved timings: each repeat times (1 new token, n new tokens) for every
    # framework in turn, after --settle untimed calls, and decode time = median over repeats of the
    # pair's difference, so a slow moment of the machine hits both frameworks and does not
    # leak from a prefill timing into the decode estimate.
    fns = {name: (make(1), make(n)) for name, make in runs}
    for one, many in fns.values():   # compile / warm up
      one(), many()
    t1s, diffs = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(args.repeats):
      for name, (one, many) in fns.items():
        for i in range(args.settle):   # untimed: the first calls after the other framework ran
          (one if i % 2 == 0 else many)()
        t1, tn = stopwatch(one), stopwatch(many)
        t1s[name].append(t1)
        diffs[name].append(tn - t1)
    for name in fns:
      t1, dt = statistics.median(t1s[name]), statistics.median(diffs[name])
      row[name] = dict(prefill=batch * PROMPT_LEN / t1, decode=batch * (n - 1) / dt)
      print(f'batch {batch} {name}: prefill {row[name]["prefill"]:.0f} tokens/s '
            f'({t1 * 1e3:.0f} ms), decode {row[name]["decode"]:.1f} tokens/s '
            f'({dt / (n - 1) * 1e3:.1f} ms/step; per repeat '
            f'{", ".join(f"{d / (n - 1) * 1e3:.1f}" for d in diffs[name])})', flush=True)
    print(f'batch {batch}: decode ratio {row["mllm_jax"]["decode"] / row["transformers"]["decode"]:.2f}, '
          f'prefill ratio {row["mllm_jax"]["prefill"] / row["transformers"]["prefill"]:.2f}; '
          f'same greedy tokens: {same:.0%}', flush=True)
    # The step's memory roofline: every weight it multiplies plus the KV cache up to the slots
    # it attends to (PROMPT_LEN + 1 .. PROMPT_LEN + n - 1 over the timed steps), at this run's
    # read bandwidth; the ratio to transformers' step that reading alone would allow.
    kv_bytes = (2 * c.depth * batch * c.num_kv_heads * c.dim_per_head * jnp.dtype(args.dtype).itemsize
                * (PROMPT_LEN + n / 2))
    floor = (weight_bytes + kv_bytes) / bandwidth
    theirs_step = batch * 1.0 / row['transformers']['decode']
    ours_step = batch * 1.0 / row['mllm_jax']['decode']
    print(f'batch {batch} roofline: {(weight_bytes + kv_bytes) / 1e6:.0f} MB per step (KV cache '
          f'{kv_bytes / 1e6:.0f} MB) -> {floor * 1e3:.1f} ms at {bandwidth / 1e9:.1f} GB/s, a ratio '
          f'of at most {theirs_step / floor:.2f}; ours at {floor / ours_step:.0%} of it',
          flush=True)
    if batch == 8 and arithmetic:
      # The matmuls' 8-row arithmetic (16 FMAs per 128 B of fp32 weights, the same per byte in
      # bf16) also takes time: the step needs `compute` of it with free reads, floor + compute
      # if reads and arithmetic did not overlap at all; where ours sits between the two says how
      # much they overlap.
      compute = weight_bytes / arithmetic
      print(f'batch 8 arithmetic: the packed matmul does 8 rows at {arithmetic / 1e9:.0f} GB/s of '
            f'weights from L2 -> {compute * 1e3:.1f} ms of the step even with free reads; reads '
            f'and arithmetic without overlap {(floor + compute) * 1e3:.1f} ms (a ratio of '
            f'{theirs_step / (floor + compute):.2f}); ours at {ours_step * 1e3:.1f} ms',
            flush=True)
    results[batch] = row
  r = results[8]
  print(f'decode_tokens_per_s={r["mllm_jax"]["decode"]:.1f} '
        f'transformers_decode_tokens_per_s={r["transformers"]["decode"]:.1f} '
        f'ratio={r["mllm_jax"]["decode"] / r["transformers"]["decode"]:.3f}')


if __name__ == '__main__':
  main()
