"""The demo model trained from files: LLaVA-format JSON + real PNG / JPEG images (CPU).

    python -m mllm_jax.data.export --out /tmp/scenes            # the scenes task as files
    python -m mllm_jax.train --config configs/llava_json_demo.py --workdir /tmp/demo_json \
        --config.data.image_root=/tmp/scenes/images \
        --config.data.caption_files=/tmp/scenes/caption_train.json \
        --config.data.caption_eval_files=/tmp/scenes/caption_eval.json \
        --config.data.train_files=/tmp/scenes/vqa_train.json \
        --config.data.eval_files=/tmp/scenes/vqa_eval.json

Same model and stages as configs/demo.py; the data goes through mllm_jax.data.pipeline (grain:
seeded global shuffle, 2 worker processes, length buckets, skip-and-count of bad samples).
The same flags with your own files train on them: LLaVA-1.5's data is
--config.data.caption_files=blip_laion_cc_sbu_558k.json (stage 1) and
--config.data.train_files=llava_v1_5_mix665k.json (stage 2), see docs/data.md.
"""
import os

from mllm_jax.config import finalize, load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), 'demo.py'))
  c.unlock()
  c.data.update(source='llava_json', bad_input='skip', buckets='48,64', window=8, workers=2,
                eval_fraction=0.0)
  # demo.py's logits_width (32) fits its synthetic rows; real conversations are longer, so
  # project every loss position unless a width is set for the data at hand
  c.train.logits_width = 0
  return finalize(c)
