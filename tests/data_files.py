"""Real data files for the data-pipeline tests: JPEG / PNG images written with PIL, LLaVA JSON
and JSONL records, and a Qwen-style (ChatML) tokenizer trained and saved locally."""
from __future__ import annotations

import json
import os

import numpy as np
import tokenizers
import transformers
from PIL import Image
from tokenizers import decoders, models, pre_tokenizers, trainers

NIT = 4        # image tokens per image
SIZE = 16      # image side after preprocessing

QWEN_SPECIAL = ('<|endoftext|>', '<|im_start|>', '<|im_end|>', '<image>')
QWEN_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_qwen_style_tokenizer(out_dir: str, corpus) -> str:
  """Byte-level BPE with Qwen2's special tokens and ChatML template, saved in HF format (no
  BOS, pad = <|endoftext|>, eos = <|im_end|>), loadable with AutoTokenizer."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(QWEN_SPECIAL),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(corpus), trainer)
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token='<|im_end|>', pad_token='<|endoftext|>',
      extra_special_tokens=['<|im_start|>', '<image>'])
  hf.chat_template = QWEN_TEMPLATE
  hf.save_pretrained(out_dir)
  return out_dir


def write_image(path: str, seed: int, hw=(24, 30)) -> str:
  """A random RGB image; format from the extension (JPEG / PNG)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rng.integers(0, 256, hw + (3,), dtype=np.uint8)).save(path)
  return path


def conv(*turns, image=None, sid='x'):
  """A LLaVA record from (from, value) pairs."""
  r = {'id': sid, 'conversations': [{'from': f, 'value': v} for f, v in turns]}
  if image is not None:
    r['image'] = image
  return r


def write_json(path: str, recs, jsonl: bool = False) -> str:
  with open(path, 'w') as f:
    if jsonl:
      f.write(''.join(json.dumps(r) + '\n' for r in recs))
    else:
      json.dump(recs, f)
  return path


def numbered_records(n: int, image_every: int = 2):
  """n LLaVA records whose answers name their index ('answer 7'), with images a.jpg / b.png."""
  recs = []
  for i in range(n):
    img = ['a.jpg', 'b.png'][i % 2] if i % image_every == 0 else None
    q = ('<image>\n' if img else '') + 'what is shown?' + ' more' * (i % 5)
    turns = [('human', q), ('gpt', f'answer {i}')]
    if i % 3 == 0:
      turns += [('human', 'and then?'), ('gpt', f'then {i}')]
    recs.append(conv(*turns, image=img, sid=f'r{i}'))
  return recs


def build_bert_tokenizer(out_dir: str, texts) -> str:
  """A real BERT WordPiece tokenizer (InstructBLIP's Q-Former tokenizer class: lower case,
  [CLS] ... [SEP], pad [PAD] = 0) over the words of `texts`, saved in HF format."""
  import re
  words = sorted({w for t in texts for w in re.findall(r'\w+|[^\w\s]', t.lower())})
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words
  transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(out_dir)
  return out_dir
