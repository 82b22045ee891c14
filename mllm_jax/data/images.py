"""Image normalisation with the constants of the vision towers we load from Hugging Face."""
from __future__ import annotations

from typing import Sequence

import numpy as np

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
