"""M-RoPE position ids for Qwen2.5-VL: text advances all three axes together; an image's merged tokens take
(temporal, row, column) positions offset by the running text position, and the text after it resumes at
start + max(rows, cols). This is Hugging Face Qwen2.5-VL's `get_rope_index` for images.

Legend: b batch, s sequence, n images.
"""

from __future__ import annotations

import torch


def _sample_positions(ids: torch.Tensor, grids: list[list[int]], merge: int, image_token_id: int,
                      vision_start_token_id: int) -> tuple[torch.Tensor, int]:
    """Positions [3, len(ids)] for one unpadded sample, consuming its images' grids in order."""
    is_image = ids == image_token_id
    starts = torch.nonzero(ids == vision_start_token_id).flatten()
    num_images = int(is_image[(starts + 1).clamp(max=len(ids) - 1)].sum()) if len(starts) else 0
    if num_images > len(grids):
        raise ValueError(f"input_ids hold {num_images} images but image_grid_thw has only {len(grids)} left")
    pieces, pos, cursor = [], 0, 0
    image_positions = torch.nonzero(is_image).flatten().tolist()
    for t, h, w in grids[:num_images]:
        first = next(p for p in image_positions if p >= cursor)
        text_len = first - cursor
        pieces.append(torch.arange(text_len).view(1, -1).expand(3, -1) + pos)
        pos += text_len
        gh, gw = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(gh, gw)
        cursor = first + t * gh * gw
    tail = len(ids) - cursor
    pieces.append(torch.arange(tail).view(1, -1).expand(3, -1) + pos)
    return torch.cat(pieces, dim=1), num_images


def get_rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, spatial_merge_size: int = 2, *,
                   image_token_id: int, vision_start_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [3, b, s], rope_deltas [b, 1]) for a batch of token ids.

    ``attention_mask`` [b, s] (1 = real token) excludes padding, which gets position 1 as in Hugging Face.
    Images are consumed from ``image_grid_thw`` [n, 3] in batch order (sample 0's images first).
    ``rope_deltas`` = max position + 1 - real length: add it to the text position of generated tokens.
    """
    b, s = input_ids.shape
    position_ids = torch.ones(3, b, s, dtype=torch.long)
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    deltas = []
    for i in range(b):
        keep = attention_mask[i].bool().cpu() if attention_mask is not None else torch.ones(s, dtype=torch.bool)
        ids = input_ids[i].cpu()[keep]
        pos, used = _sample_positions(ids, grids, spatial_merge_size, image_token_id, vision_start_token_id)
        grids = grids[used:]
        position_ids[:, i, keep] = pos
        deltas.append(int(pos.max()) + 1 - len(ids) if len(ids) else 0)
    if grids:
        raise ValueError(f"image_grid_thw has {len(grids)} more images than the <|image_pad|> runs in input_ids")
    return position_ids.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).view(b, 1)


def get_packed_rope_index(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, image_grid_thw: torch.Tensor | None,
                          spatial_merge_size: int = 2, *, image_token_id: int,
                          vision_start_token_id: int) -> torch.Tensor:
    """M-RoPE position ids [3, 1, s] of one packed sequence ``input_ids`` [1, s]: every sequence between
    consecutive ``cu_seqlens`` boundaries [k + 1] gets its own positions (from 0), as if it were alone; images
    are consumed from ``image_grid_thw`` in order."""
    ids = input_ids.reshape(-1).cpu()
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        pos, used = _sample_positions(ids[start:end], grids, spatial_merge_size, image_token_id,
                                      vision_start_token_id)
        grids = grids[used:]
        pieces.append(pos)
    if grids:
        raise ValueError(f"image_grid_thw has {len(grids)} more images than the <|image_pad|> runs in input_ids")
    return torch.cat(pieces, dim=1)[:, None].to(input_ids.device)
