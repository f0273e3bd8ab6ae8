"""Qwen2-VL image preprocessing (also Qwen3-VL's, with its patch and mean/std): the same ``pixel_values`` and
``image_grid_thw`` as Hugging Face's processor.

Pipeline per image (each step matches ``transformers``' PIL/numpy Qwen2-VL image processor bit for bit):
RGB conversion (alpha composited on white) -> ``smart_resize`` to multiples of ``patch_size * merge_size``
within [min_pixels, max_pixels] with PIL bicubic resampling on the uint8 image -> rescale by 1/255 (in float64,
then float32) -> normalise with the mean/std in float32 (CLIP's by default; 0.5 / 0.5 for Qwen3-VL) -> the frame
repeated ``temporal_patch_size`` times -> patches flattened in merge-window order (2x2 neighbouring patches consecutive, as the vision merger expects).

Shapes: P = sum over images of grid_h * grid_w patches, D = 3 * temporal_patch_size * patch_size**2 (1176 at
patch 14, 1536 at patch 16).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

# CLIP normalisation constants (``transformers.image_utils.OPENAI_CLIP_MEAN/STD``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio must be below {_MAX_ASPECT_RATIO}, got {height}x{width} "
                         f"(height x width); crop or pad the image before training on it")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent pixels are composited on white (Hugging Face's rule)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class Qwen2VLImageProcessor:
    """Images -> ``(pixel_values [P, D] float32, image_grid_thw [n, 3] int64)`` exactly as Hugging Face computes them.

    The number of ``<|image_pad|>`` tokens for image i is ``image_grid_thw[i].prod() // merge_size**2``.
    """

    def __init__(self, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2, image_mean=CLIP_MEAN, image_std=CLIP_STD):
        factor = patch_size * merge_size
        if min_pixels <= 0 or max_pixels < min_pixels:
            raise ValueError(f"image pixels: need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, "
                             f"max_pixels={max_pixels}; set data.min_pixels / data.max_pixels accordingly")
        if max_pixels < factor * factor:
            raise ValueError(f"image pixels: max_pixels={max_pixels} is below one merged patch "
                             f"({factor}x{factor}={factor * factor}); raise data.max_pixels")
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self._mean = np.array(image_mean, dtype=np.float32)
        self._std = np.array(image_std, dtype=np.float32)

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized (height, width) for an image of the given size."""
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def num_image_tokens(self, height: int, width: int) -> int:
        """``<|image_pad|>`` tokens an image of this size expands to (after the 2x2 merge)."""
        h, w = self.target_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2

    def _normalized(self, image: Image.Image) -> np.ndarray:
        # [3, H', W'] float32
        image = to_rgb(image)
        h, w = self.target_size(image.height, image.width)
        resized = np.asarray(image.resize((w, h), resample=Image.BICUBIC))  # (H', W', 3) uint8
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        return ((scaled - self._mean) / self._std).transpose(2, 0, 1)

    def _patchify(self, image: np.ndarray) -> tuple[np.ndarray, int, int]:
        # image [C, H', W'] -> patches [gh * gw, C * T * ps * ps]
        c, height, width = image.shape
        ps, ms, tps = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // ps, width // ps
        x = image.reshape(c, gh // ms, ms, ps, gw // ms, ms, ps)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/ms, gw/ms, ms, ms, C, ps, ps)
        # A still image is a clip of `tps` identical frames for the 3D patch embedding.
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tps, ps, ps))
        return x.reshape(gh * gw, c * tps * ps * ps), gh, gw

    def __call__(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) == 0:
            raise ValueError("Qwen2VLImageProcessor needs at least one image; text-only prompts have "
                             "pixel_values=None")
        patches, grids = [], []
        for image in images:
            flat, gh, gw = self._patchify(self._normalized(image))
            patches.append(flat)
            grids.append((1, gh, gw))
        pixel_values = torch.from_numpy(np.concatenate(patches, axis=0))  # [P, D]
        return pixel_values, torch.tensor(grids, dtype=torch.long)  # [n, 3]
