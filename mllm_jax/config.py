"""Defaults for every config key. `configs/*.py` start from `base_config()` and change values.

Layout:
  seed, mesh (data/fsdp/tensor/expert sizes), sharding.rules (preset or list),
  model (MLLMConfig fields: llm, vision, connector, dtypes, attention, remat),
  data (source, tokenizer, sequence/image sizes),
  train (stages to run in order, logging, eval and checkpoint cadence, non-finite policy),
  distributed (jax.distributed.initialize for multi-process runs),
  <stage name> for each stage: task, trainable regex, steps, batch size, accumulation, optim.
The returned config is locked by `finalize`, so `--config.a.b=v` with a misspelt key fails.
"""
from __future__ import annotations

import ml_collections

CD = ml_collections.ConfigDict


def optim_config(lr=1e-3, warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0, **kw) -> CD:
  c = CD(dict(lr=lr, warmup_steps=-1, warmup_ratio=warmup_ratio, final_lr_ratio=0.0,
              grad_clip=grad_clip, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))
  c.update(kw)
  return c


def stage_config(task='vqa', trainable='(connector|llm)/.*', steps=1000, batch_size=32,
                 grad_accum=1, **optim_kw) -> CD:
  """One training stage. `trainable` is re.fullmatch'ed against '/'-joined parameter paths
  such as 'connector/linear_1/kernel' or 'llm/layers/attn/q_proj/kernel'."""
  return CD(dict(task=task, trainable=trainable, steps=steps, batch_size=batch_size,
                 grad_accum=grad_accum, eval_every=0, optim=optim_config(**optim_kw),
                 # task='dpo' only (mllm_jax.train.dpo): loss type, beta, label smoothing,
                 # alpha * DPO + gamma * SFT(chosen); the reference is the stage's start
                 preference=dict(beta=0.1, loss_type='sigmoid', label_smoothing=0.0, alpha=1.0,
                                 gamma=0.0)))


