"""Flash attention (FlashAttention-2): Triton kernels → launchers → torch.library ops → autograd → functions.

Math, per (batch, head), queries Q (Lq, D), keys K and values V (Lk, D), scale s (1/sqrt(D) by default):

    S = s · Q Kᵀ,   P = softmax(S) row-wise (causal: S_ij = -inf where j > i, top-left aligned),   O = P V
    lse_i = log Σ_j exp(S_ij)   (float32, saved for the backward; O(Lq) per head, never an (Lq, Lk) buffer)

The forward walks K/V in blocks of BLOCK_N with the online softmax, in base 2 with the scale folded in
(qk_scale = s · log2 e, so exp(S - m) = exp2(s·log2e·QKᵀ - m₂)): per block

    m_new = max(m, rowmax(QKᵀ)·qk_scale),   α = exp2(m - m_new),   P̃ = exp2(QKᵀ·qk_scale - m_new)  (one FMA)
    l = α·l + rowsum(P̃),   acc = α·acc + P̃ V,   m = m_new;   finally O = acc / l,  lse = (m + log2 l)·ln 2

Backward, with dO the gradient of O:

    delta_i = Σ_d dO_id · O_id                   (preprocess kernel; equals rowsum(P ∘ dP))
    P = exp2(QKᵀ·qk_scale - lse·log2 e),  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP - delta)
    dQ = s · dS K,   dK = s · dSᵀ Q

Deterministic: one kernel owns a K/V block and loops over every query block to accumulate dK, dV; another
owns a query block and loops over K/V to accumulate dQ. No atomics, so every run gives the same bits. With
grouped-query attention (GQA) each query head writes float32 dK/dV partials that the launcher sums. Each
loop runs in two phases: blocks needing no score mask (MASKED=False), then the few on the causal diagonal
or the ragged end of the sequence (MASKED=True).

Head dims that are not powers of two (40, 80, 96, 160) run in a BLOCK_D = next power of two tile with the
extra columns masked on load and store; tensors are read and written with all their strides, so
[B, L, H, D] tensors viewed as [B, H, L, D] need no copies. Queries of head h read K/V head h // GROUP.

Strides: every kernel takes each tensor's (batch, head, row, head-dim) strides by name (stride_qb, stride_qh,
stride_qm, stride_qd, ...: _stride_kwargs). The batch, head and row strides arrive divided by ALIGN (8 when all
of a launch's are multiples of 8, else 1), so the compiler knows rows start 16-byte aligned: vector loads and
async copies even for head dim 40. Batch/head offsets are int64; offsets within one (batch, head) slice int32.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import backends, configs
from ._triton import TRITON_TYPES, KernelSpec, interpret_upcast, next_power_of_2, sm_count, tl, triton

if triton is not None:
    from ._triton import _dot, _like, _rne_bf16

OP = "scaled_dot_product_attention"
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # CUDA's limit on the grid's second dimension, which runs over batch × heads


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    block_m: int  # queries per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int
    tma: bool = False  # K/V/Q/O through tensor descriptors (Hopper's TMA) instead of pointer loads


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    block_m1: int  # dK/dV kernel: queries per inner step
    block_n1: int  # dK/dV kernel: keys per program
    block_m2: int  # dQ kernel: queries per program
    block_n2: int  # dQ kernel: keys per inner step
    num_warps: int
    num_stages: int
    tma: bool = False  # the inner loops load through TMA descriptors (sm_90)


# Tiles come from the per-arch tables in sdxl_kernels/configs (sm80.json, sm90.json) by shape class:
# fwd_class(head_dim, lk) is BLOCK_D and whether the keys are short (Lk < SHORT_LK, e.g. SDXL's 77 text tokens,
# which take a narrow BLOCK_N so the ragged last block wastes less); bwd_class(head_dim) is BLOCK_D.
# sm_90 loads through TMA descriptors: no address arithmetic in registers (BLOCK_N = 128 at head dim 64 needs
# 158 registers instead of 225), so it can take the wide tiles FlashAttention-3 uses; inputs TMA cannot take
# (strides not multiples of 16 bytes, head-dim stride ≠ 1) run the pointer kernel: the forward with the sm_80
# table's tiles, the backward with its own. Triton's warp specialization (tl.range(warp_specialize=True))
# compiles to the same PTX on sm_90 in Triton 3.6 and 3.9 (it is lowered for Blackwell only), so it is not used.
SHORT_LK = 128
PRE_BLOCK_M = 64  # rows per program of the delta = rowsum(dO ∘ O) kernel
PRE_WARPS = 4


if triton is not None:

    @triton.jit
    def _load_tile(
        base,  # the (batch, head) slice
        rows,  # (ROWS,) row indices
        n_rows,
        stride_r,
        stride_d,
        CHECK_ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """A (ROWS, BLOCK_D) tile of rows `rows`, zero beyond n_rows (when CHECK_ROWS) and beyond HEAD_DIM."""
        cols = tl.arange(0, BLOCK_D)
        ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_d
        if CHECK_ROWS:
            if HEAD_DIM == BLOCK_D:
                x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
            else:
                x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            if HEAD_DIM == BLOCK_D:
                x = tl.load(ptrs)
            else:
                x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        return x

    @triton.jit
    def _slice_offset(b, h, stride_b, stride_h, ALIGN: tl.constexpr):
        """Element offset (int64) of the (batch b, head h) slice; the strides arrive divided by ALIGN."""
        return (b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h) * ALIGN

    @triton.jit
    def _slice_desc(base, n_rows, stride_r, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """A TMA descriptor of one (n_rows, HEAD_DIM) slice with (BLOCK_R, BLOCK_D) boxes: rows past n_rows and
        columns past HEAD_DIM read as zeros and are never written."""
        return tl.make_tensor_descriptor(base, [n_rows, HEAD_DIM], [stride_r, 1], [BLOCK_R, BLOCK_D])

    @triton.jit
    def _load_rows(desc, base, start, rows, n_rows, stride_r, stride_d, CHECK_ROWS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
        """The tile of rows `rows` (= start + arange) through the descriptor (TMA) or by pointers."""
        if TMA:
            x = desc.load([start, 0])
        else:
            x = _load_tile(base, rows, n_rows, stride_r, stride_d, CHECK_ROWS, HEAD_DIM, BLOCK_D)
        return x

    @triton.jit
    def _store_tile(base, x, rows, n_rows, stride_r, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr):
        cols = tl.arange(0, BLOCK_D)
        ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_d
        if UPCAST and ptrs.dtype.element_ty == tl.bfloat16:
            x = _rne_bf16(x)  # then the cast below is exact
        if HEAD_DIM == BLOCK_D:
            tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))

    @triton.jit
    def _key_range(m0, LK, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(lo, hi) for the query block at m0: keys [0, lo) need no mask; [lo, hi) are the ragged end of the
        sequence and (causal) the diagonal; keys from hi on are never visible."""
        hi = LK
        lo = LK // BLOCK_N * BLOCK_N
        if CAUSAL:
            hi = tl.minimum(LK, m0 + BLOCK_M)
            lo = tl.minimum(lo, (m0 + 1) // BLOCK_N * BLOCK_N)
        return lo, hi

    @triton.jit
    def _store_lse(lse_ptr, pid_bh, LQ, offs_m, m_i, l_i):
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln(2): back to natural log
        tl.store(lse_ptr + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=offs_m < LQ)

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, q, k, v, offs_m, offs_n, LK, qk_scale, MASKED: tl.constexpr,
                             CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
        """One key block of the forward: scores, mask, the online-softmax rescale, acc += P̃ V."""
        qk = _dot(q, tl.trans(k), None, UPCAST)  # (BLOCK_M, BLOCK_N) raw scores Q Kᵀ
        if MASKED:
            valid = offs_n[None, :] < LK
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(valid, qk, float("-inf"))
        # The row max on the raw scores, then scaled: qk_scale > 0 (the Triton predicate), and rounding is
        # monotonic, so max(qk)·s is exactly max(qk·s). The scale then enters with the subtraction as one FMA
        # per score, qk·s - m, instead of a multiply before the max and a subtraction after it.
        # Column 0 is visible to every row and comes first, so m_new is finite from the first block on.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)  # log2 units
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _dot(_like(p, v, UPCAST), v, acc * alpha[:, None], UPCAST)
        return acc, m_new, l_i

    @triton.jit
    def _fwd_blocks(
        acc,  # (BLOCK_M, BLOCK_D) float32
        m_i,  # (BLOCK_M,) float32, running max in log2 units
        l_i,  # (BLOCK_M,) float32, running sum
        q,  # (BLOCK_M, BLOCK_D)
        k_base,
        v_base,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        offs_m,  # (BLOCK_M,) query rows
        start_n,
        end_n,
        LK,
        qk_scale,
        desc_k,  # TMA: (LK, HEAD_DIM) descriptors of K and V with (BLOCK_N, BLOCK_D) boxes; else None
        desc_v,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
        TMA: tl.constexpr,
    ):
        for n0 in range(start_n, end_n, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _load_rows(desc_k, k_base, n0, offs_n, LK, stride_kn, stride_kd, MASKED, HEAD_DIM, BLOCK_D, TMA)
            v = _load_rows(desc_v, v_base, n0, offs_n, LK, stride_vn, stride_vd, MASKED, HEAD_DIM, BLOCK_D, TMA)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, offs_m, offs_n, LK, qk_scale,
                                                 MASKED, CAUSAL, UPCAST)  # fmt: skip
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd_kernel(
        q_ptr,  # (B, H, LQ, HEAD_DIM) strided
        k_ptr,  # (B, H // GROUP, LK, HEAD_DIM) strided
        v_ptr,  # (B, H // GROUP, LK, HEAD_DIM) strided
        o_ptr,  # (B, H, LQ, HEAD_DIM) strided
        lse_ptr,  # (B, H, LQ) float32 contiguous, natural log
        sm_scale,
        H,
        GROUP,
        LQ,
        LK,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_om,
        stride_od,
        CAUSAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
        ALIGN: tl.constexpr,
        TMA: tl.constexpr,  # Q, K, V and O through TMA descriptors (Hopper; ALIGN = 8 and unit stride_*d)
    ):
        # Row strides back from ALIGN units (_stride_kwargs); batch/head strides stay in them (_slice_offset).
        stride_qm = stride_qm * ALIGN
        stride_kn = stride_kn * ALIGN
        stride_vn = stride_vn * ALIGN
        stride_om = stride_om * ALIGN
        pid_m = tl.program_id(0)
        if CAUSAL:  # the longest rows first: better tail balance
            pid_m = tl.num_programs(0) - 1 - pid_m
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP
        q_base = q_ptr + _slice_offset(b, h, stride_qb, stride_qh, ALIGN)
        k_base = k_ptr + _slice_offset(b, hk, stride_kb, stride_kh, ALIGN)
        v_base = v_ptr + _slice_offset(b, hk, stride_vb, stride_vh, ALIGN)
        o_base = o_ptr + _slice_offset(b, h, stride_ob, stride_oh, ALIGN)

        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        desc_q = None
        desc_k = None
        desc_v = None
        if TMA:  # one (L, HEAD_DIM) descriptor per (batch, head) slice: any batch/head/row strides
            desc_k = _slice_desc(k_base, LK, stride_kn, BLOCK_N, HEAD_DIM, BLOCK_D)
            desc_v = _slice_desc(v_base, LK, stride_vn, BLOCK_N, HEAD_DIM, BLOCK_D)
            desc_q = _slice_desc(q_base, LQ, stride_qm, BLOCK_M, HEAD_DIM, BLOCK_D)
        q = _load_rows(desc_q, q_base, m0, offs_m, LQ, stride_qm, stride_qd, True, HEAD_DIM, BLOCK_D, TMA)
        qk_scale = sm_scale * 1.4426950408889634  # log2(e)

        lo, hi = _key_range(m0, LK, CAUSAL, BLOCK_M, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_m, 0, lo, LK, qk_scale, desc_k, desc_v,
                                    False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, TMA)  # fmt: skip
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_m, lo, hi, LK, qk_scale, desc_k, desc_v,
                                    True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, TMA)  # fmt: skip

        out = acc / l_i[:, None]
        if TMA:  # rows past LQ and columns past HEAD_DIM are not written
            if UPCAST and o_ptr.dtype.element_ty == tl.bfloat16:
                out = _rne_bf16(out)
            desc_o = _slice_desc(o_base, LQ, stride_om, BLOCK_M, HEAD_DIM, BLOCK_D)
            desc_o.store([m0, 0], out.to(o_ptr.dtype.element_ty))
        else:
            _store_tile(o_base, out, offs_m, LQ, stride_om, stride_od, HEAD_DIM, BLOCK_D, UPCAST)
        _store_lse(lse_ptr, pid_bh, LQ, offs_m, m_i, l_i)

    @triton.jit
    def _attn_bwd_delta_kernel(
        o_ptr,  # (B, H, LQ, HEAD_DIM) strided
        do_ptr,  # (B, H, LQ, HEAD_DIM) strided
        delta_ptr,  # (B, H, LQ) float32 contiguous
        H,
        LQ,
        stride_ob,
        stride_oh,
        stride_om,
        stride_od,
        stride_dob,
        stride_doh,
        stride_dom,
        stride_dod,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        # Row strides back from ALIGN units (_stride_kwargs); batch/head strides stay in them (_slice_offset).
        stride_om = stride_om * ALIGN
        stride_dom = stride_dom * ALIGN
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        o_base = o_ptr + _slice_offset(b, h, stride_ob, stride_oh, ALIGN)
        do_base = do_ptr + _slice_offset(b, h, stride_dob, stride_doh, ALIGN)
        o = _load_tile(o_base, offs_m, LQ, stride_om, stride_od, True, HEAD_DIM, BLOCK_D)
        do = _load_tile(do_base, offs_m, LQ, stride_dom, stride_dod, True, HEAD_DIM, BLOCK_D)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(delta_ptr + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)

    @triton.jit
    def _bwd_dkdv_blocks(
        dk,  # (BLOCK_N1, BLOCK_D) float32
        dv,  # (BLOCK_N1, BLOCK_D) float32
        k,  # (BLOCK_N1, BLOCK_D)
        v,  # (BLOCK_N1, BLOCK_D)
        q_base,
        do_base,
        lse_base,
        delta_base,
        stride_qm,
        stride_qd,
        stride_dom,
        stride_dod,
        offs_n,  # (BLOCK_N1,) key rows
        start_m,
        end_m,
        LQ,
        qk_scale,
        desc_q,  # TMA: (LQ, HEAD_DIM) descriptors of Q and dO with (BLOCK_M1, BLOCK_D) boxes; else None
        desc_do,
        MASKED: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M1: tl.constexpr,
        UPCAST: tl.constexpr,
        TMA: tl.constexpr,
    ):
        # The diagonal blocks are few: not pipelining them saves registers (Triton 3.6 spilled here on sm_80).
        for m0 in tl.range(start_m, end_m, BLOCK_M1, num_stages=1 if MASKED else None):
            offs_m = m0 + tl.arange(0, BLOCK_M1)
            q = _load_rows(desc_q, q_base, m0, offs_m, LQ, stride_qm, stride_qd, True, HEAD_DIM, BLOCK_D, TMA)
            do = _load_rows(desc_do, do_base, m0, offs_m, LQ, stride_dom, stride_dod, True, HEAD_DIM, BLOCK_D, TMA)
            # Rows past LQ get lse = +inf, so their P is exactly 0 and no score mask is needed for them.
            lse2 = tl.load(lse_base + offs_m, mask=offs_m < LQ, other=float("inf")) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m, mask=offs_m < LQ, other=0.0)
            qk_t = _dot(k, tl.trans(q), None, UPCAST) * qk_scale  # (BLOCK_N1, BLOCK_M1) = (QKᵀ)ᵀ, log2
            p_t = tl.exp2(qk_t - lse2[None, :])
            if MASKED:  # causal diagonal: key n is visible to query m iff m >= n
                p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
            dv = _dot(_like(p_t, do, UPCAST), do, dv, UPCAST)
            dp_t = _dot(v, tl.trans(do), None, UPCAST)  # (BLOCK_N1, BLOCK_M1) = (dO Vᵀ)ᵀ
            ds_t = p_t * (dp_t - delta[None, :])
            dk = _dot(_like(ds_t, q, UPCAST), q, dk, UPCAST)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        q_ptr,  # (B, H, LQ, HEAD_DIM) strided
        k_ptr,  # (B, H // GROUP, LK, HEAD_DIM) strided
        v_ptr,  # (B, H // GROUP, LK, HEAD_DIM) strided
        do_ptr,  # (B, H, LQ, HEAD_DIM) strided
        dk_ptr,  # (B, H, LK, HEAD_DIM) strided: dK; or float32 partials (SPLIT·B, H, LK, HEAD_DIM) (GQA, split)
        dv_ptr,  # likewise
        lse_ptr,  # (B, H, LQ) float32 contiguous
        delta_ptr,  # (B, H, LQ) float32 contiguous
        sm_scale,
        H,
        GROUP,
        LQ,
        LK,
        Q_PER_SPLIT,  # queries per program along grid axis 2 (a multiple of BLOCK_M1; ≥ LQ: no split)
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_dob,
        stride_doh,
        stride_dom,
        stride_dod,
        stride_dkb,
        stride_dkh,
        stride_dkn,
        stride_dkd,
        stride_dvb,
        stride_dvh,
        stride_dvn,
        stride_dvd,
        CAUSAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M1: tl.constexpr,
        BLOCK_N1: tl.constexpr,
        UPCAST: tl.constexpr,
        ALIGN: tl.constexpr,
        TMA: tl.constexpr,  # the query-block loop loads Q and dO through TMA descriptors (ALIGN = 8, unit stride_d)
    ):
        # Row strides back from ALIGN units (_stride_kwargs); batch/head strides stay in them (_slice_offset).
        stride_qm = stride_qm * ALIGN
        stride_kn = stride_kn * ALIGN
        stride_vn = stride_vn * ALIGN
        stride_dom = stride_dom * ALIGN
        stride_dkn = stride_dkn * ALIGN
        stride_dvn = stride_dvn * ALIGN
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)  # over B * H: one query head, whose K/V head is h // GROUP
        pid_s = tl.program_id(2)  # which query range [q_lo, q_hi) of the split this program sums over
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP
        q_lo = pid_s * Q_PER_SPLIT
        q_hi = tl.minimum(q_lo + Q_PER_SPLIT, LQ)
        n0 = pid_n * BLOCK_N1
        offs_n = n0 + tl.arange(0, BLOCK_N1)
        k_off = _slice_offset(b, hk, stride_kb, stride_kh, ALIGN)
        v_off = _slice_offset(b, hk, stride_vb, stride_vh, ALIGN)
        k = _load_tile(k_ptr + k_off, offs_n, LK, stride_kn, stride_kd, True, HEAD_DIM, BLOCK_D)  # (BLOCK_N1, BLOCK_D)
        v = _load_tile(v_ptr + v_off, offs_n, LK, stride_vn, stride_vd, True, HEAD_DIM, BLOCK_D)  # (BLOCK_N1, BLOCK_D)
        q_base = q_ptr + _slice_offset(b, h, stride_qb, stride_qh, ALIGN)
        do_base = do_ptr + _slice_offset(b, h, stride_dob, stride_doh, ALIGN)
        lse_base = lse_ptr + pid_bh.to(tl.int64) * LQ
        delta_base = delta_ptr + pid_bh.to(tl.int64) * LQ
        qk_scale = sm_scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        desc_q = None
        desc_do = None
        if TMA:
            desc_q = _slice_desc(q_base, LQ, stride_qm, BLOCK_M1, HEAD_DIM, BLOCK_D)
            desc_do = _slice_desc(do_base, LQ, stride_dom, BLOCK_M1, HEAD_DIM, BLOCK_D)

        # Query blocks [start, diag) straddle the causal diagonal of this key block; [diag, LQ) see it whole;
        # each is cut to this program's range [q_lo, q_hi) (block-aligned: Q_PER_SPLIT is a multiple of BLOCK_M1).
        diag = q_lo
        if CAUSAL:
            start = tl.maximum(n0 // BLOCK_M1 * BLOCK_M1, q_lo)
            diag = tl.minimum(tl.cdiv(n0 + BLOCK_N1 - 1, BLOCK_M1) * BLOCK_M1, q_hi)
            dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                      stride_qm, stride_qd, stride_dom, stride_dod, offs_n, start, diag, LQ,
                                      qk_scale, desc_q, desc_do, True, HEAD_DIM, BLOCK_D, BLOCK_M1, UPCAST,
                                      TMA)  # fmt: skip
            diag = tl.maximum(diag, q_lo)
        dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                  stride_qm, stride_qd, stride_dom, stride_dod, offs_n, diag, q_hi, LQ,
                                  qk_scale, desc_q, desc_do, False, HEAD_DIM, BLOCK_D, BLOCK_M1, UPCAST,
                                  TMA)  # fmt: skip

        dk = dk * sm_scale
        b_out = pid_s * (tl.num_programs(1) // H) + b  # split s writes partial batch s·B + b
        dk_off = _slice_offset(b_out, h, stride_dkb, stride_dkh, ALIGN)
        dv_off = _slice_offset(b_out, h, stride_dvb, stride_dvh, ALIGN)
        _store_tile(dk_ptr + dk_off, dk, offs_n, LK, stride_dkn, stride_dkd, HEAD_DIM, BLOCK_D, UPCAST)
        _store_tile(dv_ptr + dv_off, dv, offs_n, LK, stride_dvn, stride_dvd, HEAD_DIM, BLOCK_D, UPCAST)

    @triton.jit
    def _bwd_dq_blocks(
        dq,  # (BLOCK_M2, BLOCK_D) float32
        q,  # (BLOCK_M2, BLOCK_D)
        do,  # (BLOCK_M2, BLOCK_D)
        lse2,  # (BLOCK_M2,) log2 units
        delta,  # (BLOCK_M2,)
        k_base,
        v_base,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        offs_m,  # (BLOCK_M2,) query rows
        start_n,
        end_n,
        LK,
        qk_scale,
        desc_k,  # TMA: (LK, HEAD_DIM) descriptors of K and V with (BLOCK_N2, BLOCK_D) boxes; else None
        desc_v,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N2: tl.constexpr,
        UPCAST: tl.constexpr,
        TMA: tl.constexpr,
    ):
        for n0 in range(start_n, end_n, BLOCK_N2):
            offs_n = n0 + tl.arange(0, BLOCK_N2)
            k = _load_rows(desc_k, k_base, n0, offs_n, LK, stride_kn, stride_kd, MASKED, HEAD_DIM, BLOCK_D, TMA)
            v = _load_rows(desc_v, v_base, n0, offs_n, LK, stride_vn, stride_vd, MASKED, HEAD_DIM, BLOCK_D, TMA)
            qk = _dot(q, tl.trans(k), None, UPCAST) * qk_scale  # (BLOCK_M2, BLOCK_N2)
            p = tl.exp2(qk - lse2[:, None])
            if MASKED:
                valid = offs_n[None, :] < LK
                if CAUSAL:
                    valid = valid & (offs_m[:, None] >= offs_n[None, :])
                p = tl.where(valid, p, 0.0)
            dp = _dot(do, tl.trans(v), None, UPCAST)  # (BLOCK_M2, BLOCK_N2)
            ds = p * (dp - delta[:, None])
            dq = _dot(_like(ds, k, UPCAST), k, dq, UPCAST)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        q_ptr,  # (B, H, LQ, HEAD_DIM) strided
        k_ptr,  # (B, H // GROUP, LK, HEAD_DIM) strided
        v_ptr,  # (B, H // GROUP, LK, HEAD_DIM) strided
        do_ptr,  # (B, H, LQ, HEAD_DIM) strided
        dq_ptr,  # (B, H, LQ, HEAD_DIM) strided
        lse_ptr,  # (B, H, LQ) float32 contiguous
        delta_ptr,  # (B, H, LQ) float32 contiguous
        sm_scale,
        H,
        GROUP,
        LQ,
        LK,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_dob,
        stride_doh,
        stride_dom,
        stride_dod,
        stride_dqb,
        stride_dqh,
        stride_dqm,
        stride_dqd,
        CAUSAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M2: tl.constexpr,
        BLOCK_N2: tl.constexpr,
        UPCAST: tl.constexpr,
        ALIGN: tl.constexpr,
        TMA: tl.constexpr,  # the key-block loop loads K and V through TMA descriptors (ALIGN = 8, unit stride_d)
    ):
        # Row strides back from ALIGN units (_stride_kwargs); batch/head strides stay in them (_slice_offset).
        stride_qm = stride_qm * ALIGN
        stride_kn = stride_kn * ALIGN
        stride_vn = stride_vn * ALIGN
        stride_dom = stride_dom * ALIGN
        stride_dqm = stride_dqm * ALIGN
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP
        m0 = pid_m * BLOCK_M2
        offs_m = m0 + tl.arange(0, BLOCK_M2)
        q_off = _slice_offset(b, h, stride_qb, stride_qh, ALIGN)
        do_off = _slice_offset(b, h, stride_dob, stride_doh, ALIGN)
        q = _load_tile(q_ptr + q_off, offs_m, LQ, stride_qm, stride_qd, True, HEAD_DIM, BLOCK_D)  # (BLOCK_M2, BLOCK_D)
        do = _load_tile(do_ptr + do_off, offs_m, LQ, stride_dom, stride_dod, True, HEAD_DIM, BLOCK_D)
        rows = lse_ptr + pid_bh.to(tl.int64) * LQ + offs_m
        lse2 = tl.load(rows, mask=offs_m < LQ, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0)
        k_base = k_ptr + _slice_offset(b, hk, stride_kb, stride_kh, ALIGN)
        v_base = v_ptr + _slice_offset(b, hk, stride_vb, stride_vh, ALIGN)
        qk_scale = sm_scale * 1.4426950408889634
        desc_k = None
        desc_v = None
        if TMA:
            desc_k = _slice_desc(k_base, LK, stride_kn, BLOCK_N2, HEAD_DIM, BLOCK_D)
            desc_v = _slice_desc(v_base, LK, stride_vn, BLOCK_N2, HEAD_DIM, BLOCK_D)

        lo, hi = _key_range(m0, LK, CAUSAL, BLOCK_M2, BLOCK_N2)
        dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)
        dq = _bwd_dq_blocks(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                            offs_m, 0, lo, LK, qk_scale, desc_k, desc_v,
                            False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N2, UPCAST, TMA)  # fmt: skip
        dq = _bwd_dq_blocks(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                            offs_m, lo, hi, LK, qk_scale, desc_k, desc_v,
                            True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N2, UPCAST, TMA)  # fmt: skip
        dq = dq * sm_scale
        dq_off = _slice_offset(b, h, stride_dqb, stride_dqh, ALIGN)
        _store_tile(dq_ptr + dq_off, dq, offs_m, LQ, stride_dqm, stride_dqd, HEAD_DIM, BLOCK_D, UPCAST)


