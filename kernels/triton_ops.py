"""Fused Triton implementation of the Poly-DPO loss, registered as torch.library custom ops.

Three launches per training step, none of which materialises an N-sized intermediate:

    forward   _errors_partial_kernel   reads policy_pred, target (ref_pred, elem_weight) once and
                                       writes partial sums [streams, 2B, chunks]: fp32 with
                                       ref_pred, else fp64 (squares formed in fp64)
              _poly_dpo_head_kernel    one program: sums the partials in a fixed order, computes
                                       z, p, the loss (sigmoid / Poly-DPO, hinge, ipo), the
                                       metrics and the per-row gradient
                                       coefficient dL/d(pred - target) / (m (pred - target))
    backward  _poly_dpo_grad_kernel    reads policy_pred, target (elem_weight) once and writes
                                       grad = coef[row] * grad_loss * m * (pred - target) once

Saved for backward: the inputs (alive anyway) and coef, 2B floats. Partial sums are combined in
a fixed order and no float atomics are used, so results are bit-identical run to run for a given
shape and device. Chunking depends only on (N, 2B, dtype, device).

With ref_pred given, the forward also accumulates the per-sample difference of policy and
reference errors directly, sum m (p - r)(p + r - 2y), instead of subtracting two large nearly
equal sums afterwards; the loss depends on exactly that difference.
"""

import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from .checks import LOSS_TYPES

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this to fill every output buffer with NaN before the kernels write it.
POISON_OUTPUTS = False

# Element-weight modes: none; a map laid out like each row; broadcast dims with any strides.
_WEIGHT_NONE, _WEIGHT_MAP, _WEIGHT_BROADCAST = 0, 1, 2


