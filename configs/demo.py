"""Tiny multimodal LLM on the built-in synthetic scenes task; trains on a 2-core CPU in minutes.

    python -m mllm_jax.train --config configs/demo.py --workdir /tmp/demo

Stage `pretrain` learns to caption scenes; stage `sft` learns multi-turn VQA (colour, shape,
count, position, existence) and reports held-out answer accuracy. Unlike LLaVA, nothing here
starts pretrained, so the pretrain stage trains the towers too (LLaVA's connector-only stage 1
is `configs/llava_v15_7b_pretrain.py`); SFT then freezes the vision tower as LLaVA does.
"""
from mllm_jax.config import base_config, finalize, stage_config


def get_config():
  c = base_config()
  c.model.llm.update(hidden=128, depth=4, heads=4, kv_heads=2, mlp_dim=384, max_position=256,
                     norm_eps=1e-6)
  c.model.vision.update(kind='clip', image_size=32, patch_size=8, width=64, depth=3, heads=4,
                        mlp_dim=256, feature_layer=-2, feature_select='patch')
  c.model.connector.update(kind='mlp', depth=2)
  c.data.update(max_len=80, max_images=2)
  c.train.update(log_every=20, checkpoint_every=200, eval_examples=512, eval_batch_size=128,
                 # the lm_head only at 32 loss positions a row, not 79: a caption has at most
                 # 25 loss tokens, a VQA conversation 6 (longer rows would run at full width)
                 logits_width=32)
  c.pretrain = stage_config(task='caption', trainable='.*', steps=300, batch_size=32,
                            lr=1e-3, warmup_ratio=0.05, weight_decay=0.01)
  c.sft = stage_config(task='vqa', trainable='(connector|llm)/.*', steps=600, batch_size=32,
                       lr=5e-4, warmup_ratio=0.05, weight_decay=0.01)
  return finalize(c)
