"""One streaming step of NeMo's cache-aware ``ConformerEncoder``, its caches kept in place per slot.

NeMo's ``cache_aware_stream_step`` takes the caches of a batch as stacked tensors, joins each
layer's cache with the new frames, slices the next cache out of the join and stacks the layers'
caches again: at a thousand streams these copies cost more GPU time than the new frames' arithmetic.
Here every slot owns, per layer,

* a ring of the attention layer's last ``W`` inputs (``channel`` pool [L, C, W, D]): a step reads
  it in place and writes only its new frames, at their index (``count`` mod W);
* the depthwise convolution's window of ``K`` past frames (``time`` pool [L, C, D, K]): a step
  reads it, joins it with its own frames (the convolution's input, as NeMo does) and writes the
  last ``K`` back.

Everything else is NeMo's own modules and arithmetic (subsampling, feed-forward, norms, masks,
position encoding); the attention is :mod:`processors.nemotron.attention`. Rows of a step are
either a contiguous run of slots (read as views, no gather) or gathered by slot index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from processors.nemotron.attention import logical_attention, pointwise_conv, ring_attention
from processors.nemotron.fused import fused
from processors.nemotron.slots import Rows


@dataclass
class StepCaches:
    """Where one step's rows keep their encoder caches, and what they held before it.

    ``count``: encoder frames each row's ring has received (0 on a first step, whose caches
    start empty as NeMo's do).
    """

    channel: torch.Tensor  # [L, C, W, D] attention input rings
    time: torch.Tensor  # [L, C, D, K] depthwise convolution windows
    rows: Rows
    count: torch.Tensor  # [B] int64
    first: bool
    kernel: bool = True  # the attention core as one Triton kernel where it runs (CUDA, bf16)
    fuse: bool = False  # batches run the pure pieces compiled (processors.nemotron.fused)


@dataclass
class RingIndex:
    """The step's addressing of the rings, shared by all layers.

    ``mask`` [B, T, W + T] and ``positions`` [B, T, W + T] list the keys in ring order, then the
    new frames: masked or not (NeMo's chunked-limited and padding masks), and the column of the
    un-shifted position scores [B, H, T, 2(W + T) - 1] each key's score is. ``logical_mask``
    [B, T, W + T] is NeMo's own mask (time order), ``rotation`` [B * W] the flat ring rows in time
    order, ``write`` [B * keep] the flat ring rows of the new frames kept.
    """

    mask: torch.Tensor
    positions: torch.Tensor
    logical_mask: torch.Tensor
    pad_mask: torch.Tensor
    rotation: torch.Tensor
    write: torch.Tensor
    keep: int


def ring_index(encoder, caches: StepCaches, length: torch.Tensor, frames: int, keep: int) -> RingIndex:
    width = encoder.streaming_cfg.last_channel_cache_size
    count, device = caches.count, length.device
    offset = width - count.clamp(max=width)  # NeMo: cache_len - cache_last_channel_len
    pad_mask, att_mask = encoder._create_masks(
        att_context_size=encoder.att_context_size,
        padding_length=length + width,
        max_audio_length=frames + width,
        offset=offset,
        device=device,
    )
    pad_mask, att_mask = pad_mask[:, width:], att_mask[:, width:]  # [B, T], [B, T, W + T]
    batch = count.shape[0]
    slot_pos = torch.arange(width, device=device)
    key_time = torch.cat(  # each key's time position (NeMo's column): ring slot r holds time (r - count) mod W
        [(slot_pos[None, :] - count[:, None]) % width, (width + torch.arange(frames, device=device)).expand(batch, -1)], dim=1
    )
    mask = att_mask.gather(-1, key_time[:, None, :].expand(-1, frames, -1))
    # NeMo's rel_shift puts score column j + T - 1 - i of query i at key column j.
    positions = key_time[:, None, :] + (frames - 1 - torch.arange(frames, device=device))[None, :, None]
    rows = caches.rows.slots[:, None] * width
    rotation = (rows + (count[:, None] + slot_pos[None, :]) % width).reshape(-1)
    write = (rows + (count[:, None] + torch.arange(keep, device=device)[None, :]) % width).reshape(-1)
    return RingIndex(mask, positions, att_mask, pad_mask, rotation, write, keep)


def encoder_step(encoder, mel, mel_len, caches: StepCaches, drop: int, keep_all: bool):
    """NeMo's ``cache_aware_stream_step`` over in-place caches: (encoded [B, D, T'], lengths, next counts).

    One stream (B = 1) takes NeMo's attention arithmetic op for op (its bits); batches the
    folded ring attention.
    """
    cfg = encoder.streaming_cfg
    x = torch.transpose(mel, 1, 2)
    if isinstance(encoder.pre_encode, torch.nn.Linear):
        x, length = encoder.pre_encode(x), mel_len
    else:
        if keep_all or not _unmasked_subsampling(encoder.pre_encode, x):
            x, length = encoder.pre_encode(x=x, lengths=mel_len)
        else:
            x, length = _subsample_whole_rows(encoder.pre_encode, x, mel_len)  # not fused: inductor's version of
            # its convolution's padding, cast and ReLU took 5.1 ms of a 1,024-stream step (H100, 2026-12-07)
        length = length.to(torch.int64)
        if drop > 0:
            x = x[:, drop:, :]
            length = (length - drop).clamp(min=0)
    x, pos_emb = encoder.pos_enc(x=x, cache_len=cfg.last_channel_cache_size)
    frames = x.size(1)
    index = ring_index(encoder, caches, length, frames, frames - cfg.cache_drop_size)
    logical = x.size(0) == 1
    for layer, (channel, time_cache) in enumerate(zip(caches.channel, caches.time)):
        x = _layer(encoder.layers[layer], x, pos_emb, index, caches, channel, time_cache, logical)
    if encoder.out_proj is not None:
        x = encoder.out_proj(x)
    encoded = torch.transpose(x, 1, 2)
    if cfg.valid_out_len > 0 and not keep_all:
        encoded = encoded[:, :, : cfg.valid_out_len]
        length = torch.clamp(length, max=cfg.valid_out_len)
    return encoded, length, caches.count + index.keep


def _unmasked_subsampling(pre_encode, x) -> bool:
    """Whether ``pre_encode`` is the masked dw-striding subsampling that :func:`_subsample_whole_rows`
    replays (and would not split this batch)."""
    conv = getattr(pre_encode, "conv", None)
    if type(conv).__name__ != "MaskedConvSequential" or not getattr(pre_encode, "conv2d_subsampling", False):
        return False
    factor = pre_encode.subsampling_conv_chunking_factor
    limit = 2**31 / pre_encode._conv_channels * pre_encode._stride * pre_encode._stride
    return factor == -1 or (factor == 1 and x.numel() <= limit)


def _subsample_whole_rows(pre_encode, x, lengths):
    """``ConvSubsampling.forward`` for a batch whose rows all fill the input (every step but a
    final one): NeMo masks the time steps past each row's length before every layer, which here
    multiplies by ones; the same layers without the masks give the same values."""
    from nemo.collections.asr.parts.submodules.subsampling import calculate_conv_output_size

    x = x.unsqueeze(1)  # (batch, 1, time, features)
    lengths = lengths.clone().float()
    for layer in pre_encode.conv:
        x = layer(x)
        if hasattr(layer, "stride") and layer.stride != (1, 1):
            padding = (layer._left_padding, layer._right_padding) if hasattr(layer, "_left_padding") else layer.padding
            lengths = calculate_conv_output_size(lengths, layer.kernel_size[0], layer.stride[0], padding)
    batch, _, frames, _ = x.size()
    return pre_encode.out(x.transpose(1, 2).reshape(batch, frames, -1)), lengths.long()


def _layer(layer, x, pos_emb, index: RingIndex, caches: StepCaches, channel, time_cache, logical: bool):
    """``ConformerLayer.forward`` (eval mode: dropout is the identity), op for op.

    The pieces between the cache reads and writes are pure; batches may run them fused
    (``caches.fuse``, :mod:`processors.nemotron.fused`).
    """
    fuse = caches.fuse and not logical
    residual, x = fused(_feed_forward_in, fuse)(layer, x)
    x = _attention(layer.self_attn, x, pos_emb, index, caches, channel, logical)
    residual, x = fused(_convolution_in, fuse)(layer, residual, x, index.pad_mask)
    depthwise = layer.conv.depthwise_conv
    if caches.first:
        cache = torch.zeros(x.shape[0], *time_cache.shape[1:], dtype=time_cache.dtype, device=x.device)
    else:
        cache = caches.rows.read(time_cache)
    window = torch.cat([cache, x], dim=-1)
    drop = depthwise.cache_drop_size or 0
    kept = window[:, :, : window.size(-1) - drop] if drop > 0 else window
    caches.rows.write(time_cache, kept[:, :, -cache.size(-1) :])
    return fused(_convolution_out, fuse)(layer, window, residual)


def _feed_forward_in(layer, residual):
    """The first half-step feed-forward and the attention's norm: (residual, attention input)."""
    x = layer.feed_forward1(layer.norm_feed_forward1(residual))
    residual = residual + x * layer.fc_factor
    return residual, layer.norm_self_att(residual)