# ---- launch configuration ----------------------------------------------------------------------------------


def block_d(head_dim: int) -> int:
    """The power-of-two tile width a head dim runs in: 64, 128 or 256 (smaller head dims pad to 64)."""
    return max(64, next_power_of_2(head_dim))


def fwd_class(head_dim: int, lk: int) -> str:
    """The attention_fwd shape class: "d{BLOCK_D}-long", or "d{BLOCK_D}-short" for lk < SHORT_LK keys."""
    return f"d{block_d(head_dim)}-{'short' if lk < SHORT_LK else 'long'}"


def bwd_class(head_dim: int) -> str:
    """The attention_bwd shape class: "d{BLOCK_D}"."""
    return f"d{block_d(head_dim)}"


def _arch(device: torch.device) -> int:
    """Config table of the device: 90 for Hopper and newer, 80 otherwise (and under the interpreter)."""
    return configs.device_arch(device)


def fwd_config(head_dim: int, lk: int, device: torch.device, arch: int | None = None) -> FwdConfig:
    return configs.get("attention_fwd", fwd_class(head_dim, lk), _arch(device) if arch is None else arch)


def bwd_config(head_dim: int, device: torch.device, arch: int | None = None) -> BwdConfig:
    return configs.get("attention_bwd", bwd_class(head_dim), _arch(device) if arch is None else arch)


