"""Tiny InstructBLIP-style MLLM on the built-in synthetic scenes task; trains on a 2-core CPU.

    python -m mllm_jax.train --config configs/demo_qformer.py --workdir /tmp/demo_qformer

BLIP-2-style ViT (class token, fused qkv, post-LN features) -> instruction-aware Q-Former
(16 learned queries; the sample's questions, tokenised with the demo tokenizer, share its
self-attention; cross-attention to the image every layer) -> projection -> 4-layer LLM. Each
image becomes 16 tokens in the LLM, whatever the tower's patch count.

Unlike BLIP-2 / InstructBLIP, nothing here starts pretrained, so stage `pretrain` trains every
part on captions (BLIP-2's stage 2 with a frozen ViT and LLM is `trainable='connector/.*'`, as
in configs/instructblip_vicuna7b.py); stage `sft` then freezes the tower, as demo.py does.
Set `--config.model.connector.qformer.instruction=False` for a plain BLIP-2 Q-Former.
"""
from mllm_jax.config import base_config, finalize, stage_config


def get_config():
  c = base_config()
  c.model.llm.update(hidden=128, depth=4, heads=4, kv_heads=2, mlp_dim=384, max_position=256,
                     norm_eps=1e-6)
  c.model.vision.update(kind='blip2', image_size=32, patch_size=8, width=64, depth=3, heads=4,
                        mlp_dim=256, norm_eps=1e-6, feature_layer=-1, feature_select='full')
  c.model.connector.update(kind='qformer')
  c.model.connector.qformer.update(num_queries=16, hidden=64, depth=2, heads=4, mlp_dim=256,
                                   cross_attention_every=1, instruction=True, vocab_size=0,
                                   max_position=32, norm_eps=1e-12)
  c.data.update(max_len=80, max_images=2, qformer_max_len=32)
  c.train.update(log_every=20, checkpoint_every=200, eval_examples=512, eval_batch_size=128)
  c.pretrain = stage_config(task='caption', trainable='.*', steps=300, batch_size=32,
                            lr=1e-3, warmup_ratio=0.05, weight_decay=0.01)
  c.sft = stage_config(task='vqa', trainable='(connector|llm)/.*', steps=600, batch_size=32,
                       lr=5e-4, warmup_ratio=0.05, weight_decay=0.01)
  return finalize(c)