def _convolution_in(layer, residual, attended, pad_mask):
    """The attention's residual, then ``ConformerConvolution.forward`` up to its causal depthwise
    convolution: (residual, the new frames of the convolution's input, right-padded)."""
    residual = residual + attended
    conv = layer.conv
    x = pointwise_conv(conv.pointwise_conv1, layer.norm_conv(residual).transpose(1, 2))
    if conv.pointwise_activation == "glu_":
        x = torch.nn.functional.glu(x, dim=1)
    else:
        x = conv.pointwise_activation(x)
    if pad_mask is not None:
        x = x.masked_fill(pad_mask.unsqueeze(1), 0.0)
    return residual, torch.nn.functional.pad(x, pad=(0, conv.depthwise_conv._right_padding))


def _convolution_out(layer, window, residual):
    """The rest of the convolution module over its window (cached frames, then the new), its
    residual, the second half-step feed-forward and the layer's output norm."""
    conv = layer.conv
    x = torch.nn.Conv1d.forward(conv.depthwise_conv, window)
    if conv.norm_type == "layer_norm":
        x = conv.batch_norm(x.transpose(1, 2)).transpose(1, 2)
    else:
        x = conv.batch_norm(x)
    x = conv.activation(x)
    x = pointwise_conv(conv.pointwise_conv2, x)
    residual = residual + x.transpose(1, 2)
    x = layer.feed_forward2(layer.norm_feed_forward2(residual))
    residual = residual + x * layer.fc_factor
    return layer.norm_out(residual)


