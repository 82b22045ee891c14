"""Data: demo tokenizer, chat-template masking (demo, ChatML, Llama-3 templates), synthetic scenes
(rendering, answers, determinism, splits) and the fixed-shape batches built from them."""
import collections
import filecmp
import os
import re

import numpy as np
import pytest
import transformers

from mllm_jax.data import images, synthetic, tokenizer as tok_lib
from mllm_jax.data.conversation import tokenize_caption, tokenize_conversation

NIT = 16   # image tokens per image


@pytest.fixture(scope='session')
def tok_dir(tmp_path_factory):
  return tok_lib.build_demo_tokenizer(str(tmp_path_factory.mktemp('demo_tokenizer')))


@pytest.fixture
def tok(tok_dir):   # fresh per test: some tests add tokens or change the template
  return tok_lib.load_tokenizer(tok_dir)


@pytest.fixture(scope='session')
def vqa(tok_dir):
  return synthetic.SyntheticTask(tok_lib.load_tokenizer(tok_dir), kind='vqa', max_len=128)


CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TEMPLATES = {  # name -> (template, extra special tokens, end-of-turn token)
    'demo': (None, [], '<|end|>'),
    'chatml': (CHATML, ['<|im_start|>', '<|im_end|>'], '<|im_end|>'),
    'llama3': (LLAMA3, ['<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
                        '<|eot_id|>'], '<|eot_id|>'),
}
CHAT = [{'role': 'system', 'content': 'answer in one word.'},
        {'role': 'user', 'content': '<image>\nwhat colour is the circle?'},
        {'role': 'assistant', 'content': 'red'},
        {'role': 'user', 'content': 'where is the blue square?'},
        {'role': 'assistant', 'content': 'bottom right'}]


def with_template(tok, name):
  template, extra, _ = TEMPLATES[name]
  if template:
    tok.add_special_tokens({'extra_special_tokens': extra}, replace_extra_special_tokens=False)
    tok.chat_template = template
  return tok


def trained_text(tok, ids, turn_ids, turn):
  return tok.decode(ids[turn_ids == turn])


# ---- tokenizer ------------------------------------------------------------------------------

def test_demo_tokenizer_round_trip_and_determinism(tok_dir, tmp_path):
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  assert len(tok) == 384
  assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ('<pad>', '<s>', '</s>',
                                                                        '<unk>')
  for t in tok_lib.DEMO_SPECIAL_TOKENS:   # each special token is one id, never split
    assert tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)]
  for text in ['a red circle at the top left and a blue square at the bottom right.',
               'Zebra crossings: 42 ünïcode ☃ words!']:   # byte level: unseen text round-trips
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
  # the demo vocabulary makes every task word a single token
  assert len(tok.encode('what colour is the triangle?', add_special_tokens=False)) == 6
  rendered = tok.apply_chat_template(CHAT[1:3], tokenize=False, add_generation_prompt=False)
  assert rendered == '<s><|user|>\n<image>\nwhat colour is the circle?<|end|>\n<|assistant|>\nred<|end|>\n'
  again = tok_lib.build_demo_tokenizer(str(tmp_path / 'again'))
  cmp = filecmp.dircmp(tok_dir, again)
  assert sorted(os.listdir(tok_dir)) == sorted(os.listdir(again)) and not cmp.diff_files
  assert tok_lib.stop_token_ids(tok) == sorted({tok.eos_token_id,
                                               tok.convert_tokens_to_ids('<|end|>')})


def test_get_or_build_builds_once(tmp_path):
  path = str(tmp_path / 'tok')
  tok = tok_lib.get_or_build_demo_tokenizer(path)
  stamp = os.stat(os.path.join(path, 'tokenizer.json')).st_mtime_ns
  assert tok_lib.get_or_build_demo_tokenizer(path).get_vocab() == tok.get_vocab()
  assert os.stat(os.path.join(path, 'tokenizer.json')).st_mtime_ns == stamp
  assert [p for p in os.listdir(tmp_path) if p != 'tok'] == []   # no temporary dirs left