def base_config() -> CD:
  c = CD()
  c.seed = 0
  c.mesh = CD(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.sharding = CD(dict(rules='fsdp'))
  c.model = CD(dict(
      llm=dict(vocab_size=0,          # 0: the tokenizer's size rounded up to a multiple of 8
               hidden=4096, depth=32, heads=32, kv_heads=0, head_dim=0, mlp_dim=11008,
               norm_eps=1e-5, rope_theta=10000.0,
               rope_scaling=dict(type='default', factor=1.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position=8192),
               max_position=4096, qkv_bias=False, qk_norm=False, sliding_window=0,
               tie_embeddings=False, act='silu',
               # Mixture-of-Experts (mllm_jax.models.moe; docs/moe.md): 0 experts = dense
               moe=dict(num_experts=0, experts_per_token=2, every=1, dense_layers=(),
                        mlp_dim=0, shared_mlp_dim=0, norm_topk_prob=True, impl='dropless',
                        dropless_impl='auto', capacity_factor=1.25, aux_loss_coef=0.001,
                        z_loss_coef=0.0),
               hf_path=''),             # HF Llama/Mistral/Qwen2 dir to start the LLM from
      vision=dict(kind='clip', image_size=336, patch_size=14, width=1024, depth=24, heads=16,
                  mlp_dim=4096, norm_eps=1e-5, act='', feature_layer=-2,
                  feature_select='patch', qkv_bias=True, hf_path=''),
      connector=dict(kind='mlp', depth=2, act='gelu', bias=True,
                     # kind='qformer' (BLIP-2 / InstructBLIP; vocab_size 0: the tokenizer's)
                     qformer=dict(num_queries=32, hidden=768, depth=12, heads=12, mlp_dim=3072,
                                  norm_eps=1e-12, act='gelu', cross_attention_every=2,
                                  instruction=False, vocab_size=0, max_position=512),
                     init_from=''),   # qformer: BLIP-2 stage-1 checkpoint (Q-Former + tower)
      image_token_id=-1,                # -1: the tokenizer's '<image>' token
      # LLaVA-NeXT AnyRes tiling, 'HxW,HxW,...' (e.g. '336x672,672x336,672x672,1008x336,
      # 336x1008'); '' = one tile per image
      image_grid_pinpoints='',
      dtype='float32', param_dtype='float32', attention='einsum', attention_blocks=1,
      remat_policy='none', vision_remat_policy='none',
      init_from=''))                    # every param from a convert / training / HF checkpoint
  c.data = CD(dict(
      source='synthetic',     # 'synthetic' (built-in scenes task) | 'llava_json' | 'tfds'
      tokenizer='',           # HF tokenizer dir; '' builds the demo tokenizer in WORKDIR/tokenizer
      max_len=2048, max_images=1, image_norm='clip', prefetch=2,
      # File-based sources (mllm_jax.data.pipeline, docs/data.md). The stage's task picks the
      # record kind: caption -> caption pairs, vqa -> conversations, dpo -> preference pairs.
      train_files='',         # llava_json: comma-separated JSON / JSONL files (conversations)
      eval_files='',          # llava_json: held-out files; '' holds out eval_fraction by id
      caption_files='',       # llava_json: caption task (pretrain) files; '' = train_files
      caption_eval_files='',
      preference_files='',    # llava_json: dpo task files; '' = train_files
      preference_eval_files='',
      eval_fraction=0.0,
      image_root='',          # llava_json: directory the records' image paths start from
      tfds_name='',           # tfds: e.g. 'llava_conversations/mix665k' (tfds_builders); a
                              # comma-separated list gives each task the dataset of its kind
      tfds_dir='',            # tfds: their data_dir
      bad_input='strict',     # 'strict': stop naming file + sample id | 'skip': drop and count
      truncate=False,         # cut over-long samples at max_len (never through image tokens)
      packing=False,          # several samples per row (segment ids, per-sample positions)
      buckets='',             # comma-separated row lengths < max_len to pad to (no packing)
      window=8,               # batches formed per window of samples (length sort / packing)
      workers=0,              # grain worker processes for decode + tokenise (0: in-process)
      shuffle_seed=-1,        # -1: config.seed
      pad_to_square=False,   # LLaVA-1.5 image_aspect_ratio='pad'
      # instruction-aware Q-Former (InstructBLIP): its tokenizer dir ('' = the LLM tokenizer)
      # and the instruction length in tokens
      qformer_tokenizer='', qformer_max_len=32))
  c.train = CD(dict(
      stages='pretrain,sft', log_every=10, checkpoint_every=500, keep_checkpoints=2,
      # orbax writes checkpoints in background threads while training goes on (the step waits
      # only for the copy to host memory); a failed write is raised at the next save or at exit
      async_checkpoint=True,
      eval_examples=256, eval_batch_size=64, progress_bar=True,
      max_steps_per_run=0,    # >0: save and exit after this many steps (time-sliced queues)
      # lm_head + cross-entropy over [batch, logits_chunk] slices of each row's loss positions
      # (no [B, T, vocab] logits; positions without loss skipped); 0 = one full projection
      logits_chunk=128,
      # >0: SFT / pretrain steps run the lm_head + cross-entropy only at each row's first
      # logits_width loss positions (losses.compact_next_token_loss): exact when no row has
      # more loss tokens, which the loop checks per batch; a batch with more runs through the
      # logits_chunk step instead (metric `train/over_logits_width`). Set it to the most loss
      # tokens a row of the data has. 0 = off. DPO stages ignore it.
      logits_width=0,
      # A step whose loss or gradients are NaN/inf never updates params or optimizer state.
      # 'skip': count it (metric `skipped_steps`) and go on, but stop with an error after
      # max_consecutive_nonfinite bad steps in a row (0 = never); 'stop': error at the first.
      nonfinite='skip', max_consecutive_nonfinite=10,
      # TEST ONLY: comma-separated global steps (as logged) whose loss masks (so loss and
      # gradients) are NaN; seconds each save stays half-written (to kill -9 a run mid-save)
      debug_nan_steps='', debug_save_delay=0.0,
  ))
  # Several processes (mllm_jax.distributed): 'auto' calls jax.distributed.initialize when the
  # environment names a multi-process job (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, GKE TPU);
  # 'yes' always (e.g. a GCE TPU pod, where jax finds the coordinator); 'no' never. Empty / -1 /
  # 0 values are left to jax's cluster detection.
  c.distributed = CD(dict(enabled='auto', coordinator_address='', num_processes=0,
                          process_id=-1, local_device_ids='', initialization_timeout=300,
                          cpu_collectives='gloo'))
  c.pretrain = stage_config(task='caption', trainable='connector/.*', lr=1e-3)
  c.sft = stage_config(task='vqa', trainable='(connector|llm)/.*', lr=2e-5)
  return c


def finalize(c: CD) -> CD:
  c.lock()
  return c


def load_config(path: str, overrides: dict | None = None) -> CD:
  """`get_config()` of a config file, with {'a.b': value} overrides applied (as --config.a.b)."""
  import importlib.util
  import os
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'mllm_jax_config_{name}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for key, value in (overrides or {}).items():
    *parents, last = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[last] = value
  return c
