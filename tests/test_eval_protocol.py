"""``evaluate --protocol papo-eval``: the processor's pixel range follows the checkpoint's model family (the
protocol was published on Qwen2.5-VL: 56*56 .. 28*28*16384; a Qwen3-VL checkpoint takes its published
preprocessor_config.json's 65,536 .. 16,777,216 with patch 16), runs without the protocol keep the checkpoint's own
processor, and `compare` pairs protocol runs of two families."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

QWEN25_PUBLISHED = (56 * 56, 28 * 28 * 16384)   # Qwen2.5-VL-*-Instruct preprocessor_config.json min/max_pixels
QWEN3_PUBLISHED = (65536, 16777216)             # Qwen3-VL-*: size.shortest_edge / longest_edge


def _settings(*flags):
    from megatron_papo.cli import _parser
    from megatron_papo.evaluation.settings import settings_from_args

    return settings_from_args(_parser().parse_args(["evaluate", "--checkpoint", "c", "--data", "d", *flags]))


def _loaded(preset: str, own=(32 * 32 * 4, 32 * 32 * 16)):
    """What load_for_inference returns, as far as the processor choice reads it: the model's spec and the
    checkpoint's own processor (a small range, as a converted checkpoint's preprocessor_config.json may hold)."""
    from megatron_papo.models import all_presets, family_of_preset

    spec = all_presets()[preset]
    return SimpleNamespace(model=SimpleNamespace(spec=spec), processor=family_of_preset(preset).image_processor(*own))


@pytest.mark.parametrize("preset, published, patch", [("tiny", QWEN25_PUBLISHED, 14),
                                                      ("qwen3-vl-tiny", QWEN3_PUBLISHED, 16)])
def test_papo_eval_takes_the_family_range(preset, published, patch):
    from megatron_papo.evaluation.command import eval_processor

    settings = _settings("--protocol", "papo-eval")
    processor, recorded = eval_processor(_loaded(preset), settings)
    assert (processor.min_pixels, processor.max_pixels, processor.patch_size) == (*published, patch)
    assert (recorded.min_pixels, recorded.max_pixels) == published and recorded.top_k == 50
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    _, grid = processor([image])                                  # a small image is scaled up into the range
    t, h, w = grid[0].tolist()
    assert published[0] <= h * w * patch * patch <= published[1]

    own, kept = eval_processor(_loaded(preset), _settings())     # no protocol: the checkpoint's own processor
    assert (own.min_pixels, own.max_pixels) == (32 * 32 * 4, 32 * 32 * 16) == (kept.min_pixels, kept.max_pixels)


def test_compare_pairs_protocol_runs_of_two_families():
    from megatron_papo.evaluation.compare import check_pairable

    def run(protocol, pixels):
        settings = dict(k=8, temperature=1.0, top_p=1.0, top_k=50, max_new_tokens=2048, protocol=protocol,
                        min_pixels=pixels[0], max_pixels=pixels[1], harness_pixels=[1024, 589824])
        return {"settings": settings, "records": [{"id": "q0", "dataset": "d"}]}

    check_pairable(run("papo-eval", QWEN25_PUBLISHED), run("papo-eval", QWEN3_PUBLISHED), "a", "b")
    with pytest.raises(ValueError, match="min_pixels"):
        check_pairable(run(None, QWEN25_PUBLISHED), run(None, QWEN3_PUBLISHED), "a", "b")
