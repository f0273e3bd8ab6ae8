"""The small CPU adaptation of megatron-core 0.16.1 (each adaptation is listed below).

megatron-core assumes CUDA in a few places that matter for us. Without CUDA we:
  1. make ``torch.cuda.current_device()`` return the CPU device (buffer placement all over megatron);
  2. make ``torch.cuda.synchronize()`` a no-op (pipeline point-to-point communication);
  3. register an RNG tracker with megatron's interface that forks the CPU generator instead of CUDA's;
  4. route the literal ``device="cuda"`` counter allocation in ``pipeline_parallel/schedules.py`` to the CPU;
  5. do the same for the ``device="cuda"`` scalars of megatron's (non-distributed) optimizer, gradient clipping
     and grad scaler, and clip gradients without clipping's assertion that they are CUDA tensors. The
     distributed optimizer type-checks ``torch.cuda`` parameters and stays GPU-only;
  6. keep the tied output weight of the last pipeline stage on the CPU where megatron moves it to CUDA;
  7. save and restore no CUDA generator state in activation recomputation (``model.recompute``).

Everything here is applied by :func:`apply` only when ``torch.cuda.is_available()`` is False; on a GPU machine
nothing is patched. ``tests/test_cpu_compat.py`` fails loudly if the pinned megatron-core changes under us.
"""

from __future__ import annotations

import contextlib
import types

import torch

MEGATRON_CORE_VERSION = "0.16.1"
_applied = False


class CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` that keeps named CPU generator states.

    ``fork(name)`` swaps the CPU generator to the named state and back, so dropout inside tensor-parallel
    regions uses per-TP-rank streams exactly as megatron intends on GPUs.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by the patched megatron modules: identical except that ``device="cuda"`` means CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, item):
        return getattr(torch, item)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        if device == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        if device == "cuda":
            device = "cpu"
        return torch.tensor(*args, device=device, **kwargs)


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's ``clip_grad_by_total_norm_fp32`` without its assertion that grads are ``torch.cuda`` tensors."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _adapt_optimizer() -> None:
    """5. megatron's (non-distributed) optimizer allocates ``device="cuda"`` scalars in optimizer.py,
    clip_grads.py, grad_scaler.py and utils.py (the local multi-tensor l2 norm), and clipping asserts CUDA grads.
    The distributed optimizer additionally type-checks ``torch.cuda.*Tensor`` parameters: it stays GPU-only."""
    import megatron.core.utils as core_utils
    from megatron.core.optimizer import clip_grads, grad_scaler
    from megatron.core.optimizer import optimizer as mcore_optimizer

    for module in (mcore_optimizer, clip_grads, grad_scaler, core_utils):
        module.torch = _CpuTorch()
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu


def _adapt_tied_embeddings() -> None:
    """With tied embeddings and pipeline parallelism, ``LanguageModule.setup_embeddings_and_output_layer``
    moves the last stage's copy of the embedding to CUDA (``weight.data.cuda()``) before all-reducing it with the
    first stage's: on CPU that move is left out (the all-reduce runs on the CPU tensor with gloo)."""
    from megatron.core.models.common.language_module import language_module

    original = language_module.LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self):
        to_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *args, **kwargs: t
        try:
            return original(self)
        finally:
            torch.Tensor.cuda = to_cuda

    language_module.LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def install_cpu_rng_tracker() -> None:
    """Make megatron's global model-parallel RNG tracker a :class:`CpuRNGStatesTracker`."""
    from megatron.core.tensor_parallel import random as mp_random

    if not isinstance(mp_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # activation recomputation (model.recompute) saves and restores "all" RNG states: on CPU there is no CUDA
    # generator, the CPU one is saved beside it and the tracker's states are CPU states already
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None


def apply() -> bool:
    """Apply the adaptation if CUDA is absent. Returns True when it is (or already was) active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    import megatron.core
    from megatron.core.pipeline_parallel import schedules

    if megatron.core.__version__ != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"megatron_papo's CPU adaptation was verified on megatron-core {MEGATRON_CORE_VERSION}, found "
            f"{megatron.core.__version__}; install megatron-core=={MEGATRON_CORE_VERSION} or re-verify "
            "megatron_papo/platform/cpu_compat.py against the new version"
        )
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    schedules.torch = _CpuTorch()
    _adapt_optimizer()
    _adapt_tied_embeddings()
    install_cpu_rng_tracker()
    _applied = True
    return True


def is_active() -> bool:
    return _applied
