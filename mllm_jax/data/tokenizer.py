"""Tokenizers: the small demo tokenizer (built offline from the synthetic task) and loading of
any Hugging Face tokenizer directory, checked for what multimodal training needs."""
from __future__ import annotations

import os
import shutil
import tempfile

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mllm_jax.data import conversation, synthetic

IMAGE_TOKEN = '<image>'
DEMO_SPECIAL_TOKENS = ('<pad>', '<s>', '</s>', '<unk>', IMAGE_TOKEN,
                       '<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
# <s><|user|>\n{content}<|end|>\n<|assistant|>\n{content}<|end|>\n ... [<|assistant|>\n]
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# End-of-turn tokens of common chat families; generation stops at these as well as at eos.
END_OF_TURN_TOKENS = ('<|end|>', '<|im_end|>', '<|eot_id|>', '<end_of_turn>')


def demo_corpus(num_samples: int = 3000) -> list[str]:
  """Captions, questions and answers of the first train samples of both synthetic tasks."""
  texts = []
  for i in range(num_samples):
    texts.append(synthetic.make_sample(i, kind='caption', image_size=None).caption)
    texts += [m['content'].replace(IMAGE_TOKEN, '').strip()
              for m in synthetic.make_sample(i, kind='vqa', image_size=None).messages]
  return texts


def build_demo_tokenizer(out_dir: str, vocab_size: int = 384) -> str:
  """Train a byte-level BPE on `demo_corpus()` and save it in HF format to `out_dir`.

  Byte level, so any text still encodes (the demo words become single tokens). Deterministic:
  the same files every time. Returns out_dir; load it with `load_tokenizer(out_dir)`.
  """
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(DEMO_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(demo_corpus(), trainer)
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<s>', eos_token='</s>', pad_token='<pad>',
      unk_token='<unk>', extra_special_tokens=list(DEMO_SPECIAL_TOKENS[4:]))
  hf.chat_template = DEMO_CHAT_TEMPLATE
  hf.save_pretrained(out_dir)
  return out_dir


def load_tokenizer(path: str, image_token: str = IMAGE_TOKEN):
  """AutoTokenizer from a local directory, checked to have a pad token and `image_token`."""
  tok = transformers.AutoTokenizer.from_pretrained(path)
  if tok.pad_token_id is None:
    raise ValueError(f'tokenizer at {path!r} has no pad token; set one (e.g. an unused reserved '
                     'token) and save it again')
  try:
    conversation.image_token_id(tok, image_token)
  except ValueError as e:
    raise ValueError(f'tokenizer at {path!r}: {e}') from None
  return tok


def get_or_build_demo_tokenizer(path: str):
  """Load the demo tokenizer from `path`, building it there first if it isn't there yet.

  Built in a temporary sibling directory and renamed into place, so a concurrent reader (another
  process of a multi-host run) sees a complete tokenizer or none.
  """
  if not os.path.exists(os.path.join(path, 'tokenizer.json')):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.tokenizer-', dir=parent)
    try:
      build_demo_tokenizer(tmp)
      os.chmod(tmp, 0o755)   # mkdtemp makes it private
      os.rename(tmp, path)
    except OSError:
      if not os.path.exists(os.path.join(path, 'tokenizer.json')):   # not a lost race
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return load_tokenizer(path)


def stop_token_ids(tokenizer) -> list[int]:
  """eos plus the chat family's end-of-turn token, if the vocabulary has one."""
  vocab = tokenizer.get_vocab()
  ids = [tokenizer.eos_token_id] + [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
  return sorted({i for i in ids if i is not None})
