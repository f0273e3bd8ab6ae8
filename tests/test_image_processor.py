"""Our Qwen2-VL image processor against Hugging Face's PIL/numpy implementation (the independent reference)."""

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_papo.data.image_processor import Qwen2VLImageProcessor, smart_resize

hf_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def _random_image(height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    if mode == "L":
        arr = arr[..., 0]
    return Image.fromarray(arr, mode=mode)


def _hf(images, min_pixels, max_pixels):
    proc = hf_mod.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=images, return_tensors="np")
    return torch.from_numpy(np.asarray(out["pixel_values"])), torch.from_numpy(np.asarray(out["image_grid_thw"]))


# (height, width) pairs: square, wide, tall, tiny (upscaled to min_pixels), large (downscaled to max_pixels),
# sizes that are not multiples of 28.
SIZES = [(56, 56), (84, 84), (100, 37), (37, 250), (20, 20), (640, 480), (333, 517), (28, 700)]


@pytest.mark.parametrize("size", SIZES)
def test_matches_hf_single_image(size):
    min_pixels, max_pixels = 56 * 56, 28 * 28 * 160
    img = _random_image(*size, seed=size[0] * 1000 + size[1])
    ours_pv, ours_grid = Qwen2VLImageProcessor(min_pixels, max_pixels)([img])
    ref_pv, ref_grid = _hf([img], min_pixels, max_pixels)
    assert ours_pv.dtype == torch.float32 and ours_grid.dtype == torch.long
    assert torch.equal(ours_grid, ref_grid)
    assert ours_pv.shape == ref_pv.shape == (int(ref_grid.prod()), 1176)
    torch.testing.assert_close(ours_pv, ref_pv.float(), rtol=0, atol=0)


def test_matches_hf_several_images_and_modes():
    min_pixels, max_pixels = 4 * 28 * 28, 64 * 28 * 28
    imgs = [_random_image(70, 130, "RGB", 1), _random_image(90, 45, "RGBA", 2), _random_image(64, 64, "L", 3)]
    proc = Qwen2VLImageProcessor(min_pixels, max_pixels)
    ours_pv, ours_grid = proc(imgs)
    ref_pv, ref_grid = _hf(imgs, min_pixels, max_pixels)
    assert torch.equal(ours_grid, ref_grid)
    torch.testing.assert_close(ours_pv, ref_pv.float(), rtol=0, atol=0)
    for img, thw in zip(imgs, ours_grid):
        assert proc.num_image_tokens(img.height, img.width) == int(thw.prod()) // 4


def test_smart_resize_bounds_and_errors():
    for h, w in [(10, 10), (2000, 3000), (123, 457)]:
        rh, rw = smart_resize(h, w, 28, 56 * 56, 28 * 28 * 100)
        assert rh % 28 == 0 and rw % 28 == 0 and 56 * 56 <= rh * rw <= 28 * 28 * 100
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)
    with pytest.raises(ValueError, match="max_pixels"):
        Qwen2VLImageProcessor(min_pixels=100, max_pixels=50)
    with pytest.raises(ValueError, match="at least one image"):
        Qwen2VLImageProcessor()([])
