"""configs/demo.py followed by a DPO stage on built-in preference pairs.

    python -m mllm_jax.train --config configs/demo_dpo.py --workdir /tmp/demo_dpo

Stages pretrain -> sft as in configs/demo.py, then `dpo`: the SFT model is the policy and the
frozen reference; each pair is a held-out-style question with its right answer (chosen) and a
wrong colour / shape / count / position or a "yes" about an absent object (rejected), see
mllm_jax/data/preference.py. The DPO stage reports the held-out preference accuracy (pairs the
policy ranks right) before and after, and the VQA accuracy, which must not drop.
A workdir that already finished `pretrain,sft` with configs/demo.py can be continued by
copying it: the stage names and their order are the same.
"""
from mllm_jax.config import finalize, load_config, stage_config

import os

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.py')


def get_config():
  c = load_config(_DEMO)
  c.unlock()
  c.train.stages = 'pretrain,sft,dpo'
  c.dpo = stage_config(task='dpo', trainable='(connector|llm)/.*', steps=300, batch_size=32,
                       lr=1e-4, warmup_ratio=0.1, weight_decay=0.0)
  # Insight-V's shipped weights: alpha * DPO + gamma * SFT(chosen) with alpha = gamma = 1
  c.dpo.preference.update(beta=0.1, loss_type='sigmoid', alpha=1.0, gamma=1.0)
  return finalize(c)
