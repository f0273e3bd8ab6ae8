"""Masked images for the Implicit Perception Loss: random patch blackening (docs/algorithm.md section 2).

Cells of a ``patch_size`` grid starting at the top-left corner (edge cells partial) independently become black
with probability ``ratio``. The draw is a numpy ``Generator``, so a run's masks are reproducible from
(run seed, RL step, prompt index) via :func:`mask_rng`; one mask per prompt is shared by its n rollouts.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image

# modes whose zero value is black, handled in place; others (P, CMYK, YCbCr, ...) are masked as RGB
_ZERO_IS_BLACK = {"1", "L", "LA", "RGB", "RGBA", "I", "I;16", "F"}


def cell_mask(height: int, width: int, patch_size: int, ratio: float, generator: np.random.Generator) -> np.ndarray:
    """Boolean [height, width] pixel mask: True where the pixel's cell was drawn black (row-major draws)."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}; fix algorithm.mask_patch_size")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}; fix algorithm.mask_ratio")
    rows, cols = -(-height // patch_size), -(-width // patch_size)      # ceil: edge cells are partial
    cells = generator.random((rows, cols)) < ratio                        # [rows, cols]
    full = np.repeat(np.repeat(cells, patch_size, axis=0), patch_size, axis=1)
    return full[:height, :width]


def random_patch_blackening(image: Image.Image, patch_size: int = 14, ratio: float = 0.6,
                            generator: Optional[np.random.Generator] = None, fill: int = 0) -> Image.Image:
    """PIL image in, PIL image out (same size; same mode except palette-like modes, returned as RGB).

    Masked cells get ``fill`` in every colour channel; an alpha channel there becomes opaque, so the cell stays
    black when the image processor composites transparency onto white.
    """
    generator = np.random.default_rng() if generator is None else generator
    if image.mode not in _ZERO_IS_BLACK:
        image = image.convert("RGB")
    arr = np.array(image)                                                  # [H, W] or [H, W, C]
    mask = cell_mask(arr.shape[0], arr.shape[1], patch_size, ratio, generator)
    if image.mode in ("LA", "RGBA"):
        colour = arr[..., :-1]
        colour[mask] = fill
        arr[..., -1][mask] = np.iinfo(arr.dtype).max
    else:
        arr[mask] = fill if image.mode != "1" else bool(fill)
    out = Image.fromarray(arr)
    return out if out.mode == image.mode else out.convert(image.mode)


def mask_rng(seed: int, step: int, prompt_index: int, response_index: Optional[int] = None) -> np.random.Generator:
    """The generator for one prompt's masks: independent streams per (run seed, RL step, global prompt index), and
    per response within the prompt when ``response_index`` is given (one mask per response)."""
    key = [int(seed), int(step), int(prompt_index)] + ([] if response_index is None else [int(response_index)])
    return np.random.default_rng(key)


def mask_prompt_images(images: Sequence[Image.Image], *, seed: int, step: int, prompt_index: int,
                       patch_size: int = 14, ratio: float = 0.6, fill: int = 0,
                       target_sizes: Optional[Sequence[tuple[int, int]]] = None,
                       response_index: Optional[int] = None) -> list[Image.Image]:
    """Mask all images of one prompt, drawing in order from one generator seeded by (seed, step, prompt_index).

    ``prompt_index`` should be the prompt's index in the whole RL step (all DP ranks), so masks do not depend on the
    parallel layout. ``target_sizes`` [(height, width)] per image masks on the model's grid instead of the raw one:
    each image is first resized (bicubic, as the Qwen2-VL processor does) to that size, e.g. with
    ``patch_size=28`` the merged-patch grid; get the sizes from :func:`resized_sizes_from_grid`.
    ``response_index`` draws the mask of one response of the prompt (see :func:`mask_rng`).
    """
    gen = mask_rng(seed, step, prompt_index, response_index)
    if target_sizes is not None and len(target_sizes) != len(images):
        raise ValueError(f"target_sizes has {len(target_sizes)} entries for {len(images)} images")
    out = []
    for i, img in enumerate(images):
        if target_sizes is not None:
            h, w = target_sizes[i]
            img = img.resize((int(w), int(h)), resample=Image.BICUBIC)
        out.append(random_patch_blackening(img, patch_size=patch_size, ratio=ratio, generator=gen, fill=fill))
    return out


def mask_rollout_batch(prompt_images: Sequence[Sequence[Image.Image]], n: int, *, seed: int, step: int,
                       prompt_offset: int = 0, **kwargs) -> list[list[Image.Image]]:
    """Masked images for a prompt-major rollout batch: P prompts -> P * n entries, the n rollouts of a prompt
    sharing the very same masked images. ``prompt_offset`` is this rank's first global prompt index."""
    masked = [mask_prompt_images(imgs, seed=seed, step=step, prompt_index=prompt_offset + p, **kwargs)
              for p, imgs in enumerate(prompt_images)]
    return [m for m in masked for _ in range(n)]


def resized_sizes_from_grid(image_grid_thw, patch_size: int = 14) -> list[tuple[int, int]]:
    """(height, width) in pixels the processor resized each image to, from its ``image_grid_thw`` [n, 3]."""
    return [(int(h) * patch_size, int(w) * patch_size) for _, h, w in np.asarray(image_grid_thw).tolist()]


def masking_options(cfg, image_grid_thw=None, patch_size: int = 14, merge_size: int = 2) -> dict:
    """Keyword arguments for :func:`mask_prompt_images` from an ``AlgorithmConfig``.

    ``patch_size`` / ``merge_size``: the model family's (the image processor's): 14 / 2 for Qwen2.5-VL, 16 / 2 for
    Qwen3-VL. Cells are ``cfg.mask_patch_size`` raw pixels, or the family's patch when it is unset. With
    ``cfg.mask_on_merged_grid`` the cells are the model's merged patches (patch * merge: 28 px, 32 px) on the
    processor-resized image, which needs that prompt's ``image_grid_thw``.
    """
    opts = dict(patch_size=cfg.mask_patch_size or patch_size, ratio=cfg.mask_ratio, fill=cfg.mask_fill)
    if cfg.mask_on_merged_grid:
        if image_grid_thw is None:
            raise ValueError("algorithm.mask_on_merged_grid needs the prompt's image_grid_thw (from encode_prompt)")
        opts.update(patch_size=patch_size * merge_size,
                    target_sizes=resized_sizes_from_grid(image_grid_thw, patch_size))
    return opts
