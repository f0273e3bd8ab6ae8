"""Model FLOPs of a vision tower, counted from its spec (multiply-add = 2 FLOPs); each family's ``counts`` names
its MLP, mergers and attention windows (``models.registry`` hands them to ``training.flops``).

Counted: patch embedding, attention projections, the MLP, the merger(s), and attention's two products (4 x context
x hv per patch and block: each window, or the whole image in a full-attention block). Not counted: norms, rotary,
softmax, position tables.

Legend: P patches of an image, hv vision width, m spatial merge size.
"""

from __future__ import annotations


def tower_flops(v, grid_thw, *, mlp_matrices: int, num_mergers: int, full_blocks: int,
                window_patches: int | None) -> float:
    """Forward FLOPs for images of patch grids ``grid_thw`` ([n, 3] rows t, h, w); ``mlp_matrices``: 3 (SwiGLU)
    or 2, ``full_blocks``: blocks attending over the whole image, the others over windows of ``window_patches``
    patches (None: no windows)."""
    hv, m2 = v.hidden_size, v.spatial_merge_size ** 2
    layer = 4 * hv * hv + mlp_matrices * hv * v.intermediate_size               # qkv + projection, MLP
    merger = num_mergers * ((hv * m2) ** 2 + hv * m2 * v.out_hidden_size)        # per merged token
    total = 0.0
    for t, h, w in (grid_thw.tolist() if hasattr(grid_thw, "tolist") else grid_thw):
        p = t * h * w
        window = h * w if window_patches is None else window_patches
        total += 2.0 * p * (v.depth * layer + v.patch_dim * hv) + 2.0 * (p / m2) * merger
        total += 4.0 * hv * p * (full_blocks * h * w + (v.depth - full_blocks) * min(window, h * w))
    return total
