"""The streaming encoder's attention and pointwise convolutions, lean at large batches.

Two costs of NeMo's ``RelPositionMultiHeadAttention`` in a streaming step grow with the batch
for no arithmetic reason (measured on an H100 at 1,024 streams, bench/asr_graph_bench.py):

* the position scores ``q_v @ p^T``: ``torch.matmul`` broadcasts the positions p (the same for
  every stream) to the whole batch, copies them B times and runs B x H tiny products;
* under autocast, the layer-input cache joined with the new frames is turned into fp32 copies,
  and ``linear_k`` and ``linear_v`` each cast their own copy back to bf16.

:func:`cached_attention` computes the same layer with a cache kept in the dtype the linear layers
read (bf16 under bf16 autocast): key and value reach ``linear_k``/``linear_v`` as the same bf16
values NeMo's casts produce (rounding an fp32 value to bf16 once, or after a bf16 -> fp32 -> bf16
round trip, gives the same bits), the query keeps its fp32 path, and the cache it returns holds
values that are only ever read through those bf16 projections, so a bf16 cache is exact. The
position scores of a batch are one product per head (:func:`_position_scores`): each score is
the same dot product, and at batch 1 the call is NeMo's own, so single streams get NeMo's bits;
larger batches may differ in the last bits, as NeMo's own batched kernels do. Everything else is
NeMo's arithmetic, op for op.

Batches also take NeMo's own ``use_pytorch_sdpa`` formulation of the attention (one fused
kernel instead of two batched products over copies of k and v); single streams keep the
formulation the model is configured with.

The conformer convolution's pointwise (kernel 1) convolutions see two frames per stream, a shape
cuDNN handles badly; :func:`pointwise_conv` runs them as one matrix product over all frames of a
batch (at batch 1 as NeMo's own call).

Only the fast path (``processors.nemotron.graphs``) installs these, for the duration of a step,
through :func:`lean_streaming_step`; the eager path runs NeMo unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from nemo.utils import avoid_float16_autocast_context

_MASKED = -10000.0  # NeMo's -INF_VAL for masked scores
PROJECT_KV_ATTR = "_annie_project_kv"


def cached_attention(module, query, key, value, mask, pos_emb, cache=None):
    """``RelPositionMultiHeadAttention.forward`` for a streaming step (``cache`` given).

    With ``project_kv`` (set on the module by :func:`lean_streaming_step`) the cache holds the
    history's keys and values already projected (``[B, T, 2 * d_model]``, keys first) instead of
    the layer's input: ``linear_k(cat(cache, x)) = cat(linear_k(cache), linear_k(x))`` row by row,
    so each step projects only its new frames, not the whole history again.
    """
    if cache is None or key is not query or value is not query:
        return type(module).forward(module, query, key, value, mask, pos_emb, cache)
    keep = query.shape[1] - module.cache_drop_size
    project_kv = getattr(module, PROJECT_KV_ATTR, False)
    x = query.to(cache.dtype)
    if torch.is_autocast_enabled():
        query = query.to(torch.float32)
    with avoid_float16_autocast_context():
        batch, heads, width = query.shape[0], module.h, module.d_k
        q = module.linear_q(query).view(batch, -1, heads, width)
        if project_kv:
            new = torch.cat([module.linear_k(x), module.linear_v(x)], dim=-1).to(cache.dtype)
            joined = torch.cat([cache, new], dim=1)
            k, v = joined[..., : heads * width], joined[..., heads * width :]
        else:
            joined = torch.cat([cache, x], dim=1)  # NeMo: key = value = cat(cache, key)
            k, v = module.linear_k(joined), module.linear_v(joined)
        next_cache = joined[:, keep : keep + cache.shape[1]]  # cat(cache[:, keep:], new[:, :keep])
        k = k.view(batch, -1, heads, width).transpose(1, 2)
        v = v.view(batch, -1, heads, width).transpose(1, 2)
        p = module.linear_pos(pos_emb).view(pos_emb.size(0), -1, heads, width).transpose(1, 2)
        q_u = (q + module.pos_bias_u).transpose(1, 2)
        q_v = (q + module.pos_bias_v).transpose(1, 2)
        bd = module.rel_shift(_position_scores(q_v, p))
        if module.use_pytorch_sdpa or batch > 1:  # batches: one fused kernel, no copies of k and v
            out = _sdpa(module, q_u, k, v, bd, mask)
        else:
            ac = torch.matmul(q_u, k.transpose(-2, -1))
            scores = (ac + bd[:, :, :, : ac.size(-1)]) / module.s_d_k
            out = module.forward_attention(v, scores, mask)
    # A view: the encoder stacks the layers' caches right after, so it is copied only once.
    return out, next_cache


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
    bd = bd[:, :, :, : k.size(-2)] * (1 / math.sqrt(q_u.size(-1)))
    if mask is not None:
        mask = mask.unsqueeze(1)
        bd.masked_fill_(mask, _MASKED)
    backends = module.use_pytorch_sdpa_backends
    with torch.nn.attention.sdpa_kernel(backends) if backends else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(q_u, k, v, attn_mask=bd, dropout_p=0.0)
    if mask is not None:
        rows = torch.all(mask, dim=-1).unsqueeze_(-1).expand(-1, out.size(1), -1, out.size(-1))
        out = out.masked_fill(rows, 0.0)
    return module.linear_out(out.transpose(1, 2).reshape(out.size(0), -1, module.h * module.d_k))


def pointwise_conv(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-1 ``Conv1d`` on [B, C, T] as a matrix product over the B x T frames.

    With T = 2 frames per stream cuDNN runs these convolutions an order of magnitude slower
    than the same product as one GEMM. At batch 1 the call is NeMo's own (cuDNN), so single
    streams keep its bits.
    """
    if x.size(0) == 1:
        return type(conv).forward(conv, x)
    return torch.nn.functional.linear(x.transpose(1, 2), conv.weight.squeeze(-1), conv.bias).transpose(1, 2)


def _is_pointwise(conv) -> bool:
    return (
        type(conv) is torch.nn.Conv1d
        and conv.kernel_size == (1,)
        and conv.stride == (1,)
        and conv.dilation == (1,)
        and conv.groups == 1
        and conv.padding in ((0,), "valid")
    )


@contextlib.contextmanager
def lean_streaming_step(encoder, project_kv: bool = False) -> Iterator[None]:
    """Meanwhile route the encoder's rel-pos attention layers through :func:`cached_attention`
    (with caches of projected keys and values if ``project_kv``) and its conformer convolution
    modules' pointwise convolutions through :func:`pointwise_conv`."""
    from nemo.collections.asr.parts.submodules.multi_head_attention import RelPositionMultiHeadAttention

    patched = []
    for m in encoder.modules():
        if type(m) is RelPositionMultiHeadAttention:
            m.forward = cached_attention.__get__(m)
            setattr(m, PROJECT_KV_ATTR, project_kv)
            patched.append(m)
        elif _is_pointwise(m):
            m.forward = pointwise_conv.__get__(m)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
            if hasattr(m, PROJECT_KV_ATTR):
                delattr(m, PROJECT_KV_ATTR)
