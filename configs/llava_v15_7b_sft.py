"""LLaVA-1.5-7B stage 2 (visual instruction tuning): connector + LLM train, tower frozen.

Recipe (haotian-liu/LLaVA, scripts/v1_5/finetune.sh): llava_v1_5_mix665k, 1 epoch, global
batch 128, lr 2e-5, cosine with 3% warmup, no weight decay, max length 2048, `v1` template.
Starts from the stage-1 checkpoint (same parameter layout).
"""
import os

from mllm_jax.config import finalize, load_config, stage_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), 'llava_v15_7b_pretrain.py'))
  c.unlock()
  c.train.stages = 'sft'
  c.sft = stage_config(task='vqa', trainable='(connector|llm)/.*', steps=5197,   # 665K / 128
                       batch_size=128, lr=2e-5, warmup_ratio=0.03, weight_decay=0.0)
  return finalize(c)
