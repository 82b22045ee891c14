"""Numerical parity of mllm_jax.data.images with transformers' PIL-backend image processors.

transformers 5.x's `CLIPImageProcessor` & co. are torchvision-backed when torchvision is
installed (and fall back to PIL otherwise), so we compare with the explicit `*Pil` classes.
"""
import io

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data import images as I

transformers = pytest.importorskip('transformers')
from transformers import (CLIPImageProcessorPil, LlavaImageProcessorPil,  # noqa: E402
                          LlavaNextImageProcessorPil, SiglipImageProcessorPil)
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor  # noqa: E402

TOL = 1e-5
PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def _rgb(rng, h, w):
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _images():
  """Random noise (the hardest case for resampling) in many sizes and modes."""
  rng = np.random.default_rng(0)
  rgba = rng.integers(0, 256, (33, 47, 4), dtype=np.uint8)
  pal = Image.fromarray(rng.integers(0, 256, (21, 30), dtype=np.uint8), 'L').convert('P')
  pal.info['transparency'] = 7
  return {
      'portrait': _rgb(rng, 97, 41),
      'landscape': _rgb(rng, 40, 131),
      'square': _rgb(rng, 64, 64),
      'odd': _rgb(rng, 333, 500),  # 336 * 500 / 333 = 504.5... -> truncated to 504
      'tiny': _rgb(rng, 3, 2),
      'pixel': _rgb(rng, 1, 1),
      'strip': _rgb(rng, 1, 90),
      'L': Image.fromarray(rng.integers(0, 256, (50, 29), dtype=np.uint8), 'L'),
      'RGBA': Image.fromarray(rgba, 'RGBA'),
      'LA': Image.fromarray(rgba[..., 2:], 'LA'),
      'P+transparency': pal,
      'CMYK': _rgb(rng, 30, 45).convert('CMYK'),
  }


IMAGES = _images()


def _arrays():
  rng = np.random.default_rng(1)
  return {'hwc3': rng.integers(0, 256, (45, 31, 3), dtype=np.uint8),
          'hwc1': rng.integers(0, 256, (26, 40, 1), dtype=np.uint8),
          'hwc4': rng.integers(0, 256, (37, 37, 4), dtype=np.uint8)}


ARRAYS = _arrays()


def _hf(proc, image):
  """One image through a transformers processor -> channels-last float32."""
  kw = {} if isinstance(image, Image.Image) else {'input_data_format': 'channels_last'}
  out = proc(image, return_tensors='np', **kw)['pixel_values'][0]
  return np.moveaxis(out, -3, -1)


def _check(ours, hf, images):
  for name, image in images.items():
    want = _hf(hf, image)
    got = ours.preprocess(image, name)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.abs(got - want).max() <= TOL, (name, np.abs(got - want).max())


@pytest.mark.parametrize('size,crop', [(28, 28), (30, 24), (20, 28), (336, 336)])
def test_clip_parity(size, crop):
  hf = CLIPImageProcessorPil(size={'shortest_edge': size}, crop_size={'height': crop, 'width': crop})
  ours = I.ImageProcessor('clip', size=size, crop_size=crop)
  images = IMAGES if size < 100 else {k: IMAGES[k] for k in ('portrait', 'odd', 'RGBA')}
  _check(ours, hf, images)
  _check(ours, hf, ARRAYS)
  # A batch, and from_hf on the processor's own config dict.
  batch = [IMAGES['portrait'], IMAGES['landscape'], ARRAYS['hwc3']]
  want = np.stack([_hf(hf, im) for im in batch])
  got = I.ImageProcessor.from_hf(hf.to_dict())(batch)['pixel_values']
  assert got.dtype == np.float32 and got.shape == (3, crop, crop, 3)
  assert np.abs(got - want).max() <= TOL


def test_clip_matches_exactly_and_resize_rounding():
  hf = CLIPImageProcessorPil(size={'shortest_edge': 336}, crop_size={'height': 336, 'width': 336})
  ours = I.ImageProcessor('clip', size=336, crop_size=336)
  np.testing.assert_array_equal(ours.preprocess(IMAGES['odd']), _hf(hf, IMAGES['odd']))
  assert I.resize_output_size(333, 500, {'shortest_edge': 336}) == (336, 504)
  assert I.resize_output_size(500, 333, {'shortest_edge': 336}) == (504, 336)
  assert I.resize_output_size(3, 7, {'shortest_edge': 28}) == (28, 65)  # 65.33 truncated


