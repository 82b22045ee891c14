"""The vocabulary projection paths: `logits_chunk` slices equal the full logits, and with
`config.train.logits_width` the compact loss (lm_head + CE only at each row's first W loss
positions) equals the full one when no row has more loss tokens, and the loop runs batches
that have such a row through the full-width step instead of cutting them short. (The train
step with both: test_train.py::test_logits_chunk_and_width_steps_equal_full_logits_step.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.train import loop, losses

from test_loop import TINY, load_demo, read_metrics


def loss_case():
  """hidden [4, 12, 5], a [5, 7] head, and rows with 6, 3, 0 and 1 loss tokens (position 0 is
  never a target); loss positions in the middle, at the end and alone."""
  rng = np.random.RandomState(0)
  hidden = jnp.asarray(rng.randn(4, 12, 5), jnp.float32)
  w = jnp.asarray(rng.randn(5, 7), jnp.float32)
  ids = jnp.asarray(rng.randint(0, 7, (4, 12)))
  loss_mask = np.zeros((4, 12), np.float32)
  loss_mask[0, 6:] = 1
  loss_mask[1, [2, 3, 9]] = 1
  loss_mask[3, 0] = 1                          # position 0: not a target
  loss_mask[3, 11] = 1
  return hidden, w, ids, loss_mask


def sums_and_grads(loss_fn, hidden, w):
  """loss_fn(hidden, w) -> dict(loss_sum, tokens, correct); also d loss_sum / d (hidden, w)."""
  fn = lambda h, w: (loss_fn(h, w)['loss_sum'], loss_fn(h, w))
  (_, sums), grads = jax.jit(jax.value_and_grad(fn, (0, 1), has_aux=True))(hidden, w)
  return sums, grads


@pytest.mark.parametrize('chunk', [1, 3, 16])
def test_chunked_loss_equals_full_logits_loss_and_grads(chunk):
  """logits_chunk: loss positions first, [B, chunk] slices, empty slices skipped: the same sums
  and gradients as the full [B, T, V] logits (T-1 = 11 positions: uneven last slice)."""
  hidden, w, ids, loss_mask = loss_case()
  a, ga = sums_and_grads(lambda h, w: losses.next_token_loss(h @ w, ids, loss_mask), hidden, w)
  b, gb = sums_and_grads(lambda h, w: losses.chunked_next_token_loss(
      h, lambda x: x @ w, ids, loss_mask, chunk), hidden, w)
  for key in ('loss_sum', 'tokens', 'correct'):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-6)
  assert float(a['tokens']) == 10
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(y, x, atol=1e-6)


def test_compact_loss_equals_full_loss_and_grads_when_rows_fit():
  hidden, w, ids, loss_mask = loss_case()
  assert losses.row_loss_tokens(loss_mask) == 6
  assert losses.row_loss_tokens(loss_mask[None]) == 6        # [accum, micro, T] host batches
  a, ga = sums_and_grads(lambda h, w: losses.next_token_loss(h @ w, ids, loss_mask), hidden, w)
  assert float(a['tokens']) == 10
  for width in (6, 9, 40):                     # the max row count, more, more than T - 1
    b, gb = sums_and_grads(lambda h, w: losses.compact_next_token_loss(
        h, lambda x: x @ w, ids, loss_mask, width), hidden, w)
    for key in ('loss_sum', 'tokens', 'correct'):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=f'{key}, width {width}')
    for x, y in zip(ga, gb):                   # d/d hidden and d/d head
      np.testing.assert_allclose(y, x, atol=1e-6, err_msg=f'width {width}')
    assert np.abs(np.asarray(ga[0])).max() > 1e-2


def test_compact_loss_drops_loss_tokens_beyond_width():
  """Below the max row count the compact loss silently keeps each row's first `width` loss
  tokens: the reason the loop checks `row_loss_tokens` before using it."""
  hidden, w, ids, loss_mask = loss_case()
  b = losses.compact_next_token_loss(hidden, lambda x: x @ w, ids, loss_mask, 4)
  assert float(b['tokens']) == 4 + 3 + 0 + 1   # row 0 cut from 6 to its first 4
  kept = loss_mask.copy()
  kept[0, 10:] = 0                             # row 0's loss positions 6..9 are its first 4
  ref = losses.next_token_loss(hidden @ w, ids, kept)
  np.testing.assert_allclose(b['loss_sum'], ref['loss_sum'], rtol=1e-6)
  full = losses.next_token_loss(hidden @ w, ids, loss_mask)
  assert abs(float(b['loss_sum']) - float(full['loss_sum'])) > 1e-3


def test_logits_width_config_errors(tmp_path):
  with pytest.raises(ValueError, match=r'config.train.logits_width=-1: expected an integer'):
    loop.logits_width(load_demo(**{'train.logits_width': -1}))
  with pytest.raises(ValueError, match=r'config.train.logits_width=-3'):   # before any model
    loop.run(load_demo(**{**TINY, 'train.logits_width': -3}), str(tmp_path))
  assert not (tmp_path / 'metrics.jsonl').exists()


@pytest.mark.slow
def test_loop_runs_batches_over_the_width_at_full_width(tmp_path, capsys):
  """SFT with a logits_width below some batches' max row count: those batches take the wide
  step (counted in train/over_logits_width, warned once), the others the compact one, the two
  steps hand the one state back and forth, and every logged number equals the run without it."""
  sft = {**TINY, 'train.stages': 'sft', 'sft.steps': 6, 'train.checkpoint_every': 0}
  # the batch of SFT step s is samples [16 s, 16 (s + 1)) of the built-in task
  config = load_demo(**sft)
  assert config.train.logits_width   # the demo sets one; replaced below
  tok = loop.load_tokenizer(config, str(tmp_path / 'tok'))
  task = loop.make_task(config, tok, loop.model_config(config, tok), 'vqa', 'train')
  masks = [task.batch(16 * s, 16)['loss_mask'] for s in range(6)]
  row_max = [losses.row_loss_tokens(m) for m in masks]
  width = sorted(set(row_max))[-2]              # some batches fit, some don't ([5, 6, 6, 5, 6, 4])
  over = [m > width for m in row_max]
  # the state passes from the compact step to the wide one and back
  assert (False, True) in zip(over, over[1:]) and (True, False) in zip(over, over[1:]), row_max
  expected = np.cumsum(over).tolist()

  loop.run(load_demo(**sft, **{'train.logits_width': 0}), str(tmp_path / 'full'))
  capsys.readouterr()
  loop.run(load_demo(**sft, **{'train.logits_width': width}), str(tmp_path / 'width'))
  out = capsys.readouterr().out
  assert out.count('config.train.logits_width') == 2, out   # the first time, and the summary
  assert f'loss tokens > config.train.logits_width={width}' in out
  a, b = read_metrics(tmp_path / 'full'), read_metrics(tmp_path / 'width')
  train_a, train_b = [m for m in a if 'loss' in m], [m for m in b if 'loss' in m]
  assert [m['step'] for m in train_b] == [m['step'] for m in train_a] == list(range(1, 7))
  assert 'train/over_logits_width' not in train_a[0]
  assert [m['train/over_logits_width'] for m in train_b] == expected
  # no batch lost a loss token, neither through the compact step nor the wide one
  assert [m['loss_tokens'] for m in train_b] == [float(m[:, 1:].sum()) for m in masks]
  for key in ('loss', 'grad_norm', 'token_accuracy', 'loss_tokens'):
    np.testing.assert_allclose([m[key] for m in train_b], [m[key] for m in train_a], rtol=2e-5,
                               err_msg=key)
  eval_a, eval_b = [m for m in a if 'eval/loss' in m], [m for m in b if 'eval/loss' in m]
  np.testing.assert_allclose(eval_b[-1]['eval/loss'], eval_a[-1]['eval/loss'], rtol=2e-5)


def test_demo_logits_width_covers_its_rows(tmp_path):
  """configs/demo.py sets logits_width so that its data never needs the full-width step (the
  fallback keeps other data exact; here it would only cost time), yet skips most positions."""
  config = load_demo()
  width = config.train.logits_width
  tok = loop.load_tokenizer(config, str(tmp_path))
  mcfg = loop.model_config(config, tok)
  for name in loop.stage_names(config):
    task = loop.make_task(config, tok, mcfg, config[name].task, 'train')
    mask = task.batch(0, 512)['loss_mask']
    assert 0 < losses.row_loss_tokens(mask) <= width < (mask.shape[1] - 1) / 2, name
