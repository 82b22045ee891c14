"""Convert between Hugging Face checkpoint directories and mllm_jax parameter checkpoints.

    python -m mllm_jax.convert --from-hf HF_DIR --out CKPT [--dtype bfloat16]
    python -m mllm_jax.convert --to-hf CKPT --out HF_DIR

--from-hf writes CKPT/params (orbax) and CKPT/mllm_jax_model.json; a training run starts from it
with `--config.model.init_from=CKPT`. --to-hf reads such a checkpoint, or a training workdir
(its latest checkpoint; the model comes from the run's saved config) and writes config.json +
safetensors that transformers loads. For a training run it also writes the run's tokenizer and a
processor with the run's image preprocessing (`config.data.image_norm`): LLaVA's (LLaVA-NeXT's,
with the run's AnyRes `image_grid_pinpoints`), or for a Q-Former run BLIP-2's / InstructBLIP's
(`num_query_tokens`; InstructBLIP's also with the Q-Former's tokenizer in
`qformer_tokenizer/`), so `AutoProcessor` /
`AutoTokenizer.from_pretrained(HF_DIR)` work.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m mllm_jax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--from-hf', metavar='HF_DIR', help='Hugging Face directory to import')
  src.add_argument('--to-hf', metavar='CKPT',
                   help='params checkpoint or training workdir to export')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--dtype', default=None,
                 help='parameter dtype (default: float32 on import, unchanged on export)')
  p.add_argument('--max-shard-size', type=int, default=5 * 2 ** 30,
                 help='bytes per safetensors shard on export (default 5 GiB)')
  return p.parse_args(argv)


def from_hf(src: str, out: str, dtype: str | None):
  import jax.numpy as jnp
  from mllm_jax.hf import api, pretrained
  model, params = api.load_hf(src, dtype=jnp.dtype(dtype or 'float32'))
  pretrained.save_params(out, model, params, pretrained.saved_image_norm(src),
                         pretrained.saved_pad_to_square(src))
  print(f'Wrote {out} ({type(model).__name__}); train from it with '
        f'--config.model.init_from={os.path.abspath(out)}')


def to_hf(src: str, out: str, dtype: str | None, max_shard_size: int):
  import flax
  import jax.numpy as jnp
  from mllm_jax.hf import api, pretrained
  cfg, tok_dir = pretrained.saved_model_config(src)
  model = api.build_model(cfg, jnp.dtype(dtype or getattr(cfg, 'param_dtype', 'float32')))
  abstract = flax.traverse_util.unflatten_dict(api.param_targets(model), sep='/')
  params = pretrained.restore_params(src, abstract)
  api.save_hf(model, params, out, max_shard_size)
  if tok_dir is not None:
    save_tokenizer_and_processor(src, tok_dir, cfg, out)
  print(f'Wrote {out} ({api.hf_config_for(model)[0]})')


def save_tokenizer_and_processor(src, tok_dir, cfg, out):
  """The run's tokenizer, and the processor transformers pairs with the exported model:
  LLaVA's (LLaVA-NeXT's for AnyRes tiles), or for a Q-Former connector BLIP-2's /
  InstructBLIP's (`blip_processor`), with the run's image preprocessing
  (`config.data.image_norm`)."""
  import transformers
  from mllm_jax.data import images
  from mllm_jax.hf import pretrained
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  tok.save_pretrained(out)
  v = getattr(cfg, 'vision', None)
  if v is None:
    return
  config = pretrained.run_config(src)
  norm = config.data.image_norm
  mean, std = images.NORMALIZATION[norm]
  if cfg.connector.kind == 'qformer':
    blip_processor(config, cfg, tok, mean, std).save_pretrained(out)
    return
  s = v.image_size   # the run's preprocessing (images.run_processor) in transformers' class
  tokens = dict(tokenizer=tok, patch_size=v.patch_size,
                vision_feature_select_strategy='default' if v.feature_select == 'patch' else 'full',
                num_additional_image_tokens=1 if v.has_cls else 0, chat_template=tok.chat_template)
  if cfg.image_grid_pinpoints:   # AnyRes tiles: the base tile is a shortest-edge resize + crop
    ip = transformers.LlavaNextImageProcessorPil(
        size={'shortest_edge': s}, crop_size={'height': s, 'width': s},
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
        image_mean=list(mean), image_std=list(std))
    transformers.LlavaNextProcessor(image_processor=ip, **tokens).save_pretrained(out)
    return
  resize = (dict(size={'shortest_edge': s}, crop_size={'height': s, 'width': s},
                 do_center_crop=True) if norm == 'clip' else
            dict(size={'height': s, 'width': s}, do_center_crop=False))
  ip = transformers.LlavaImageProcessorPil(
      do_pad=bool(config.data.get('pad_to_square', False)), image_mean=list(mean),
      image_std=list(std), **resize)
  transformers.LlavaProcessor(image_processor=ip, **tokens).save_pretrained(out)


def blip_processor(config, cfg, tok, mean, std):
  """transformers' Blip2Processor / InstructBlipProcessor for a Q-Former run: a
  BlipImageProcessor doing the run's resize (image_norm 'clip': shortest edge + centre crop;
  'siglip': to a square) and normalisation, the run's tokenizer, `num_query_tokens` and, for an
  instruction-aware Q-Former, its tokenizer (`config.data.qformer_tokenizer`, '' = the LLM's;
  saved in `qformer_tokenizer/`). The processor puts the query tokens in front of the
  tokenised text, which the exported model accepts wherever its image tokens are."""
  import transformers
  from mllm_jax.train import loop
  s = cfg.vision.image_size
  if config.data.image_norm == 'clip':
    resize = dict(size={'shortest_edge': s}, do_center_crop=True,
                  crop_size={'height': s, 'width': s})
  else:
    resize = dict(size={'height': s, 'width': s}, do_center_crop=False)
  ip = transformers.BlipImageProcessorPil(image_mean=list(mean), image_std=list(std), **resize)
  if config.data.get('pad_to_square'):
    print('note: the run padded images to a square (config.data.pad_to_square); '
          'BlipImageProcessor cannot, so pad images before the exported processor')
  image_id = tok.convert_tokens_to_ids('<image>')
  if image_id != cfg.image_token_id:   # the processor looks the image token up by this name
    raise ValueError(f'the run\'s tokenizer maps "<image>" to {image_id}, the model\'s '
                     f'image_token_id is {cfg.image_token_id}: the processor would put other '
                     'tokens where the model expects the image')
  q = cfg.connector.qformer
  if not q.instruction:
    return transformers.Blip2Processor(ip, tok, num_query_tokens=q.num_queries)
  qtok = loop.load_qformer_tokenizer(config, tok)
  return transformers.InstructBlipProcessor(ip, tok, qtok, num_query_tokens=q.num_queries)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.from_hf:
    from_hf(args.from_hf, args.out, args.dtype)
  else:
    to_hf(args.to_hf, args.out, args.dtype, args.max_shard_size)


if __name__ == '__main__':
  main()
