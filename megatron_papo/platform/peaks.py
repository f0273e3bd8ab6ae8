"""Dense bf16 peak throughput of the accelerators the recipes target, for model FLOP utilisation (MFU).

Vendor datasheet figures without sparsity, per GPU. Matched against the device name in order (the first key the
name contains), so the PCIe H100 is told from the SXM one. Unknown devices and the CPU have no peak: MFU is then
not reported.
"""

from __future__ import annotations

from typing import Optional

import torch

# device name fragment -> dense bf16 TFLOP/s
PEAK_BF16_DENSE_TFLOPS = (
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
)


def peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 FLOP/s of a device by name, or None when it is not in the table."""
    for fragment, tflops in PEAK_BF16_DENSE_TFLOPS:
        if fragment.lower() in device_name.lower():
            return tflops * 1e12
    return None


def device_peak_flops() -> Optional[float]:
    """This process's GPU's dense bf16 FLOP/s, None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    return peak_flops(torch.cuda.get_device_name())