def _attention(module, x, pos_emb, index: RingIndex, caches: StepCaches, ring_pool, logical: bool):
    width = ring_pool.shape[-1]
    flat = ring_pool.view(-1, width)
    if logical:  # the ring rotated into time order: NeMo's own arithmetic
        cached = ring_pool.shape[1]
        if caches.first:
            cache = torch.zeros(x.shape[0], cached, width, dtype=ring_pool.dtype, device=x.device)
        else:
            cache = flat.index_select(0, index.rotation).view(x.shape[0], cached, width)
        out = logical_attention(module, x, cache, index.logical_mask, pos_emb)
    else:
        out = ring_attention(module, x, ring_pool, caches.rows, pos_emb, index, caches.kernel, caches.fuse)
    flat.index_copy_(0, index.write, x[:, : index.keep].reshape(-1, width).to(flat.dtype))
    return out


def supports_in_place_caches(encoder) -> str | None:
    """None if :func:`encoder_step` computes this encoder's step, else why not."""
    from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D
    from nemo.collections.asr.parts.submodules.multi_head_attention import RelPositionMultiHeadAttention

    if getattr(encoder, "reduction_position", None) is not None:
        return "the encoder reduces its frame rate between layers"
    for layer in encoder.layers:
        if type(layer.self_attn) is not RelPositionMultiHeadAttention:
            return f"attention {type(layer.self_attn).__name__} is not rel_pos"
        if not isinstance(layer.conv.depthwise_conv, CausalConv1D):
            return "the convolutions are not causal"
        if layer.is_adapter_available():
            return "the layers have adapters"
    return None