def _check_config(arch: int, cls: str, cfg: FwdConfig | BwdConfig) -> None:
    """Blocks are powers of two in 16..256: tl.dot takes 16 rows and columns at least, a TMA box 256 rows at
    most; tma needs sm_90. Register and shared-memory limits are compile_check's to find."""
    for field in dataclasses.fields(cfg):
        if field.name.startswith("block_"):
            configs.check_pow2(field.name, getattr(cfg, field.name), 16, 256)
    configs.check_launch(cfg)
    if cfg.tma and arch < 90:
        raise ValueError("tma = true needs sm_90 (Hopper's tensor memory accelerator); sm_80 loads by pointers")


# Sweep candidates per arch and class, (block_m, block_n, num_warps, num_stages) for the forward and
# (block_m1, block_n1, block_m2, block_n2, num_warps, num_stages) for the backward, on sm_90 through TMA;
# configs.candidates puts the table's config first. Every one compiles without spills for its arch
# (compile_check builds them all) under Triton 3.9 and 3.6 (the GPU machine's); tiles that spilled under either
# were dropped.
FWD_SWEEP = {
    80: {
        "d64-long": ((128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 4), (128, 64, 4, 3), (128, 32, 4, 3),
                     (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4)),
        "d64-short": ((128, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2), (128, 16, 8, 3), (64, 32, 4, 2),
                      (64, 32, 4, 3), (64, 64, 4, 2), (64, 16, 4, 2)),
        "d128-long": ((128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3),
                      (64, 128, 8, 2)),
        "d128-short": ((128, 32, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)),
        "d256-long": ((64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2)),
        "d256-short": ((64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 1), (32, 32, 4, 2)),
    },
    90: {
        "d64-long": ((128, 128, 8, 2), (128, 128, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3),
                     (128, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4)),
        "d64-short": ((128, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 4, 2), (64, 32, 4, 2),
                      (64, 32, 4, 3), (64, 64, 4, 2), (128, 128, 8, 1)),
        "d128-long": ((128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2),
                      (128, 32, 8, 3)),
        "d128-short": ((128, 32, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2)),
        "d256-long": ((64, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)),
        "d256-short": ((64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 1)),
    },
}
BWD_SWEEP = {
    80: {
        "d64": ((32, 128, 128, 32, 8, 2), (32, 64, 64, 32, 4, 3), (32, 64, 64, 32, 8, 2), (16, 64, 64, 16, 4, 3),
                (32, 64, 128, 32, 8, 3)),
        "d128": ((16, 64, 128, 32, 8, 2), (64, 64, 64, 64, 8, 2), (32, 32, 32, 32, 4, 2), (16, 32, 64, 16, 4, 2),
                 (32, 64, 64, 32, 8, 2)),
        "d256": ((16, 32, 32, 16, 4, 1), (32, 32, 32, 32, 4, 1), (32, 64, 64, 32, 8, 1), (16, 32, 32, 16, 8, 2)),
    },
    90: {
        "d64": ((32, 128, 128, 32, 8, 2), (32, 64, 64, 32, 4, 3), (64, 64, 64, 64, 4, 2), (64, 128, 128, 64, 8, 2),
                (16, 64, 64, 16, 4, 3), (32, 64, 128, 32, 8, 3)),
        "d128": ((32, 64, 64, 32, 4, 2), (32, 64, 128, 32, 8, 2), (64, 64, 64, 64, 8, 2), (16, 64, 64, 16, 4, 2),
                 (32, 128, 128, 32, 8, 1)),
        "d256": ((16, 32, 32, 16, 4, 1), (16, 32, 32, 16, 8, 2), (16, 32, 32, 16, 8, 1), (32, 32, 32, 32, 8, 2)),
    },
}


