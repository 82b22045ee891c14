"""Image preprocessing for the vision towers we load from Hugging Face, in numpy + PIL.

Ports of transformers' PIL-backend ("slow") image processors, numerically identical to them:

  kind='clip'        CLIPImageProcessor / LlavaImageProcessor: resize the shortest edge, centre
                     crop, rescale 1/255, normalise; LLaVA-1.5's optional pad-to-square first.
  kind='siglip'      SiglipImageProcessor: resize to (H, W), rescale, normalise (mean = std = 0.5).
  kind='blip'        BlipImageProcessor (BLIP-2, InstructBLIP): resize to (H, W) by default (a
                     shortest-edge size + centre crop when configured so), CLIP normalisation.
  kind='llava_next'  LlavaNextImageProcessor (AnyRes): pick the best grid resolution, resize
                     keeping the aspect ratio, pad, cut into tiles, prepend the whole image.

Every step works on uint8 pixels with PIL exactly as transformers does (PIL bicubic on uint8,
the same integer rounding of the resized edge), then rescales in float64 and normalises in
float32 as transformers does, so outputs match bit for bit. Outputs are channels-last
([..., H, W, 3]); transformers' are channels-first.

Since transformers 5.x `CLIPImageProcessor` & co. default to a torchvision backend (when
torchvision is installed) whose antialiased tensor bicubic differs from PIL's by up to a few
uint8 levels; we match the PIL backend (`CLIPImageProcessorPil`, ...), which is what the
original LLaVA code and older transformers used.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# `config.data.image_norm` -> (mean, std)
NORMALIZATION = {'clip': (CLIP_MEAN, CLIP_STD), 'siglip': (SIGLIP_MEAN, SIGLIP_STD)}


def normalize(image: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """uint8 [..., H, W, 3] in 0..255 -> float32 [..., H, W, 3] = (x / 255 - mean) / std."""
  if image.shape[-1] != 3:
    raise ValueError(f'expected channels-last RGB images [..., H, W, 3], got shape {image.shape}')
  # One fused scale + shift: x * (1 / (255 std)) - mean / std.
  scale = 1.0 / (255.0 * np.asarray(std, np.float32))
  shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  return image.astype(np.float32) * scale - shift


# PIL resampling filters by name; HF configs store the integer (3 = bicubic).
RESAMPLING = {'nearest': 0, 'lanczos': 1, 'bilinear': 2, 'bicubic': 3, 'box': 4, 'hamming': 5}
# LLaVA-NeXT's default AnyRes grid, (H, W).
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
KINDS = ('clip', 'siglip', 'llava_next', 'blip')
# transformers image processor class (minus Fast/Pil suffix) -> kind.
HF_PROCESSOR_KINDS = {'CLIPImageProcessor': 'clip', 'LlavaImageProcessor': 'clip',
                      'SiglipImageProcessor': 'siglip', 'LlavaNextImageProcessor': 'llava_next',
                      'BlipImageProcessor': 'blip'}


# ----------------------------------------------------------------------------- input

def load_image(path: str | os.PathLike) -> Image.Image:
  """Reads an image file as transformers' `load_image` and LLaVA's loaders do.

  EXIF orientation is applied and the result converted to RGB (an alpha channel is dropped, not
  composited: that is what `load_image(...).convert('RGB')` does).

  Raises:
    ValueError naming the file if it is missing, unreadable, truncated or not an image.
  """
  try:
    with Image.open(path) as image:
      image.load()  # decode now: a truncated file fails here, not later in a worker
      image = ImageOps.exif_transpose(image)
      return image.convert('RGB')
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f'cannot read image file {os.fspath(path)!r}: {e}') from e


def to_rgb(image: Image.Image | np.ndarray, convert: bool = True,
           name: str = 'image') -> np.ndarray:
  """A PIL image or uint8 array -> uint8 [H, W, 3], as transformers' `convert_to_rgb`.

  Args:
    image: PIL image of any mode, or a uint8 array [H, W] or [H, W, C] with C in {1, 3, 4}
      (channels-last).
    convert: `do_convert_rgb`. PIL images with transparency are composited onto white, other
      modes converted by PIL; arrays: 1 channel is repeated, 4 channels composited onto white.
      If False the image must already be 3-channel.
    name: what to call the image in error messages.
  Raises:
    ValueError on a wrong dtype or shape.
  """
  if isinstance(image, Image.Image):
    if convert:
      if 'A' in image.getbands() or image.info.get('transparency') is not None:
        rgba = image.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert('RGB')
      else:
        image = image.convert('RGB')
    array = np.asarray(image)
  elif isinstance(image, np.ndarray):
    array = image
    if array.dtype != np.uint8:
      raise ValueError(f'{name}: expected a uint8 array, got dtype {array.dtype} '
                       f'(shape {array.shape})')
    if array.ndim == 2:
      array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
      raise ValueError(f'{name}: expected a channels-last uint8 array [H, W] or [H, W, C] with C '
                       f'in (1, 3, 4), got shape {image.shape}')
    if convert and array.shape[-1] == 1:
      array = np.repeat(array, 3, axis=-1)
    elif convert and array.shape[-1] == 4:
      alpha = array[..., 3:4] / 255
      array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  else:
    raise ValueError(f'{name}: expected a PIL image, a uint8 array or a file path, '
                     f'got {type(image).__name__}')
  if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
    raise ValueError(f'{name}: expected an RGB image (pass do_convert_rgb=True to convert), got '
                     f'shape {array.shape} dtype {array.dtype}')
  if array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f'{name}: empty image of shape {array.shape}')
  return array


# ----------------------------------------------------------------------------- geometry

def size_dict(size: int | Sequence[int] | Mapping[str, int],
              default_to_square: bool) -> dict[str, int]:
  """transformers' `get_size_dict`: an int is a square (default_to_square) or the shortest edge;
  a pair is (H, W). Returns {'shortest_edge': n} or {'height': h, 'width': w}."""
  if isinstance(size, Mapping):
    d = {k: int(v) for k, v in size.items()}
  elif isinstance(size, (int, np.integer)):
    d = ({'height': int(size), 'width': int(size)} if default_to_square
         else {'shortest_edge': int(size)})
  elif isinstance(size, Sequence) and len(size) == 2:
    d = {'height': int(size[0]), 'width': int(size[1])}
  else:
    raise ValueError(f'size must be an int, (height, width) or a dict, got {size!r}')
  if set(d) not in ({'shortest_edge'}, {'height', 'width'}) or min(d.values()) < 1:
    raise ValueError(f"size must be {{'shortest_edge': n}} or {{'height': h, 'width': w}} with "
                     f'positive values, got {d}')
  return d


def resize_output_size(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
  """(H, W) after resizing to `size`. For a shortest edge the long edge is truncated, as in
  transformers' `get_resize_output_image_size`: int(shortest_edge * long / short)."""
  if 'shortest_edge' in size:
    short, long = (width, height) if width <= height else (height, width)
    new_short = size['shortest_edge']
    new_long = int(new_short * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)
  return size['height'], size['width']


