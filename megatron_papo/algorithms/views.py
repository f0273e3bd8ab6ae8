"""Auxiliary views of a prompt's images: the same prompt with other pixels, scored in the no-grad pass.

Every view keeps the real image's size, so the processor gives the same ``image_grid_thw``: the same number of
image tokens, the same token ids and positions; only the pixel values differ. A view of a prompt with n rollouts is
one entry per row; rows that share a view share the very same ``(pixel_values, grid)`` object, which is what lets
the prefix-shared scoring pass run that prompt once (``training.scoring``).

- ``masked``: PAPO's random patch blackening of the raw image (``masking``), one mask per prompt drawn from
  (run seed, RL step, global prompt index); ``algorithm.view_per_response`` draws one per response instead.
- ``blank``: a black image of the same size: no visual information at all.
- ``noise``: Gaussian noise of standard deviation ``algorithm.noise_sigma`` added to the normalised pixels, drawn
  from the same (seed, step, prompt[, response]) key.

Legend: n rows of a prompt, P image patches of the prompt, D = 1176 values per patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from PIL import Image

from megatron_papo.algorithms.masking import mask_prompt_images, mask_rng, masking_options
from megatron_papo.registry import Registry

ImageView = tuple  # (pixel_values [P, D] | None, image_grid_thw [k, 3] | None)


@dataclass
class ViewRequest:
    """One prompt whose views are wanted."""
    images: list                 # the prompt's raw PIL images (empty: a text-only prompt)
    pixel_values: Optional[torch.Tensor]   # [P, D] the real images, processed
    image_grid_thw: Optional[torch.Tensor]  # [k, 3]
    prompt_index: int            # the prompt's index in the whole RL step (all DP ranks): layout independent
    n: int                       # rows (rollouts) of the prompt
    seed: int                    # run seed
    step: int                    # RL step


# (request, algorithm config, image processor) -> n views, one per row
ViewFn = Callable[[ViewRequest, object, Callable], list]
VIEWS: Registry[ViewFn] = Registry("view", "algorithm.views")
register_view = VIEWS.register   # decorator: make a view available by name


def _per_row(req: ViewRequest, cfg, draw: Callable[[Optional[int]], ImageView]) -> list:
    """n views: one drawn per response (``cfg.view_per_response``), else one per prompt shared by its rows."""
    if cfg.view_per_response:
        return [draw(j) for j in range(req.n)]
    return [draw(None)] * req.n


def _processed(processor, images: list, req: ViewRequest) -> ImageView:
    pv, grid = processor(images)
    assert torch.equal(grid, req.image_grid_thw), "a view must keep the image grid"
    return pv, grid


@register_view("masked")
def masked_view(req: ViewRequest, cfg, processor) -> list:
    """PAPO's random patch blackening on the raw images (``algorithm.mask_*``)."""
    opts = masking_options(cfg, req.image_grid_thw, processor.patch_size, processor.merge_size)
    draw = lambda j: _processed(processor, mask_prompt_images(  # noqa: E731
        req.images, seed=req.seed, step=req.step, prompt_index=req.prompt_index, response_index=j, **opts), req)
    return _per_row(req, cfg, draw)


@register_view("blank")
def blank_view(req: ViewRequest, cfg, processor) -> list:
    """Black images of the real ones' sizes (deterministic: one per prompt)."""
    return [_processed(processor, [Image.new("RGB", im.size) for im in req.images], req)] * req.n


@register_view("noise")
def noise_view(req: ViewRequest, cfg, processor) -> list:
    """The real normalised pixels plus N(0, noise_sigma^2) noise, seeded like the masks."""
    def draw(j: Optional[int]) -> ImageView:
        seed = int(mask_rng(req.seed, req.step, req.prompt_index, j).integers(2**62))
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(req.pixel_values.shape, generator=gen, dtype=torch.float32)   # [P, D]
        return req.pixel_values + cfg.noise_sigma * noise.to(req.pixel_values.dtype), req.image_grid_thw
    return _per_row(req, cfg, draw)


def make_views(names: list, requests: list, cfg, processor) -> dict:
    """``{view name: one entry per row}`` for prompt-major rows (``requests`` in row order, n rows each);
    a text-only prompt's rows get ``(None, None)`` in every view."""
    out = {}
    for name in names:
        fn, rows = VIEWS.get(name), []
        for req in requests:
            rows += fn(req, cfg, processor) if req.pixel_values is not None else [(None, None)] * req.n
        out[name] = rows
    return out


def view_names() -> list:
    return VIEWS.names()
