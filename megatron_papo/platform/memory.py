"""Memory actually held by tensors, for checking the memory plan (``training.memory_plan``) on any device.

``TensorMemory`` is a dispatch mode: every tensor an operator creates inside it (forward, autograd's backward,
optimizer state, DDP buffers) is counted by its storage, once however many views share it, until the storage is
freed; ``peak`` is the most ever held at once. Tensors made before the context (the model's weights) are not
counted unless handed to ``count``. It sees what the CPU's and the GPU's allocators are asked for, not what
they cache or round up, and it slows every operator a little: a measuring tool, not for training runs.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0         # bytes held now by tensors created in the context
        self.peak = 0         # the most held at once
        self._sizes: dict = {}

    def count(self, tensors) -> None:
        """Count tensors made before the context too (a model's weights: DDP may move them into new storage,
        freeing the old, which then leaves the count)."""
        for t in tensors:
            self._track(t)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._sizes:
            return
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)   # storages keep their Python object: fires when freed

    def _free(self, key) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._track(t)
        return out


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
