"""The model's numeric kernels, and batch-invariant numerics (`with batch_invariant():`).

Generation and training compute the same log-probabilities in different shapes: decoding
feeds one token per row over a cache, while the training forward runs whole padded
sequences in micro-batches of another size. The math is equal, the rounding is not: a
CPU GEMM picks other kernels for a few rows, an elementwise op evaluates the last
elements of a tensor (and of each thread's share) with scalar code instead of vector code
(exp, silu, sigmoid, rsqrt and log differ there in the last bit), attention reduces over
another number of keys, and MLA's absorbed decode multiplies in another order. So a
rollout's log-probs and the training forward's differ by ~1e-6, and an RL ratio is not
exactly 1 where it should be (the rollout/training mismatch RL frameworks measure).

Inside `batch_invariant()` every kernel here gives each row a result that depends only on
that row (and on the keys it may attend to):

    linear              rows padded to at least `min_rows()`, from which the BLAS kernel
                        no longer depends on the row count (measured, MKL fp32: row counts
                        below 4 with 1 thread, 12 with 2 or 8, 28 with 16, 52 with 32 and
                        76 with 64 round differently)
    grouped_linear      group by group through `linear`
    silu, sigmoid,      evaluated over a flat copy padded to a multiple of ALIGN, in
    rsqrt, exp, log     pieces of at most PIECE elements (one thread each), so every
                        element goes through the vector code
    attention           keys in chunks of CHUNK; each chunk's scores and its
                        softmax-weighted values (the denominator as one more column) are
                        fixed-shape GEMMs, added chunk by chunk in key order, so keys a
                        query cannot see add exact zeros and the padded length is moot

and MLA decodes with keys and values expanded from the cached latent (as training does)
instead of absorbing W^UK and W^UV. With the log-probs taken by one function on both sides
(`parallel.tensor_parallel.vocab_parallel_logprobs`), a token's rollout log-prob equals the
training forward's bit for bit in fp32 on CPU, whatever the batch, cache slot, micro-batch
or expert-parallel layout (tests/unit/test_kernels.py, tests/dist/test_grpo.py). Outside the
context these are torch's kernels, unchanged. The bounds are what this CPU build does
(ATen's vectorised loops, its 32768-element grain, MKL's small-M paths); GPUs need
batch-invariant kernels of their own, and there the logged mismatch is the check.
"""
from __future__ import annotations

import ctypes
import functools
import math
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

ALIGN = 128  # elements: a multiple of every vector loop's stride (2 x 64-byte vectors of 1-byte types)
PIECE = 32768  # elements: ATen's grain size, below which an op runs on one thread
CHUNK = 64  # keys per attention chunk
CAUSAL_BLOCK, CAUSAL_BLOCKS = 64, 4  # causal_blocks: rows per query block at least, blocks at most

_INVARIANT: ContextVar[bool] = ContextVar("batch_invariant", default=False)


@contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread), the kernels are batch-invariant (module docstring)."""
    token = _INVARIANT.set(enabled)
    try:
        yield
    finally:
        _INVARIANT.reset(token)


def is_batch_invariant() -> bool:
    """Whether the kernels run batch-invariant here. Inside torch.compile'd code: never (the
    compiled regions run eager while the mode is on, model/compile.py), which also keeps
    dynamo from tracing the ContextVar."""
    return not torch.compiler.is_compiling() and _INVARIANT.get()


# ---------------------------------------------------------------------------- GEMMs


def min_rows() -> int:
    """GEMM rows below which the result of a row may depend on the row count."""
    return max(32, 4 * torch.get_num_threads())


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T: every linear's default `gemm`."""
    if not is_batch_invariant():
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    n, least = rows.shape[0], min_rows()
    if n < least:
        rows = torch.cat([rows, rows.new_zeros(least - n, rows.shape[1])])
    return F.linear(rows, weight)[:n].view(*x.shape[:-1], weight.shape[0])


