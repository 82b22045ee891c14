"""BLIP-2 stage 1 (ITC + ITM + ITG representation learning) on the built-in scenes task's
captions; trains on a 2-core CPU.

    python -m mllm_jax.train.blip2_stage1 --config configs/demo_blip2_stage1.py --workdir DIR

A BLIP-2-style ViT (3 x 64 on 32 px, frozen as in BLIP-2; nothing here is pretrained, so its
features are those of its random init) -> Q-Former 2 x 64 with 16 queries and cross-attention
every layer (the sizes of configs/demo_qformer.py's connector, so the result starts its stage 2)
with a BERT WordPiece tokenizer built over the task's words in DIR/tokenizer ([DEC] added as the
ITG decoder BOS). The run logs held-out image -> text recall@1 of ITC over 256 held-out pairs,
checkpoints every 250 steps (rerun the command to resume) and saves DIR/stage1 (params +
stage1_model.json) at the end.
"""
import ml_collections

from mllm_jax.config import optim_config


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      vision=dict(kind='blip2', image_size=32, patch_size=8, width=64, depth=3, heads=4,
                  mlp_dim=256, norm_eps=1e-6, act='', feature_layer=-1, feature_select='full',
                  qkv_bias=True, hf_path=''),
      # vocab_size 0: the tokenizer's size rounded up to a multiple of 8
      qformer=dict(num_queries=16, hidden=64, depth=2, heads=4, mlp_dim=256, norm_eps=1e-12,
                   act='gelu', cross_attention_every=1, instruction=False, vocab_size=0,
                   max_position=32),
      embed_dim=64,          # ITC space (BLIP-2: 256)
      decoder_bos_id=-1,     # -1: the tokenizer's bos_token ([DEC])
      dtype='float32', param_dtype='float32', attention='einsum'))
  c.data = ml_collections.ConfigDict(dict(
      tokenizer='',          # BERT tokenizer dir with a bos_token ([DEC]); '' builds DIR/tokenizer
      max_len=32, image_norm='clip'))
  c.train = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=32, trainable='(?!vision/).*',   # everything but the tower
      log_every=50, eval_every=250, eval_examples=256,
      # train states in DIR/stage1_checkpoints (a rerun resumes); max_steps_per_run > 0: save
      # and stop after that many steps; async: writes go on in the background
      checkpoint_every=250, keep_checkpoints=2, max_steps_per_run=0, async_checkpoint=True))
  c.loss = ml_collections.ConfigDict(dict(itc_weight=1.0, itm_weight=1.0, itg_weight=1.0,
                                          label_smoothing=0.1))
  c.optim = optim_config(lr=1e-3, warmup_ratio=0.05, weight_decay=0.05)
  c.lock()
  return c
