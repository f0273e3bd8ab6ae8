"""Checkpoints: resumed training equals uninterrupted training, a crash mid-save keeps the last good checkpoint,
SIGTERM produces a checkpoint. A tiny megatron GPTModel trained through the real schedule, DDP and optimizer."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from multirank import run_multirank

VOCAB, SEQ = 64, 8


def _build(seed):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron_papo.config import OptimizerConfig
    from megatron_papo.models import local_layer_spec
    from megatron_papo.platform import seed_all
    from megatron_papo.training.optimizer import build_optimizer, wrap_ddp

    from megatron.core import parallel_state as ps
    seed_all(seed)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                            params_dtype=torch.float32, hidden_dropout=0.1, attention_dropout=0.0,
                            tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                            pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size())
    model = GPTModel(cfg, local_layer_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    ocfg = OptimizerConfig(lr=1e-2, weight_decay=0.01, clip_grad=1.0, warmup_steps=2, schedule="cosine")
    ddp = wrap_ddp(model, ocfg)
    opt, sched = build_optimizer(ocfg, [ddp], total_steps=10)
    return ddp, opt, sched


def _train_step(ddp, opt, sched, reader):
    """One step on the batch the 'reader' (a seeded position) yields; dropout draws from the torch RNG."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_papo.training.optimizer import optimizer_step, zero_grads

    g = torch.Generator().manual_seed(1000 + reader["pos"])
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    reader["pos"] += 1
    pos = torch.arange(SEQ).expand(2, SEQ)

    def fwd(it, model):
        x = next(it)
        out = model(x, pos, None, labels=x)

        def loss_func(o):
            loss = o.float().mean()
            return loss, {"loss": loss.detach()}
        return out, loss_func

    zero_grads(opt, [ddp])
    out = get_forward_backward_func()(forward_step_func=fwd, data_iterator=iter(ids.split(2)), model=[ddp],
                                      num_microbatches=2, seq_length=SEQ, micro_batch_size=2, forward_only=False)
    res = optimizer_step(opt, sched, [ddp])
    assert res.applied
    return float(sum(o["loss"] for o in out) / 2) if out else 0.0


def _resume_body(rank, world, ckpt_dir):
    from megatron_papo.training.checkpoint import find_resume, load_checkpoint, save_checkpoint

    ddp, opt, sched = _build(seed=7)
    reader = {"pos": 0}
    straight = [_train_step(ddp, opt, sched, reader) for _ in range(5)]

    ddp, opt, sched = _build(seed=7)
    reader = {"pos": 0}
    for _ in range(3):
        _train_step(ddp, opt, sched, reader)
    save_checkpoint(ckpt_dir, 3, [ddp], opt, sched, reader_state=dict(reader), config={"x": 1}, keep_last=1)
    _train_step(ddp, opt, sched, reader)                    # moves RNG/weights on; the load must undo this

    ddp, opt, sched = _build(seed=99)                       # different init: everything must come from disk
    info = load_checkpoint(find_resume("auto", ckpt_dir), [ddp], opt, sched)
    reader = info["reader_state"]
    resumed = [_train_step(ddp, opt, sched, reader) for _ in range(2)]
    return straight[3:], resumed, info["step"], info["config"]


def test_resume_equals_uninterrupted(tmp_path):
    results = run_multirank(_resume_body, 2, args=(str(tmp_path / "ck"),), tp=2)
    for straight, resumed, step, config in results:
        assert step == 3 and config == {"x": 1}
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight), rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path / "ck")) == ["step_3"]


def _crash_body(rank, world, ckpt_dir):
    import megatron_papo.training.checkpoint as ck

    ddp, opt, sched = _build(seed=7)
    reader = {"pos": 0}
    _train_step(ddp, opt, sched, reader)
    ck.save_checkpoint(ckpt_dir, 1, [ddp], opt, sched, reader_state=dict(reader), config={}, keep_last=2)
    saved = [p.detach().clone() for p in ddp.parameters()]
    _train_step(ddp, opt, sched, reader)

    real_save = ck.dist_checkpointing.save

    def save_then_crash(sd, path):
        real_save(sd, path)
        raise RuntimeError("simulated crash between writing the shards and publishing them")
    ck.dist_checkpointing.save = save_then_crash
    try:
        ck.save_checkpoint(ckpt_dir, 2, [ddp], opt, sched, reader_state=dict(reader), config={})
    except RuntimeError:
        pass
    finally:
        ck.dist_checkpointing.save = real_save
    latest = ck.find_resume("auto", ckpt_dir)
    ddp2, opt2, sched2 = _build(seed=99)
    info = ck.load_checkpoint(latest, [ddp2], opt2, sched2)
    same = all(torch.equal(a, b.detach()) for a, b in zip(saved, ddp2.parameters()))
    return latest.name, info["step"], same


def test_crash_during_save_keeps_previous(tmp_path):
    for name, step, same in run_multirank(_crash_body, 2, args=(str(tmp_path / "ck"),), tp=1):
        assert name == "step_1" and step == 1 and same
    assert (tmp_path / "ck" / "step_2.tmp").exists()        # the torn write is left aside, never picked


def _sigterm_body(rank, world, ckpt_dir):
    from megatron_papo.training.checkpoint import PreemptionHandler, list_checkpoints, save_checkpoint

    ddp, opt, sched = _build(seed=7)
    handler = PreemptionHandler().install()
    reader = {"pos": 0}
    step = 0
    try:
        while step < 50:
            _train_step(ddp, opt, sched, reader)
            step += 1
            if step == 2 and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)        # only one rank is signalled: all must stop together
            if handler.should_stop():
                save_checkpoint(ckpt_dir, step, [ddp], opt, sched, reader_state=reader, config={})
                break
    finally:
        handler.uninstall()
    return step, [s for s, _ in list_checkpoints(ckpt_dir)]


def test_sigterm_saves_and_stops(tmp_path):
    for step, saved in run_multirank(_sigterm_body, 2, args=(str(tmp_path / "ck"),), tp=1):
        assert step == 2 and saved == [2]
