"""examples/llava_from_hf_parts.py at tiny size: HF CLIP + Llama parts -> two training stages ->
export -> transformers generate, and the export's logits equal mllm_jax's."""
import importlib.util
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_llava_from_hf_parts_example(tmp_path):
  spec = importlib.util.spec_from_file_location(
      'llava_from_hf_parts', os.path.join(ROOT, 'examples', 'llava_from_hf_parts.py'))
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  out = example.main(['--out', str(tmp_path), '--tiny', '--score-samples', '2'])
  assert np.isfinite(out['train']['eval/loss'])
  assert out['logit_rel_diff'] <= 1e-4
  exported = load_file(os.path.join(out['export'], 'model.safetensors'))
  clip = load_file(os.path.join(out['clip'], 'model.safetensors'))
  llama = load_file(os.path.join(out['llama'], 'model.safetensors'))
  for k, v in clip.items():   # the tower was frozen in both stages: exported bit for bit
    np.testing.assert_array_equal(exported['vision_tower.' + k], v, err_msg=k)
  up = 'model.layers.0.mlp.up_proj.weight'   # stage 2 trained the LLM
  assert exported['language_model.' + up].shape == llama[up].shape
  assert not np.array_equal(exported['language_model.' + up], llama[up])
  assert 'multi_modal_projector.linear_2.bias' in exported
  for f in ('tokenizer.json', 'processor_config.json', 'config.json'):
    assert os.path.exists(os.path.join(out['export'], f))