def test_load_tokenizer_errors_name_the_path(tok, tmp_path):
  no_pad = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer,
                                                eos_token='</s>')
  no_pad.save_pretrained(tmp_path / 'no_pad')
  with pytest.raises(ValueError, match=r'no_pad.*no pad token'):
    tok_lib.load_tokenizer(str(tmp_path / 'no_pad'))
  with pytest.raises(ValueError, match=r"demo_tokenizer.*no single token '<img>'"):
    tok_lib.load_tokenizer(tok.name_or_path, image_token='<img>')


# ---- conversation masking ---------------------------------------------------------------------

@pytest.mark.parametrize('name', list(TEMPLATES))
def test_chat_template_masks_exactly_assistant_turns(tok, name):
  tok = with_template(tok, name)
  end = TEMPLATES[name][2]
  ids, loss, turns = tokenize_conversation(tok, CHAT, num_image_tokens=NIT)
  assert ids.dtype == np.int32 and loss.dtype == np.float32 and turns.dtype == np.int32
  assert trained_text(tok, ids, turns, 1) == 'red' + end
  assert trained_text(tok, ids, turns, 2) == 'bottom right' + end
  np.testing.assert_array_equal(loss, (turns > 0).astype(np.float32))
  assert set(np.unique(turns)) == {0, 1, 2}
  # each answer is one contiguous span
  for k in (1, 2):
    pos = np.nonzero(turns == k)[0]
    assert pos[-1] - pos[0] + 1 == len(pos)
  img = tok.convert_tokens_to_ids('<image>')
  assert (ids == img).sum() == NIT and loss[ids == img].sum() == 0
  # the sequence is the template's own rendering with the image token repeated
  ref = tok.apply_chat_template(CHAT, tokenize=False)
  expanded = tok.encode(ref.replace('<image>', '<image>' * NIT), add_special_tokens=False)
  assert ids.tolist() == expanded


def test_chat_template_without_trailing_separator_and_with_cache(tok):
  tok = with_template(tok, 'llama3')   # <|eot_id|> ends the text: nothing to trim
  cache = {}
  first = tokenize_conversation(tok, CHAT, num_image_tokens=NIT, cache=cache)
  assert cache   # prefixes memoised, and the memo gives the same answer
  second = tokenize_conversation(tok, CHAT, num_image_tokens=NIT, cache=cache)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  assert first[0][-1] == tok.convert_tokens_to_ids('<|eot_id|>') and first[1][-1] == 1


def test_caption_tokens(tok):
  ids, loss, turns = tokenize_caption(tok, 'a red circle at the top left.', num_image_tokens=NIT,
                                      num_images=2)
  img = tok.convert_tokens_to_ids('<image>')
  assert ids[0] == tok.bos_token_id and (ids[1:1 + 2 * NIT] == img).all()
  assert tok.decode(ids[loss == 1]) == 'a red circle at the top left.</s>'
  assert loss[:1 + 2 * NIT].sum() == 0 and (turns == loss).all()
  tok.bos_token = None   # Qwen-style tokenizers have no BOS
  ids2, _, _ = tokenize_caption(tok, 'a red circle at the top left.', num_image_tokens=NIT)
  assert ids2[0] == img and len(ids2) == len(ids) - 1 - NIT


def test_conversation_errors(tok):
  user = {'role': 'user', 'content': 'hi'}
  with pytest.raises(ValueError, match='empty conversation'):
    tokenize_conversation(tok, [], num_image_tokens=NIT)
  with pytest.raises(ValueError, match="message 1 has unknown role 'gpt'"):
    tokenize_conversation(tok, [user, {'role': 'gpt', 'content': 'x'}], num_image_tokens=NIT)
  with pytest.raises(ValueError, match='no assistant turn'):
    tokenize_conversation(tok, [user], num_image_tokens=NIT)
  with pytest.raises(ValueError, match='starts with an assistant turn'):
    tokenize_conversation(tok, CHAT[2:], num_image_tokens=NIT)
  n = len(tokenize_conversation(tok, CHAT, num_image_tokens=NIT)[0])
  with pytest.raises(ValueError, match=f'{n} tokens > max_len=20'):
    tokenize_conversation(tok, CHAT, num_image_tokens=NIT, max_len=20)
  with pytest.raises(ValueError, match='would cut image tokens'):   # images end near 30
    tokenize_conversation(tok, CHAT, num_image_tokens=NIT, max_len=20, truncate=True)
  ids, loss, _ = tokenize_conversation(tok, CHAT, num_image_tokens=NIT, max_len=n - 3,
                                       truncate=True)
  assert len(ids) == len(loss) == n - 3