def test_llava_pad_to_square_parity():
  hf = LlavaImageProcessorPil(size={'shortest_edge': 28}, crop_size={'height': 28, 'width': 28},
                              do_pad=True)
  ours = I.ImageProcessor.from_hf(hf.to_dict())
  assert ours.pad_to_square and ours.kind == 'clip'
  _check(ours, hf, IMAGES)
  _check(ours, hf, ARRAYS)
  assert I.pad_color(I.CLIP_MEAN) == (122, 116, 104)
  padded = I.pad_to_square(np.zeros((2, 5, 3), np.uint8), (122, 116, 104))
  assert padded.shape == (5, 5, 3) and (padded[0, 0] == (122, 116, 104)).all()
  assert (padded[1:3] == 0).all() and (padded[3:] != 0).all()  # top offset (5 - 2) // 2 = 1
  # Original LLaVA's flag in its config does the same.
  cfg = CLIPImageProcessorPil(size={'shortest_edge': 28}, crop_size=28).to_dict()
  assert I.ImageProcessor.from_hf({**cfg, 'image_aspect_ratio': 'pad'}).pad_to_square
  assert not I.ImageProcessor.from_hf(cfg).pad_to_square


@pytest.mark.parametrize('size', [28, 224])
def test_siglip_parity(size):
  hf = SiglipImageProcessorPil(size={'height': size, 'width': size})
  ours = I.ImageProcessor.from_hf(hf.to_dict())
  assert ours.kind == 'siglip' and not ours.do_center_crop and ours.mean == (0.5, 0.5, 0.5)
  images = IMAGES if size < 100 else {k: IMAGES[k] for k in ('landscape', 'L', 'pixel')}
  _check(ours, hf, images)
  _check(ours, hf, ARRAYS)
  assert ours([IMAGES['square']] * 2)['pixel_values'].shape == (2, size, size, 3)


def _llava_next_hf(**kw):
  return LlavaNextImageProcessorPil(size={'shortest_edge': 28},
                                    crop_size={'height': 28, 'width': 28},
                                    image_grid_pinpoints=PINPOINTS, **kw)


def test_llava_next_parity():
  hf = _llava_next_hf()
  ours = I.ImageProcessor.from_hf(hf.to_dict())
  assert ours.kind == 'llava_next' and ours.image_grid_pinpoints == ((28, 56), (56, 28), (56, 56))
  batch = list(IMAGES.values()) + list(ARRAYS.values())
  hf_out = {}
  for im in batch:  # one at a time: transformers can't batch PIL images with channels-last arrays
    kw = {} if isinstance(im, Image.Image) else {'input_data_format': 'channels_last'}
    o = hf(im, return_tensors='np', **kw)
    hf_out.setdefault('pixel_values', []).append(np.moveaxis(o['pixel_values'][0], 1, -1))
    hf_out.setdefault('image_sizes', []).append(o['image_sizes'][0])
  out = ours(batch)
  assert out['pixel_values'].shape[2:] == (28, 28, 3)
  for b, want in enumerate(hf_out['pixel_values']):
    n = out['num_tiles'][b]
    assert n == len(want)
    np.testing.assert_array_equal(out['image_sizes'][b], hf_out['image_sizes'][b])
    assert np.abs(out['pixel_values'][b, :n] - want).max() <= TOL, b
    assert (out['pixel_values'][b, n:] == 0).all()
  # transformers' own padded batch (PIL images only), channels-first -> channels-last.
  pil = list(IMAGES.values())
  want = hf(pil, return_tensors='np')
  got = ours(pil)
  assert got['pixel_values'].shape == np.moveaxis(want['pixel_values'], 2, -1).shape
  assert np.abs(got['pixel_values'] - np.moveaxis(want['pixel_values'], 2, -1)).max() <= TOL
  np.testing.assert_array_equal(got['image_sizes'], want['image_sizes'])
  unpadded = I.ImageProcessor.from_hf(hf.to_dict(), pad_tiles=False)(pil)['pixel_values']
  assert isinstance(unpadded, list) and [len(t) for t in unpadded] == list(got['num_tiles'])


