"""The streaming encoder's attention over a per-slot ring of cached layer inputs, and its
pointwise convolutions as matrix products.

Each attention layer keeps, per stream, the inputs of its last ``W`` (70) frames in a ring: a
step writes its new frames at their index and reads the ring in place, never concatenating,
slicing or stacking whole caches. Two formulations of NeMo's ``RelPositionMultiHeadAttention``
read it:

* :func:`ring_attention` (batches): the key and value projections are folded into the query and
  the output instead of being applied to the history, so a step projects only its new frames and
  the cache stays the size of the layer inputs (half of cached keys plus values). Per head ``h``,
  ``q_h . (W_k,h x) = (W_k,h^T q_h) . x`` and ``sum_j a_j W_v,h x_j = W_v,h (sum_j a_j x_j)``: the
  scores are one product of the folded queries with the ring, the mix one product of the weights
  with the ring. The ring is read in storage order; the position scores and the mask are gathered
  into that order (``RingIndex``). Equal to NeMo's layer up to float rounding, as NeMo's own
  batched kernels are. On a GPU the scores, softmax and mix are one Triton kernel that reads
  each stream's ring by slot index (``processors.nemotron.ring_kernel``).
* :func:`logical_attention` (one stream): the ring rotated into time order and joined with the
  new frames, then NeMo's own arithmetic op for op, so a single stream gets NeMo's bits.

Under bf16 autocast the ring holds bf16 values: NeMo's key and value projections read the layer
input cast to bf16, so a bf16 cache is exact. The position scores of a batch are one product per
head (:func:`_position_scores`): the positions are the same for every stream.

The conformer convolution's pointwise (kernel 1) convolutions see a few frames per stream, a
shape cuDNN handles badly; :func:`pointwise_conv` runs them as one matrix product over all
frames of a batch (one stream: NeMo's own call).
"""

from __future__ import annotations

import torch
from nemo.utils import avoid_float16_autocast_context

from processors.nemotron.fused import fused
from processors.nemotron.ring_kernel import ring_mix, usable as kernel_usable

_MASKED = -10000.0  # NeMo's -INF_VAL for masked scores


def ring_attention(module, x: torch.Tensor, ring_pool: torch.Tensor, rows, pos_emb: torch.Tensor, index,
                   kernel: bool = True, fuse: bool = False) -> torch.Tensor:
    """NeMo's rel-pos attention of ``x`` [B, T, D] (queries, and keys/values of the new frames)
    over the rings of ``ring_pool`` [C, W, D] at ``rows`` (cached inputs, storage order) and
    itself; returns [B, T, D].

    ``index`` (a ``RingIndex``) maps ring slots and new frames to position scores and holds the
    mask [B, T, W + T] in the same order (True: masked). ``kernel``: the scores, softmax and mix
    in one Triton kernel where it can run (``processors.nemotron.ring_kernel``). ``fuse``: the
    work before and after the core compiled (``processors.nemotron.fused``).
    """
    batch, frames, width = x.shape
    heads = module.h
    keys, folded, bd, mask = fused(_fold_queries, fuse)(module, x, pos_emb, index.positions, index.mask, ring_pool.dtype)
    mix = None
    if kernel and kernel_usable(x, ring_pool, heads * frames):
        mix = ring_mix(  # [H, B, T, D], as the per-head products give and take it
            folded.view(heads, batch, frames, width), ring_pool, keys, rows.slots,
            (bd / module.s_d_k).reshape(batch, heads * frames, -1), mask.reshape(batch, heads * frames, -1),
            1.0 / module.s_d_k,
        )
        weights = None if mix is None or module.linear_v.bias is None else (~mask).to(mix.dtype)
    if mix is None:
        folded = folded.view(heads, batch, frames, width).transpose(0, 1).reshape(batch, heads * frames, width)
        mix, weights = _ring_mix(folded, rows.read(ring_pool), keys, bd, mask, module.s_d_k)
        mix = mix.view(batch, heads, frames, width).transpose(0, 1)
    return fused(_unfold_values, fuse)(module, mix, weights)


def _fold_queries(module, x, pos_emb, positions, mask, cache_dtype):
    """The work before the attention's core: (keys [B, T, D] of the new frames in the cache's
    dtype, folded queries W_k,h^T q_h [H, B*T, D], position scores in ring order [B, H, T, W + T],
    the mask expanded over the heads [B, H, T, W + T])."""
    batch, frames, width = x.shape
    heads, d_k = module.h, module.d_k
    keys = x.to(cache_dtype)  # what NeMo's linear_k / linear_v read (bf16 under bf16 autocast)
    query = x.to(torch.float32) if torch.is_autocast_enabled() else x
    with avoid_float16_autocast_context():
        q = module.linear_q(query).view(batch, frames, heads, d_k)
        q_u = (q + module.pos_bias_u).permute(2, 0, 1, 3).reshape(heads, batch * frames, d_k)
        q_v = (q + module.pos_bias_v).transpose(1, 2)
        folded = torch.matmul(q_u, module.linear_k.weight.view(heads, d_k, width))
        p = module.linear_pos(pos_emb).view(pos_emb.size(0), -1, heads, d_k).transpose(1, 2)
        scores = _position_scores(q_v, p)  # [B, H, T, 2L-1], L = W + T
        bd = scores.gather(-1, positions.unsqueeze(1).expand(-1, heads, -1, -1))  # [B, H, T, W + T]
    return keys, folded, bd, mask.unsqueeze(1).expand(-1, heads, -1, -1)


