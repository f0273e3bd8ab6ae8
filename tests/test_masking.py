"""Random patch blackening (docs/algorithm.md s.2): reproducible, ratio near the target, size/mode kept, grid from the
top-left with partial edge cells, one mask per prompt shared by its n rollouts."""

import numpy as np
import pytest
from PIL import Image

from megatron_papo.algorithms import algorithm_preset
from megatron_papo.algorithms.masking import (mask_prompt_images, mask_rollout_batch, masking_options,
                                              random_patch_blackening, resized_sizes_from_grid)


def _image(w=45, h=31, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(1, 256, size=(h, w, 3), dtype=np.uint8)          # no black pixel in the original
    return Image.fromarray(arr).convert(mode)


def _black(img):
    return np.all(np.array(img.convert("RGB")) == 0, axis=-1)


def test_reproducible_for_a_seed_and_different_for_another():
    img = _image()
    a = random_patch_blackening(img, generator=np.random.default_rng(7))
    b = random_patch_blackening(img, generator=np.random.default_rng(7))
    c = random_patch_blackening(img, generator=np.random.default_rng(8))
    assert np.array_equal(np.array(a), np.array(b))
    assert not np.array_equal(np.array(a), np.array(c))
    assert np.array_equal(np.array(img), np.array(_image()))           # the input is not modified


def test_grid_starts_top_left_with_partial_edge_cells():
    img = _image(w=45, h=31)                                            # 4 x 3 cells of 14 px, edges 3 px wide
    out = random_patch_blackening(img, patch_size=14, ratio=0.5, generator=np.random.default_rng(3))
    cells = np.random.default_rng(3).random((3, 4)) < 0.5               # row-major draws, one per cell
    want = np.kron(cells, np.ones((14, 14), dtype=bool))[:31, :45]
    assert np.array_equal(_black(out), want)
    orig = np.array(img)
    assert np.array_equal(np.array(out)[~want], orig[~want])           # untouched pixels keep their values


def test_ratio_close_to_target_on_a_large_image():
    img = Image.new("RGB", (1400, 1400), (255, 255, 255))               # 100 x 100 = 10,000 cells
    for ratio in (0.4, 0.6, 1.0):
        frac = _black(random_patch_blackening(img, ratio=ratio, generator=np.random.default_rng(1))).mean()
        assert abs(frac - ratio) < 0.02, (ratio, frac)                  # binomial std at 0.6 is 0.005
    assert _black(random_patch_blackening(img, ratio=0.0, generator=np.random.default_rng(1))).sum() == 0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "I;16", "F"])
def test_size_and_mode_preserved(mode):
    img = _image(mode=mode)
    out = random_patch_blackening(img, generator=np.random.default_rng(0))
    assert out.size == img.size and out.mode == mode
    assert 0 < _black(out).mean() < 1


def test_alpha_becomes_opaque_black_and_palette_images_come_back_rgb():
    img = Image.new("RGBA", (28, 28), (255, 255, 255, 0))               # fully transparent white
    out = np.array(random_patch_blackening(img, ratio=1.0))
    assert np.all(out == [0, 0, 0, 255])                                # opaque black: survives compositing
    pal = _image().convert("P")
    assert random_patch_blackening(pal, generator=np.random.default_rng(0)).mode == "RGB"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_blackening(_image(), ratio=1.5)
    with pytest.raises(ValueError, match="mask_patch_size"):
        random_patch_blackening(_image(), patch_size=0)


def test_prompt_masks_reproducible_from_seed_step_and_index():
    imgs = [_image(seed=1), _image(w=30, h=60, seed=2)]
    a = mask_prompt_images(imgs, seed=5, step=3, prompt_index=11)
    b = mask_prompt_images(imgs, seed=5, step=3, prompt_index=11)
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, b))
    for other in (dict(seed=6, step=3, prompt_index=11), dict(seed=5, step=4, prompt_index=11),
                  dict(seed=5, step=3, prompt_index=12)):
        c = mask_prompt_images(imgs, **other)
        assert not np.array_equal(np.array(a[0]), np.array(c[0])), other
    # the two images of one prompt draw different masks from the same stream
    assert not np.array_equal(_black(a[0])[:31, :30], _black(a[1])[:31, :30])


def test_rollouts_of_a_prompt_share_the_mask_and_layout_does_not_matter():
    prompts = [[_image(seed=i)] for i in range(4)]
    n = 3
    whole = mask_rollout_batch(prompts, n, seed=1, step=2)
    assert len(whole) == 4 * n
    for p in range(4):
        group = whole[p * n:(p + 1) * n]
        assert all(np.array_equal(np.array(g[0]), np.array(group[0][0])) for g in group)
    assert not np.array_equal(np.array(whole[0][0]), np.array(whole[n][0]))
    # two DP ranks with two prompts each (global prompt offsets) reproduce the single-rank masks
    halves = (mask_rollout_batch(prompts[:2], n, seed=1, step=2, prompt_offset=0)
              + mask_rollout_batch(prompts[2:], n, seed=1, step=2, prompt_offset=2))
    assert all(np.array_equal(np.array(x[0]), np.array(y[0])) for x, y in zip(whole, halves))


def test_merged_grid_option_masks_28px_cells_of_the_resized_image():
    cfg = algorithm_preset("papo_g", mask_on_merged_grid=True)
    grid = np.array([[1, 4, 6]])                                        # 56 x 84 pixels after resize
    opts = masking_options(cfg, grid)
    assert opts["patch_size"] == 28 and opts["target_sizes"] == [(56, 84)] == resized_sizes_from_grid(grid)
    (out,) = mask_prompt_images([_image(w=50, h=70)], seed=0, step=0, prompt_index=0, **opts)
    assert out.size == (84, 56)
    black = _black(out).reshape(2, 28, 3, 28)
    assert np.all(black.all(axis=(1, 3)) == black.any(axis=(1, 3)))     # every 28 px cell all-or-nothing
    with pytest.raises(ValueError, match="image_grid_thw"):
        masking_options(cfg)
    assert masking_options(algorithm_preset("papo_g")) == dict(patch_size=14, ratio=0.6, fill=0)
