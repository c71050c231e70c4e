"""The fused packed-pair loss (megapmp_kernels.pair_loss) against full-logits references.

On a CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets
when no CUDA device is visible; numpy, fp32 only), with small tiles (BT=16, BV=32, BD=16) so that odd shapes
exercise every mask: T, V and H not multiples of the tiles, forward vocab splits past the vocabulary (empty
splits), the backward's vocab chunks not aligned to the tiles, ignore_index rows, T = 1. On a GPU those
interpreter tests skip (run them with the GPU hidden: ``CUDA_VISIBLE_DEVICES= python -m pytest ...``) and
the ``cuda`` tests at the end run the compiled kernels with the launch configurations of a real run.

Reference: pair_loss_reference on float64 copies of the inputs (full logits, autograd). Tolerance,
fp32: rtol 1e-5 and atol 1e-6 x the reference tensor's largest magnitude (per tensor: elementwise
relative error means nothing for entries that cancel to ~0). Both backends land near 1e-7 relative
(fp32 tile sums in another order); a wrong mask, shard offset or missing term is O(1).
"""
import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distributed_utils import run_ranks
from megapmp.loss import LOSS_BACKEND_ENV, Heads, lm_loss_sum, loss_backend, pmp_loss, resolve_loss_backend
from megapmp_kernels import pair_loss as PL
from megapmp_kernels import softmax_grad
from triton_interpreter import use_interpreter

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"  # conftest: only where no GPU is visible
# The Triton kernels on CPU tensors: the interpreter's tests.
needs_triton = pytest.mark.skipif(not (HAS_TRITON and INTERPRETING),
                                  reason="needs triton and its CPU interpreter (TRITON_INTERPRET=1, set by conftest "
                                         "where no CUDA device is visible); the torch backend is still tested")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton), pytest.param("triton_recompute", marks=needs_triton)]
KERNEL_BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]  # of the recompute path's primitives
RTOL, ATOL_SCALE = 1e-5, 1e-6
TILES = {"BT": 16, "BV": 32, "BD": 16}
BLOCK_V = 32  # the row kernels' column block under the interpreter (softmax_grad.INTERPRET_BLOCK_V)


def backend_options(backend, T=None, chunk_cols=None, splits=None, chunk_tokens=None):
    """fused_pair_loss keyword arguments pinning each backend's chunking and tiles for the interpreter."""
    if backend == "triton_recompute":
        return dict(config=TILES, num_splits=splits, chunk_bytes=T * chunk_cols * 4 if chunk_cols else None)
    if backend == "triton":
        return dict(block_v=BLOCK_V, chunk_tokens=chunk_tokens)
    return dict(chunk_bytes=T * chunk_cols * 4 if chunk_cols else None)


def close(actual, expected, what=""):
    expected = expected.detach()
    atol = ATOL_SCALE * max(float(expected.abs().max()), 1e-30) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().to(expected.dtype), expected, rtol=RTOL, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def make_inputs(seed, T, H, V, N, ignored=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)  # logits ~ N(0, 4): a peaked softmax
    targets = torch.randint(0, V, (T,), generator=g)
    for i in ignored:
        targets[i] = PL.IGNORE_INDEX
    chosen, rejected = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    score = torch.randn(1, H, generator=g) * 0.3
    return hidden, weight, targets, chosen, rejected, score


def leaves(tensors, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in tensors]


def reference(hidden, weight, targets, chosen, rejected, score, lm_coef=0.7, rm_coef=1.3):
    """float64 full-logits loss and gradients (hidden, weight, chosen, rejected, score)."""
    h, w, c, r, s = leaves([hidden, weight, chosen, rejected, score], torch.float64)
    out = PL.pair_loss_reference(h, w, targets, c, r, s)
    grads = torch.autograd.grad(lm_coef * out.lm_sum + rm_coef * out.rm_sum, [h, w, c, r, s])
    return out, grads