def test_bad_templates_are_rejected(tok):
  # Marks only the last message's end: earlier renderings are not prefixes of later ones.
  tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                       "{% if loop.last %}<|end|>{% endif %}\n{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
  with pytest.raises(ValueError, match='not prefix-consistent'):
    tokenize_conversation(tok, CHAT, num_image_tokens=NIT)
  tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}"
  with pytest.raises(ValueError, match='ignores add_generation_prompt'):
    tokenize_conversation(tok, CHAT, num_image_tokens=NIT)


# ---- images -----------------------------------------------------------------------------------

def test_normalize():
  x = np.array([[[0, 128, 255]]], np.uint8)
  got = images.normalize(x, images.CLIP_MEAN, images.CLIP_STD)
  want = (np.array([0, 128, 255]) / 255 - np.array(images.CLIP_MEAN)) / np.array(images.CLIP_STD)
  np.testing.assert_allclose(got[0, 0], want, atol=1e-6)
  assert got.dtype == np.float32
  np.testing.assert_allclose(images.normalize(x, images.SIGLIP_MEAN, images.SIGLIP_STD)[0, 0],
                             [-1, 128 / 127.5 - 1, 1], atol=1e-6)


# ---- synthetic scenes -------------------------------------------------------------------------

def nearest_colour(rgb):
  return min(synthetic.COLOURS, key=lambda c: np.sum((np.array(synthetic.COLOURS[c]) - rgb) ** 2))


@pytest.mark.parametrize('size', [32, 64])
def test_rendered_objects_have_their_colour_shape_and_quadrant(size):
  fill = collections.defaultdict(list)
  for i in range(60):
    s = synthetic.make_sample(i, kind='caption', image_size=size)
    img, half = s.images[0].astype(int), size // 2
    assert img.shape == (size, size, 3) and s.images[0].dtype == np.uint8
    assert np.all(img[0, 0] < 40)   # a corner is always dark background
    by_quadrant = {o.quadrant: o for o in s.scenes[0]}
    for q in range(4):
      r, c = divmod(q, 2)
      quad = img[r * half:(r + 1) * half, c * half:(c + 1) * half]
      fg = quad.max(-1) > 100        # objects have a bright channel; background is < 40
      if q not in by_quadrant:
        assert not fg.any(), (i, q)
        continue
      obj = by_quadrant[q]
      assert fg.sum() > 0.1 * half * half, (i, q)
      assert nearest_colour(quad[fg].mean(0)) == obj.colour
      assert all(nearest_colour(p) == obj.colour for p in quad[fg][::7])
      rows, cols = np.nonzero(fg)
      fill[obj.shape].append(fg.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1)))
  if size == 64:   # shape is visible: fraction of the bounding box the object fills
    assert min(fill['square']) > 0.95
    assert 0.65 < min(fill['circle']) and max(fill['circle']) < 0.9
    assert max(fill['triangle']) < 0.65


def oracle(scenes, question):
  """The answer to `question`, worked out from the scene alone."""
  scene = scenes[0]
  count = lambda pred: sum(map(pred, scene))   # noqa: E731
  if m := re.fullmatch(r'what colour is the (\w+)\?', question):
    assert count(lambda o: o.shape == m[1]) == 1, 'ambiguous'
    return next(o.colour for o in scene if o.shape == m[1])
  if m := re.fullmatch(r'what shape is at the (.+)\?', question):
    return next(o.shape for o in scene if synthetic.QUADRANTS[o.quadrant] == m[1])
  if m := re.fullmatch(r'where is the (\w+) (\w+)\?', question):
    assert count(lambda o: (o.colour, o.shape) == (m[1], m[2])) == 1, 'ambiguous'
    return next(synthetic.QUADRANTS[o.quadrant] for o in scene if (o.colour, o.shape) == (m[1], m[2]))
  if question == 'how many objects are there?':
    return synthetic.NUMBERS[len(scene)]
  if m := re.fullmatch(r'how many (\w+)s are there\?', question):
    return synthetic.NUMBERS[count(lambda o: o.shape == m[1])]
  if m := re.fullmatch(r'is there a (\w+) (\w+)\?', question):
    return 'yes' if count(lambda o: (o.colour, o.shape) == (m[1], m[2])) else 'no'
  a, b = scenes
  if question == 'which image has more objects?':
    assert len(a) != len(b), 'ambiguous'
    return 'first' if len(a) > len(b) else 'second'
  assert question == 'how many objects are there in the two images together?', question
  return synthetic.NUMBERS[len(a) + len(b)]