def test_llava_next_full_size_parity():
  hf = LlavaNextImageProcessorPil(size={'shortest_edge': 336},
                                  crop_size={'height': 336, 'width': 336})
  ours = I.ImageProcessor.from_hf(hf.to_dict())
  assert ours.image_grid_pinpoints == I.LLAVA_NEXT_PINPOINTS
  image = IMAGES['odd']  # (333, 500) -> best (336, 672): 1 base + 2 tiles
  want = np.moveaxis(hf(image, return_tensors='np')['pixel_values'][0], 1, -1)
  got = ours.preprocess(image)
  assert got.shape == want.shape == (3, 336, 336, 3)
  assert np.abs(got - want).max() <= TOL


def test_select_best_resolution_and_tiles():
  from transformers.image_processing_utils import select_best_resolution
  rng = np.random.default_rng(2)
  pins = [list(p) for p in I.LLAVA_NEXT_PINPOINTS]
  for h, w in rng.integers(1, 2000, (300, 2)):
    assert I.select_best_resolution((h, w), pins) == tuple(select_best_resolution((h, w), pins))
  assert I.select_best_resolution((30, 50), PINPOINTS) == (56, 56)
  tiles = I.anyres_tiles(np.full((30, 50, 3), 255, np.uint8), PINPOINTS, 28, (28, 28))
  assert len(tiles) == 5 and all(t.shape == (28, 28, 3) for t in tiles)
  for h, w in [(30, 50), (60, 20), (28, 28), (100, 30)]:   # the count without making the tiles
    made = I.anyres_tiles(np.zeros((h, w, 3), np.uint8), PINPOINTS, 28, (28, 28))
    assert I.anyres_num_tiles((h, w), PINPOINTS, 28) == len(made)
  # (30, 50) fits (56, 56) as (34, 56): rows 11..44 are image, the rest black padding.
  assert I.fit_size((30, 50), (56, 56)) == (34, 56)
  assert (tiles[1][:11] == 0).all() and (tiles[1][11:] == 255).all()


def _hf_token_counter(patch_size, tile, pinpoints, num_additional, strategy):
  proc = LlavaNextProcessor.__new__(LlavaNextProcessor)  # no tokenizer needed for the count
  proc.image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints)
  proc.patch_size, proc.num_additional_image_tokens = patch_size, num_additional
  proc.vision_feature_select_strategy = strategy

  def count(h, w):
    n = proc._get_number_of_features(h, w, tile, tile)
    return n - 1 if strategy == 'default' else n
  return count


def test_llava_next_num_image_tokens():
  # The reference check: 2x2 grid, 5 tiles, 8 unpadded + 2 newlines + 4 base = 14.
  assert I.llava_next_num_image_tokens((30, 50), PINPOINTS, (28, 28), 14) == 14
  assert I.llava_next_num_image_tokens((30, 50), PINPOINTS, (28, 28), 14, 0, 'full') == 14
  assert I.anyres_num_features((30, 50), PINPOINTS, (28, 28), 14) == (8, 2, 4)
  ours = I.ImageProcessor('llava_next', size=28, crop_size=28, image_grid_pinpoints=PINPOINTS)
  assert ours.num_image_tokens((30, 50), 14) == 14
  # Base tile of a CLIP-L/14-336 tower: 576 (plain LLaVA count, CLS dropped).
  assert I.ImageProcessor('clip', size=336, crop_size=336).num_image_tokens((1, 1), 14) == 576
  assert I.anyres_num_features((336, 336), I.LLAVA_NEXT_PINPOINTS, (336, 336), 14)[2] == 576
  rng = np.random.default_rng(3)
  sizes = [tuple(s) for s in rng.integers(1, 1500, (200, 2))] + [(336, 336), (672, 1344), (1, 999)]
  for cfg in [(14, 336, I.LLAVA_NEXT_PINPOINTS, 1, 'default'), (14, 28, PINPOINTS, 0, 'full'),
              (16, 384, [[384, 768], [768, 384], [768, 768]], 0, 'full')]:
    patch, tile, pins, extra, strategy = cfg
    hf_count = _hf_token_counter(patch, tile, [list(p) for p in pins], extra, strategy)
    for h, w in sizes:
      got = I.llava_next_num_image_tokens((h, w), pins, (tile, tile), patch, extra, strategy)
      assert got == hf_count(h, w), (cfg, h, w)