def _unfold_values(module, mix, weights):
    """The work after the core: the value projection W_v,h of each head's mix [H, B, T, D], its
    bias, and the output projection; [B, T, D]."""
    heads, batch, frames, width = mix.shape
    d_k = module.d_k
    with avoid_float16_autocast_context():
        # Unfolded values W_v,h mix_h: [H, B*T, D] @ [H, D, d_k] -> [B, T, H*d_k]
        mix = mix.reshape(heads, batch * frames, width)
        out = torch.matmul(mix, module.linear_v.weight.view(heads, d_k, width).transpose(1, 2))
        out = out.view(heads, batch, frames, d_k).permute(1, 2, 0, 3).reshape(batch, frames, heads * d_k)
        if module.linear_v.bias is not None:  # sum_j a_j (W x_j + b) = W (sum_j a_j x_j) + b sum_j a_j
            total = (weights.sum(-1) > 0).to(out.dtype).transpose(1, 2).unsqueeze(-1)  # [B, T, H, 1]: 1, or 0 where all is masked
            out = (out.view(batch, frames, heads, d_k) + total * module.linear_v.bias.view(heads, d_k)).view(batch, frames, -1)
        return module.linear_out(out)


def _ring_mix(folded, ring, keys, bd, mask, s_d_k):
    """The folded attention's core in PyTorch products: (mix [B, H*T, D], weights [B, H, T, W + T])."""
    batch, heads, frames, _ = bd.shape
    scores = torch.cat(
        [torch.matmul(folded, ring.transpose(1, 2)), torch.matmul(folded, keys.transpose(1, 2).to(folded.dtype))], dim=-1
    ).view(batch, heads, frames, -1)
    scores = (scores + bd) / s_d_k
    weights = torch.softmax(scores.masked_fill(mask, _MASKED), dim=-1).masked_fill(mask, 0.0)
    cached = ring.shape[1]
    mixed = weights.view(batch, heads * frames, -1)
    mix = torch.matmul(mixed[..., :cached].to(ring.dtype), ring)
    return mix + torch.matmul(mixed[..., cached:].to(keys.dtype), keys).to(mix.dtype), weights


def logical_attention(module, x: torch.Tensor, cache: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
    """NeMo's ``RelPositionMultiHeadAttention.forward`` with ``cache`` [B, W, D] in time order
    (oldest first), op for op; ``mask`` [B, T, W + T] in time order. Returns [B, T, D]."""
    joined = torch.cat([cache, x.to(cache.dtype)], dim=1)  # NeMo: key = value = cat(cache, key)
    query = x.to(torch.float32) if torch.is_autocast_enabled() else x
    with avoid_float16_autocast_context():
        batch, heads, width = query.shape[0], module.h, module.d_k
        q = module.linear_q(query).view(batch, -1, heads, width)
        k = module.linear_k(joined).view(batch, -1, heads, width).transpose(1, 2)
        v = module.linear_v(joined).view(batch, -1, heads, width).transpose(1, 2)
        p = module.linear_pos(pos_emb).view(pos_emb.size(0), -1, heads, width).transpose(1, 2)
        q_u = (q + module.pos_bias_u).transpose(1, 2)
        q_v = (q + module.pos_bias_v).transpose(1, 2)
        bd = module.rel_shift(_position_scores(q_v, p))
        if module.use_pytorch_sdpa:
            return _sdpa(module, q_u, k, v, bd, mask)
        ac = torch.matmul(q_u, k.transpose(-2, -1))
        scores = (ac + bd[:, :, :, : ac.size(-1)]) / module.s_d_k
        return module.forward_attention(v, scores, mask)


def _position_scores(q_v, p):
    """``q_v @ p^T`` for q_v [B, H, T, D] and p [1, H, P, D], the positions all streams share.

    NeMo's ``torch.matmul`` broadcasts p to [B, H, D, P], copies it B times and runs B x H
    products of T rows each; here the B x T rows of a head form one product per head. Each
    score is the same dot product; at batch 1 the call is NeMo's own.
    """
    if q_v.size(0) == 1 or p.size(0) != 1:
        return torch.matmul(q_v, p.transpose(-2, -1))
    batch, heads, frames, width = q_v.shape
    rows = q_v.transpose(0, 1).reshape(heads, batch * frames, width)
    scores = torch.matmul(rows, p[0].transpose(-2, -1))  # [H, B*T, P]
    return scores.view(heads, batch, frames, -1).transpose(0, 1)


def _sdpa(module, q_u, k, v, bd, mask):
    """NeMo's ``use_pytorch_sdpa`` branch, op for op."""
    import math

    bd = bd[:, :, :, : k.size(-2)] * (1 / math.sqrt(q_u.size(-1)))
    if mask is not None:
        mask = mask.unsqueeze(1)
        bd.masked_fill_(mask, _MASKED)
    backends = module.use_pytorch_sdpa_backends
    if backends:
        with torch.nn.attention.sdpa_kernel(backends):
            out = torch.nn.functional.scaled_dot_product_attention(q_u, k, v, attn_mask=bd, dropout_p=0.0)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q_u, k, v, attn_mask=bd, dropout_p=0.0)
    if mask is not None:
        rows = torch.all(mask, dim=-1).unsqueeze_(-1).expand(-1, out.size(1), -1, out.size(-1))
        out = out.masked_fill(rows, 0.0)
    return module.linear_out(out.transpose(1, 2).reshape(out.size(0), -1, module.h * module.d_k))


def pointwise_conv(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-1 ``Conv1d`` on [B, C, T] as a matrix product over the B x T frames.

    With a few frames per stream cuDNN runs these convolutions an order of magnitude slower
    than the same product as one GEMM. At batch 1 the call is NeMo's own (cuDNN), so single
    streams keep its bits.
    """
    if x.size(0) == 1:
        return conv(x)
    return torch.nn.functional.linear(x.transpose(1, 2), conv.weight.squeeze(-1), conv.bias).transpose(1, 2)