def _bmm_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (N, M, K) @ b (N, K, P) with M padded to `min_rows()`."""
    m, least = a.shape[1], min_rows()
    if m < least:
        a = torch.cat([a, a.new_zeros(a.shape[0], least - m, a.shape[2])], dim=1)
    return torch.bmm(a, b)[:, :m]


# ---------------------------------------------------------------------------- grouped GEMM


def grouped_linear(x: torch.Tensor, w, counts: torch.Tensor, use_grouped_mm: bool = True):
    """x (P, in) rows sorted by group, w (G, out, in), counts (G,) -> (P, out), where the
    rows of group g are multiplied by w[g]^T: the routed experts' GEMMs (moe/experts.py).
    `w` may be a tuple of such weights (w1 and w3 of a SwiGLU, which read the same rows):
    then a tuple of outputs.

    One grouped kernel when `use_grouped_mm`: on CPU in fp32, MKL's `cblas_sgemm_batch`
    (`_GroupedMKL`: one call for all groups of all the weights, which MKL spreads over its
    threads), elsewhere `torch._grouped_mm` where it takes the dtype and device; otherwise,
    or inside batch_invariant() (group by group with the row-invariant `linear`), a loop over
    groups, never over rows. The paths agree to rounding (tests/unit/test_kernels.py)."""
    several = isinstance(w, (tuple, list))
    ws = tuple(w) if several else (w,)
    if use_grouped_mm and not is_batch_invariant() and _sgemm_batch_ok(x, ws, counts):
        out = _GroupedMKL.apply(x, counts, *ws)  # a tensor for one weight, a tuple for several
        return (out,) if several and len(ws) == 1 else out
    if several:
        return tuple(grouped_linear(x, wi, counts, use_grouped_mm) for wi in ws)
    if is_batch_invariant():
        return torch.cat([linear(chunk, w[g]) for g, chunk in enumerate(x.split(counts.tolist()))])
    if use_grouped_mm and _grouped_mm_ok(x):
        offs = counts.cumsum(0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))
    chunks = x.split(counts.tolist())
    return torch.cat([chunk @ w[g].t() for g, chunk in enumerate(chunks)])


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":  # the CUDA kernel takes bf16 on sm90+
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the CPU backward of
    `_grouped_mm` rejects expanded (stride-0) gradients such as that of `y.sum()`."""

    @staticmethod
    def forward(fctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(fctx, grad):
        return grad.contiguous()


@functools.cache
def _sgemm_batch() -> Optional[Callable]:
    """`cblas_sgemm_batch` of the MKL inside the libtorch_cpu this process runs (the MKL
    torch's own GEMMs call; 32-bit integers: torch links MKL's LP64 interface, and MKL names
    its 64-bit one `cblas_sgemm_batch_64`), or None: a build without MKL, or a library that
    does not export it."""
    if not torch.backends.mkl.is_available():
        return None
    lib = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (lib / name).exists():
            try:
                fn = ctypes.CDLL(str(lib / name)).cblas_sgemm_batch
            except (OSError, AttributeError):
                return None
            # layout, transa[], transb[], m[], n[], k[], alpha[], a[], lda[], b[], ldb[],
            # beta[], c[], ldc[], group_count, group_size[]
            fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [ctypes.c_int, ctypes.c_void_p]
            fn.restype = None
            return fn
    return None


def _sgemm_batch_ok(x: torch.Tensor, ws: tuple, counts: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and all(w.dtype == torch.float32 for w in ws)
            and counts.device.type == "cpu" and not torch.compiler.is_compiling() and _sgemm_batch() is not None)


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums


def _sgemm_groups(gemms: list[tuple]) -> None:
    """C = op(A) op(B) + beta C for every GEMM of every entry of `gemms`, row-major, in one
    MKL call. An entry (trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta) describes G
    GEMMs: m, n, k, lda, ldb, ldc ints or int arrays (G,), a, b, c arrays (G,) of addresses."""
    sizes = [max(len(v) if isinstance(v, np.ndarray) else 1 for v in entry) for entry in gemms]

    def column(i: int, dtype, fn=lambda v: v) -> np.ndarray:
        return np.concatenate([np.broadcast_to(np.asarray(fn(entry[i]), dtype), (size,))
                               for entry, size in zip(gemms, sizes)])

    trans = lambda t: _TRANS if t else _NO_TRANS
    args = [column(0, np.int32, trans), column(1, np.int32, trans)]
    args += [column(i, dtype) for i, dtype in ((2, np.int32), (3, np.int32), (4, np.int32))]
    args.append(np.ones(sum(sizes), np.float32))  # alpha
    args += [column(i, dtype) for i, dtype in ((5, np.int64), (6, np.int32), (7, np.int64), (8, np.int32))]
    args += [column(11, np.float32), column(9, np.int64), column(10, np.int32)]  # beta, c, ldc
    group_size = np.ones(len(args[0]), np.int32)  # every GEMM its own group; held until the call returns
    _sgemm_batch()(_ROW_MAJOR, *(arr.ctypes.data for arr in args), len(group_size), group_size.ctypes.data)


class _GroupedMKL(torch.autograd.Function):
    """`grouped_linear` as MKL batch GEMMs, for weights w_1..w_n (G, N_i, K) on the same
    rows: y_ig = x_g w_ig^T in one call; in backward dw_ig = dy_ig^T x_g and the first term
    of dx_g = sum_i dy_ig w_ig in one call, each further term accumulated in place by one
    more. Saves x and the weights, as the autograd of `torch._grouped_mm` does. One thread:
    the per-group GEMMs of `_grouped_mm` at about the same speed (its loop calls MKL's sgemm
    per group; outputs bitwise equal at the small V3's sizes, while a one-row group and the
    input gradient of small groups can round differently); more threads: MKL runs groups side
    by side instead of splitting each small GEMM (benchmarks/README.md)."""

    @staticmethod
    def forward(fctx, x, counts, *ws):
        x, ws = x.contiguous(), tuple(w.contiguous() for w in ws)
        rows = counts.numpy().astype(np.int32)
        # MKL reads and writes through raw addresses: shapes that do not match would do so
        # outside the tensors, so they are refused here
        if x.dim() != 2 or (rows < 0).any() or int(rows.sum()) != x.shape[0] or any(
                w.dim() != 3 or w.shape[0] != len(rows) or w.shape[2] != x.shape[1] for w in ws):
            raise ValueError(f"grouped_linear: x {tuple(x.shape)} with counts summing to {int(rows.sum())} and weights "
                             f"{[tuple(w.shape) for w in ws]}: expected x (P, in), counts (G,) >= 0 summing to P, "
                             "weights (G, out, in)")
        starts = np.zeros(len(rows), np.int64)
        np.cumsum(rows[:-1], out=starts[1:])
        fctx.save_for_backward(x, *ws)
        fctx.groups = rows, starts
        K = x.shape[1]
        ys = [x.new_empty(x.shape[0], w.shape[1]) for w in ws]
        xa = _rows_at(x, starts)
        _sgemm_groups([(False, True, rows, w.shape[1], K, xa, K, _groups_at(w), K, _rows_at(y, starts), w.shape[1], 0.0)
                       for w, y in zip(ws, ys)])
        return ys[0] if len(ys) == 1 else tuple(ys)

    @staticmethod
    def backward(fctx, *dys):
        x, *ws = fctx.saved_tensors
        rows, starts = fctx.groups
        dys = [dy.contiguous() for dy in dys]
        K = x.shape[1]
        dx, dws = None, [None] * len(ws)
        calls = [[]]
        if fctx.needs_input_grad[0]:
            dx = x.new_empty(x.shape)
            for i, (dy, w) in enumerate(zip(dys, ws)):  # the first term in the first call, one call per further term
                gemm = (False, False, rows, K, w.shape[1], _rows_at(dy, starts), w.shape[1], _groups_at(w), K,
                        _rows_at(dx, starts), K, 0.0 if i == 0 else 1.0)
                if i == 0:
                    calls[0].append(gemm)
                else:
                    calls.append([gemm])
        wanted = [i for i in range(len(ws)) if fctx.needs_input_grad[2 + i]]
        xa = _rows_at(x, starts)
        for i in wanted:
            dws[i] = torch.empty_like(ws[i])
            calls[0].append((True, False, ws[i].shape[1], K, rows, _rows_at(dys[i], starts), ws[i].shape[1], xa, K,
                             _groups_at(dws[i]), K, 0.0))
        for gemms in calls:
            if gemms:
                _sgemm_groups(gemms)
        empty = np.flatnonzero(rows == 0)
        if len(empty):  # k = 0: zero by the BLAS rule for beta = 0, but not every BLAS writes it
            for i in wanted:
                dws[i][torch.from_numpy(empty)] = 0
        return dx, None, *dws


def _rows_at(t: torch.Tensor, starts: np.ndarray) -> np.ndarray:
    """Addresses of rows `starts` of the contiguous 2-D `t`."""
    return t.data_ptr() + starts * (t.shape[1] * t.element_size())


def _groups_at(t: torch.Tensor) -> np.ndarray:
    """Addresses of the matrices t[g] of the contiguous 3-D `t`."""
    return t.data_ptr() + np.arange(t.shape[0], dtype=np.int64) * (t[0].numel() * t.element_size())


# ---------------------------------------------------------------------------- elementwise


def _elementwise(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def kernel(x: torch.Tensor) -> torch.Tensor:
        if not is_batch_invariant() or x.numel() == 0:
            return fn(x)
        flat = x.reshape(-1)
        n = flat.numel()
        padded = F.pad(flat, (0, (-n) % ALIGN))
        return torch.cat([fn(piece) for piece in padded.split(PIECE)])[:n].view(x.shape)

    kernel.__name__ = kernel.__qualname__ = fn.__name__
    kernel.__doc__ = f"torch's {fn.__name__}, position-independent inside batch_invariant()."
    return kernel


silu = _elementwise(F.silu)
sigmoid = _elementwise(torch.sigmoid)
rsqrt = _elementwise(torch.rsqrt)
exp = _elementwise(torch.exp)
log = _elementwise(torch.log)


# ---------------------------------------------------------------------------- attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Optional[torch.Tensor],
              scale: float) -> torch.Tensor:
    """softmax(q k^T * scale over the visible keys) v, per batch and query head; every
    attention module's core.

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv), G dividing H (query head h reads head
    h // (H/G)); visible (B, 1|H, T, S) bool (True: may attend), or None for causal with
    T == S. Returns (B, H, T, Dv). Torch's fused kernel, or the chunked batch-invariant one
    (computed in fp32); causal MLA on CPU as `causal_blocks`."""
    if not is_batch_invariant():
        if visible is None and q.device.type == "cpu" and v.shape[-1] != q.shape[-1] and k.shape[1] == q.shape[1]:
            bounds = causal_block_bounds(q.shape[2])
            if len(bounds) > 2:
                return causal_blocks(q, k, v, scale, bounds)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    B, H, T, D = q.shape
    if k.shape[1] != H:
        k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    S, Dv = k.shape[2], v.shape[-1]
    if visible is None:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril().view(1, 1, T, S)
    n_chunks = math.ceil(S / CHUNK)
    pad = n_chunks * CHUNK - S
    qf = q.float().reshape(B * H, T, D)
    kf = F.pad(k.float(), (0, 0, 0, pad)).reshape(B * H, n_chunks, CHUNK, D)
    ones = torch.ones(*v.shape[:-1], 1, dtype=torch.float32, device=v.device)
    vf = F.pad(torch.cat([v.float(), ones], dim=-1), (0, 0, 0, pad)).reshape(B * H, n_chunks, CHUNK, Dv + 1)
    vis = F.pad(visible.expand(B, H, T, S), (0, pad)).reshape(B * H, T, n_chunks, CHUNK)
    scores = [(_bmm_rows(qf, kf[:, c].transpose(1, 2)) * scale).masked_fill(~vis[:, :, c], float("-inf"))
              for c in range(n_chunks)]  # each (BH, T, CHUNK)
    top = torch.stack([s.amax(dim=-1) for s in scores], dim=-1).amax(dim=-1, keepdim=True)  # (BH, T, 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    acc = None
    for c in range(n_chunks):  # in key order: a chunk a query cannot see adds exact zeros
        part = _bmm_rows(exp(scores[c] - top), vf[:, c])  # (BH, T, Dv + 1): numerator | denominator
        acc = part if acc is None else acc + part
    return (acc[..., :Dv] / acc[..., Dv:]).view(B, H, T, Dv).to(q.dtype)


def causal_block_bounds(seqlen: int) -> list[int]:
    """Query-block boundaries of `causal_blocks` for `seqlen` tokens: [0, ..., seqlen]."""
    n = max(1, min(CAUSAL_BLOCKS, seqlen // CAUSAL_BLOCK))
    return [seqlen * i // n for i in range(n + 1)]


def causal_block_keys(seqlen: int) -> float:
    """Keys per query, on average, whose scores `causal_blocks` computes (and whose softmax
    output backward keeps): seqlen itself for one block, 5/8 of it at 4."""
    bounds = causal_block_bounds(seqlen)
    return sum((end - start) * end for start, end in zip(bounds[:-1], bounds[1:])) / seqlen


def causal_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  bounds: Optional[list[int]] = None) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v that skips the keys no query of a block can see:
    queries in n blocks of at least CAUSAL_BLOCK rows (at most CAUSAL_BLOCKS), block i
    against keys [0, end of block i), masking only its diagonal square. It computes
    (n + 1) / 2n of the scores (5/8 at n = 4) where SDPA's math path, the only one torch's CPU
    build has when v is narrower than q and k (MLA), computes all of them; masked keys add
    exact zeros either way, so the result is SDPA's to rounding (tests/unit/test_kernels.py).
    A block's scores are one batched GEMM that adds the mask (`torch.baddbmm`, the scale as
    its alpha), then torch's softmax; backward is written out (`_CausalBlocks`), accumulating
    the key and value gradients of the blocks in place instead of through autograd's slice
    and concatenation gradients. Forward + backward of one layer (1024 tokens, 4 heads, fp32,
    1 thread): 0.6x of the autograd version's time eagerly; a whole training step of the
    small V3 eagerly 12% faster, compiled unchanged (inductor traces this function).
    q, k (B, H, S, D), v (B, H, S, Dv) -> (B, H, S, Dv); `bounds`: causal_block_bounds(S)."""
    return _CausalBlocks.apply(q, k, v, scale, tuple(bounds or causal_block_bounds(q.shape[2])))


class _CausalBlocks(torch.autograd.Function):
    """`causal_blocks`; saves q, k, v (contiguous, heads flattened into the batch) and each
    block's probabilities, as the autograd of the same ops would."""

    @staticmethod
    def forward(fctx, q, k, v, scale, bounds):
        B, H, S, _ = q.shape
        q, k, v = (t.contiguous().view(B * H, S, t.shape[-1]) for t in (q, k, v))
        out, probs = [], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            # -inf where key j > query start + i: the diagonal square's upper triangle
            mask = torch.full((end - start, end), float("-inf"), dtype=q.dtype, device=q.device).triu_(start + 1)
            p = torch.softmax(torch.baddbmm(mask, q[:, start:end], k[:, :end].transpose(1, 2), alpha=scale), dim=-1)
            out.append(torch.bmm(p, v[:, :end]))
            probs.append(p)
        fctx.save_for_backward(q, k, v, *probs)
        fctx.scale, fctx.bounds, fctx.heads = scale, bounds, (B, H)
        return torch.cat(out, dim=1).view(B, H, S, -1)

    @staticmethod
    def backward(fctx, grad):
        q, k, v, *probs = fctx.saved_tensors
        bounds, scale = fctx.bounds, fctx.scale
        grad = grad.contiguous().view(q.shape[0], q.shape[1], v.shape[-1])
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (start, end), p in zip(zip(bounds[:-1], bounds[1:]), probs):
            g = grad[:, start:end]
            dv[:, :end].baddbmm_(p.transpose(1, 2), g)
            ds = torch._softmax_backward_data(torch.bmm(g, v[:, :end].transpose(1, 2)), p, -1, p.dtype)
            dq[:, start:end].baddbmm_(ds, k[:, :end], alpha=scale)
            dk[:, :end].baddbmm_(ds.transpose(1, 2), q[:, start:end], alpha=scale)
        B, H = fctx.heads
        return dq.view(B, H, *q.shape[1:]), dk.view(B, H, *k.shape[1:]), dv.view(B, H, *v.shape[1:]), None, None
