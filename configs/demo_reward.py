"""A reward model on the built-in preference pairs, starting from the demo's SFT model.

    python -m mllm_jax.train.reward --config configs/demo_reward.py --workdir DIR

Without `--config.model.init_from` (a finished configs/demo.py workdir, or any params /
training checkpoint of the same model), the demo's pretrain and sft stages are trained first in
DIR/sft. The reward model is that policy plus a fresh scalar `score` head; it trains the
Bradley-Terry loss on right-vs-wrong answers (mllm_jax/data/preference.py) and reports the
held-out pairwise accuracy before and after. The model is saved in DIR/reward/model
(`mllm_jax.train.reward.load_reward`; `save_reward_hf` exports it for transformers).
"""
from mllm_jax.config import finalize, load_config, stage_config

import os

from mllm_jax.train.reward import DEFAULT_TRAINABLE

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.py')


def get_config():
  c = load_config(_DEMO)
  c.unlock()
  c.reward = stage_config(task='reward', trainable=DEFAULT_TRAINABLE, steps=200, batch_size=32,
                          lr=3e-4, warmup_ratio=0.05, weight_decay=0.0)
  # TRL's optional centring term: coefficient * mean((r_chosen + r_rejected)^2)
  c.reward.center_rewards_coefficient = 0.01
  return finalize(c)