def _sweep(config: type, table: dict) -> Callable[[int, str], list]:
    return lambda arch, cls: [config(*tiles, tma=arch >= 90) for tiles in table[arch][cls]]


CONFIG_FAMILIES = (
    configs.Family(
        "attention_fwd", FwdConfig, tuple(f"d{d}-{keys}" for d in (64, 128, 256) for keys in ("long", "short")),
        _check_config, _sweep(FwdConfig, FWD_SWEEP), fwd_class,
    ),
    configs.Family(
        "attention_bwd", BwdConfig, ("d64", "d128", "d256"), _check_config, _sweep(BwdConfig, BWD_SWEEP), bwd_class
    ),
)  # fmt: skip


ROW_LETTER = {"q": "m", "o": "m", "do": "m", "dq": "m", "k": "n", "v": "n", "dk": "n", "dv": "n"}


def _stride_kwargs(**tensors: torch.Tensor) -> tuple[dict[str, int], int]:
    """({stride_<name>b, stride_<name>h, stride_<name><row>, stride_<name>d: ...} for each (B, H, L, D) tensor
    named as the kernels' parameters are (q, k, v, o, do, dq, dk, dv; row m for queries, n for keys), ALIGN):
    batch, head and row strides divided by ALIGN = 8 (16 bytes of fp16/bf16) when every one is a multiple of
    8, else 1. `_strides_of` picks one kernel's."""
    align = 8 if all(s % 8 == 0 for t in tensors.values() for s in t.stride()[:3]) else 1
    out = {}
    for name, t in tensors.items():
        sb, sh, sl, sd = t.stride()
        out |= {f"stride_{name}b": sb // align, f"stride_{name}h": sh // align,
                f"stride_{name}{ROW_LETTER[name]}": sl // align, f"stride_{name}d": sd}  # fmt: skip
    return out, align


def _strides_of(strides: dict[str, int], *names: str) -> dict[str, int]:
    """The entries of `strides` (from _stride_kwargs) for the tensors `names`: what one kernel takes."""
    return {k: v for k, v in strides.items() if k[len("stride_"):-1] in names}


def tma_reason(*tensors: torch.Tensor) -> str | None:
    """None when TMA descriptors can address every tensor: unit head-dim stride, 16-byte aligned base
    pointers and batch/head/row strides (multiples of 8 fp16/bf16 elements); else why not."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"Triton {triton.__version__} has no tl.make_tensor_descriptor"
    for t in tensors:
        if t.stride(3) != 1 and t.shape[3] > 1:
            return "a head-dim stride is not 1"
        if t.data_ptr() % 16:
            return "a base pointer is not 16-byte aligned"
        if any(s % 8 for s in t.stride()[:3]):
            return "a batch/head/row stride is not a multiple of 8 elements"
    return None


def _torch_allocator(size: int, alignment: int, stream):
    """Global scratch for kernels that build TMA descriptors on the device (128 bytes per descriptor)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Kernels that call tl.make_tensor_descriptor need triton.set_allocator; set ours unless the caller set
    one (the allocator is a context variable, so this runs per launch: autograd's thread has its own)."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_torch_allocator)


def forward_config(q, k, v, out=None) -> FwdConfig:
    """The forward's tiles for these inputs as the launcher picks them: the device's table, or, on sm_90 for
    inputs TMA cannot address, the sm_80 table's tiles by pointers (an override may hold TMA there too).
    `out` defaults to q (torch.empty_like(q) has q's strides wherever TMA could take q)."""
    head_dim, lk = q.shape[-1], k.shape[2]
    cfg = fwd_config(head_dim, lk, q.device)
    if cfg.tma and tma_reason(q, k, v, q if out is None else out) is not None:
        cfg = dataclasses.replace(fwd_config(head_dim, lk, q.device, arch=80), tma=False)
    return cfg


def forward_path(q, k, v) -> str:
    """Which loads the forward takes for these (B, H, L, D) inputs: "tma" (Hopper's tensor descriptors) or
    "pointers"; what the GPU pass records per row."""
    return "tma" if forward_config(q, k, v).tma else "pointers"


def _triton_forward(q, k, v, causal, scale, want_lse=True):
    """q (B, H, Lq, D), k/v (B, H_kv, Lk, D) → out (B, H, Lq, D) in q's memory layout, lse (B, H, Lq) fp32
    (always written: it costs the kernel nothing)."""
    bsz, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(bsz, heads, lq, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    if lk == 0:  # softmax over no keys: PyTorch returns zeros
        return out.zero_(), lse.fill_(float("-inf"))
    cfg = forward_config(q, k, v, out)
    strides, align = _stride_kwargs(q=q, k=k, v=v, o=out)
    if cfg.tma:  # tma_reason passed, so align is 8
        _ensure_allocator()
    _attn_fwd_kernel[(triton.cdiv(lq, cfg.block_m), bsz * heads)](
        q, k, v, out, lse, scale, heads, heads // k.shape[1], lq, lk, **strides,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        UPCAST=interpret_upcast(q.dtype), ALIGN=align, TMA=cfg.tma, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def _triton_backward(dout, q, k, v, out, lse, causal, scale):
    """Gradients (dq, dk, dv), each in its input's memory layout."""
    bsz, heads, lq, head_dim = q.shape
    heads_kv, lk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if lq == 0 or lk == 0 or bsz * heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if _slice_extent(dout) >= 2**31:  # the forward's inputs were checked; an odd gradient layout is copied
        dout = dout.contiguous()
    group = heads // heads_kv
    bd = block_d(head_dim)
    delta = torch.empty(bsz, heads, lq, device=q.device, dtype=torch.float32)  # (B, H, Lq)
    strides, align = _stride_kwargs(o=out, do=dout)
    _attn_bwd_delta_kernel[(triton.cdiv(lq, PRE_BLOCK_M), bsz * heads)](
        out, dout, delta, heads, lq, **strides,
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=PRE_BLOCK_M, ALIGN=align, num_warps=PRE_WARPS, num_stages=1,
    )  # fmt: skip
    cfg = bwd_config(head_dim, q.device)
    split, q_per_split = dkdv_split(lq, lk, bsz * heads, cfg.block_m1, cfg.block_n1, _split_sms(q.device))
    # GQA and a split query range: each query head and range writes its own float32 dK/dV partials, summed
    # below in a fixed order (no atomics, so still deterministic).
    dk_h, dv_h = dk, dv
    if group > 1 or split > 1:
        dk_h = torch.empty(split * bsz, heads, lk, head_dim, device=q.device, dtype=torch.float32)  # (S·B, H, Lk, D)
        dv_h = torch.empty_like(dk_h)
    strides, align = _stride_kwargs(q=q, k=k, v=v, do=dout, dk=dk_h, dv=dv_h, dq=dq)
    if cfg.tma and (align != 8 or tma_reason(q, k, v, dout) is not None):
        cfg = dataclasses.replace(cfg, tma=False)
    if cfg.tma:
        _ensure_allocator()
    flags = dict(CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=bd, UPCAST=interpret_upcast(q.dtype), ALIGN=align,
                 TMA=cfg.tma)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _attn_bwd_dkdv_kernel[(triton.cdiv(lk, cfg.block_n1), bsz * heads, split)](
        q, k, v, dout, dk_h, dv_h, lse, delta, scale, heads, group, lq, lk, q_per_split,
        **_strides_of(strides, "q", "k", "v", "do", "dk", "dv"),
        BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, **flags, **launch,
    )  # fmt: skip
    _attn_bwd_dq_kernel[(triton.cdiv(lq, cfg.block_m2), bsz * heads)](
        q, k, v, dout, dq, lse, delta, scale, heads, group, lq, lk,
        **_strides_of(strides, "q", "k", "v", "do", "dq"),
        BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2, **flags, **launch,
    )  # fmt: skip
    if group > 1 or split > 1:
        dk.copy_(dk_h.view(split, bsz, heads_kv, group, lk, head_dim).sum((0, 3)))  # (B, H_kv, Lk, D)
        dv.copy_(dv_h.view(split, bsz, heads_kv, group, lk, head_dim).sum((0, 3)))
    return dq, dk, dv


SPLIT_MIN_CTAS_PER_SM = 2  # the dK/dV grid's floor: below it, the query range is split across programs


def _split_sms(device: torch.device) -> int:
    """SMs the dK/dV split plans for: the device's on CUDA; 0 (never split) under the interpreter."""
    return sm_count(device) if device.type == "cuda" else 0


def dkdv_split(lq: int, lk: int, batch_heads: int, block_m1: int, block_n1: int, sms: int) -> tuple[int, int]:
    """(SPLIT, Q_PER_SPLIT) of the dK/dV kernel. Its grid is cdiv(Lk, BLOCK_N1) · B·H programs, each walking
    every query; with few keys (SDXL's 77 text tokens: 1 · 20 programs at [2, 10, 4096, 64]) that leaves most
    of a 132-SM GPU idle. When the grid is under SPLIT_MIN_CTAS_PER_SM · sms, the Lq queries are cut into SPLIT
    ranges of Q_PER_SPLIT (whole BLOCK_M1 blocks), one program each, so the grid reaches the floor (or one
    query block per program). No split: (1, Lq rounded up to BLOCK_M1)."""
    blocks = triton.cdiv(lq, block_m1)
    ctas = triton.cdiv(lk, block_n1) * batch_heads
    per = blocks
    if sms > 0 and ctas < SPLIT_MIN_CTAS_PER_SM * sms:
        per = max(1, blocks // triton.cdiv(SPLIT_MIN_CTAS_PER_SM * sms, ctas))  # cdiv(blocks, per) ≥ wanted
    return triton.cdiv(blocks, per), per * block_m1


# ---- ahead-of-time compile check ---------------------------------------------------------------------------


def _spec(fn, label, dtype, consts, num_warps, num_stages, arch, fp32=("lse_ptr", "delta_ptr"),
          candidate=False) -> KernelSpec:
    """One variant of fn as the launchers call it: unit head-dim strides (what [B, H, L, D] and [B, L, H, D]
    tensors have), 16-byte aligned pointers, the other strides known only through ALIGN."""
    t, names = TRITON_TYPES[dtype], fn.arg_names
    ptrs = {n: "fp32" if n in fp32 else t for n in names if n.endswith("_ptr")}
    consts = {k: v for k, v in consts.items() if k in names}
    consts |= {n: 1 for n in names if n.startswith("stride_") and n.endswith("d")}
    floats = ("sm_scale",) if "sm_scale" in names else ()
    return KernelSpec(fn, label, ptrs, consts, floats, num_warps, num_stages=num_stages,
                       divisible_by_16=tuple(ptrs), archs=(arch,), candidate=candidate)  # fmt: skip


def _fwd_spec(label, dtype, flags, c: FwdConfig, arch, candidate=False) -> KernelSpec:
    tiles = flags | dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, TMA=c.tma)
    return _spec(_attn_fwd_kernel, label, dtype, tiles, c.num_warps, c.num_stages, arch, candidate=candidate)


def _bwd_specs(tag, dtype, flags, c: BwdConfig, arch, partials=False, candidate=False) -> list[KernelSpec]:
    """dK/dV and dQ kernels of c, through TMA when c.tma and by pointers (what TMA tables fall back to)."""
    specs, warps, stages = [], c.num_warps, c.num_stages
    extra = f" w{warps}" if candidate else ""
    for tma in (True, False) if c.tma else (False,):
        suffix = (" TMA" if tma else "") + (" candidate" if candidate else "")
        tiles = flags | dict(BLOCK_M1=c.block_m1, BLOCK_N1=c.block_n1, TMA=tma)
        label = f"{tag} M{c.block_m1} N{c.block_n1}{extra} s{stages}{suffix}"
        specs.append(_spec(_attn_bwd_dkdv_kernel, label, dtype, tiles, warps, stages, arch, candidate=candidate))
        if partials:  # float32 dK/dV partials (GQA, a split query range)
            fp32 = ("lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr")
            specs.append(_spec(_attn_bwd_dkdv_kernel, f"{label} GQA", dtype, tiles, warps, stages, arch, fp32))
        tiles = flags | dict(BLOCK_M2=c.block_m2, BLOCK_N2=c.block_n2, TMA=tma)
        label = f"{tag} M{c.block_m2} N{c.block_n2}{extra} s{stages}{suffix}"
        specs.append(_spec(_attn_bwd_dq_kernel, label, dtype, tiles, warps, stages, arch, candidate=candidate))
    return specs


def _fwd_table(arch: int, bd: int) -> list[FwdConfig]:
    """The distinct forward configs arch's launcher picks at BLOCK_D bd: its table's (long, short), and on
    sm_90 the sm_80 pointer tiles it falls back to for inputs TMA cannot address."""
    tiles = [configs.table(a)["attention_fwd"][f"d{bd}-{keys}"] for a in (arch, 80) for keys in ("long", "short")]
    tiles = tiles if arch != 80 else tiles[:2]
    return list(dict.fromkeys(tiles[:2] + [dataclasses.replace(c, tma=False) for c in tiles[2:]]))


# The table variants compile_check builds, one row per (dtype, HEAD_DIM, BLOCK_D): every power-of-two head dim
# in both dtypes; in float16 one padded head dim per BLOCK_D (the extra column masks), and the float32 GQA dK/dV
# partials at HEAD_DIM = BLOCK_D. Each row × causal × arch × the arch's distinct table configs.
COMPILE_SHAPES = tuple((dt, d, d) for dt in KERNEL_DTYPES for d in (64, 128, 256)) + tuple(
    (torch.float16, d, bd) for d, bd in ((40, 64), (80, 128), (160, 256))
)


def compile_specs() -> list[KernelSpec]:
    """Every variant the launchers can pick, for the arch whose table picks it (configs.table: the packaged
    tables, with $SDXL_KERNELS_CONFIGS's entries in place): COMPILE_SHAPES × causal × each distinct table config
    (sm_90: its TMA tiles and the pointer tiles it falls back to), the delta kernel once per shape. Then each
    sweep candidate that is not a table config, labelled "candidate": bfloat16, non-causal, HEAD_DIM = BLOCK_D
    only, which bounds the compile time (causal and padded variants differ from it by masks); sm_90's backward
    candidates also by pointers, the loads they fall back to once a sweep puts them in a table."""
    specs = []
    for arch in configs.ARCHS:
        for dtype, head_dim, bd in COMPILE_SHAPES:
            specs += _shape_specs(arch, dtype, head_dim, bd)
        specs += _candidate_specs(arch)
    return specs


def _shape_specs(arch: int, dtype: torch.dtype, head_dim: int, bd: int) -> list[KernelSpec]:
    dims = dict(HEAD_DIM=head_dim, BLOCK_D=bd, ALIGN=8)
    shape = f"{TRITON_TYPES[dtype]} D={head_dim}/{bd}"
    pre = dims | dict(BLOCK_M=PRE_BLOCK_M)
    specs = [_spec(_attn_bwd_delta_kernel, f"{shape} M{PRE_BLOCK_M}", dtype, pre, PRE_WARPS, 1, arch)]
    partials = head_dim == bd  # the float32 dK/dV partials of GQA and of a split query range
    bwd = configs.table(arch)["attention_bwd"][f"d{bd}"]
    for causal in (False, True):
        flags = dims | dict(CAUSAL=causal, UPCAST=False)
        tag = f"{shape}{' causal' if causal else ''}"
        for c in _fwd_table(arch, bd):
            label = f"{tag} M{c.block_m} N{c.block_n} s{c.num_stages}{' TMA' if c.tma else ''}"
            specs.append(_fwd_spec(label, dtype, flags, c, arch))
        specs += _bwd_specs(tag, dtype, flags, bwd, arch, partials=partials)
    return specs


def _candidate_specs(arch: int) -> list[KernelSpec]:
    specs, dtype = [], torch.bfloat16
    for bd in (64, 128, 256):
        flags = dict(HEAD_DIM=bd, BLOCK_D=bd, ALIGN=8, CAUSAL=False, UPCAST=False)
        tag = f"{TRITON_TYPES[dtype]} D={bd}/{bd}"
        table = set(_fwd_table(arch, bd))
        fwd = [c for keys in ("long", "short") for c in configs.candidates("attention_fwd", f"d{bd}-{keys}", arch)]
        for c in dict.fromkeys(fwd):
            if c not in table:
                label = f"{tag} M{c.block_m} N{c.block_n} w{c.num_warps} s{c.num_stages}{' TMA' if c.tma else ''}"
                specs.append(_fwd_spec(f"{label} candidate", dtype, flags, c, arch, candidate=True))
        table = configs.table(arch)["attention_bwd"][f"d{bd}"]
        for c in configs.candidates("attention_bwd", f"d{bd}", arch):
            if c != table:
                specs += _bwd_specs(tag, dtype, flags, c, arch, candidate=True)
    return specs


# ---- backend predicates ------------------------------------------------------------------------------------


def _contract_reason(query, key, value, attn_mask, dropout_p, enable_gqa) -> str | None:
    """None when the call fits the ops' (q, k, v, causal, scale) contract, whichever backend then serves:
    (B, H, L, D) floating tensors of one dtype and device, K/V heads equal to or (GQA) dividing Q's, no mask or
    dropout; else why not."""
    if attn_mask is not None:
        return "attn_mask is not supported (only is_causal)"
    if dropout_p != 0.0:
        return "dropout_p > 0 is not supported"
    if not all(type(t) is torch.Tensor and t.is_floating_point() for t in (query, key, value)):
        return "query, key and value must be floating-point tensors"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return "query, key and value dtypes differ"
    if key.device != query.device or value.device != query.device:
        return "query, key and value are on different devices"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "query, key and value must be 4-D (B, H, L, D)"
    if key.shape != value.shape:
        return "key and value shapes differ"
    bsz, heads, _, head_dim = query.shape
    if key.shape[0] != bsz or key.shape[3] != head_dim:
        return "key's batch or head dim differs from query's"
    heads_kv = key.shape[1]
    if heads_kv != heads and not (enable_gqa and heads_kv > 0 and heads % heads_kv == 0):
        return "key/value heads differ from query heads (and enable_gqa is off or they do not divide)"
    return None


def _triton_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """None when the Triton kernel serves these `scaled_dot_product_attention` arguments, else why not."""
    why = backends.device_reason(query, "triton") or _contract_reason(query, key, value, attn_mask, dropout_p,
                                                                       enable_gqa)
    if why is not None:
        return why
    if query.dtype not in KERNEL_DTYPES:
        return f"dtype {query.dtype} (the kernel takes float16/bfloat16)"
    bsz, heads, _, head_dim = query.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} outside 1..{MAX_HEAD_DIM}"
    if scale is not None and not (0.0 < float(scale) < math.inf):
        return f"scale {scale} is not a positive finite number (the kernel takes the row max before scaling)"
    if bsz * heads > MAX_GRID_Y:
        return f"batch × heads = {bsz * heads} > {MAX_GRID_Y}"
    if any(_slice_extent(t) >= 2**31 for t in (query, key, value)):
        return "one (batch, head) slice spans 2**31 elements or more (the kernels index it in int32)"
    return None


def _slice_extent(t: torch.Tensor) -> int:
    """The largest element offset within one (batch, head) slice of a (B, H, L, D) tensor."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[2:], t.stride()[2:]))


PREDICATES = {"triton": _triton_reason, "torch": lambda *a: None}


def _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """PyTorch's own SDPA (its default backend choice)."""
    gqa = {"enable_gqa": True} if enable_gqa else {}  # torch < 2.5 has no enable_gqa argument
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **gqa
    )


LSE_CHUNK = 2**24  # score elements per step of the torch backend's lse and backward: 64 MiB of float32


def _rows_per_step(q, k) -> int:
    return max(1, LSE_CHUNK // max(1, q.shape[0] * q.shape[1] * k.shape[2]))


def _scores(q_rows, kt, i0, causal, scale):
    """scale · q kᵀ for query rows i0.. (B, H, rows, Lk), -inf where causal hides key j > query i."""
    s = (q_rows @ kt) * scale
    if causal:
        rows = torch.arange(i0, i0 + s.shape[2], device=s.device)[:, None]
        s = s.masked_fill(torch.arange(s.shape[3], device=s.device)[None, :] > rows, float("-inf"))
    return s


def _torch_lse(q, k, causal, scale):
    """lse (B, H, Lq) float32 = log Σ_j exp(scale · q_i·k_j) over the visible keys, a block of query rows at a
    time, so no (Lq, Lk) buffer of the whole sequence is held."""
    bsz, heads, lq, _ = q.shape
    kt = k.float().repeat_interleave(heads // k.shape[1], dim=1).transpose(-1, -2)  # (B, H, D, Lk)
    lse = torch.empty(bsz, heads, lq, device=q.device, dtype=torch.float32)
    step = _rows_per_step(q, k)
    for i0 in range(0, lq, step):
        lse[:, :, i0 : i0 + step] = _scores(q[:, :, i0 : i0 + step].float(), kt, i0, causal, scale).logsumexp(-1)
    return lse


def _torch_forward(q, k, v, causal, scale, want_lse=True):
    """The torch backend inside the op: PyTorch's SDPA, and (when the op needs it) the exact lse in float32,
    so either backend's backward can follow either backend's forward."""
    out = _torch_sdpa(q, k, v, None, 0.0, causal, scale, k.shape[1] != q.shape[1])
    if not want_lse:
        return out, None
    return out, _torch_lse(q, k, causal, scale)


def _torch_backward(dout, q, k, v, out, lse, causal, scale):
    """The torch backend's gradients: the backward formulas of the module docstring in plain PyTorch (float32;
    float64 inputs in float64), a block of query rows at a time; GQA sums the group's dK/dV. Deterministic."""
    ct = torch.promote_types(q.dtype, torch.float32)
    bsz, heads, lq, head_dim = q.shape
    heads_kv, lk = k.shape[1], k.shape[2]
    group = heads // heads_kv
    kc = k.to(ct).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    vc = v.to(ct).repeat_interleave(group, dim=1)
    kt = kc.transpose(-1, -2)
    dq = torch.empty(bsz, heads, lq, head_dim, device=q.device, dtype=ct)
    dk, dv = torch.zeros_like(kc), torch.zeros_like(vc)
    delta = (dout.to(ct) * out.to(ct)).sum(-1)  # (B, H, Lq) = rowsum(P ∘ dP)
    step = _rows_per_step(q, k)
    for i0 in range(0, lq, step):
        rows = slice(i0, i0 + step)
        q_i, do_i = q[:, :, rows].to(ct), dout[:, :, rows].to(ct)
        p = torch.exp(_scores(q_i, kt, i0, causal, scale) - lse[:, :, rows, None].to(ct))  # (B, H, rows, Lk)
        dv += p.transpose(-1, -2) @ do_i
        ds = p * (do_i @ vc.transpose(-1, -2) - delta[:, :, rows, None])
        dq[:, :, rows] = (ds @ kc) * scale
        dk += (ds.transpose(-1, -2) @ q_i) * scale
    if group > 1:
        dk = dk.view(bsz, heads_kv, group, lk, head_dim).sum(2)
        dv = dv.view(bsz, heads_kv, group, lk, head_dim).sum(2)
    return torch.empty_like(q).copy_(dq), torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv)


FORWARD = {"triton": _triton_forward, "torch": _torch_forward}
BACKWARD = {"triton": _triton_backward, "torch": _torch_backward}


def _select(q, k, v, causal, scale) -> str:
    """The backend of one call of the ops: (B, H, L, D) tensors, no mask, no dropout."""
    return backends.select(OP, PREDICATES, q, k, v, None, 0.0, causal, scale, k.shape[1] != q.shape[1])


def _forward(q, k, v, causal, scale, want_lse=True):
    """The forward op's body: picks the backend, runs it. want_lse=False (inference, no op around it) spares
    the torch backend its lse."""
    return FORWARD[_select(q, k, v, causal, scale)](q, k, v, causal, scale, want_lse)


def _forward_out(q, k, v, causal, scale):
    return _forward(q, k, v, causal, scale, want_lse=False)


# ---- torch.library ops ------------------------------------------------------------------------------------


@torch.library.custom_op("sdxl_kernels::flash_attention_fwd", mutates_args=())
def flash_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Lq, D), k/v (B, H_kv, Lk, D), H_kv dividing H → (out (B, H, Lq, D), lse (B, H, Lq) float32).
    Served by the backend `sdxl_kernels.backends` picks: Triton, else PyTorch's SDPA."""
    return _forward(q, k, v, causal, scale)


@flash_attention_fwd_op.register_fake
def _(q, k, v, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sdxl_kernels::flash_attention_bwd", mutates_args=())
def flash_attention_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from dout (B, H, Lq, D) and the forward's out and lse."""
    return BACKWARD[_select(q, k, v, causal, scale)](dout, q, k, v, out, lse, causal, scale)


@flash_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd_op(dout, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


flash_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public API ---------------------------------------------------------------------------------------------


def _attention(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    """(B, H, L, D) attention through the op (autograd, torch.compile) or its body (inference)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return backends.call(flash_attention_fwd_op, _forward_out, (q, k, v, causal, scale), (q, k, v))[0]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention`, same arguments and semantics.

    query (B, H, Lq, D), key/value (B, H_kv, Lk, D) in float16/bfloat16 with D ≤ 256, any strides, no mask or
    dropout: our flash-attention kernel (H_kv = H, or H_kv dividing H with enable_gqa). Everything else, and
    CPU tensors unless forced onto the Triton interpreter, goes to PyTorch's SDPA;
    `sdxl_kernels.last_backend("scaled_dot_product_attention")` says which served. The output keeps query's
    memory layout, so [B, L, H, D] tensors viewed as [B, H, L, D] give a [B, L, H, D]-contiguous output.
    """
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if not _op_can_take(*args):
        # Outside the op's signature (a mask, dropout, tensors that are not (B, H, L, D) of one dtype, device
        # and head count a GQA group divides): PyTorch's SDPA, once the registry confirms no forced kernel
        # backend is being asked for (it raises then, saying why).
        backends.select(OP, PREDICATES, *args)
        return _torch_sdpa(*args)
    return _attention(query, key, value, is_causal, scale)


def _op_can_take(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """True when the call fits the ops' (q, k, v, causal, scale) contract, whichever backend then serves."""
    return _contract_reason(query, key, value, attn_mask, dropout_p, enable_gqa) is None


def _check_blhd(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, L, H, D), got {t.dim()}-D shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in (B, L, H)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k/v have {k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q has head dim {q.shape[3]} but k has {k.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"k/v heads ({k.shape[2]}) must divide q heads ({q.shape[2]})")


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Attention over [B, L, H, D] tensors (the layout of a fused QKV projection): q (B, Lq, H, D), k/v
    (B, Lk, H_kv, D) with H_kv dividing H → (B, Lq, H, D). The same kernel as `scaled_dot_product_attention`
    through strided views, so no transposes are copied; backends and fallback as there."""
    _check_blhd(q, k, v)
    out = scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )  # (B, H, Lq, D), in q's memory layout  # fmt: skip
    return out.transpose(1, 2)
