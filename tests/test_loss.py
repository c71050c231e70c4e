"""The CPU loss path (megapmp_kernels.pair_loss.ChunkedLinearCrossEntropy, lm_loss_sum, pmp_loss) against full-logit torch references,
and flat packing against row packing through the whole model.

Tolerance: fp32 on CPU. The references materialise [T x V] logits and let autograd differentiate
F.cross_entropy; the chunked Function computes the same softmax - onehot by hand, so values agree to
float rounding (~1e-6 relative on these O(1)-O(10) losses).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megapmp.config import model_preset
from megapmp.data.datasets import Pair
from megapmp.data.packing import IGNORE_INDEX, flatten_rows, pack_pairs
from megapmp.model.attention import attention_inputs
from megapmp.loss import Heads, lm_loss_sum, pmp_loss
from megapmp_kernels.pair_loss import ChunkedLinearCrossEntropy
from megapmp.model import Qwen2RewardModel


def full_logits_ce(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")


def leaf(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_()


@pytest.mark.parametrize("tokens,hidden,vocab,chunk", [(37, 13, 101, 5), (37, 13, 101, 37), (64, 24, 257, 1000),
                                                       (1, 7, 11, 3), (129, 16, 4099, 32)])
def test_chunked_linear_ce_matches_full_logits(tokens, hidden, vocab, chunk):
    torch.manual_seed(tokens + vocab)
    h, w = leaf(tokens, hidden, scale=3.0), leaf(vocab, hidden)
    t = torch.randint(0, vocab, (tokens,))
    got = ChunkedLinearCrossEntropy.apply(h, w, t, chunk)
    (2.5 * got).backward()  # a non-unit upstream gradient must scale both stored gradients
    got_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = full_logits_ce(h, w, t)
    (2.5 * want).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grads[0], h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grads[1], w.grad, rtol=1e-5, atol=1e-5)


def test_chunked_linear_ce_frozen_inputs_and_no_grad(monkeypatch):
    torch.manual_seed(0)
    h, w, t = leaf(20, 8), torch.randn(50, 8), torch.randint(0, 50, (20,))
    ChunkedLinearCrossEntropy.apply(h, w, t, 7).backward()  # only the hidden states need a gradient
    expected = torch.autograd.grad(full_logits_ce(h, w, t), h)[0]
    torch.testing.assert_close(h.grad, expected, rtol=1e-5, atol=1e-5)

    # Under no_grad (evaluation) no gradient is made at all: every chunk is called without outputs for it.
    import megapmp_kernels.pair_loss as loss_module

    calls = []
    real_chunk = loss_module._ce_chunk

    def spy(h, weight, targets, grad_hidden_out, grad_weight_acc, group):
        calls.append((grad_hidden_out is None, grad_weight_acc is None))
        return real_chunk(h, weight, targets, grad_hidden_out, grad_weight_acc, group)

    monkeypatch.setattr(loss_module, "_ce_chunk", spy)
    labels = t.reshape(4, 5)
    with torch.no_grad():
        value = lm_loss_sum(h.reshape(4, 5, 8), w.requires_grad_(), labels, chunk=7)
    assert calls == [(True, True)] * 3 and not value.requires_grad
    torch.testing.assert_close(value, full_logits_ce(h, w, t).detach(), rtol=1e-6, atol=1e-5)
    calls.clear()
    lm_loss_sum(h.reshape(4, 5, 8), w, labels, chunk=7).backward()
    assert calls == [(False, False)] * 3


def test_chunked_linear_ce_refuses_a_second_backward():
    h, w, t = leaf(6, 4), leaf(9, 4), torch.randint(0, 9, (6,))
    loss = ChunkedLinearCrossEntropy.apply(h, w, t, 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_chunked_linear_ce_bf16_weights_get_bf16_gradients():
    torch.manual_seed(1)
    h, w = leaf(33, 16, dtype=torch.bfloat16), leaf(97, 16, dtype=torch.bfloat16)
    t = torch.randint(0, 97, (33,))
    ChunkedLinearCrossEntropy.apply(h, w, t, 8).backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    h32, w32 = (x.detach().float().requires_grad_() for x in (h, w))
    full_logits_ce(h32, w32, t).backward()  # fp32 reference on the same (bf16-valued) inputs
    torch.testing.assert_close(h.grad.float(), h32.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad.float(), w32.grad, rtol=2e-2, atol=2e-2)


def test_lm_loss_sum_reads_only_labelled_positions():
    torch.manual_seed(2)
    hidden, w = leaf(3, 10, 8), leaf(40, 8)
    labels = torch.full((3, 10), IGNORE_INDEX)
    labels[0, 2:6] = torch.tensor([1, 5, 39, 0])
    labels[2, 7] = 11
    got = lm_loss_sum(hidden, w, labels, chunk=3)
    mask = labels != IGNORE_INDEX
    want = full_logits_ce(hidden[mask], w, labels[mask])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    g_got = torch.autograd.grad(got, (hidden, w))
    g_want = torch.autograd.grad(want, (hidden, w))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (g_got[0][~mask] == 0).all()


def random_pairs(n, seed, vocab):
    rng = np.random.default_rng(seed)
    return [Pair(*(rng.integers(2, vocab, int(rng.integers(1, 15))) for _ in range(3))) for _ in range(n)]


@pytest.mark.parametrize("layout", ["duplicated", "shared-prefix"])
def test_flat_packing_gives_the_row_packing_loss_and_gradients(layout):
    """The same pairs as [R, S] rows (with row-end padding) and as one flat row: same loss terms and
    the same gradient for every parameter -- the flat row only drops tokens nobody reads."""
    config = model_preset("tiny")
    pairs = random_pairs(9, seed=4, vocab=config.vocab_size)
    rows = pack_pairs(pairs, 40, layout, pad_id=0)
    assert rows.shape[0] > 1 and rows.num_real_tokens < np.prod(rows.shape), "want several rows with padding"
    results = []
    for batch in (rows, flatten_rows(rows, pad_id=0, multiple=4)):
        torch.manual_seed(0)
        model = Qwen2RewardModel(config, attention_backend="segmented")
        model.init_weights()
        b = batch.to_torch()
        hidden = model.train()(b.input_ids, b.position_ids, attention_inputs(b))
        out = pmp_loss(hidden, Heads.of(model), b, rm_coef=1.0, lm_coef=1.0,
                       global_pairs=len(pairs), global_lm_tokens=batch.num_lm_tokens, lm_chunk=16,
                       backend="torch")
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    for term in ("loss", "rm_loss", "lm_loss", "correct", "margin_sum"):
        torch.testing.assert_close(getattr(b, term), getattr(a, term), rtol=1e-5, atol=1e-5, msg=term)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_pmp_loss_under_bf16_autocast_keeps_rewards_fp32():
    """The trainer runs the loss inside the forward's autocast (bf16 logit GEMMs); the rewards must still
    be exact fp32 products, while the LM term moves only by bf16 rounding."""
    config = model_preset("tiny")
    pairs = random_pairs(6, seed=5, vocab=config.vocab_size)
    batch = flatten_rows(pack_pairs(pairs, 64, "shared-prefix", pad_id=0), pad_id=0).to_torch()
    torch.manual_seed(0)
    hidden = torch.randn(*batch.input_ids.shape, config.hidden_size) * 2.0
    lm_weight, score_weight = torch.randn(config.vocab_size, config.hidden_size) * 0.1, torch.randn(1, config.hidden_size)
    kwargs = dict(rm_coef=1.0, lm_coef=1.0, global_pairs=len(pairs), global_lm_tokens=batch.num_lm_tokens,
                  lm_chunk=32, backend="torch")
    fp32 = pmp_loss(hidden, Heads(lm_weight, score_weight), batch, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pmp_loss(hidden, Heads(lm_weight, score_weight), batch, **kwargs)
        rows = hidden.reshape(-1, config.hidden_size)[batch.chosen_index]
        bf16_rewards = rows @ score_weight.reshape(-1)  # what an unguarded product would give
    assert mixed.rm_loss.dtype == torch.float32 and mixed.lm_loss.dtype == torch.float32
    assert torch.equal(mixed.rm_loss, fp32.rm_loss) and torch.equal(mixed.margin_sum, fp32.margin_sum)
    assert bf16_rewards.dtype == torch.bfloat16  # so the equality above is not autocast being off
    torch.testing.assert_close(mixed.lm_loss, fp32.lm_loss, rtol=2e-2, atol=0)
    assert not torch.equal(mixed.lm_loss, fp32.lm_loss)  # the LM GEMMs really ran in bf16


def test_loss_backend_names_agree_with_config_validation():
    """config.py names the loss backends without importing torch; they must be megapmp.loss's, and a bad
    one is refused with the list in the message."""
    from megapmp.config import LOSS_BACKEND_NAMES, ConfigError, LossConfig
    from megapmp.loss import LOSS_BACKENDS
    from megapmp_kernels.pair_loss import BACKENDS

    assert LOSS_BACKEND_NAMES == LOSS_BACKENDS == ("auto", *BACKENDS)
    for name in LOSS_BACKENDS:
        LossConfig(backend=name).validate()
    with pytest.raises(ConfigError, match="auto, torch, triton, triton_recompute"):
        LossConfig(backend="triton-fused").validate()