def test_vqa_answers_follow_from_the_scene():
  kinds, exists, n_turns, two = collections.Counter(), collections.Counter(), [], 0
  for i in range(2500):
    s = synthetic.make_sample(i, image_size=None)
    msgs = s.messages
    assert [m['role'] for m in msgs] == ['user', 'assistant'] * (len(msgs) // 2)
    assert msgs[0]['content'].startswith('<image>\n' * len(s.scenes))
    assert all('<image>' not in m['content'] for m in msgs[1:])
    two += len(s.scenes) == 2
    # no give-aways between turns: standalone kinds stay alone; shape follows only shapes
    if len(s.kinds) > 1:
      assert s.kinds[0] in ('colour', 'shape') and set(s.kinds[1:]) <= {'colour', 'shape'}
      assert all(k == 'colour' or set(s.kinds[:t]) == {'shape'}
                 for t, k in enumerate(s.kinds[1:], 1))
    n_turns.append(len(msgs) // 2)
    for kind, q, a in zip(s.kinds, msgs[::2], msgs[1::2]):
      question = q['content'].replace('<image>\n', '')
      assert a['content'] == oracle(s.scenes, question), (i, question)
      assert 1 <= len(a['content'].split()) <= 2
      kinds[kind] += 1
      if kind == 'exists':
        exists[a['content']] += 1
  assert set(kinds) == set(synthetic.QUESTION_KINDS)
  assert set(n_turns) == {1, 2, 3} and sum(n > 1 for n in n_turns) > 250
  assert 0.07 < two / 2500 < 0.13
  assert sum(exists.values()) >= 400 and abs(exists['yes'] / sum(exists.values()) - 0.5) < 0.07


def test_chance_accuracy():
  chance = synthetic.chance_accuracy(2000)
  assert abs(chance['exists'] - 0.5) < 0.07 and abs(chance['compare'] - 0.5) < 0.15
  assert abs(chance['colour'] - 0.25) < 0.07 and abs(chance['position'] - 0.25) < 0.07
  assert abs(chance['shape'] - 1 / 3) < 0.07
  assert chance['all'] < 0.45


def test_captions():
  s = synthetic.make_sample(3, kind='caption', image_size=None)
  objs = s.scenes[0]
  assert [o.quadrant for o in objs] == sorted({o.quadrant for o in objs})
  assert s.caption == synthetic.scene_caption(objs)
  scene = (synthetic.SceneObject('circle', 'red', 0), synthetic.SceneObject('square', 'blue', 1),
           synthetic.SceneObject('triangle', 'green', 3))
  assert synthetic.scene_caption(scene) == ('a red circle at the top left, a blue square at the '
                                            'top right and a green triangle at the bottom right.')
  assert synthetic.scene_caption(scene[:1]) == 'a red circle at the top left.'


def test_samples_are_deterministic_and_splits_disjoint():
  a = synthetic.make_sample(7, seed=1)
  b = synthetic.make_sample(7, seed=1)
  assert a.messages == b.messages and all((x == y).all() for x, y in zip(a.images, b.images))
  assert synthetic.make_sample(7, seed=1, image_size=None).messages == a.messages
  train = {synthetic.make_sample(i).images[0].tobytes() for i in range(100)}
  evals = {synthetic.make_sample(i, split='eval').images[0].tobytes() for i in range(100)}
  assert len(train) == len(evals) == 100 and not train & evals
  with pytest.raises(ValueError, match="unknown split 'test'"):
    synthetic.make_sample(0, split='test')


# ---- batches ----------------------------------------------------------------------------------

def test_batch_is_independent_of_slicing(vqa, tok_dir):
  full = vqa.batch(0, 8)
  part = synthetic.SyntheticTask(tok_lib.load_tokenizer(tok_dir), kind='vqa').batch(4, 4)
  for k in full:
    np.testing.assert_array_equal(full[k][4:], part[k], err_msg=k)
  other = synthetic.SyntheticTask(vqa.tokenizer, kind='vqa', seed=1).batch(0, 8)
  assert not np.array_equal(full['pixel_values'], other['pixel_values'])


def test_vqa_batch_format(vqa):
  tok, b = vqa.tokenizer, vqa.batch(0, 64)
  img_id = tok.convert_tokens_to_ids('<image>')
  shapes = {'input_ids': ((64, 128), np.int32), 'attention_mask': ((64, 128), np.int32),
            'loss_mask': ((64, 128), np.float32), 'turn_ids': ((64, 128), np.int32),
            'pixel_values': ((64, 2, 32, 32, 3), np.float32), 'num_images': ((64,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == shapes
  assert set(b['num_images']) == {1, 2}
  for row, s in enumerate(vqa.examples(0, 64)):
    ids, attn = b['input_ids'][row], b['attention_mask'][row]
    n = attn.sum()
    assert attn[:n].all() and not attn[n:].any()   # right padding
    assert (ids[n:] == tok.pad_token_id).all()
    assert not b['loss_mask'][row, n:].any() and not b['turn_ids'][row, n:].any()
    assert (ids == img_id).sum() == b['num_images'][row] * NIT == len(s.scenes) * NIT
    np.testing.assert_array_equal(b['loss_mask'][row], b['turn_ids'][row] > 0)
    answers = [m['content'] for m in s.messages[1::2]]
    assert b['turn_ids'][row].max() == len(answers)
    for k, answer in enumerate(answers, 1):
      assert trained_text(tok, ids, b['turn_ids'][row], k) == answer + '<|end|>'
    assert tok.decode(ids[:n]).startswith('<s><|user|>\n<image>')
    k = b['num_images'][row]
    np.testing.assert_allclose(b['pixel_values'][row, :k], images.normalize(np.stack(s.images)),
                               rtol=1e-6)
    assert not b['pixel_values'][row, k:].any()


def test_caption_batch(tok):
  task = synthetic.SyntheticTask(tok, kind='caption', max_len=48, max_images=1,
                                 image_mean=images.SIGLIP_MEAN, image_std=images.SIGLIP_STD)
  b = task.batch(10, 16)
  assert b['pixel_values'].shape == (16, 1, 32, 32, 3) and (b['num_images'] == 1).all()
  assert b['pixel_values'].min() >= -1 and b['pixel_values'].max() <= 1
  for row, s in enumerate(task.examples(10, 16)):
    ids = b['input_ids'][row]
    assert ids[0] == tok.bos_token_id
    assert (ids[1:1 + NIT] == tok.convert_tokens_to_ids('<image>')).all()
    assert tok.decode(ids[b['loss_mask'][row] == 1]) == s.caption + '</s>'
    assert set(b['turn_ids'][row]) == {0, 1}


def test_too_long_sample_names_its_index(tok):
  task = synthetic.SyntheticTask(tok, kind='vqa', max_len=30)
  lengths = [int(a.sum()) for a in synthetic.SyntheticTask(tok, max_len=256).batch(0, 8)[
      'attention_mask']]
  first = next(i for i, n in enumerate(lengths) if n > 30)
  with pytest.raises(ValueError, match=f"sample {first} of split 'train' .* {lengths[first]} "
                                       'tokens > max_len=30'):
    task.batch(0, 8)


def test_one_image_slot_means_no_two_image_samples(tok):
  task = synthetic.SyntheticTask(tok, max_images=1)
  assert all(len(s.scenes) == 1 for s in task.examples(0, 200, with_images=False))
