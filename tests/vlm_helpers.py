"""What the model and conversion tests of both families share: the inputs, transformers' logits and ours (whole
model or pipeline stages, KV-cache decoding), and the checks of a HF -> megatron -> HF round trip. The tiny HF
models themselves are ``hf_tiny``'s.

Legend: b batch, s sequence, V vocabulary.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from hf_tiny import IMG, VEND, VSTART

# the batch of two samples holds images of these grids: two in sample 0, then one in sample 1
GRIDS = {"qwen2.5-vl": [[1, 4, 4], [1, 8, 4], [1, 4, 8]], "qwen3-vl": [[1, 4, 4], [1, 10, 6], [1, 4, 8]]}
PATCH_DIM = {"qwen2.5-vl": 3 * 2 * 14 * 14, "qwen3-vl": 3 * 2 * 16 * 16}


def image_run(grid) -> list[int]:
    """An image's tokens: vision start, t*h*w/4 image pads, vision end."""
    return [VSTART] + [IMG] * (int(grid[0] * grid[1] * grid[2]) // 4) + [VEND]


def make_inputs(family: str, seed: int = 0) -> list[dict]:
    """Text only (b=2), one image (b=1), and b=2 with two images in sample 0 and one in sample 1."""
    g = torch.Generator().manual_seed(seed)
    txt = lambda n: torch.randint(0, 240, (n,), generator=g).tolist()  # noqa: E731
    cases = [dict(input_ids=torch.tensor([txt(11), txt(11)]))]
    grid1 = torch.tensor([[1, 8, 12]])
    cases.append(dict(input_ids=torch.tensor([txt(3) + image_run(grid1[0]) + txt(5)]), image_grid_thw=grid1))
    grids = torch.tensor(GRIDS[family])
    s0 = txt(2) + image_run(grids[0]) + txt(3) + image_run(grids[1]) + txt(2)
    s1 = txt(4) + image_run(grids[2])
    s1 += txt(len(s0) - len(s1))
    cases.append(dict(input_ids=torch.tensor([s0, s1]), image_grid_thw=grids))
    for c in cases:
        if "image_grid_thw" in c:
            c["pixel_values"] = torch.randn(int(c["image_grid_thw"].prod(-1).sum()), PATCH_DIM[family], generator=g)
    return cases


@torch.no_grad()
def hf_logits(model, case: dict) -> torch.Tensor:
    """transformers' logits [b, s, V] (float32)."""
    ids = case["input_ids"]
    out = model(input_ids=ids, pixel_values=case.get("pixel_values"), image_grid_thw=case.get("image_grid_thw"),
                mm_token_type_ids=(ids == IMG).int(), attention_mask=torch.ones_like(ids))
    return out.logits.float()


@torch.no_grad()
def pipeline_logits(model, case: dict) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V] on the last stage (None elsewhere); stages hand activations on by p2p, at the
    model's pipeline width (hidden states plus anything that rides along, e.g. DeepStack features)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ids = case["input_ids"]
    if not ps.is_pipeline_first_stage():
        recv = torch.empty(ids.shape[1], ids.shape[0], model.pipeline_hidden_size)
        dist.recv(recv, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(recv)
    out = model(ids, pixel_values=case.get("pixel_values"), image_grid_thw=case.get("image_grid_thw"),
                runtime_gather_output=True)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        return None
    return out[..., : model.spec.vocab_size].float()


@torch.no_grad()
def kv_cache_logits(model, case: dict, num_decode: int = 2) -> torch.Tensor:
    """Prefill all but the last num_decode tokens, then decode them one at a time with megatron's static KV
    cache; returns the logits of the last prefill token and each decoded one [b, 1 + num_decode, V].
    M-RoPE under the static cache needs the position ids of the whole sequence so far at every step."""
    from megatron.core.inference.contexts import StaticInferenceContext

    ids = case["input_ids"]
    pos = model.position_ids(ids, case.get("image_grid_thw"))
    ctx = StaticInferenceContext(ids.shape[0], ids.shape[1])
    n = ids.shape[1] - num_decode
    outs = [model(ids[:, :n], position_ids=pos[:, :, :n], pixel_values=case.get("pixel_values"),
                  image_grid_thw=case.get("image_grid_thw"), inference_context=ctx, runtime_gather_output=True)]
    ctx.sequence_len_offset += n
    for j in range(n, ids.shape[1]):
        outs.append(model(ids[:, j:j + 1], position_ids=pos[:, :, :j + 1], inference_context=ctx,
                          runtime_gather_output=True))
        ctx.sequence_len_offset += 1
    return torch.cat([o[:, -1:, : model.spec.vocab_size] for o in outs], dim=1)


def load_tool(name: str):
    """A script of tools/ as a module (its ``main(argv)`` returns the exit code)."""
    path = os.path.join(os.path.dirname(__file__), "..", "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_round_trip(src: dict, dst: dict, hf_class, back_dir: str, hf, case: dict) -> None:
    """HF -> megatron -> HF: the same tensor names, dtypes and values bit for bit (``src``, ``dst``: name ->
    tensor), and the exported directory loads in transformers with nothing missing or unexpected and the same
    logits as the original model ``hf``."""
    assert sorted(src) == sorted(dst)
    for name in src:
        assert src[name].dtype == dst[name].dtype and torch.equal(src[name], dst[name]), name
    again, info = hf_class.from_pretrained(back_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(hf_logits(again.eval(), case), hf_logits(hf, case))


def assert_verify_conversion_passes(hf_dir: str, mcore_dir: str, capsys, tp: int = 2) -> None:
    """tools/verify_conversion.py at TP=``tp`` exits 0 and its last line reports a diff under its tolerance."""
    capsys.readouterr()
    assert load_tool("verify_conversion").main(["--hf", hf_dir, "--mcore", mcore_dir, "--tp", str(tp),
                                                "--tol", "1e-4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff=") and float(last.split("=")[1]) < 1e-4


def sdp_attention(ng: int, rep: int, hn: int, mask_type: str = "causal"):
    """One-rank ``SDPAttention`` (the local spec's core attention) with ``ng`` query groups of ``rep`` heads of
    size ``hn``; ``mask_type`` names an ``AttnMaskType`` member."""
    import types

    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_papo.models.common.attention import SDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=ng * rep * hn, num_attention_heads=ng * rep,
                            num_query_groups=ng, kv_channels=hn)
    tp = types.SimpleNamespace(size=lambda: 1)
    return SDPAttention(cfg, 1, AttnMaskType[mask_type], "self", pg_collection=types.SimpleNamespace(tp=tp))