def resize(image: np.ndarray, size_hw: tuple[int, int], resample: int = RESAMPLING['bicubic']
           ) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [h, w, 3] with PIL (as transformers' PIL backend does)."""
  h, w = size_hw
  if (h, w) == image.shape[:2]:
    return image  # PIL returns an unchanged copy
  return np.asarray(Image.fromarray(image).resize((w, h), resample=resample))


def center_crop(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """[H, W, C] -> [h, w, C] centred (top/left rounded down); zero-padded where the image is
  smaller, exactly as transformers' `center_crop`."""
  height, width = image.shape[:2]
  crop_h, crop_w = size_hw
  top, left = (height - crop_h) // 2, (width - crop_w) // 2
  if top >= 0 and left >= 0:
    return image[top:top + crop_h, left:left + crop_w]
  new_h, new_w = max(crop_h, height), max(crop_w, width)
  canvas = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
  top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
  canvas[top_pad:top_pad + height, left_pad:left_pad + width] = image
  top, left = top + top_pad, left + left_pad
  return canvas[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def pad_to_square(image: np.ndarray, background: Sequence[int]) -> np.ndarray:
  """LLaVA-1.5 `expand2square`: pad [H, W, 3] to [L, L, 3], L = max(H, W), image centred
  (offset rounded down), padding filled with `background` (uint8 per channel)."""
  height, width = image.shape[:2]
  if height == width:
    return image
  side = max(height, width)
  out = np.empty((side, side, image.shape[2]), image.dtype)
  out[...] = np.asarray(background, image.dtype)
  top, left = (side - height) // 2, (side - width) // 2
  out[top:top + height, left:left + width] = image
  return out


def pad_color(mean: Sequence[float]) -> tuple[int, ...]:
  """The pad-to-square fill of LLaVA-1.5 and transformers: int(255 * mean) per channel."""
  return tuple(int(m * 255) for m in mean)


def rescale_normalize(image: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None,
                      rescale_factor: float | None = 1 / 255) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x * rescale_factor - mean) / std.

  Bit-identical to transformers: the rescale runs in float64 and is cast to float32, the
  normalisation runs in float32. (`normalize` above fuses both into one float32 multiply-add,
  which differs by ~1e-7.) Pass None to skip a step.
  """
  if rescale_factor is not None:
    x = (image.astype(np.float64) * rescale_factor).astype(np.float32)
  else:
    x = image.astype(np.float32)
  if mean is not None:
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return x


# ----------------------------------------------------------------------------- AnyRes

def select_best_resolution(image_size: tuple[int, int],
                           pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """LLaVA-NeXT's choice of grid resolution for an image (everything (H, W)).

  Maximises the effective resolution min(area after fitting inside the candidate, original
  area), then minimises the wasted area; ties keep the first candidate.
  """
  height, width = image_size
  best, best_effective, best_wasted = None, 0, float('inf')
  for cand_h, cand_w in pinpoints:
    scale = min(cand_w / width, cand_h / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    wasted = cand_w * cand_h - effective
    if effective > best_effective or (effective == best_effective and wasted < best_wasted):
      best, best_effective, best_wasted = (cand_h, cand_w), effective, wasted
  if best is None:
    raise ValueError(f'no usable grid pinpoint for image size {image_size} in {pinpoints}')
  return best


def fit_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
  """(H, W) of the image scaled to fit inside `target` keeping its aspect ratio; the scaled
  edge is rounded up (transformers' `get_patch_output_size`)."""
  height, width = image_size
  target_h, target_w = target
  scale_w, scale_h = target_w / width, target_h / height
  if scale_w < scale_h:
    return min(math.ceil(height * scale_w), target_h), target_w
  return target_h, min(math.ceil(width * scale_h), target_w)


def anyres_tiles(image: np.ndarray, pinpoints: Sequence[Sequence[int]], tile: int,
                 base_size: tuple[int, int], resample: int = RESAMPLING['bicubic']
                 ) -> list[np.ndarray]:
  """LLaVA-NeXT AnyRes split of a uint8 [H, W, 3] image, before per-tile resize/crop/normalise.

  Resizes the image into the best pinpoint keeping its aspect ratio, centres it on a black
  (zero) canvas of that size, and cuts it row-major into `tile` x `tile` tiles. The whole image
  resized to `base_size` (not keeping the aspect ratio) is prepended as tile 0.

  Returns:
    [base, tile_00, tile_01, ...], uint8 arrays; 1 + (best_h / tile) * (best_w / tile) of them.
  """
  best = select_best_resolution(image.shape[:2], pinpoints)
  new_h, new_w = fit_size(image.shape[:2], best)
  resized = resize(image, (new_h, new_w), resample)
  top, left = (best[0] - new_h) // 2, (best[1] - new_w) // 2
  canvas = np.zeros(best + (image.shape[2],), np.uint8)
  canvas[top:top + new_h, left:left + new_w] = resized
  tiles = [canvas[i:i + tile, j:j + tile]
           for i in range(0, best[0], tile) for j in range(0, best[1], tile)]
  return [resize(image, base_size, resample)] + tiles


def anyres_num_tiles(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]],
                     tile: int) -> int:
  """Tiles of an AnyRes image of `image_size` (H, W): the base tile + the best pinpoint's grid."""
  best_h, best_w = select_best_resolution(image_size, pinpoints)
  return 1 + (best_h // tile) * (best_w // tile)


def anyres_num_features(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]],
                        tile_size: tuple[int, int], patch_size: int) -> tuple[int, int, int]:
  """(unpadded grid features, newline features, base features) of an AnyRes image, as the
  LLaVA-NeXT processor counts them (`_get_number_of_features` without the additional tokens).

  The grid of tiles has (best_h // tile_h * patches_h) x (best_w // tile_w * patches_w) patch
  features; `unpad_image` then drops the rows (or columns) that only saw padding, with the same
  round(., 7) as the model, and one newline feature follows each remaining row.
  """
  height, width = image_size
  tile_h, tile_w = tile_size
  best_h, best_w = select_best_resolution(image_size, pinpoints)
  patches_h, patches_w = tile_h // patch_size, tile_w // patch_size
  cur_h, cur_w = patches_h * (best_h // tile_h), patches_w * (best_w // tile_w)
  if width / height > cur_w / cur_h:
    new_h = int(round(height * (cur_w / width), 7))
    cur_h -= (cur_h - new_h) // 2 * 2
  else:
    new_w = int(round(width * (cur_h / height), 7))
    cur_w -= (cur_w - new_w) // 2 * 2
  return cur_h * cur_w, cur_h, patches_h * patches_w


def llava_next_num_image_tokens(image_size: tuple[int, int],
                                pinpoints: Sequence[Sequence[int]] = LLAVA_NEXT_PINPOINTS,
                                tile_size: tuple[int, int] = (336, 336), patch_size: int = 14,
                                num_additional_image_tokens: int = 1,
                                vision_feature_select_strategy: str = 'default') -> int:
  """Number of `<image>` tokens LlavaNextProcessor expands one image of `image_size` (H, W) to.

  = unpadded grid + one newline per grid row + base tile (patches + additional tokens, e.g.
  +1 for CLIP's CLS), minus 1 under the 'default' strategy (which drops CLS). The defaults are
  those of the llava-v1.6 hub processors (CLIP-L/14-336: base tile 576).
  """
  unpadded, newlines, base = anyres_num_features(image_size, pinpoints, tile_size, patch_size)
  n = unpadded + newlines + base + num_additional_image_tokens
  return n - 1 if vision_feature_select_strategy == 'default' else n


def pad_tiles(tiles: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Per-image [n_i, H, W, C] -> ([B, max n_i, H, W, C] zero-padded, num_tiles int32 [B])."""
  num = np.asarray([len(t) for t in tiles], np.int32)
  out = np.zeros((len(tiles), int(num.max())) + tiles[0].shape[1:], tiles[0].dtype)
  for b, t in enumerate(tiles):
    out[b, :len(t)] = t
  return out, num


# ----------------------------------------------------------------------------- processor

# transformers' class defaults per kind (so ImageProcessor(kind) == XImageProcessor()).
_DEFAULTS = {
    'clip': dict(size={'shortest_edge': 224}, crop_size={'height': 224, 'width': 224},
                 do_center_crop=True, mean=CLIP_MEAN, std=CLIP_STD),
    'siglip': dict(size={'height': 224, 'width': 224}, crop_size=None, do_center_crop=False,
                   mean=SIGLIP_MEAN, std=SIGLIP_STD),
    'llava_next': dict(size={'shortest_edge': 224}, crop_size={'height': 224, 'width': 224},
                       do_center_crop=True, mean=CLIP_MEAN, std=CLIP_STD),
    'blip': dict(size={'height': 384, 'width': 384}, crop_size=None, do_center_crop=False,
                 mean=CLIP_MEAN, std=CLIP_STD),
}


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """Config-driven image preprocessing; `__call__` mirrors the transformers processor of `kind`.

  Fields left None take transformers' class defaults for `kind`. `size`/`crop_size` accept an
  int, (H, W) or a dict as in `preprocessor_config.json` (an int size is the shortest edge for
  'clip'/'llava_next' and a square for 'siglip' / 'blip'; an int crop size is a square).
  `pad_to_square` is LLaVA-1.5's `image_aspect_ratio='pad'` (LlavaImageProcessor `do_pad`);
  `pad_tiles` is LlavaNextImageProcessor's `do_pad` (pad the tile axis to a batch).
  """
  kind: str = 'clip'
  size: Any = None
  crop_size: Any = None
  do_resize: bool = True
  do_center_crop: bool | None = None
  resample: int | str = 'bicubic'
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None
  do_convert_rgb: bool = True
  pad_to_square: bool = False
  image_grid_pinpoints: Sequence[Sequence[int]] = LLAVA_NEXT_PINPOINTS
  pad_tiles: bool = True

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'unknown image processor kind {self.kind!r}; expected one of {KINDS}')
    d = _DEFAULTS[self.kind]
    fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
    fix('size', size_dict(d['size'] if self.size is None else self.size,
                          default_to_square=self.kind in ('siglip', 'blip')))
    crop = d['crop_size'] if self.crop_size is None else self.crop_size
    fix('crop_size', None if crop is None else size_dict(crop, default_to_square=True))
    if self.do_center_crop is None:
      fix('do_center_crop', d['do_center_crop'])
    if self.do_center_crop and self.crop_size is None:
      raise ValueError(f'{self.kind}: do_center_crop needs a crop_size')
    for field in ('mean', 'std'):  # a scalar (allowed in HF configs) is per channel
      value = d[field] if getattr(self, field) is None else getattr(self, field)
      value = (value,) * 3 if isinstance(value, (int, float)) else value
      fix(field, tuple(float(v) for v in value))
    if len(self.mean) != 3 or len(self.std) != 3:
      raise ValueError(f'mean/std must have 3 values, got {self.mean} / {self.std}')
    if isinstance(self.resample, str):
      if self.resample.lower() not in RESAMPLING:
        raise ValueError(f'unknown resample {self.resample!r}; expected one of {list(RESAMPLING)}')
      fix('resample', RESAMPLING[self.resample.lower()])
    fix('resample', int(self.resample))
    fix('image_grid_pinpoints', tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints))
    if self.kind == 'llava_next' and not self.image_grid_pinpoints:
      raise ValueError('llava_next needs image_grid_pinpoints')

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], **overrides) -> 'ImageProcessor':
    """From a `preprocessor_config.json` dict, so a checkpoint's own settings are used.

    The kind comes from `image_processor_type` (or the older `feature_extractor_type`;
    Fast/Pil suffixes ignored) unless `kind=` is given. `overrides` replace fields, e.g.
    `pad_to_square=True` for LLaVA-1.5 stage 2 with a CLIPImageProcessor config. A config key
    `image_aspect_ratio: 'pad'` (original LLaVA) also turns on `pad_to_square`.
    """
    name = hf_processor_class(config)
    kind = overrides.pop('kind', None) or HF_PROCESSOR_KINDS.get(name)
    if kind is None:
      raise ValueError(f'unsupported image processor type {name or None!r}; expected one of '
                       f'{sorted(HF_PROCESSOR_KINDS)} or an explicit kind=')
    kw: dict[str, Any] = {'kind': kind}
    if config.get('size') is not None:
      # transformers reads an int size with the class's default_to_square (False for ours).
      kw['size'] = size_dict(config['size'],
                             bool(config.get('default_to_square', kind == 'blip')))
    for ours, theirs in [('crop_size', 'crop_size'), ('do_resize', 'do_resize'),
                         ('do_center_crop', 'do_center_crop'), ('resample', 'resample'),
                         ('do_rescale', 'do_rescale'), ('rescale_factor', 'rescale_factor'),
                         ('do_normalize', 'do_normalize'), ('mean', 'image_mean'),
                         ('std', 'image_std'), ('do_convert_rgb', 'do_convert_rgb'),
                         ('image_grid_pinpoints', 'image_grid_pinpoints')]:
      if config.get(theirs) is not None:
        kw[ours] = config[theirs]
    if config.get('do_pad') is not None:
      # Only LLaVA's processor pads to a square; CLIP's `do_pad` pads a batch to its largest
      # image, a no-op after the fixed-size crop.
      if name == 'LlavaImageProcessor':
        kw['pad_to_square'] = bool(config['do_pad'])
      elif kind == 'llava_next':
        kw['pad_tiles'] = bool(config['do_pad'])
    if config.get('image_aspect_ratio') == 'pad':
      kw['pad_to_square'] = True
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'unknown ImageProcessor fields {sorted(unknown)}')
    kw.update(overrides)
    return cls(**kw)

  @property
  def tile_size(self) -> tuple[int, int]:
    """(H, W) of one output image / tile."""
    if self.do_center_crop:
      return self.crop_size['height'], self.crop_size['width']
    if 'shortest_edge' in self.size:
      raise ValueError('the output size depends on the image: shortest-edge resize without crop')
    return self.size['height'], self.size['width']

  def _finish(self, image: np.ndarray) -> np.ndarray:
    """Resize, crop, rescale and normalise one uint8 [H, W, 3] image -> [h, w, 3]."""
    if self.do_resize:
      image = resize(image, resize_output_size(*image.shape[:2], self.size), self.resample)
    if self.do_center_crop:
      image = center_crop(image, (self.crop_size['height'], self.crop_size['width']))
    return rescale_normalize(image, self.mean if self.do_normalize else None, self.std,
                             self.rescale_factor if self.do_rescale else None)

  def rgb(self, image: Image.Image | np.ndarray | str | os.PathLike,
          name: str = 'image') -> np.ndarray:
    """Loads (a path) and converts one input image to uint8 [H, W, 3] (see `to_rgb`)."""
    if isinstance(image, (str, os.PathLike)):
      name, image = os.fspath(image), load_image(image)
    return to_rgb(image, self.do_convert_rgb, name)

  def preprocess(self, image: Image.Image | np.ndarray | str | os.PathLike,
                 name: str = 'image') -> np.ndarray:
    """One image -> float32 [H, W, 3] ('clip', 'siglip', 'blip') or [n_tiles, H, W, 3]
    ('llava_next').

    Args:
      image: PIL image (any mode), uint8 array [H, W] / [H, W, C] (C in 1, 3, 4), or a file path.
      name: how to name the image in errors (a path names itself).
    Raises:
      ValueError naming the file or the shape of a bad image.
    """
    return self.preprocess_rgb(self.rgb(image, name))

  def preprocess_rgb(self, pixels: np.ndarray) -> np.ndarray:
    """`preprocess` of an already converted uint8 [H, W, 3] image."""
    if self.kind != 'llava_next':
      if self.pad_to_square:
        pixels = pad_to_square(pixels, pad_color(self.mean))
      return self._finish(pixels)
    if 'shortest_edge' in self.size:
      base = (self.size['shortest_edge'],) * 2
    else:
      base = (self.size['height'], self.size['width'])
    tile = self.crop_size['height'] if self.crop_size is not None else base[0]
    tiles = anyres_tiles(pixels, self.image_grid_pinpoints, tile, base, self.resample)
    return np.stack([self._finish(t) for t in tiles])

  def __call__(self, images) -> dict[str, Any]:
    """A list of images (PIL, uint8 arrays, or paths) -> batch dict, channels-last.

    Returns:
      'clip'/'siglip'/'blip': {'pixel_values': float32 [N, H, W, 3]}.
      'llava_next': {'pixel_values': float32 [N, max_tiles, H, W, 3] (zero tiles after each
        image's own; a list of [n_i, H, W, 3] if pad_tiles=False), 'num_tiles': int32 [N],
        'image_sizes': int64 [N, 2] original (H, W)}.
    Raises:
      ValueError naming the file, or the index and shape, of a bad image.
    """
    if isinstance(images, (Image.Image, str, os.PathLike)) or (
        isinstance(images, np.ndarray) and images.ndim < 4):
      images = [images]
    if len(images) == 0:
      raise ValueError('no images to preprocess')
    rgbs = [self.rgb(image, f'image {i}') for i, image in enumerate(images)]
    outs = [self.preprocess_rgb(p) for p in rgbs]
    if self.kind != 'llava_next':
      shapes = {o.shape for o in outs}
      if len(shapes) > 1:
        raise ValueError(f'preprocessed images differ in shape {sorted(shapes)}; '
                         'set crop_size or a (height, width) size to batch them')
      return {'pixel_values': np.stack(outs)}
    return {'pixel_values': pad_tiles(outs)[0] if self.pad_tiles else outs,
            'num_tiles': np.asarray([len(o) for o in outs], np.int32),
            'image_sizes': np.asarray([p.shape[:2] for p in rgbs], np.int64)}

  def num_image_tokens(self, image_size: tuple[int, int], patch_size: int,
                       num_additional_image_tokens: int = 1,
                       vision_feature_select_strategy: str = 'default') -> int:
    """`<image>` tokens the LLaVA / LLaVA-NeXT processor expands one image of (H, W) to.

    'clip'/'siglip': (h // P) * (w // P) + additional - (1 if 'default'), independent of the
    image; 'llava_next': see `llava_next_num_image_tokens`. Use num_additional_image_tokens=0
    and strategy 'full' for towers without CLS (SigLIP).
    """
    if self.kind == 'llava_next':
      return llava_next_num_image_tokens(image_size, self.image_grid_pinpoints, self.tile_size,
                                         patch_size, num_additional_image_tokens,
                                         vision_feature_select_strategy)
    h, w = self.tile_size
    n = (h // patch_size) * (w // patch_size) + num_additional_image_tokens
    return n - 1 if vision_feature_select_strategy == 'default' else n


def hf_processor_class(config: Mapping[str, Any]) -> str:
  """The transformers image processor class an HF processor config names, without the
  Fast / Pil backend suffix (`image_processor_type`, or the older `feature_extractor_type`)."""
  name = config.get('image_processor_type') or config.get('feature_extractor_type') or ''
  return name.replace('FeatureExtractor', 'ImageProcessor').removesuffix('Fast').removesuffix(
      'Pil')


def hf_processor_config(hf: str) -> dict | None:
  """The image processor settings of an HF directory: `preprocessor_config.json`, or the
  `image_processor` entry of `processor_config.json` (where transformers 5.x processors save
  them); None if neither is there."""
  pp = os.path.join(hf, 'preprocessor_config.json')
  if os.path.exists(pp):
    with open(pp) as f:
      return json.load(f)
  pc = os.path.join(hf, 'processor_config.json')
  if os.path.exists(pc):
    with open(pc) as f:
      return json.load(f).get('image_processor')
  return None


def norm_name(mean: Sequence[float], std: Sequence[float]) -> str | None:
  """The `config.data.image_norm` whose mean / std these are (to 1e-6), or None."""
  for name, (m, s) in NORMALIZATION.items():
    if np.allclose(mean, m, atol=1e-6) and np.allclose(std, s, atol=1e-6):
      return name
  return None


def run_processor(image_norm: str, image_size: int, pad_to_square: bool = False,
                  image_grid_pinpoints: Sequence[Sequence[int]] = ()) -> 'ImageProcessor':
  """The image preprocessing a training run applies (`config.data.image_norm`, the tower's
  `image_size`, `config.data.pad_to_square`): 'clip' = shortest-edge resize + centre crop,
  'siglip' = resize to a square; the norm's mean / std. The data pipeline, the generate CLI and
  the exported processor all follow it. With `image_grid_pinpoints` (LLaVA-NeXT) it is
  LlavaNextImageProcessor's AnyRes tiling (base tile: shortest-edge resize + centre crop) with
  the norm's mean / std."""
  mean, std = NORMALIZATION[image_norm]
  if image_grid_pinpoints:
    return ImageProcessor(kind='llava_next', size=image_size, crop_size=image_size, mean=mean,
                          std=std, image_grid_pinpoints=image_grid_pinpoints)
  return ImageProcessor(kind=image_norm, size=image_size,
                        crop_size=image_size if image_norm == 'clip' else None, mean=mean,
                        std=std, pad_to_square=pad_to_square)

