"""Build a LLaVA from separately saved Hugging Face parts, train, export, use it in transformers.

    python examples/llava_from_hf_parts.py --out /tmp/llava_parts [--tiny]

1. parts: a CLIPVisionModel and a LlamaForCausalLM (random weights: nothing is downloaded) saved
   with `save_pretrained`, the LLM together with a tiny tokenizer (the demo's, with `<image>`);
2. training with the training CLI on the built-in synthetic task, vision tower from
   `--config.model.vision.hf_path`, LLM from `--config.model.llm.hf_path`, fresh connector:
   stage 1 (`pretrain`, captions) trains the connector only, stage 2 (`sft`, VQA) the connector
   and the LLM; the tower stays frozen;
3. export with `python -m mllm_jax.convert --to-hf` (config.json, safetensors, tokenizer,
   processor);
4. transformers: `AutoProcessor` + `LlavaForConditionalGeneration` from the export answer
   held-out questions with `generate`, and `mllm_jax.load_hf` of the export gives the same logits.

Each step prints the equivalent shell command. The CLIP and Llama sizes are those of
configs/demo.py (`--tiny`: smaller, a few steps; what the test runs).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, 'configs', 'demo.py')
SIZES = {   # (CLIP, Llama) sizes: those of configs/demo.py, and a tiny variant for tests
    'demo': (dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, image_size=32, patch_size=8),
             dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  max_position_embeddings=256)),
    'tiny': (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  max_position_embeddings=256)),
}
TRAIN = {   # stage lengths and evaluation sizes
    'demo': {'pretrain.steps': 300, 'sft.steps': 600},
    'tiny': {'pretrain.steps': 3, 'pretrain.batch_size': 8, 'sft.steps': 3, 'sft.batch_size': 8,
             'train.eval_examples': 16, 'train.eval_batch_size': 8, 'train.log_every': 1,
             'train.progress_bar': False},
}


def build_parts(out: str, size: str):
  """Random-weight CLIP tower and Llama (+ tokenizer) saved as HF directories."""
  import torch
  import transformers
  from mllm_jax.data import tokenizer as tok_lib
  clip_cfg, llama_cfg = SIZES[size]
  tok = tok_lib.get_or_build_demo_tokenizer(os.path.join(out, 'tokenizer'))
  torch.manual_seed(0)
  clip_dir, llama_dir = os.path.join(out, 'hf_clip'), os.path.join(out, 'hf_llama')
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**clip_cfg)).save_pretrained(clip_dir)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=-(-len(tok) // 8) * 8, bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **llama_cfg))
  llama.save_pretrained(llama_dir)
  tok.save_pretrained(llama_dir)   # an LLM checkpoint ships its tokenizer
  return clip_dir, llama_dir


def train_overrides(clip_dir, llama_dir, size):
  """--config.* values: the parts, LLaVA's stage-1 trainable set, and the run's sizes."""
  from mllm_jax.hf import pretrained
  over = {'model.vision.hf_path': clip_dir, 'model.llm.hf_path': llama_dir,
          'data.tokenizer': llama_dir, 'pretrain.trainable': 'connector/.*',
          'sft.trainable': '(connector|llm)/.*'}
  if size != 'demo':   # the architecture the checkpoints have (demo.py already says it)
    over.update({k: v for k, v in pretrained.config_overrides(clip_dir, 'vision').items()})
    over.update({k: v for k, v in pretrained.config_overrides(llama_dir, 'llm').items()
                 if k != 'model.llm.vocab_size'})   # 0 = from the tokenizer: the same
  over.update(TRAIN[size])
  return over


def show(cmd):
  print('\n$ ' + ' '.join(shlex.quote(str(c)) for c in cmd), flush=True)


def score(export_dir: str, n: int) -> dict:
  """Held-out VQA through transformers from the export, and logits against mllm_jax.load_hf."""
  import jax
  import torch
  import transformers
  from PIL import Image
  import mllm_jax
  from mllm_jax.data import synthetic
  proc = transformers.AutoProcessor.from_pretrained(export_dir)
  model = transformers.LlavaForConditionalGeneration.from_pretrained(export_dir).eval()
  tok = proc.tokenizer
  stop = [tok.eos_token_id, tok.convert_tokens_to_ids('<|end|>')]
  right, first = 0, None
  size = proc.image_processor.crop_size['height']
  for i in range(n):
    s = synthetic.make_sample(i, kind='vqa', split='eval', image_size=size)
    prompt = tok.apply_chat_template(s.messages[:1], tokenize=False, add_generation_prompt=True)
    inputs = proc(text=prompt, images=[Image.fromarray(im) for im in s.images],
                  return_tensors='pt', add_special_tokens=False)
    with torch.no_grad():
      out = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=stop,
                           pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True).strip()
    right += answer == s.messages[1]['content']
    if first is None:
      first = (inputs, s.messages[0]['content'], answer, s.messages[1]['content'])
  inputs, question, answer, truth = first
  print(f'transformers, held-out sample 0: {question!r} -> {answer!r} (truth {truth!r})')
  jmodel, params = mllm_jax.load_hf(export_dir)
  np_inputs = {k: v.numpy() for k, v in inputs.items()}
  ours = np.asarray(jax.jit(lambda p, kw: jmodel.apply({'params': p}, **kw))(params, np_inputs))
  with torch.no_grad():
    ref = model(**inputs).logits.numpy()
  diff = float(np.abs(ours - ref).max() / np.abs(ref).max())
  print(f'transformers first-turn accuracy on {n} held-out samples: {right / n:.2f}; '
        f'max |logit diff| mllm_jax vs transformers: {diff:.1e} of max |logit|')
  return {'accuracy': right / n, 'logit_rel_diff': diff}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', required=True, help='directory for the parts, the run and the export')
  p.add_argument('--tiny', action='store_true', help='small parts and a few steps (tests)')
  p.add_argument('--score-samples', type=int, default=None)
  args = p.parse_args(argv)
  size = 'tiny' if args.tiny else 'demo'
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  from mllm_jax import convert
  from mllm_jax.config import load_config
  from mllm_jax.train import loop

  clip_dir, llama_dir = build_parts(out, size)
  print(f'Saved a CLIPVisionModel to {clip_dir} and a LlamaForCausalLM + tokenizer to {llama_dir}')

  workdir = os.path.join(out, 'run')
  overrides = train_overrides(clip_dir, llama_dir, size)
  show([sys.executable, '-m', 'mllm_jax.train', '--config', DEMO_CONFIG, '--workdir', workdir] +
       [f'--config.{k}={v}' for k, v in overrides.items()])
  results = loop.run(load_config(DEMO_CONFIG, overrides), workdir)

  export_dir = os.path.join(out, 'llava_hf')
  show([sys.executable, '-m', 'mllm_jax.convert', '--to-hf', workdir, '--out', export_dir])
  convert.main(['--to-hf', workdir, '--out', export_dir])

  scores = score(export_dir, args.score_samples or (4 if args.tiny else 64))
  return {'train': results, **scores, 'export': export_dir, 'clip': clip_dir,
          'llama': llama_dir}


if __name__ == '__main__':
  main()
