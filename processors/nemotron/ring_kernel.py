"""A Triton kernel for the folded attention's core over the per-slot rings (CUDA, bf16).

For each stream of a batch one program reads its ring (by slot index: no gather, whatever the
batch's slots) and its new frames, computes the scores of its folded queries (fp32
accumulation), the softmax under the mask, and the weighted sum of the same rows: the ring is
read once from memory per pass instead of by two batched products, a concatenation and copies.
The caller folds the key projection into the queries and unfolds the value projection after
(``processors.nemotron.attention.ring_attention``); without Triton or a GPU that function does
the same with PyTorch products.
"""

from __future__ import annotations

import torch
from loguru import logger

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path serves
    triton = None

_MASKED = -1e30  # bias of masked keys: their weights are exactly zero
MAX_ROWS = 64  # heads x new frames per stream the kernel takes (steady steps: 8 to 56)


_failed: list[str] = []  # a kernel that failed to build or run once is not tried again


def usable(x: torch.Tensor, ring_pool: torch.Tensor, rows: int) -> bool:
    return not _failed and triton is not None and x.is_cuda and ring_pool.dtype == torch.bfloat16 and rows <= MAX_ROWS


def ring_mix(folded: torch.Tensor, ring_pool: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor,
             bias: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor | None:
    """softmax(folded . [ring; keys]^T * scale + bias, masked) . [ring; keys] for every stream and head.

    folded [H, B, T, D] bf16 (the layout the per-head products give and take: no transposes);
    ring_pool [C, W, D] bf16 (this layer's rings, read at ``slots`` [B]); keys [B, T, D] bf16 (the
    new frames); bias, mask [B, H * T, W + T] (fp32 scores to add, True where masked). Returns
    [H, B, T, D] bf16; rows whose keys are all masked are zero. None if the kernel cannot be
    built or run here (the caller computes the same in PyTorch).
    """
    heads, batch, frames, width = folded.shape
    cached = ring_pool.shape[1]
    bias = bias.float().masked_fill(mask, _MASKED).contiguous()
    folded = folded.contiguous()
    out = torch.empty_like(folded)
    try:
        _ring_mix_kernel[(batch,)](
            folded, ring_pool, keys.contiguous(), slots, bias, out, scale, batch * frames * width,
            W=cached, T=frames, D=width, R=heads * frames,
            ROWS=max(16, triton.next_power_of_2(heads * frames)), KEYS=triton.next_power_of_2(cached + frames),
            BLOCK_D=64, num_warps=4,
        )
    except Exception as e:  # a Triton or driver mismatch: serve with the PyTorch products
        if torch.cuda.is_current_stream_capturing():
            raise
        _failed.append(f"{type(e).__name__}: {e}")
        logger.warning(f"The ring attention kernel failed ({_failed[-1]}); batches use PyTorch products")
        return None
    return out


if triton is not None:

    @triton.jit
    def _ring_mix_kernel(Q, RING, NEW, SLOTS, BIAS, OUT, scale, head_stride,
                         W: tl.constexpr, T: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                         ROWS: tl.constexpr, KEYS: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        slot = tl.load(SLOTS + b).to(tl.int64)
        rows = tl.arange(0, ROWS)
        keys = tl.arange(0, KEYS)
        row_ok = rows < R
        in_ring = keys < W
        in_new = (keys >= W) & (keys < W + T)
        new_row = tl.where(in_new, keys - W, 0)
        ring_row = tl.where(in_ring, keys, 0)
        ring_base = RING + slot * (W * D)
        new_base = NEW + b * (T * D)
        # Row r of a stream is head r // T, frame r % T of the [H, B, T, D] queries and output.
        row_off = (rows // T).to(tl.int64) * head_stride + (rows % T) * D
        q_base = Q + b * (T * D)
        scores = tl.zeros((ROWS, KEYS), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            q = tl.load(q_base + row_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0)
            k = tl.load(ring_base + ring_row[None, :] * D + dd[:, None], mask=in_ring[None, :], other=0.0)
            k += tl.load(new_base + new_row[None, :] * D + dd[:, None], mask=in_new[None, :], other=0.0)
            scores += tl.dot(q, k)
        bias = tl.load(BIAS + b * (R * (W + T)) + rows[:, None] * (W + T) + keys[None, :],
                       mask=row_ok[:, None] & (keys < W + T)[None, :], other=-1e30)
        valid = bias > -1e29
        scores = scores * scale + bias
        top = tl.max(scores, axis=1)
        weights = tl.where(valid, tl.exp(scores - top[:, None]), 0.0)
        total = tl.sum(weights, axis=1)
        weights = (weights / tl.where(total > 0, total, 1.0)[:, None]).to(tl.bfloat16)
        o_base = OUT + b * (T * D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            v = tl.load(ring_base + ring_row[:, None] * D + dd[None, :], mask=in_ring[:, None], other=0.0)
            v += tl.load(new_base + new_row[:, None] * D + dd[None, :], mask=in_new[:, None], other=0.0)
            mixed = tl.dot(weights, v)
            tl.store(o_base + row_off[:, None] + dd[None, :], mixed.to(tl.bfloat16), mask=row_ok[:, None])
