"""Caps on what one sample may cost, checked before the cost is paid, and the rules for hostile sample fields.

A shard is untrusted input: a 1 MB gzip-compressed tar can hold a 1 GiB member, a 190 KB PNG can decode to 144
megapixels. Each cap turns such a sample into a counted skip (reason in brackets) instead of memory exhaustion:

- ``max_member_bytes`` (``member_too_large``): the size in a tar member's header, checked before its data is read;
- ``max_image_pixels`` (``image_too_large``): width x height from the image header (PIL opens lazily), checked
  before decoding; also an aspect ratio the image processor cannot resize (``bad_image``);
- ``max_sample_pixels`` (``sample_too_large``): the sum over a sample's images, also before decoding.

The defaults are generous for real data sets (a 12k x 12k scan is 144 MP; PIL itself refuses images above 179 MP);
the image processor resizes everything to at most ``data.max_pixels`` afterwards anyway.

Field rules (``question``, ``answer``): a string is taken as is, an integer or a finite float becomes its decimal
text (``3`` -> ``"3"``, ``2.5`` -> ``"2.5"``); anything else (a mapping, a list, a boolean, null, an empty string) is
the skip ``bad_field``. ``reward`` must name a registered reward (``unknown_reward``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MB = 1 << 20


@dataclass(frozen=True)
class DataLimits:
    # largest tar member in bytes (0: no cap)
    max_member_bytes: int = 512 * MB
    # largest decoded image in pixels (0: no cap)
    max_image_pixels: int = 150_000_000
    # largest total of decoded pixels over one sample's images (0: no cap)
    max_sample_pixels: int = 400_000_000

    @classmethod
    def from_config(cls, data_cfg) -> "DataLimits":
        return cls(data_cfg.max_member_bytes, data_cfg.max_image_pixels, data_cfg.max_sample_pixels)


DEFAULT_LIMITS = DataLimits()


def text_field(value, name: str) -> str:
    """The documented rule for ``question`` / ``answer``; raises ValueError with the reason."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{name} is empty")
        return value
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a string or a number, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    raise ValueError(f"{name} must be a string or a number, got {type(value).__name__}")
