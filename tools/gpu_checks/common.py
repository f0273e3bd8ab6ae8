"""What every section of the GPU check shares: the table (``row``, ``print_table``), the tolerance test
(``close``), the guard that runs a section under its time limit (``run_section``), the watchdog for a hang inside
native code, the results one section leaves for another (``STATE``), and the tiny Hugging Face Qwen2.5-VL model
with the rollout engine built from it (sections 2 and 6).

Legend: z a section's size dict (``SMOKE``/``GPU`` in tools/gpu_check.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(ROOT, "tools", "gpu_check.py")  # the command line (section 1 runs it again as a subprocess)

OK, FAIL, SKIP = "ok", "FAIL", "skip"
HEADER = ("section", "check", "value", "reference", "status")
ROWS: list[tuple] = []  # (section, check, value, reference, status)
STATE: dict = {}        # results one section leaves for another (section 4 reads 1 and 3)


def row(section: str, check: str, value, reference="", status: str = OK) -> None:
    ROWS.append((section, check, str(value), str(reference), status))


def close(a: float, b: float, rel: float, abs_: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rel * abs(b) + abs_


class SectionTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise SectionTimeout()


def run_section(name: str, fn, limit_s: float, deadline: float, args) -> None:
    """Run one section under min(its limit, what is left of the budget); failures become FAIL rows."""
    left = deadline - time.monotonic()
    if left < 5:
        row(name, "section", "not run: total budget spent", "", FAIL)
        return
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(min(limit_s, left))))
    t0 = time.monotonic()
    try:
        fn(args)
    except SectionTimeout:
        row(name, "section", f"time limit {min(limit_s, left):.0f} s reached", "", FAIL)
    except Exception as e:  # noqa: BLE001 - a blind run must report every failure and go on
        row(name, "section", f"{type(e).__name__}: {str(e).splitlines()[0][:110] if str(e) else ''}", "", FAIL)
        traceback.print_exc()
    finally:
        signal.alarm(0)
    print(f"[gpu_check] section {name} done in {time.monotonic() - t0:.1f} s", flush=True)


def print_table(title: str) -> None:
    widths = [max(len(r[i]) for r in ROWS + [HEADER]) for i in range(5)]
    print(title)
    for r in [HEADER] + ROWS:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def start_watchdog(seconds: float, title: str) -> None:
    """A section stuck inside native code (a hung collective or kernel) never sees SIGALRM: past the budget plus a
    margin, print the table so far and exit non-zero from a thread."""
    import threading

    def fire():
        row("watchdog", "total budget", f"exceeded by {seconds:.0f} s inside native code", "", FAIL)
        print_table(title + " (stopped by the watchdog)")
        sys.stdout.flush()
        os._exit(1)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def hf_tiny(out_dir: str, hidden: int, layers: int, vocab: int):
    """A random Qwen2.5-VL of transformers at this size, saved to ``out_dir`` (seed 0)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = max(2, hidden // 64)
    d = hidden // heads                                                       # head dim
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=2, vocab_size=vocab, rms_norm_eps=1e-6,
                         max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                         rope_scaling={"type": "mrope", "mrope_section": [d // 8, 3 * d // 16, 3 * d // 16],
                                       "rope_theta": 1e6}),
        vision_config=dict(depth=1, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        image_token_id=vocab - 1, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 3,
        video_token_id=vocab - 4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(out_dir)
    return model


def engine_from_hf(hf_dir: str):
    """megatron_papo's rollout engine on the weights of the Hugging Face checkpoint in ``hf_dir``."""
    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.models import build_vlm, spec_from_hf_config
    from megatron_papo.rollout import MegatronEngine

    spec = spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))
    model = build_vlm(spec).eval()
    fill_from_hf(model, HFCheckpoint(hf_dir))
    return MegatronEngine(model, max_seq_len=4096, eos_ids=[], pad_id=0)
