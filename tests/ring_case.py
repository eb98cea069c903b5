"""Attention inputs for the ring-cache tests: caches in time order and the same caches as rings."""

from __future__ import annotations


def ring_case(encoder, counts, frames, generator, device="cpu"):
    """Random layer inputs and caches in time order, the same caches stored as rings, and the step's index."""
    import torch

    from processors.nemotron.encoder_step import StepCaches, ring_index
    from processors.nemotron.slots import Rows

    width, d_model, batch = encoder.streaming_cfg.last_channel_cache_size, encoder.d_model, len(counts)
    x = torch.randn(batch, frames, d_model, generator=generator)
    cache = torch.randn(batch, width, d_model, generator=generator)  # time order, oldest first
    count = torch.tensor(counts)
    ring = torch.empty_like(cache)
    for b, n in enumerate(counts):  # time position j lives in ring slot (j + count) mod W
        ring[b, (torch.arange(width) + n) % width] = cache[b]
    rows = Rows(torch.arange(1, batch + 1), None)  # the rings of slots 1..B of a pool; slot 0 is scratch
    pool = torch.cat([torch.zeros(1, width, d_model), ring])
    caches = StepCaches(torch.empty(0), torch.empty(0), rows, count, False)
    index = ring_index(encoder, caches, torch.full((batch,), frames), frames, frames)
    _, pos_emb = encoder.pos_enc(x=torch.zeros(1, frames, d_model), cache_len=width)
    to = lambda t: t.to(device)  # noqa: E731
    index = type(index)(*(to(v) if isinstance(v, torch.Tensor) else v for v in vars(index).values()))
    return to(x), to(cache), (to(pool), Rows(to(rows.slots), None)), to(pos_emb), index