def test_from_hf_legacy_and_unknown_configs():
  # Old hub configs: int sizes and a feature-extractor type (openai/clip-vit-large-patch14-336).
  legacy = {'crop_size': 28, 'do_center_crop': True, 'do_normalize': True, 'do_resize': True,
            'feature_extractor_type': 'CLIPFeatureExtractor', 'image_mean': list(I.CLIP_MEAN),
            'image_std': list(I.CLIP_STD), 'resample': 3, 'size': 28}
  ours = I.ImageProcessor.from_hf(legacy)
  assert ours.size == {'shortest_edge': 28} and ours.crop_size == {'height': 28, 'width': 28}
  _check(ours, CLIPImageProcessorPil.from_dict(legacy), {'p': IMAGES['portrait']})
  # Resampling taken from the config: bilinear differs from bicubic and still matches.
  bilinear = CLIPImageProcessorPil(size={'shortest_edge': 28}, crop_size=28, resample=2)
  _check(I.ImageProcessor.from_hf(bilinear.to_dict()), bilinear, {'p': IMAGES['landscape']})
  with pytest.raises(ValueError, match='Qwen2VLImageProcessor'):
    I.ImageProcessor.from_hf({'image_processor_type': 'Qwen2VLImageProcessor'})
  with pytest.raises(ValueError, match='unknown ImageProcessor fields'):
    I.ImageProcessor.from_hf(legacy, pad_to_sqare=True)
  with pytest.raises(ValueError, match='kind'):
    I.ImageProcessor('vit')


def test_load_image_matches_transformers(tmp_path):
  rng = np.random.default_rng(4)
  path = tmp_path / 'rot.jpg'
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees on display
  Image.fromarray(rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)).save(path, exif=exif)
  got = np.asarray(I.load_image(path))
  assert got.shape == (36, 20, 3)
  np.testing.assert_array_equal(got, np.asarray(hf_load_image(str(path))))
  png = tmp_path / 'alpha.png'
  IMAGES['RGBA'].save(png)
  np.testing.assert_array_equal(np.asarray(I.load_image(png)), np.asarray(hf_load_image(str(png))))
  # Paths go through the processor too.
  ours = I.ImageProcessor('siglip', size=28)
  np.testing.assert_array_equal(ours([str(png)])['pixel_values'][0],
                                ours.preprocess(I.load_image(png)))


def test_bad_inputs(tmp_path):
  ours = I.ImageProcessor('clip', size=28, crop_size=28)
  garbage = tmp_path / 'garbage.png'
  garbage.write_bytes(b'not an image at all')
  buf = io.BytesIO()
  IMAGES['odd'].save(buf, format='PNG')
  truncated = tmp_path / 'truncated.png'
  truncated.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  for path in [garbage, truncated, tmp_path / 'missing.jpg']:
    with pytest.raises(ValueError, match=path.name):
      ours([IMAGES['square'], str(path)])
  for bad in [np.zeros((3, 28, 28), np.uint8), np.zeros((4, 5, 6, 7, 3), np.uint8),
              np.zeros((28, 28, 2), np.uint8), np.zeros((0, 5, 3), np.uint8)]:
    with pytest.raises(ValueError, match=r'image 1.*shape'):
      ours([ARRAYS['hwc3'], bad])
  with pytest.raises(ValueError, match='float32'):
    ours([np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(ValueError, match='image 0'):
    I.ImageProcessor('clip', do_convert_rgb=False)([IMAGES['L']])
  with pytest.raises(ValueError, match='differ in shape'):
    I.ImageProcessor('clip', size=28, do_center_crop=False)([IMAGES['portrait'], IMAGES['square']])