def _new(shape, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _load_weight(
    weight_ptr,
    row,
    offs,
    mask,
    w_row_stride,
    w_size1,
    w_size2,
    w_stride0,
    w_stride1,
    w_stride2,
    WEIGHT_MODE: tl.constexpr,
):
    """fp32 element weights for flat indices `offs` of one row. Mode 1: a map laid out like the
    row (contiguous, vector loads); mode 2: three broadcast dims of sizes (-, w_size1, w_size2)
    and any strides (spatial maps, frame weights, per-channel or per-sample weights). Callers
    skip it in mode 0 (no weights). One return, at the end: the compiler, unlike the
    interpreter, does not stop at a `return` inside a constexpr `if`."""
    if WEIGHT_MODE == 1:
        w_offs = row * w_row_stride + offs
    else:
        i2 = offs % w_size2
        rest = offs // w_size2
        w_offs = (
            row * w_row_stride + (rest // w_size1) * w_stride0 + (rest % w_size1) * w_stride1 + i2 * w_stride2
        )
    return tl.load(weight_ptr + w_offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_program(n_elems, BLOCK: tl.constexpr, OFFS_64: tl.constexpr):
    """(chunk, row, row_start, lanes) of a streaming program. Row starts are int64: 2B rows pass
    2^31 elements long before one row does (a Wan 720p batch of 8 pairs has 1.2e9 in a tensor).
    Offsets inside a row are int32, which keeps the index arithmetic (the broadcast weights'
    div/mod above all) cheap, unless the launcher found a row offset that can reach 2^31."""
    chunk = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    if OFFS_64:
        chunk = chunk.to(tl.int64)
        lanes = lanes.to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    return chunk, row, row * n_elems, lanes


# Integers that only index or count are not specialised: each specialisation (divisible by 16,
# equal to 1) would be one more JIT compile on a GPU whenever a batch or bucket shape changes.
# n_elems and a weight map's row stride stay specialised: their alignment decides the load widths.
_NOT_SPECIALIZED = (
    "n_rows",
    "n_chunks",
    "iters",
    "w_size1",
    "w_size2",
    "w_stride0",
    "w_stride1",
    "w_stride2",
)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _errors_partial_kernel(
    pred_ptr,
    target_ptr,
    ref_ptr,
    weight_ptr,
    partial_ptr,
    n_elems,
    n_rows,
    n_chunks,
    iters,
    w_row_stride,
    w_size1,
    w_size2,
    w_stride0,
    w_stride1,
    w_stride2,
    HAS_REF: tl.constexpr,
    WEIGHT_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    OFFS_64: tl.constexpr,
):
    # Reads pred, target (ref, weight) once; writes 1 (or 3 with ref) fp32 partial sums.
    chunk, row, row_start, lanes = _row_program(n_elems, BLOCK, OFFS_64)
    acc_pol = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ref = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gap = tl.zeros([BLOCK], dtype=tl.float32)
    acc_one = tl.zeros([BLOCK], dtype=tl.float64)  # without ref: the error alone, in float64
    # `iters` is a runtime bound: a constexpr one would be one more compiled variant per value.
    for it in range(iters):
        offs = (chunk * iters + it) * BLOCK + lanes
        mask = offs < n_elems
        p = tl.load(pred_ptr + row_start + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(target_ptr + row_start + offs, mask=mask, other=0.0).to(tl.float32)
        dp = p - y
        if WEIGHT_MODE == 0:
            w = 1.0
        else:
            w = _load_weight(
                weight_ptr,
                row,
                offs,
                mask,
                w_row_stride,
                w_size1,
                w_size2,
                w_stride0,
                w_stride1,
                w_stride2,
                WEIGHT_MODE,
            )
        if HAS_REF:
            acc_pol += w * dp * dp
            r = tl.load(ref_ptr + row_start + offs, mask=mask, other=0.0).to(tl.float32)
            dr = r - y
            acc_ref += w * dr * dr
            # (p-y)^2 - (r-y)^2 = (p-r)(p+r-2y): the policy/reference gap without cancellation.
            acc_gap += w * (p - r) * (dp + dr)
        else:
            # Alone, an error is later subtracted from another nearly equal one (ref_err): its
            # digits must survive. In float64 the difference of two float32 (or 16-bit) values is
            # exact and its square rounds at 1e-16, so the per-element rounding a float32 square
            # and sum would add (the eager formula's own) is gone; memory-bound, the float64
            # arithmetic is hidden on A100/H100 (and roughly breaks even on 1/64-rate GPUs).
            d = p.to(tl.float64) - y.to(tl.float64)
            acc_one += w * (d * d)
    out = partial_ptr + row * n_chunks + chunk
    if HAS_REF:
        tl.store(out, tl.sum(acc_pol, axis=0))
        stream = n_rows * n_chunks
        tl.store(out + stream, tl.sum(acc_ref, axis=0))
        tl.store(out + 2 * stream, tl.sum(acc_gap, axis=0))
    else:
        tl.store(out, tl.sum(acc_one, axis=0))


@triton.jit
def _row_sums(partial_ptr, rows, row_mask, n_chunks, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum of partial[rows, :] over chunks, tile by tile in a fixed order -> [BLOCK_P], in the
    partials' own dtype (float32, or float64 for errors that are not a policy/reference gap)."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=partial_ptr.dtype.element_ty)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    for c0 in range(0, n_chunks, BLOCK_C):
        c = c0 + cols
        mask = row_mask[:, None] & (c < n_chunks)[None, :]
        acc += tl.load(partial_ptr + rows[:, None] * n_chunks + c[None, :], mask=mask, other=0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def _log1p(x):
    """log(1 + x) for 0 <= x <= 1, accurate for tiny x (Goldberg's trick, no libdevice)."""
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


# The loss of a pair as a function of its logit z: the head kernel's LOSS constexpr.
LOSS_CODES = {name: code for code, name in enumerate(LOSS_TYPES)}


@triton.jit(do_not_specialize=("n_pairs", "n_chunks", "n_elems"))
def _poly_dpo_head_kernel(
    partial_ptr,
    ref_err_ptr,
    pair_weight_ptr,
    loss_ptr,
    stats_ptr,
    logits_ptr,
    prob_ptr,
    policy_err_ptr,
    ref_err_out_ptr,
    coef_ptr,
    n_pairs,
    n_chunks,
    n_elems,
    inv_n,
    beta,
    alpha,
    coef_scale,
    inv_beta,
    HAS_REF_PRED: tl.constexpr,
    HAS_PAIR_WEIGHT: tl.constexpr,
    LOSS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program. Reads the partial sums (O(2B * chunks)); writes O(B) values.
    n_rows = 2 * n_pairs
    stream = n_rows * n_chunks
    loss_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    hit_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, n_pairs, BLOCK_P):
        pairs = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        pmask = pairs < n_pairs
        win, lose = pairs, pairs + n_pairs
        if HAS_REF_PRED:
            pol_w = _row_sums(partial_ptr, win, pmask, n_chunks, BLOCK_P, BLOCK_C) * inv_n
            pol_l = _row_sums(partial_ptr, lose, pmask, n_chunks, BLOCK_P, BLOCK_C) * inv_n
            ref_w = _row_sums(partial_ptr + stream, win, pmask, n_chunks, BLOCK_P, BLOCK_C) * inv_n
            ref_l = _row_sums(partial_ptr + stream, lose, pmask, n_chunks, BLOCK_P, BLOCK_C) * inv_n
            gap_w = _row_sums(partial_ptr + 2 * stream, win, pmask, n_chunks, BLOCK_P, BLOCK_C) * inv_n
            gap_l = _row_sums(partial_ptr + 2 * stream, lose, pmask, n_chunks, BLOCK_P, BLOCK_C) * inv_n
        else:
            # float64 partials and float64 reference errors (sample_errors): the gap of two nearly
            # equal errors is formed before any rounding to float32.
            pol_w64 = _row_sums(partial_ptr, win, pmask, n_chunks, BLOCK_P, BLOCK_C) / n_elems
            pol_l64 = _row_sums(partial_ptr, lose, pmask, n_chunks, BLOCK_P, BLOCK_C) / n_elems
            ref_w64 = tl.load(ref_err_ptr + win, mask=pmask, other=0.0).to(tl.float64)
            ref_l64 = tl.load(ref_err_ptr + lose, mask=pmask, other=0.0).to(tl.float64)
            gap_w = (pol_w64 - ref_w64).to(tl.float32)
            gap_l = (pol_l64 - ref_l64).to(tl.float32)
            pol_w, pol_l = pol_w64.to(tl.float32), pol_l64.to(tl.float32)
            ref_w, ref_l = ref_w64.to(tl.float32), ref_l64.to(tl.float32)
        if HAS_PAIR_WEIGHT:
            k = tl.load(pair_weight_ptr + pairs, mask=pmask, other=0.0).to(tl.float32)
        else:
            k = tl.full([BLOCK_P], 1.0, tl.float32)
        h = -k * (gap_w - gap_l)  # the logit before beta: z = beta h / 2
        z = 0.5 * beta * h
        # p and 1 - p each from exp(-|z|), so neither cancels near p = 0 or p = 1.
        q = tl.exp(-tl.abs(z))
        inv = 1.0 / (1.0 + q)
        p = tl.where(z >= 0, inv, q * inv)
        one_minus_p = tl.where(z >= 0, q * inv, inv)
        if LOSS == 0:  # sigmoid; Poly-DPO with alpha != 0
            softplus_neg_z = tl.maximum(-z, 0.0) + _log1p(q)  # -log sigmoid(z)    (Eq. 9)
            loss_pair = softplus_neg_z + alpha * one_minus_p
            dl_dz = -one_minus_p * (1.0 + alpha * p)  # Eq. 10
        elif LOSS == 1:  # hinge: relu(1 - z)
            loss_pair = tl.maximum(1.0 - z, 0.0)
            dl_dz = tl.where(z < 1.0, -1.0, 0.0)
        else:  # ipo: (h - 1 / beta)^2, dL/dz = dL/dh * 2 / beta
            dev = h - inv_beta
            loss_pair = dev * dev
            dl_dz = 4.0 * dev * inv_beta
        # dL/dpred = dL/dz * dz/dgap * dgap/dpred with dgap_w/dpred = 2 m (pred - y) / N and a mean
        # over pairs: coef_w = -dL/dz * beta * k / (B N), coef_l = -coef_w.
        coef = -dl_dz * k * coef_scale
        tl.store(coef_ptr + win, coef, mask=pmask)
        tl.store(coef_ptr + lose, -coef, mask=pmask)
        tl.store(logits_ptr + pairs, z, mask=pmask)
        tl.store(prob_ptr + pairs, p, mask=pmask)
        tl.store(policy_err_ptr + win, pol_w, mask=pmask)
        tl.store(policy_err_ptr + lose, pol_l, mask=pmask)
        tl.store(ref_err_out_ptr + win, ref_w, mask=pmask)
        tl.store(ref_err_out_ptr + lose, ref_l, mask=pmask)
        loss_sum += tl.where(pmask, loss_pair, 0.0)
        hit_sum += tl.where(pmask & (z > 0), 1.0, 0.0)
        z_sum += tl.where(pmask, z, 0.0)
    tl.store(loss_ptr, tl.sum(loss_sum, axis=0) / n_pairs)
    tl.store(stats_ptr, tl.sum(hit_sum, axis=0) / n_pairs)
    tl.store(stats_ptr + 1, tl.sum(z_sum, axis=0) / n_pairs * inv_beta)


@triton.jit
def _to_bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even by integer arithmetic. The GPU's cast already rounds
    so; Triton's interpreter truncates, which would make CPU tests see twice the bf16 error."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED[2:])
def _poly_dpo_grad_kernel(
    pred_ptr,
    target_ptr,
    weight_ptr,
    coef_ptr,
    grad_scale_ptr,
    grad_ptr,
    n_elems,
    iters,
    w_row_stride,
    w_size1,
    w_size2,
    w_stride0,
    w_stride1,
    w_stride2,
    WEIGHT_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    OFFS_64: tl.constexpr,
    ROUND_BF16_BY_BITS: tl.constexpr,
):
    # Reads pred, target (weight) once; writes grad once.
    chunk, row, row_start, lanes = _row_program(n_elems, BLOCK, OFFS_64)
    scale = tl.load(coef_ptr + row).to(tl.float32) * tl.load(grad_scale_ptr).to(tl.float32)
    for it in range(iters):
        offs = (chunk * iters + it) * BLOCK + lanes
        mask = offs < n_elems
        p = tl.load(pred_ptr + row_start + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(target_ptr + row_start + offs, mask=mask, other=0.0).to(tl.float32)
        if WEIGHT_MODE == 0:
            g = scale * (p - y)
        else:
            w = _load_weight(
                weight_ptr,
                row,
                offs,
                mask,
                w_row_stride,
                w_size1,
                w_size2,
                w_stride0,
                w_stride1,
                w_stride2,
                WEIGHT_MODE,
            )
            g = scale * w * (p - y)
        if ROUND_BF16_BY_BITS:
            g = _to_bf16_rtne(g)
        tl.store(grad_ptr + row_start + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch helpers


class Launch(NamedTuple):
    """One kernel launch, built but not run. `run()` launches it; `vipo.kernels.aot` binds the
    same arguments for a GPU target and compiles them ahead of time, with no GPU."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    options: dict

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.options)


# Element-weight dtypes the streaming kernels read as they are; others are converted (bool masks
# to uint8, anything else to float32) with one copy at the weight's own, usually small, size.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)

# Options every launch passes. FMA contraction is stated, not left to the default, which
# Triton 3.10 changes (3.9 warns about it).
_COMPILE_OPTIONS = dict(enable_fp_fusion=True)


def _weight_layout(weight: torch.Tensor | None, shape: torch.Size):
    """(tensor, mode, row_stride, size1, size2, stride0, stride1, stride2) addressing a weight that
    broadcasts to `shape` without materialising it. Non-batch dims of size 1 are dropped and
    neighbours that index memory alike are merged; up to three dims remain addressable in the
    kernel (a full map, [2B,1,H,W] spatial maps, [2B,1,F,1,1] frame weights, per-channel ...).
    Layouts that need more are expanded with one copy."""
    if weight is None:
        return None, _WEIGHT_NONE, 0, 1, 1, 0, 0, 0
    if weight.dtype == torch.bool:
        weight = weight.to(torch.uint8)
    elif weight.dtype not in WEIGHT_DTYPES:
        weight = weight.to(torch.float32)
    expanded = weight.expand(shape)
    dims = []
    for size, stride in zip(shape[1:], expanded.stride()[1:], strict=True):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) > 3:
        expanded = expanded.contiguous()
        dims = [(expanded[0].numel(), 1)]
    row_stride = expanded.stride(0)
    if len(dims) == 1 and dims[0][1] == 1:
        return expanded, _WEIGHT_MAP, row_stride, 1, 1, 0, 0, 1
    while len(dims) < 3:
        dims.insert(0, (1, 0))
    (_, st0), (s1, st1), (s2, st2) = dims
    return expanded, _WEIGHT_BROADCAST, row_stride, s1, s2, st0, st1, st2


def sm_count(device: torch.device) -> int | None:
    """SMs of a CUDA device; None where the kernels run in the interpreter."""
    if INTERPRET or device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


# BLOCK of the streaming kernels on a GPU: 16 KiB of 16-bit or 8 KiB of 32-bit input per program
# and iteration, 16 elements a thread (two 128-bit loads of each 16-bit input, four of each
# 32-bit one). One BLOCK per dtype, also for rows shorter than a block (the tail is masked):
# every extra BLOCK would be one more compiled variant for work too small to matter.
_BLOCK = {torch.bfloat16: 4096, torch.float16: 4096, torch.float32: 2048}
_ELEMS_PER_THREAD = 16
_MAX_ITERS = 64


def grid_config(n_elems: int, n_rows: int, dtype: torch.dtype, sms: int | None):
    """(BLOCK, iters, n_chunks, num_warps) of the streaming kernels for rows of N elements on a GPU
    with `sms` SMs (None: the interpreter). A heuristic keyed on N, 2B, dtype and the SM count, not
    an autotuner: it never times anything inside a training step, and the interpreter (tests) can
    run only one config. Each program covers BLOCK * iters elements of one row."""
    if sms is None:
        # Each interpreted program costs ~2 ms: few programs, large blocks.
        block = max(16, min(triton.next_power_of_2(n_elems), 8192))
        return block, 1, triton.cdiv(n_elems, block), 4
    block = _BLOCK.get(dtype, 2048)
    blocks_per_row = triton.cdiv(n_elems, block)
    # Enough programs to fill every SM several times over; the rest of the work goes into iters,
    # which never exceeds the blocks a row has.
    target_programs = 8 * sms
    iters = 1
    while (
        iters < _MAX_ITERS
        and 2 * iters <= blocks_per_row
        and n_rows * triton.cdiv(blocks_per_row, 2 * iters) >= target_programs
    ):
        iters *= 2
    num_warps = block // (32 * _ELEMS_PER_THREAD)
    return block, iters, triton.cdiv(n_elems, block * iters), num_warps


def head_config(n_pairs: int, n_chunks: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the head kernel: pairs and chunks summed per tile. On a GPU one tile
    shape (the head is one program over O(B) values): 32 x 32 with 4 warps uses no stack on
    sm_90, where 64 x 64 spilled 1.4 KiB (measured by vipo.kernels.aot). The interpreter sizes
    tiles to the data."""
    if not interpret:
        return 32, 32
    return max(16, min(triton.next_power_of_2(n_pairs), 64)), max(
        16, min(triton.next_power_of_2(n_chunks), 1024)
    )


_INT32_MAX = 2**31 - 1


def _needs_int64_offsets(n_elems: int, block: int, iters: int, weight: torch.Tensor | None) -> bool:
    """Whether an offset inside a row can pass int32: the last program's lanes reach
    n_chunks * iters * BLOCK - 1, and a broadcast weight's in-row offset its largest stride sum."""
    covered = triton.cdiv(n_elems, block * iters) * block * iters
    weight_span = (
        0
        if weight is None
        else sum((s - 1) * st for s, st in zip(weight.shape[1:], weight.stride()[1:], strict=True))
    )
    return max(covered, weight_span + 1) > _INT32_MAX


def _flat(t: torch.Tensor) -> torch.Tensor:
    # Contiguous inputs are used in place; others cost one copy here.
    return t if t.is_contiguous() else t.contiguous()


def _row_count(pred: torch.Tensor) -> tuple[int, int]:
    n_rows = pred.shape[0]
    if n_rows > 65535:
        raise ValueError(f"the fused loss takes at most 65535 rows (2B) per call, got {n_rows}")
    return n_rows, pred.numel() // n_rows


def partials_launch(pred, target, ref, weight, sms: int | None):
    """The partial-sum launch -> (Launch, partial [streams, 2B, chunks], N)."""
    n_rows, n_elems = _row_count(pred)
    block, iters, n_chunks, num_warps = grid_config(n_elems, n_rows, pred.dtype, sms)
    w, mode, w_rs, w_s1, w_s2, w_st0, w_st1, w_st2 = _weight_layout(weight, pred.shape)
    streams = 3 if ref is not None else 1
    partial = _new((streams, n_rows, n_chunks), pred, dtype=partial_dtype(ref is not None))
    if ref is None:
        # A float64 accumulator a lane is two registers an element: twice the threads, half the
        # elements each (still 128-bit loads) keep it off the stack.
        num_warps *= 2
    launch = Launch(
        _errors_partial_kernel,
        (n_chunks, n_rows),
        (
            pred,
            target,
            ref if ref is not None else pred,
            w if w is not None else pred,
            partial,
            n_elems,
            n_rows,
            n_chunks,
            iters,
            w_rs,
            w_s1,
            w_s2,
            w_st0,
            w_st1,
            w_st2,
        ),
        dict(
            HAS_REF=ref is not None,
            WEIGHT_MODE=mode,
            BLOCK=block,
            OFFS_64=_needs_int64_offsets(n_elems, block, iters, w),
            num_warps=num_warps,
            **_COMPILE_OPTIONS,
        ),
    )
    return launch, partial, n_elems


def partial_dtype(has_ref: bool) -> torch.dtype:
    """The partial sums' dtype: float32 with ref_pred (its gap stream needs no more), float64 for
    errors alone (float64 lanes: later subtracted from nearly equal reference errors)."""
    return torch.float32 if has_ref else torch.float64


def head_launch(
    partial,
    ref_err,
    pair_weight,
    n_elems,
    beta: float,
    alpha: float,
    has_ref_pred: bool,
    sms,
    loss_type: str = "sigmoid",
):
    """The one-program head launch -> (Launch, (loss, stats, logits, prob, policy_err, ref_err, coef))."""
    n_rows, n_chunks = partial.shape[1], partial.shape[2]
    n_pairs = n_rows // 2
    outputs = (
        _new((), partial),  # loss
        _new((2,), partial),  # stats: accuracy, margin
        _new((n_pairs,), partial),  # logits
        _new((n_pairs,), partial),  # prob
        _new((n_rows,), partial),  # policy_err
        _new((n_rows,), partial),  # ref_err
        _new((n_rows,), partial),  # coef
    )
    block_p, block_c = head_config(n_pairs, n_chunks, interpret=sms is None)
    launch = Launch(
        _poly_dpo_head_kernel,
        (1,),
        (
            partial,
            ref_err if ref_err is not None else partial,
            pair_weight if pair_weight is not None else partial,
            *outputs,
            n_pairs,
            n_chunks,
            n_elems,
            1.0 / n_elems,
            float(beta),
            float(alpha),
            float(beta) / (n_pairs * n_elems),
            1.0 / beta if beta != 0 else 0.0,
        ),
        dict(
            HAS_REF_PRED=has_ref_pred,
            HAS_PAIR_WEIGHT=pair_weight is not None,
            LOSS=LOSS_CODES[loss_type],
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            num_warps=4,
            **_COMPILE_OPTIONS,
        ),
    )
    return launch, outputs


def grad_launch(grad_scale, pred, target, weight, coef, sms: int | None):
    """The gradient launch -> (Launch, grad in pred's dtype)."""
    n_rows, n_elems = _row_count(pred)
    block, iters, n_chunks, num_warps = grid_config(n_elems, n_rows, pred.dtype, sms)
    w, mode, w_rs, w_s1, w_s2, w_st0, w_st1, w_st2 = _weight_layout(weight, pred.shape)
    grad = _new(pred.shape, pred, dtype=pred.dtype)
    launch = Launch(
        _poly_dpo_grad_kernel,
        (n_chunks, n_rows),
        (
            pred,
            target,
            w if w is not None else pred,
            coef,
            grad_scale,
            grad,
            n_elems,
            iters,
            w_rs,
            w_s1,
            w_s2,
            w_st0,
            w_st1,
            w_st2,
        ),
        dict(
            WEIGHT_MODE=mode,
            BLOCK=block,
            OFFS_64=_needs_int64_offsets(n_elems, block, iters, w),
            ROUND_BF16_BY_BITS=sms is None and pred.dtype == torch.bfloat16,
            num_warps=num_warps,
            **_COMPILE_OPTIONS,
        ),
    )
    return launch, grad


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break), with fake kernels for shape inference.


@torch.library.custom_op("vipo::poly_dpo_fwd", mutates_args=())
def poly_dpo_fwd(
    policy_pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    ref_err: torch.Tensor | None,
    elem_weight: torch.Tensor | None,
    pair_weight: torch.Tensor | None,
    beta: float,
    alpha: float,
    loss_type: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss [], stats [2] (accuracy, margin), logits [B], prob [B], policy_err [2B],
    ref_err [2B], coef [2B] (for backward)."""
    policy_pred, target = _flat(policy_pred), _flat(target)
    ref_pred = _flat(ref_pred) if ref_pred is not None else None
    # 2B and B values, whatever dtype they came in: reference errors are read as float64 (the
    # digits their difference from the policy errors needs), pair weights as float32.
    ref_err = ref_err.to(torch.float64).contiguous() if ref_err is not None else None
    pair_weight = pair_weight.to(torch.float32).contiguous() if pair_weight is not None else None
    sms = sm_count(policy_pred.device)
    launch, partial, n_elems = partials_launch(policy_pred, target, ref_pred, elem_weight, sms)
    launch.run()
    launch, outputs = head_launch(
        partial, ref_err, pair_weight, n_elems, beta, alpha, ref_pred is not None, sms, loss_type
    )
    launch.run()
    return outputs


@poly_dpo_fwd.register_fake
def _(policy_pred, target, ref_pred, ref_err, elem_weight, pair_weight, beta, alpha, loss_type):
    n_rows = policy_pred.shape[0]
    f32 = dict(dtype=torch.float32, device=policy_pred.device)
    return (
        policy_pred.new_empty((), **f32),
        policy_pred.new_empty((2,), **f32),
        policy_pred.new_empty((n_rows // 2,), **f32),
        policy_pred.new_empty((n_rows // 2,), **f32),
        policy_pred.new_empty((n_rows,), **f32),
        policy_pred.new_empty((n_rows,), **f32),
        policy_pred.new_empty((n_rows,), **f32),
    )


@torch.library.custom_op("vipo::poly_dpo_bwd", mutates_args=())
def poly_dpo_bwd(
    grad_scale: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    elem_weight: torch.Tensor | None,
    coef: torch.Tensor,
) -> torch.Tensor:
    """grad[row] = grad_scale * coef[row] * elem_weight * (pred - target), in pred's dtype."""
    pred = _flat(pred)
    launch, grad = grad_launch(
        _flat(grad_scale), pred, _flat(target), elem_weight, _flat(coef), sm_count(pred.device)
    )
    launch.run()
    return grad


@poly_dpo_bwd.register_fake
def _(grad_scale, pred, target, elem_weight, coef):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _fwd_setup_context(ctx, inputs, output):
    policy_pred, target, _, _, elem_weight, _, _, _, _ = inputs
    coef = output[6]
    # Saved: the inputs (alive anyway) and coef, 2B floats; no N-sized intermediate.
    ctx.save_for_backward(policy_pred, target, elem_weight, coef)


def _fwd_backward(ctx, grad_loss, *_unused_metric_grads):
    policy_pred, target, elem_weight, coef = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad = poly_dpo_bwd(grad_loss, policy_pred, target, elem_weight, coef)
    return grad, None, None, None, None, None, None, None, None


poly_dpo_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _no_double_backward(ctx, grad):
    raise RuntimeError(
        "vipo's fused Poly-DPO loss does not support double backward (create_graph=True through "
        "its gradient); use vipo.kernels.reference.poly_dpo_loss for higher-order gradients"
    )


def _bwd_setup_context(ctx, inputs, output):
    pass


poly_dpo_bwd.register_autograd(_no_double_backward, setup_context=_bwd_setup_context)


@torch.library.custom_op("vipo::sample_errors", mutates_args=())
def sample_errors_op(
    pred: torch.Tensor, target: torch.Tensor, elem_weight: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample mean of elem_weight * (pred - target)^2 -> float64 [2B]."""
    pred = _flat(pred)
    launch, partial, n_elems = partials_launch(pred, _flat(target), None, elem_weight, sm_count(pred.device))
    launch.run()
    # A fixed-order float64 sum over a few chunks per row: deterministic.
    return partial[0].sum(dim=1) / n_elems


@sample_errors_op.register_fake
def _(pred, target, elem_weight):
    return pred.new_empty((pred.shape[0],), dtype=torch.float64)


def _errors_setup_context(ctx, inputs, output):
    pred, target, elem_weight = inputs
    ctx.save_for_backward(pred, target, elem_weight)


def _errors_backward(ctx, grad_err):
    pred, target, elem_weight = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    n_elems = pred.numel() // pred.shape[0]
    coef = grad_err.float() * (2.0 / n_elems)
    one = torch.ones((), dtype=torch.float32, device=pred.device)
    return poly_dpo_bwd(one, pred, target, elem_weight, coef), None, None


sample_errors_op.register_autograd(_errors_backward, setup_context=_errors_setup_context)