SHAPES = [  # (seed, T, H, V, N, ignored target rows, recompute: backward chunk columns and forward splits,
    #          grad-in-forward / torch: target rows per chunk)
    # 37 rows in chunks of 16 (16 + 16 + 5: the fp32 dW accumulation runs, the last chunk is short)
    pytest.param(1, 37, 48, 389, 5, (3, 36), 128, 3, 16, id="T37-H48-V389"),
    pytest.param(2, 1, 32, 100, 1, (), 128, 3, 16, id="T1-V100-empty-split"),  # 4 vocab tiles over 3 splits: one empty
    pytest.param(3, 70, 50, 257, 3, (0,), 10**9, 2, None, id="T70-H50-V257-one-chunk"),  # default chunk > T
    pytest.param(4, 20, 24, 150, 2, tuple(range(20)), 128, 1, 16, id="all-ignored"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,T,H,V,N,ignored,chunk_cols,splits,chunk_tokens", SHAPES)
def test_loss_and_gradients_match_reference(backend, seed, T, H, V, N, ignored, chunk_cols, splits, chunk_tokens):
    inputs = make_inputs(seed, T, H, V, N, ignored)
    ref, ref_grads = reference(*inputs)
    h, w, c, r, s = leaves([inputs[0], inputs[1], inputs[3], inputs[4], inputs[5]])
    out = PL.fused_pair_loss(h, w, inputs[2], c, r, s, backend=backend,
                             **backend_options(backend, T, chunk_cols, splits, chunk_tokens))
    close(out.lm_sum, ref.lm_sum, "lm_sum")
    close(out.rm_sum, ref.rm_sum, "rm_sum")
    close(out.margins, ref.margins, "margins")
    assert not out.margins.requires_grad
    grads = torch.autograd.grad(0.7 * out.lm_sum + 1.3 * out.rm_sum, [h, w, c, r, s])
    for name, got, want in zip(["hidden", "lm_weight", "chosen", "rejected", "score_weight"], grads, ref_grads):
        assert got.shape == want.shape and got.dtype == torch.float32, name
        close(got, want, f"d {name}")
    if len(ignored) == T:
        assert out.lm_sum.item() == 0.0 and not grads[0].any() and not grads[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_only_and_rm_only(backend):
    hidden, weight, targets, chosen, rejected, score = make_inputs(5, 23, 40, 131, 4)
    h, w = leaves([hidden, weight])
    out = PL.fused_pair_loss(h, w, targets, backend=backend, **backend_options(backend, splits=2, chunk_tokens=9))
    hd, wd = leaves([hidden, weight], torch.float64)
    ref = F.cross_entropy(hd @ wd.t(), targets, reduction="sum")
    close(out.lm_sum, ref, "lm_sum")
    assert out.rm_sum.item() == 0.0 and out.margins.numel() == 0
    for got, want in zip(torch.autograd.grad(out.lm_sum, [h, w]), torch.autograd.grad(ref, [hd, wd])):
        close(got, want, "lm-only grads")
    c, r, s = leaves([chosen, rejected, score])
    out = PL.fused_pair_loss(None, None, None, c, r, s, backend=backend)
    ref, ref_grads = reference(hidden, weight, targets, chosen, rejected, score, lm_coef=0.0, rm_coef=1.0)
    close(out.rm_sum, ref.rm_sum, "rm_sum")
    for got, want in zip(torch.autograd.grad(out.rm_sum, [c, r, s]), ref_grads[2:]):
        close(got, want, "rm-only grads")


@needs_triton
def test_kernels_write_every_element_and_are_deterministic():
    hidden, weight, targets, *_ = make_inputs(6, 37, 48, 389, 1, ignored=(5,))
    lse_parts, z_parts = PL.lse_partials(hidden, weight, targets, backend="triton", num_splits=4, config=TILES)
    assert lse_parts.shape == (4, 37) and torch.isfinite(lse_parts).all() and torch.isfinite(z_parts).all()
    lse, z = PL.combine_partials(lse_parts, z_parts)
    ref_logits = hidden.double() @ weight.double().t()
    close(lse, torch.logsumexp(ref_logits, -1), "lse")
    valid = targets != PL.IGNORE_INDEX
    close(z[valid], ref_logits[valid].gather(1, targets[valid, None]).squeeze(1), "target logit")
    scale = torch.tensor([0.5])
    outs = []
    for _ in range(2):
        poisoned = torch.full((37, 389 - 61), float("nan"))  # columns [61, 389): not tile-aligned
        outs.append(PL.grad_logits(hidden, weight, targets, lse, scale, 61, 389, backend="triton", out=poisoned,
                                   config=TILES))
    assert torch.isfinite(outs[0]).all(), "grad_logits left elements unwritten"
    assert torch.equal(outs[0], outs[1]), "grad_logits is not deterministic"
    want = PL.grad_logits(hidden, weight, targets, lse, scale, 61, 389, backend="torch")
    close(outs[0], want, "grad_logits vs torch twin")
    assert not outs[0][5].any()  # the ignore_index row


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vocab_split_in_one_process(backend):
    """V = 389 split unevenly into two shards [0, 195) and [195, 389), as two TP ranks would hold them:
    each shard's partials (local lse, target logit where owned), combined; then each shard's
    grad-logits with the global lse gives its dW rows and its partial dH, which sum to the full one."""
    hidden, weight, targets, *_ = make_inputs(7, 37, 48, 389, 1, ignored=(2,))
    assert {int(t) // 195 for t in targets if t >= 0} == {0, 1}  # both shards own targets
    cfg = TILES if backend == "triton" else None
    shards = [(0, weight[:195]), (195, weight[195:])]
    parts = [PL.lse_partials(hidden, w, targets, vocab_start=v0, backend=backend, num_splits=2, config=cfg)
             for v0, w in shards]
    lse, z = PL.combine_partials(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    valid = targets != PL.IGNORE_INDEX
    hd, wd = leaves([hidden, weight], torch.float64)
    ref = F.cross_entropy(hd @ wd.t(), targets, reduction="sum")
    close(torch.where(valid, lse - z, 0).sum(), ref, "combined loss")
    ref_dh, ref_dw = torch.autograd.grad(ref * 0.25, [hd, wd])
    scale = torch.tensor([0.25])
    dh = torch.zeros_like(hidden)
    for v0, w in shards:
        g = PL.grad_logits(hidden, w, targets, lse, scale, 0, w.shape[0], vocab_start=v0, backend=backend,
                           config=cfg)
        close(g.t() @ hidden, ref_dw[v0:v0 + w.shape[0]], f"dW shard at {v0}")
        dh += g @ w
    close(dh, ref_dh, "dH summed over shards")


def _tp_rank(rank, world, seed, sequence_parallel):
    use_interpreter()  # a fresh rank process: the interpreter where there is no GPU (as conftest does)
    from megapmp.loss import lm_loss_sum
    from megapmp.parallel.topology import ParallelDims

    group = ParallelDims(tp=world, world_size=world).build().tp_group
    T, H = 30, 40
    hidden, weight, targets, *_ = make_inputs(seed, T, H, 2 * 131, 1, ignored=(4,))
    labels = targets.reshape(1, -1)
    hd, wd = leaves([hidden, weight], torch.float64)
    ref = F.cross_entropy(hd @ wd.t(), targets, reduction="sum")
    ref_dh, ref_dw = torch.autograd.grad(ref, [hd, wd])
    if sequence_parallel:  # this rank's token shard [T / tp, H]; the all-gather's backward reduce-scatters
        hidden, ref_dh = hidden.chunk(world)[rank], ref_dh.chunk(world)[rank]
    results = {}
    for backend in ["torch", "triton", "triton_recompute"] if HAS_TRITON and INTERPRETING else ["torch"]:
        h = (hidden if sequence_parallel else hidden.reshape(1, T, H)).clone().requires_grad_()
        w = weight.chunk(world)[rank].clone().requires_grad_()
        # chunks of 7 of the 29 target rows: the grad-in-forward path combines every chunk over the group
        loss = lm_loss_sum(h, w, labels, group, sequence_parallel=sequence_parallel, backend=backend, chunk=7)
        close(loss, ref, f"{backend} loss")
        loss.backward()
        close(h.grad.reshape(ref_dh.shape), ref_dh, f"{backend} dH (partials summed over the TP group)")
        close(w.grad, ref_dw.chunk(world)[rank], f"{backend} dW shard")
        results[backend] = loss.item()
    return results


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_vocab_parallel_two_gloo_ranks(sequence_parallel):
    """Every backend behind the vocab-parallel lm_loss_sum on 2 gloo ranks against the single-process
    full-logits reference: the all-reduce combine (per row chunk for grad-in-forward), vocab_start
    offsets, and the partial dH summed by copy_to_tp (TP) or by the sequence all-gather's reduce-scatter
    (TP+SP)."""
    results = run_ranks(2, _tp_rank, 8, sequence_parallel, timeout=120)
    assert results[0] == results[1]


# -- the torch-chunked CPU path and the pmp_loss wiring -----------------------------------------------

def test_chunked_cpu_path_matches_naive_full_logits():
    hidden, weight, targets, *_ = make_inputs(9, 45, 32, 211, 1, ignored=(0, 7, 44))
    labels = targets.reshape(3, 15)
    h, w = leaves([hidden.reshape(3, 15, 32), weight])
    got = lm_loss_sum(h, w, labels, chunk=7)  # 7 checkpointed chunks of 7 tokens (the last one short)
    hd, wd = leaves([hidden, weight], torch.float64)
    ref = F.cross_entropy(hd @ wd.t(), targets, reduction="sum")
    close(got, ref, "chunked loss")
    for got_g, want in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(ref, [hd, wd])):
        close(got_g.reshape(want.shape), want, "chunked grads")
    naive, _logits = PL.naive_pair_loss(hidden, weight, targets)
    close(naive.lm_sum, ref, "naive (seed) path")


def _packed_batch(seed):
    g = torch.Generator().manual_seed(seed)
    R, S, V = 2, 19, 97
    labels = torch.randint(0, V, (R, S), generator=g)
    labels[torch.rand(R, S, generator=g) < 0.4] = PL.IGNORE_INDEX
    chosen = torch.tensor([5, 18, 30])
    rejected = torch.tensor([9, 25, 37])
    return SimpleNamespace(labels=labels, chosen_index=chosen, rejected_index=rejected), R, S, V


@needs_triton
@pytest.mark.parametrize("coefs", [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0)], ids=["pmp", "lm-pretrain", "rm-finetune"])
def test_pmp_loss_triton_backend_matches_torch_backend(coefs):
    rm_coef, lm_coef = coefs
    batch, R, S, V = _packed_batch(10)
    g = torch.Generator().manual_seed(11)
    hidden, weight, score = torch.randn(R, S, 36, generator=g), torch.randn(V, 36, generator=g) * 0.3, \
        torch.randn(1, 36, generator=g)
    kwargs = dict(rm_coef=rm_coef, lm_coef=lm_coef, global_pairs=5, global_lm_tokens=40)
    outs, grads = {}, {}
    for backend in ["torch", "triton", "triton_recompute"]:
        h, w, s = leaves([hidden, weight, score])
        out = pmp_loss(h, Heads(w, s), batch, backend=backend, **kwargs)
        out.loss.backward()
        outs[backend], grads[backend] = out, [x.grad if x.grad is not None else torch.zeros_like(x) for x in (h, w, s)]
    b = outs["torch"]
    for backend in ["triton", "triton_recompute"]:
        a = outs[backend]
        for field in ("loss", "rm_loss", "lm_loss", "correct", "margin_sum"):
            close(getattr(a, field), getattr(b, field), f"{backend} {field}")
        assert a.num_pairs == b.num_pairs == 3
        for name, x, y in zip(["hidden", "lm_weight", "score"], grads[backend], grads["torch"]):
            close(x, y, f"{backend} d {name}")


def test_backend_selection(monkeypatch):
    monkeypatch.delenv(LOSS_BACKEND_ENV, raising=False)
    assert resolve_loss_backend("cpu") == "torch"  # auto on CPU: torch-chunked, even with the interpreter on
    assert loss_backend("cpu") == "torch-chunked"
    assert loss_backend("cpu", tp_size=2) == "vocab-parallel torch-chunked"
    monkeypatch.setenv(LOSS_BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="loss backend must be one of"):
        resolve_loss_backend("cpu")
    monkeypatch.setenv(LOSS_BACKEND_ENV, "torch")
    assert resolve_loss_backend("cuda") == "torch"
    if HAS_TRITON and INTERPRETING:
        monkeypatch.setenv(LOSS_BACKEND_ENV, "triton")
        assert loss_backend("cpu") == "triton-grad-in-forward"  # TRITON_INTERPRET=1 in this process
        assert resolve_loss_backend("cpu", backend="triton_recompute") == "triton_recompute"
        assert loss_backend("cpu", tp_size=2, backend="triton_recompute") == "vocab-parallel triton-recompute"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        for explicit in ("triton", "triton_recompute"):
            with pytest.raises(ValueError, match=f"'{explicit}' was requested but cannot run.*need a CUDA device"):
                resolve_loss_backend("cpu", backend=explicit)
        assert resolve_loss_backend("cpu", backend="torch") == "torch"  # the argument beats the environment
        assert resolve_loss_backend("cpu", backend="auto") == "torch"


BF16_BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_bf16_weights(backend):
    """The model-dtype path: bf16 logits chunks (33 rows in chunks of 8: the fp32 dW accumulation of bf16
    GEMMs runs), softmax - onehot stored in bf16, gradients in bf16; bf16 rounding: rtol 2e-2."""
    hidden, weight, targets, chosen, rejected, score = make_inputs(12, 33, 64, 300, 3, ignored=(1,))
    ref, ref_grads = reference(hidden, weight, targets, chosen, rejected, score)
    h, w, c, r, s = leaves([hidden, weight, chosen, rejected, score], torch.bfloat16)
    out = PL.fused_pair_loss(h, w, targets, c, r, s, backend=backend, **backend_options(backend, chunk_tokens=8))
    grads = torch.autograd.grad(0.7 * out.lm_sum + 1.3 * out.rm_sum, [h, w, c, r, s])
    torch.testing.assert_close(out.lm_sum.double(), ref.lm_sum, rtol=2e-2, atol=0)
    for name, got, want in zip(["hidden", "lm_weight", "chosen", "rejected", "score"], grads, ref_grads):
        assert got.dtype == torch.bfloat16, name
        err = (got.double() - want).norm() / want.norm()
        assert err < 2e-2, f"d {name}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_autocast_sets_the_compute_dtype(backend):
    """Under autocast the logit GEMMs run in the autocast dtype (as torch.mm would); gradients come back
    in the inputs' dtypes (fp32 master weights), the reward term stays fp32."""
    hidden, weight, targets, chosen, rejected, score = make_inputs(13, 21, 32, 200, 2)
    ref, ref_grads = reference(hidden, weight, targets, chosen, rejected, score)
    h, w, c, r, s = leaves([hidden, weight, chosen, rejected, score])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = PL.fused_pair_loss(h, w, targets, c, r, s, backend=backend, **backend_options(backend, chunk_tokens=8))
    close(out.rm_sum, ref.rm_sum, "fp32 reward term")
    assert out.lm_sum.item() != pytest.approx(ref.lm_sum.item(), rel=1e-6)  # bf16 products: not fp32 exact
    torch.testing.assert_close(out.lm_sum.double(), ref.lm_sum, rtol=2e-2, atol=0)
    grads = torch.autograd.grad(0.7 * out.lm_sum + 1.3 * out.rm_sum, [h, w, c, r, s])
    for name, got, want in zip(["hidden", "lm_weight", "chosen", "rejected", "score"], grads, ref_grads):
        assert got.dtype == torch.float32, name
        assert (got.double() - want).norm() / want.norm() < 2e-2, name


@needs_triton
def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (triton.autotune wrappers, meta-dependent grids), run under the interpreter
    with one small candidate per kernel (a single config is used without benchmarking)."""
    small = [(16, 32, 16, 4, 2)]
    monkeypatch.setattr(PL, "_TILES", {key: small for key in PL._TILES})
    monkeypatch.setattr(PL, "_INTERPRET_CONFIG", None)
    monkeypatch.setattr(PL, "_KERNELS", None)
    inputs = make_inputs(14, 19, 32, 97, 2, ignored=(3,))
    ref, ref_grads = reference(*inputs)
    h, w, c, r, s = leaves([inputs[0], inputs[1], inputs[3], inputs[4], inputs[5]])
    out = PL.fused_pair_loss(h, w, inputs[2], c, r, s, backend="triton_recompute", num_splits=2,
                             chunk_bytes=19 * 64 * 4)
    close(out.lm_sum, ref.lm_sum, "lm_sum")
    grads = torch.autograd.grad(0.7 * out.lm_sum + 1.3 * out.rm_sum, [h, w, c, r, s])
    for got, want in zip(grads, ref_grads):
        close(got, want, "grads")
    assert set(PL._KERNELS["tuned"]) == {("lse", 2), ("lse", 4), ("grad", 2), ("grad", 4)}


# -- the grad-in-forward backend's row kernels (softmax_grad.py) and its chunk loop ----------------------------

def _row_case(dtype, vocab_start, seed=15, rows=11, V=97):
    """Logits [11, 97] (97 columns: 3 full blocks of 32 and a partial one) with targets inside this slice,
    outside it (another rank's) and ignore_index."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, V, generator=g) * 3.0).to(dtype)
    targets = vocab_start + torch.randint(0, V, (rows,), generator=g)
    targets[2] = vocab_start + V + 5  # owned by the next rank
    targets[7] = PL.IGNORE_INDEX
    targets[9] = vocab_start + V - 1  # last column: in the partial block
    if vocab_start:
        targets[4] = vocab_start - 1  # owned by the previous rank
    return logits, targets


def _softmax_grad_reference(logits, targets, lse, vocab_start):
    """float64 (exp(x - lse) - onehot) with ignore_index rows 0, written from the definition."""
    want = (logits.double() - lse.double()[:, None]).exp()
    for i, t in enumerate(targets.tolist()):
        if t == PL.IGNORE_INDEX:
            want[i] = 0.0
        elif 0 <= t - vocab_start < logits.shape[1]:
            want[i, t - vocab_start] -= 1.0
    return want


def _check_softmax_grad(got, logits, targets, lse, vocab_start, dtype):
    want = _softmax_grad_reference(logits, targets, lse, vocab_start)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # stored in the logits' dtype: one bf16 rounding
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab_start", [0, 300], ids=["whole-vocab", "slice-at-300"])
def test_row_kernels_match_definition_and_torch_twin(dtype, vocab_start):
    logits, targets = _row_case(dtype, vocab_start)
    lse, z = softmax_grad.row_lse(logits, targets, vocab_start=vocab_start, block_v=BLOCK_V)
    x = logits.double()
    close(lse, torch.logsumexp(x, dim=-1), "kernel A lse")
    want_z = torch.tensor([x[i, t - vocab_start] if 0 <= t - vocab_start < x.shape[1] else 0.0
                           for i, t in enumerate(targets.tolist())], dtype=torch.float64)
    close(z, want_z, "kernel A target logit (0 where another rank owns the target)")
    twin = softmax_grad.row_lse(logits, targets, vocab_start=vocab_start, backend="torch")
    close(lse, twin[0].double(), "kernel A vs torch twin")
    got = softmax_grad.softmax_minus_onehot_(logits.clone(), targets, lse, vocab_start=vocab_start, block_v=BLOCK_V)
    assert got.dtype == dtype
    _check_softmax_grad(got, logits, targets, lse, vocab_start, dtype)
    assert not got[7].any(), "the ignore_index row must be 0"
    twin_grad = softmax_grad.softmax_minus_onehot_(logits.clone(), targets, lse, vocab_start=vocab_start,
                                                   backend="torch")
    torch.testing.assert_close(got, twin_grad, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)
    poisoned = torch.full_like(logits, float("nan"))
    poisoned.copy_(logits)
    softmax_grad.softmax_minus_onehot_(poisoned, targets, lse, vocab_start=vocab_start, block_v=BLOCK_V)
    assert torch.equal(poisoned, got), "in place: the same values as on a fresh copy, every element written"


@needs_triton
@pytest.mark.parametrize("broken", ["onehot not subtracted", "ignored row not zeroed", "lse off by 1e-3"])
def test_softmax_grad_check_catches_a_broken_kernel(broken):
    """The check of the kernel test above, fed a kernel output broken the ways a kernel could be wrong:
    each must fail it (the unbroken output passes it in the test above)."""
    logits, targets = _row_case(torch.float32, 0)
    lse, _ = softmax_grad.row_lse(logits, targets, block_v=BLOCK_V)
    got = softmax_grad.softmax_minus_onehot_(logits.clone(), targets, lse, block_v=BLOCK_V)
    _check_softmax_grad(got, logits, targets, lse, 0, torch.float32)
    if broken == "onehot not subtracted":
        rows = torch.nonzero((targets >= 0) & (targets < logits.shape[1])).squeeze(-1)
        got[rows, targets[rows]] += 1.0
    elif broken == "ignored row not zeroed":
        got[7] = (logits[7] - lse[7]).exp()
    else:
        got = softmax_grad.softmax_minus_onehot_(logits.clone(), targets, lse + 1e-3, block_v=BLOCK_V)
    with pytest.raises(AssertionError):
        _check_softmax_grad(got, logits, targets, lse, 0, torch.float32)


@needs_triton
def test_grad_in_forward_makes_only_the_gradients_a_backward_needs(monkeypatch):
    """Kernel B runs once per chunk when a backward can follow (37 rows, chunks of 10: 4), never under
    no_grad; a frozen LM head gets no dW accumulation; a second backward is refused."""
    hidden, weight, targets, *_ = make_inputs(16, 37, 24, 131, 1, ignored=(4,))
    calls = {"B": 0, "dW": 0}
    real_b, real_acc = PL.softmax_minus_onehot_, PL.accumulate_fp32

    def spy_b(*args, **kwargs):
        calls["B"] += 1
        return real_b(*args, **kwargs)

    def spy_acc(*args, **kwargs):
        calls["dW"] += 1
        return real_acc(*args, **kwargs)

    monkeypatch.setattr(PL, "softmax_minus_onehot_", spy_b)
    monkeypatch.setattr(PL, "accumulate_fp32", spy_acc)
    opts = dict(backend="triton", chunk_tokens=10, block_v=BLOCK_V)
    h, w = leaves([hidden, weight])
    hd, wd = leaves([hidden, weight], torch.float64)
    ref = F.cross_entropy(hd @ wd.t(), targets, reduction="sum")
    ref_dh, ref_dw = torch.autograd.grad(ref, [hd, wd])
    with torch.no_grad():
        value = PL.fused_pair_loss(h, w, targets, **opts).lm_sum
    close(value, ref, "no_grad loss")
    assert calls == {"B": 0, "dW": 0} and not value.requires_grad
    loss = PL.fused_pair_loss(h, w, targets, **opts).lm_sum
    assert calls == {"B": 4, "dW": 4}
    (2.5 * loss).backward(retain_graph=True)  # the upstream gradient scales both stored gradients
    close(h.grad, 2.5 * ref_dh, "dH x 2.5")
    close(w.grad, 2.5 * ref_dw, "dW x 2.5")
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
    calls.update(B=0, dW=0)
    h.grad = None
    PL.fused_pair_loss(h, w.detach(), targets, **opts).lm_sum.backward()
    assert calls == {"B": 4, "dW": 0}
    close(h.grad, ref_dh, "dH with a frozen LM head")
    empty = leaves([hidden[:0]])[0]  # no target rows this micro-batch: zero loss, zero gradients
    out = PL.fused_pair_loss(empty, w, targets[:0], **opts).lm_sum
    out.backward()
    assert out.item() == 0.0
    assert empty.grad is None or not empty.grad.any()


def _exact_out_dtype_standins(monkeypatch, round_accumulator=False):
    """CPU stand-ins for CUDA's torch.mm / torch.addmm with ``out_dtype`` (absent on CPU): bf16 operands,
    an fp32 product; ``round_accumulator`` imitates a path that passes the accumulator through bf16."""
    real_mm, real_addmm = torch.mm, torch.addmm

    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b) if out is None else real_mm(a, b, out=out)
        return real_mm(a.float(), b.float())

    def addmm(acc, a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real_addmm(acc, a, b) if out is None else real_addmm(acc, a, b, out=out)
        start = acc.bfloat16().float() if round_accumulator else acc
        result = start + real_mm(a.float(), b.float())
        return out.copy_(result) if out is not None else result

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)


def test_fp32_accumulation_probe_checks_values(monkeypatch):
    monkeypatch.setattr(PL, "_FP32_ACCUMULATION", {})
    assert PL.fp32_accumulation_mode("cpu", torch.bfloat16) == "cast"  # torch has no out_dtype GEMM on CPU
    monkeypatch.setattr(PL, "_FP32_ACCUMULATION", {})
    _exact_out_dtype_standins(monkeypatch)
    assert PL.fp32_accumulation_mode("cpu", torch.bfloat16) == "addmm"
    monkeypatch.setattr(PL, "_FP32_ACCUMULATION", {})
    _exact_out_dtype_standins(monkeypatch, round_accumulator=True)  # runs, but loses the accumulator's bits
    assert PL.fp32_accumulation_mode("cpu", torch.bfloat16) == "mm"


@pytest.mark.parametrize("mode", ["addmm", "mm", "cast"])
def test_accumulate_fp32_modes(monkeypatch, mode):
    """acc + a @ b for bf16 a, b into an fp32 acc, in each mode (addmm / mm through exact CPU stand-ins of
    the CUDA out_dtype GEMMs): addmm / mm keep fp32 precision; cast rounds each product to bf16 once."""
    _exact_out_dtype_standins(monkeypatch)
    g = torch.Generator().manual_seed(17)
    a, b = torch.randn(40, 24, generator=g).bfloat16(), torch.randn(24, 8, generator=g).bfloat16()
    acc = torch.randn(40, 8, generator=g) * 100
    want = acc.double() + a.double() @ b.double()
    first = PL.accumulate_fp32(None, a, b, mode=mode)
    assert first.dtype == torch.float32
    got = PL.accumulate_fp32(acc, a, b, mode=mode)
    assert got is acc, "the accumulator is updated in place"
    tol = 1e-6 if mode != "cast" else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(first.double(), a.double() @ b.double(), rtol=tol, atol=tol)


def test_grad_in_forward_kernels_compile_for_hopper():
    """The interpreter runs the kernels' Python; this compiles them for sm_90 as a GPU run would (no GPU
    needed), so a type or layout error of real compilation fails here and not on a lent device."""
    pytest.importorskip("triton")
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter patches triton
    code = "import json; from megapmp_kernels import softmax_grad; print(json.dumps(softmax_grad.compile_for_gpu(90)))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(sizes) == {"lse_bf16", "grad_bf16", "lse_fp32", "grad_fp32"} and min(sizes.values()) > 1000


# -- the interpreter's scope --------------------------------------------------------------------------------

@pytest.mark.parametrize("cuda", [False, True], ids=["no-gpu", "gpu"])
def test_conftest_sets_the_interpreter_only_without_cuda(cuda):
    """What a CUDA run would see, on any machine: a fresh process with torch.cuda.is_available() forced
    to ``cuda`` loads tests/conftest.py and this test module; TRITON_INTERPRET must then be set exactly when
    there is no GPU (a leak into a CUDA run would send inductor's and the loss's Triton kernels to the
    interpreter)."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys, os, torch; torch.cuda.is_available = lambda: {cuda}; sys.path.insert(0, {tests!r}); "
            "import conftest; import test_pair_loss_kernel as t; "
            "print(os.environ.get('TRITON_INTERPRET'), conftest.INTERPRETING, t.INTERPRETING)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == (["None", "False", "False"] if cuda else ["1", "True", "True"])


# -- on a GPU: the compiled kernels, with the launch configurations of a real run -----------------------------

def cuda_inputs(seed, T, H, V, N, dtype, ignored=()):
    tensors = make_inputs(seed, T, H, V, N, ignored)
    h, w, c, r, s = (t.to("cuda", dtype).requires_grad_() for t in (tensors[0], tensors[1], *tensors[3:]))
    return tensors, (h, w, tensors[2].cuda(), c, r, s)


def relative_error(got, want):
    return float((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("backend", ["triton", "triton_recompute"])
def test_cuda_fused_loss_matches_reference(backend, dtype):
    """V = 10,007: two full 4096-column blocks of the row kernels and a partial one, vocab tiles past the end;
    700 target rows in chunks of 256 (three chunks, the fp32 dW accumulation over them); ignored rows. The
    recompute path with one pinned tile config (autotuning is timed by tools/bench_loss.py, not here).
    Tolerance: bf16 operands 2e-2 relative, fp32 (cuBLAS without tf32; Triton 'ieee') 1e-4."""
    tensors, (h, w, targets, c, r, s) = cuda_inputs(21, 700, 256, 10_007, 6, dtype, ignored=(0, 5, 699))
    ref, ref_grads = reference(*tensors)
    options = (dict(chunk_tokens=256) if backend == "triton" else
               dict(config={"BT": 64, "BV": 128, "BD": 32, "num_warps": 4, "num_stages": 3}))
    out = PL.fused_pair_loss(h, w, targets, c, r, s, backend=backend, **options)
    grads = torch.autograd.grad(0.7 * out.lm_sum + 1.3 * out.rm_sum, [h, w, c, r, s])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert relative_error(out.lm_sum, ref.lm_sum) < tol and relative_error(out.rm_sum, ref.rm_sum) < 1e-4
    for name, got, want in zip(["hidden", "lm_weight", "chosen", "rejected", "score"], grads, ref_grads):
        assert got.dtype == dtype and got.is_cuda, name
        assert relative_error(got, want) < tol, f"d {name}: {relative_error(got, want):.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_row_kernels_with_the_gpu_block(dtype):
    """softmax_grad's two kernels at GPU_BLOCK_V (4096) and 8 warps on 40 x 9,001 logits against the
    float64 definition: every element written (NaN-poisoned copy), the ignored row zero."""
    logits, targets = _row_case(dtype, 300, rows=40, V=9001)
    logits, targets = logits.cuda(), targets.cuda()
    lse, z = softmax_grad.row_lse(logits, targets, vocab_start=300)
    close(lse.cpu(), torch.logsumexp(logits.double().cpu(), -1), "lse")
    poisoned = torch.full_like(logits, float("nan"))
    poisoned.copy_(logits)
    got = softmax_grad.softmax_minus_onehot_(poisoned, targets, lse, vocab_start=300)
    assert torch.isfinite(got).all()
    _check_softmax_grad(got.cpu(), logits.cpu(), targets.cpu(), lse.cpu(), 300, dtype)


@pytest.mark.cuda
def test_cuda_fp32_accumulation_mode_keeps_fp32_bits():
    """The probe's answer on this device (printed: the device check reads it) and the accumulation it
    selects against float64: bf16 products summed into fp32 over 8 chunks lose nothing to bf16 rounding."""
    mode = PL.fp32_accumulation_mode(torch.device("cuda"), torch.bfloat16)
    print(f"fp32_accumulation_mode(cuda, bf16) = {mode}")
    assert mode in ("addmm", "mm", "cast")
    g = torch.Generator().manual_seed(22)
    parts = [(torch.randn(64, 512, generator=g).bfloat16(), torch.randn(512, 96, generator=g).bfloat16())
             for _ in range(8)]
    acc = None
    for a, b in parts:
        acc = PL.accumulate_fp32(acc, a.cuda(), b.cuda())
    want = sum(a.double() @ b.double() for a, b in parts)
    err = relative_error(acc, want)
    assert acc.dtype == torch.float32 and err < (1e-5 if mode != "cast" else 1e-2), (mode, err)


@pytest.mark.cuda
def test_cuda_runs_compiled_kernels_not_the_interpreter():
    """In a CUDA run the kernels are jitted for the GPU: no TRITON_INTERPRET, the loss's auto backend is the
    Triton one, and its kernels are compiled JIT functions (the interpreter's are InterpretedFunction)."""
    from triton.runtime.jit import JITFunction

    assert os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "yes", "on")
    assert resolve_loss_backend("cuda") == "triton"
    logits, targets = _row_case(torch.bfloat16, 0)
    softmax_grad.row_lse(logits.cuda(), targets.cuda())
    assert all(isinstance(k, JITFunction) for k in softmax_grad._kernels().values())


@pytest.mark.cuda
def test_cuda_pmp_loss_under_autocast_matches_the_torch_backend():
    """The trainer's call: fp32 master weights, bf16 autocast, pmp_loss with auto (= triton) against the
    torch backend on the same device; loss terms and gradients within bf16 rounding (2e-2)."""
    batch, R, S, V = _packed_batch(23)
    batch = SimpleNamespace(**{k: v.cuda() for k, v in vars(batch).items()})
    g = torch.Generator().manual_seed(24)
    hidden, weight, score = (torch.randn(R, S, 64, generator=g), torch.randn(V, 64, generator=g) * 0.3,
                             torch.randn(1, 64, generator=g))
    kwargs = dict(rm_coef=1.0, lm_coef=1.0, global_pairs=5, global_lm_tokens=40)
    results = {}
    for backend in ("auto", "torch"):
        h, w, s = (t.cuda().requires_grad_() for t in (hidden, weight, score))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = pmp_loss(h, Heads(w, s), batch, backend=backend, **kwargs)
        out.loss.backward()
        results[backend] = (out.loss.detach(), h.grad, w.grad, s.grad)
    for name, a, b in zip(("loss", "d hidden", "d lm_weight", "d score"), results["auto"], results["torch"]):
        assert relative_error(a, b.double().cpu()) < 2e-2, name
