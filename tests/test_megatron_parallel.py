"""megatron-core through our platform layer: TP1 == TP2 (logits, gradients) and 1F1B TP2xPP2 == TP1xPP1 (loss).

Weights move between layouts through megatron's dist checkpointing (save at TP1, load resharded), so this also
checks that resharding works on CPU.
"""

import os

import torch

from multirank import run_multirank

VOCAB, SEQ, BATCH = 64, 8, 2


def _build(tp, pp):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron_papo.models import local_layer_spec

    cfg = TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        add_bias_linear=False, add_qkv_bias=True, use_cpu_initialization=True, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    return GPTModel(config=cfg, transformer_layer_spec=local_layer_spec(), vocab_size=VOCAB,
                    max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=False,
                    position_embedding_type="rope")


def _data(seed=0, n=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (n, BATCH, SEQ), generator=g)
    return ids, labels


def _save(rank, world, ckpt):
    from megatron.core import dist_checkpointing

    model = _build(1, 1)
    os.makedirs(ckpt, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    return True


def _load(tp, pp, ckpt):
    from megatron.core import dist_checkpointing

    model = _build(tp, pp)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt)
    model.load_state_dict(state)
    return model


def _tp_forward_backward(rank, world, ckpt):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, vocab_parallel_cross_entropy

    tp = world
    model = _load(tp, 1, ckpt)
    ids, labels = _data()
    pos = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    logits = model(ids[0], pos, None)  # [b, s, V/tp]
    loss = vocab_parallel_cross_entropy(logits.clone().transpose(0, 1).contiguous(), labels[0].t().contiguous()).sum()
    loss.backward()
    full_logits = gather_from_tensor_model_parallel_region(logits.detach())  # [b, s, V]
    emb_grad = model.embedding.word_embeddings.weight.grad
    if tp > 1:
        parts = [torch.empty_like(model.embedding.word_embeddings.weight.grad) for _ in range(tp)]
        torch.distributed.all_gather(parts, model.embedding.word_embeddings.weight.grad,
                                     group=ps.get_tensor_model_parallel_group())
        emb_grad = torch.cat(parts)
    return {
        "logits": full_logits, "loss": loss.detach(), "emb_grad": emb_grad,
        "norm_grad": model.decoder.final_layernorm.weight.grad.clone(),
    }


def test_gpt_tp1_equals_tp2(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_multirank(_save, 1, args=(ckpt,), tp=1, pp=1, timeout=120)
    (ref,) = run_multirank(_tp_forward_backward, 1, args=(ckpt,), tp=1, pp=1, timeout=120)
    out = run_multirank(_tp_forward_backward, 2, args=(ckpt,), tp=2, pp=1, timeout=120)
    for r in out:
        torch.testing.assert_close(r["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["loss"], ref["loss"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(r["emb_grad"], ref["emb_grad"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r["norm_grad"], ref["norm_grad"], atol=1e-5, rtol=1e-4)
    assert ref["emb_grad"].abs().sum() > 0


def _pipeline_loss(rank, world, ckpt, tp, pp, num_micro):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    model = _load(tp, pp, ckpt)
    ids, labels = _data(seed=1, n=num_micro)
    batches = iter([(ids[i], labels[i]) for i in range(num_micro)])

    def forward_step(data_iterator, model):
        x, y = next(data_iterator)
        pos = torch.arange(SEQ)[None].expand(BATCH, SEQ)
        logits = model(x, pos, None)

        def loss_func(out):
            loss = vocab_parallel_cross_entropy(out.clone().transpose(0, 1).contiguous(), y.t().contiguous()).mean()
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[model], num_microbatches=num_micro,
        seq_length=SEQ, micro_batch_size=BATCH, forward_only=False,
    )
    if ps.is_pipeline_last_stage():
        return [float(d["loss"]) for d in losses]
    return None


def test_1f1b_tp2_pp2_equals_tp1_pp1(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_multirank(_save, 1, args=(ckpt,), tp=1, pp=1, timeout=120)
    (ref,) = run_multirank(_pipeline_loss, 1, args=(ckpt, 1, 1, 4), tp=1, pp=1, timeout=120)
    out = run_multirank(_pipeline_loss, 4, args=(ckpt, 2, 2, 4), tp=2, pp=2, timeout=240)
    last_stage = [r for r in out if r is not None]
    assert len(last_stage) == 2  # the two TP ranks of the last pipeline stage
    for r in last_stage:
        assert len(r) == 4
        torch.testing.assert_close(torch.tensor(r), torch.tensor(ref), atol=1e-5, rtol=1e-5)
