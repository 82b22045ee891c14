"""`python -m mllm_jax.train --config configs/X.py --workdir DIR [--config.a.b=value ...]`

Trains every stage in `config.train.stages`; rerunning the same command on a workdir with
checkpoints resumes from the latest one. A misspelt `--config.*` key is an error naming it.
SIGTERM / SIGINT save a checkpoint and exit with status 128 + signal number (143 / 130); a
failed checkpoint write or too many non-finite steps exit with status 1 and a one-line error.
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Path to a config file (get_config()).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl, TensorBoard.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl parsing, with a one-line error for a `--config.*` override of a key that doesn't exist."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    msg = str(e.args[0] if e.args else e).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
    sys.exit(f'Unknown config key: {msg} (in {" ".join(bad)})')


def job_main(job):
  """absl `main` running `job(config, workdir)` (the training job, or another entry point that
  takes the same flags) with quiet library logs and the exits described above."""
  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    for name in ('absl', 'jax', 'orbax'):
      logging.getLogger(name).setLevel(logging.WARNING)
    from mllm_jax.checkpoint import CheckpointError
    from mllm_jax.train import loop   # after flag parsing: keeps --help fast
    try:
      job(flags.FLAGS.config, flags.FLAGS.workdir)
    except loop.Interrupted as e:   # checkpoint saved: exit 128 + signal, as a killed job would
      print(e, flush=True)
      sys.exit(e.exit_code)
    except (CheckpointError, loop.NonFiniteError) as e:
      sys.exit(f'{type(e).__name__}: {e}')
  return main


def _train(config, workdir):
  from mllm_jax.train import loop
  loop.run(config, workdir)


main = job_main(_train)


if __name__ == '__main__':
  from mllm_jax import hostmem
  hostmem.reexec_with_huge_pages()
  app.run(main, flags_parser=parse_flags)
