"""Installed when ``megatron_papo`` is imported: megatron-core's warnings go through the platform layer first.

Standard library only (``megatron-papo --help`` must not pay for torch); the platform layer is imported when
megatron first warns, by which time torch is loaded anyway. ``warnings.showwarning`` is the documented hook for
redirecting warnings; everything the platform does not consume is shown exactly as before.
"""

from __future__ import annotations

import os
import warnings

_previous = None


def _showwarning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, UserWarning) and f"{os.sep}megatron{os.sep}" in str(filename):
        from megatron_papo.platform import accelerators

        if accelerators.consume(str(message)):
            return
    _previous(message, category, filename, lineno, file, line)


def install() -> None:
    """Idempotent; other warnings and filters are untouched."""
    global _previous
    if _previous is None:
        _previous = warnings.showwarning
        warnings.showwarning = _showwarning
