"""The fast step of the streaming engine: per-stream slots, static shapes and CUDA graphs.

The eager step (``conformer_stream_step``) rebuilds NeMo ``Hypothesis`` objects, stacks caches
and synchronises with the GPU many times per chunk; on a GPU it is bound by the host, not by the
arithmetic. :class:`FastStepper` does the same computation with the same NeMo modules, arranged
so that one chunk of a batch of streams is a fixed sequence of kernels:

* every stream owns a *slot* in preallocated pools (encoder caches, prediction-network state);
  a step gathers the slots of its streams into a static batch, runs the encoder step and the
  greedy RNN-T search, and scatters the new state back;
* the batch is padded to a power-of-two bucket; padding rows point at slot 0, a scratch slot
  no stream owns, so whatever they compute is never read;
* the greedy search is NeMo's label-looping greedy search (same joint and prediction-network
  calls, same ``max_symbols`` rule) unrolled to ``frames x max_symbols`` masked iterations, so
  it needs no host synchronisation: the only one left is reading the new tokens back;
* on CUDA each (input shape, bucket) is captured once in a ``torch.cuda.CUDAGraph`` and
  replayed; on the CPU the same function runs eagerly (that is what the CI tests compare
  against the eager NeMo path).

Final steps (``keep_all_outputs``) have a variable number of frames; they are padded to a
static width with their true lengths, which the encoder masks, so one graph serves them all.
"""

from __future__ import annotations

import heapq
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger

from processors.nemotron.attention import lean_streaming_step
from processors.nemotron.model import GRAPH_OWNER_ATTR, check_no_graphs
from processors.nemotron.slots import PendingTokens, SlotLease, SlotPools, batch_dim


@dataclass(frozen=True)
class _Kind:
    """What fixes a step's kernels: input frames, history frames dropped, final or not, first or not."""

    frames: int
    drop: int
    keep_all: bool
    first: bool


@dataclass(frozen=True)
class _Rows:
    """Slots 1..count of the pools, in order (a batch stepped in place)."""

    count: int


class _Runner:
    """Static buffers and (on CUDA) the captured graph for one kind and one bucket size."""

    def __init__(self, stepper: FastStepper, kind: _Kind, bucket: int, in_place: bool = False):
        self.kind, self.bucket, self.in_place = kind, bucket, in_place
        s = stepper
        self.mel = torch.zeros(bucket, s.features, kind.frames, device=s.device)
        self.mel_len = torch.full((bucket,), kind.frames, dtype=torch.long, device=s.device)
        self.slots = torch.zeros(bucket, dtype=torch.long, device=s.device)
        self.tokens: torch.Tensor | None = None  # [bucket, decoder frames x max_symbols], made by the first run
        self.graph: torch.cuda.CUDAGraph | None = None
        self._stepper = s

    def body(self) -> None:
        out = self._stepper.compute(self.kind, self.mel, self.mel_len, self.slots, self.in_place)
        if self.tokens is None:
            self.tokens = torch.empty_like(out)
        self.tokens.copy_(out)

    def capture(self, pool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuBLAS/cuDNN handles and workspaces before capture
                self.body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.body()

    def set_slots(self, slots: Sequence[int]) -> None:
        """Point the batch's rows at ``slots`` (the rest at scratch slot 0); no host synchronisation."""
        index = torch.zeros(self.bucket, dtype=torch.long, pin_memory=self.slots.is_cuda)
        index[: len(slots)] = torch.as_tensor(slots, dtype=torch.long)
        self.slots.copy_(index, non_blocking=True)  # pinned: the allocator keeps it until the copy is done

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()


class FastStepper:
    """Slot pools plus graphed (CUDA) or eager (CPU) static-shape steps for one model.

    ``autocast`` is a zero-argument callable returning the autocast context the eager path uses
    (bf16 on CUDA), so both paths run the same arithmetic. ``graphs`` captures CUDA graphs.
    """

    def __init__(
        self,
        model,
        device: torch.device,
        autocast: Callable[[], Any],
        *,
        graphs: bool,
        final_frames: int,
        max_batch: int = 1024,
        initial_slots: int = 8,
        cache_dtype: torch.dtype | None = None,
        project_kv: bool = False,
    ):
        self.model = model
        self.device = device
        self.autocast = autocast
        self.graphs = bool(graphs and device.type == "cuda")
        self.final_frames = final_frames
        self.max_batch = max_batch
        self.cache_dtype = cache_dtype  # encoder caches' dtype in the pools (None: as the encoder returns them)
        # Attention caches hold projected keys and values, not layer inputs (see cached_attention).
        self.project_kv = bool(project_kv)
        self.features = int(model.preprocessor.featurizer.nfilt)
        decoding = model.decoding.decoding
        self.max_symbols = int(getattr(decoding, "max_symbols", None) or 10)
        self.blank = int(model.decoding.blank_id)
        self._valid_out = int(model.encoder.streaming_cfg.valid_out_len)
        self._free: list[int] = []
        self._used = 0
        self._lock = threading.Lock()
        self._runners: dict[tuple[_Kind, int], _Runner] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._pools = SlotPools(initial_slots + 1, self._probe_state_shapes())
        if self.graphs:
            check_no_graphs(model)
            setattr(model, GRAPH_OWNER_ATTR, weakref.ref(self))

    @property
    def holds_graphs(self) -> bool:
        """Whether captured graphs (pointing into the model's buffers) are alive."""
        return any(r.graph is not None for r in self._runners.values())

    def close(self) -> None:
        """Drop the captured graphs and stop capturing; steps after this run eagerly."""
        with self._lock:
            if self.graphs:
                torch.cuda.synchronize()
            self._runners.clear()
            self.graphs = False
            ref = getattr(self.model, GRAPH_OWNER_ATTR, None)
            if ref is not None and ref() is self:
                setattr(self.model, GRAPH_OWNER_ATTR, None)

    # ----- slots ----------------------------------------------------------------------------

    def lease(self) -> SlotLease:
        """A free slot (slot 0 is scratch); the pools grow by doubling, dropping captured graphs."""
        with self._lock:
            if self._free:  # the lowest free slot: a full house stays slots 1..N (stepped in place)
                slot = heapq.heappop(self._free)
            else:
                self._used += 1
                slot = self._used
                if slot >= self._pools.capacity:
                    self._grow(2 * self._pools.capacity)
        return SlotLease(self, slot)

    def _free_slot(self, slot: int) -> None:
        with self._lock:
            heapq.heappush(self._free, slot)

    def _grow(self, capacity: int) -> None:
        old = self._pools
        with torch.inference_mode():
            new = SlotPools(capacity, {k: v.narrow(batch_dim(k), 0, 1) for k, v in old.tensors.items()})
            for name, t in old.tensors.items():
                new.tensors[name].narrow(batch_dim(name), 0, old.capacity).copy_(t)
        self._pools = new
        # Graphs point at the old pools: drop them, and capture the next ones into a fresh
        # memory pool (capturing into a pool that dropped graphs shared trips an allocator assert).
        if self.graphs:
            torch.cuda.synchronize()
            self._graph_pool = torch.cuda.graph_pool_handle()
        self._runners.clear()
        logger.debug(f"ASR slot pools grown to {capacity - 1} streams")

    @property
    def bytes_per_stream(self) -> int:
        return self._pools.nbytes_per_slot()

    def slot_rows(self, slot: int) -> dict[str, torch.Tensor]:
        return {k: v.narrow(batch_dim(k), slot, 1) for k, v in self._pools.tensors.items()}

    # ----- the step -------------------------------------------------------------------------

    def run(
        self, kind: _Kind, mel: torch.Tensor, lengths: torch.Tensor, slots: Sequence[int], capture: bool = True
    ) -> list[list[int]]:
        """One step over ``len(slots)`` streams; per stream its new non-blank token ids.

        ``capture=False`` runs an odd shape eagerly rather than capturing a graph for it.
        """
        return self.launch(kind, mel, lengths, slots, capture).tokens()

    def launch(
        self, kind: _Kind, mel: torch.Tensor, lengths: torch.Tensor, slots: Sequence[int], capture: bool = True
    ) -> PendingTokens:
        """:meth:`run` without waiting: the host may work while the GPU steps; then ``.tokens()``."""
        parts = []
        for lo in range(0, len(slots), self.max_batch):
            part = slots[lo : lo + self.max_batch]
            parts.append(self._launch_bucket(kind, mel[lo : lo + len(part)], lengths[lo : lo + len(part)], part, capture))
        return PendingTokens(parts, self.blank)

    def _launch_bucket(self, kind, mel, lengths, slots, capture) -> torch.Tensor:
        n = len(slots)
        bucket = 1 << max(0, (n - 1).bit_length())
        in_place = not kind.first and n == bucket and list(slots) == list(range(1, n + 1))
        key = (kind, bucket, capture, in_place)
        runner = self._runners.get(key)
        with torch.inference_mode():
            if runner is None:
                runner = _Runner(self, kind, bucket, in_place)
                if self.graphs and capture:
                    try:
                        runner.capture(self._graph_pool)
                        logger.debug(f"captured ASR step graph: {kind}, batch {bucket}")
                    except Exception as e:  # keep serving, eagerly, rather than lose the call
                        logger.warning(f"CUDA graph capture failed ({type(e).__name__}: {e}); ASR steps run without graphs")
                        self.graphs = False
                        runner.graph = None
                        torch.cuda.synchronize()
                self._runners[key] = runner
            runner.mel.zero_()
            runner.mel[:n, :, : mel.shape[-1]].copy_(mel[:, :, : kind.frames])
            runner.mel_len.fill_(kind.frames)
            runner.mel_len[:n].copy_(lengths)
            runner.set_slots(slots)
            runner.run()
            return runner.tokens[:n].clone()  # a later part of the same step may replay this runner

    def compute(self, kind: _Kind, mel, mel_len, slots, in_place: bool = False) -> torch.Tensor:
        """The step itself, static shapes, no host synchronisation: returns [B, frames x max_symbols] labels.

        ``in_place``: the batch is slots 1..B in order, so the encoder reads its caches straight
        from the pools' rows and the new ones are copied back there (no gather, no index).
        """
        rows = _Rows(mel.shape[0]) if in_place else slots
        caches = self._initial_caches(mel.shape[0]) if kind.first else self._gather(rows, "channel", "time", "length")
        with self.autocast():
            encoded, encoded_len, *caches = self._encode(kind, mel, mel_len, caches)
            # Decoder frames: exactly the encoder's static output width (rows past their length emit nothing).
            projected = self.model.joint.project_encoder(encoded.transpose(1, 2))
            if kind.first:
                dec_out, state = self._start_decoder(mel.shape[0], projected)
            else:
                dec_out, h, c = self._gather(slots, "dec_out", "h", "c")
                state = (h, c)
            labels, dec_out, state = self._greedy(projected, encoded_len, dec_out, state)
        self._scatter(rows, channel=caches[0], time=caches[1], length=caches[2])
        self._scatter(slots, h=state[0], c=state[1], dec_out=dec_out)
        return labels

    def _gather(self, slots, *names: str) -> list[torch.Tensor]:
        pools = self._pools.tensors
        if isinstance(slots, _Rows):
            return [pools[n].narrow(batch_dim(n), 1, slots.count) for n in names]
        return [pools[n].index_select(batch_dim(n), slots) for n in names]

    def _scatter(self, slots, **values: torch.Tensor) -> None:
        pools = self._pools.tensors
        for name, value in values.items():
            if isinstance(slots, _Rows):
                pools[name].narrow(batch_dim(name), 1, slots.count).copy_(value)
            else:
                pools[name].index_copy_(batch_dim(name), slots, value.to(pools[name].dtype))

    def _initial_caches(self, bucket: int) -> list[torch.Tensor]:
        """Fresh streams' caches (zeros, as ``get_initial_cache_state`` gives the eager path)."""
        channel, time_cache, length = self.model.encoder.get_initial_cache_state(batch_size=bucket, device=self.device)
        if self.project_kv:  # keys and values; zeros where the history is masked, as the layer inputs are
            channel = torch.cat([channel, channel], dim=-1)
        return [channel.to(self.cache_dtype or channel.dtype), time_cache.to(self.cache_dtype or time_cache.dtype), length]

    def _encode(self, kind: _Kind, mel, mel_len, caches):
        with lean_streaming_step(self.model.encoder, project_kv=self.project_kv):
            return self.model.encoder.cache_aware_stream_step(
                processed_signal=mel,
                processed_signal_length=mel_len,
                cache_last_channel=caches[0],
                cache_last_time=caches[1],
                cache_last_channel_len=caches[2],
                keep_all_outputs=kind.keep_all,
                drop_extra_pre_encoded=kind.drop,
            )

    def _start_decoder(self, bucket: int, projected):
        model = self.model
        state = model.decoder.initialize_state(projected)
        sos = torch.full((bucket, 1), self.blank, dtype=torch.long, device=self.device)
        dec_out, state, *_ = model.decoder.predict(sos, state, add_sos=False, batch_size=bucket)
        return model.joint.project_prednet(dec_out), state

    def _greedy(self, projected, lengths, dec_out, state):
        """NeMo's greedy label-looping search, unrolled: frame by frame, up to max_symbols labels.

        Same calls as ``GreedyBatchedRNNTLabelLoopingComputer.torch_impl``: the joint after
        projection, ``max(-1)``, the prediction network on the found label, and the old state
        kept for rows that emitted nothing. Rows past their length emit nothing.
        """
        model, blank = self.model, self.blank
        bucket, frames = projected.shape[0], projected.shape[1]
        out = []
        for t in range(frames):
            active = lengths > t
            enc_t = projected[:, t].unsqueeze(1)
            for _ in range(self.max_symbols):
                logits = model.joint.joint_after_projection(enc_t, dec_out).squeeze(1).squeeze(1)
                labels = logits.max(-1)[1]
                active = torch.logical_and(active, labels != blank)
                labels = torch.where(active, labels, torch.full_like(labels, blank))
                out.append(labels)
                new_out, new_state, *_ = model.decoder.predict(labels.unsqueeze(1), state, add_sos=False, batch_size=bucket)
                new_out = model.joint.project_prednet(new_out)
                model.decoder.batch_replace_states_mask(src_states=state, dst_states=new_state, mask=~active)
                dec_out = torch.where(active[:, None, None], new_out, dec_out)
                state = new_state
        return torch.stack(out, dim=1), dec_out, state

    def _probe_state_shapes(self) -> dict[str, torch.Tensor]:
        """Run one first step eagerly at batch 1 to learn the state shapes and dtypes."""
        cfg = self.model.encoder.streaming_cfg
        frames = int(cfg.chunk_size[0]) if isinstance(cfg.chunk_size, (list, tuple)) else int(cfg.chunk_size)
        mel = torch.zeros(1, self.features, frames, device=self.device)
        length = torch.tensor([frames], device=self.device)
        with torch.inference_mode(), self.autocast():
            kind = _Kind(frames, 0, False, True)
            encoded, encoded_len, channel, time_cache, cache_len = self._encode(kind, mel, length, self._initial_caches(1))
            projected = self.model.joint.project_encoder(encoded.transpose(1, 2))
            _, dec_out, state = self._greedy(projected, encoded_len, *self._start_decoder(1, projected))
        if self.cache_dtype is not None:
            channel, time_cache = channel.to(self.cache_dtype), time_cache.to(self.cache_dtype)
        return {"channel": channel, "time": time_cache, "length": cache_len, "h": state[0], "c": state[1], "dec_out": dec_out}


def new_kind(frames: int, drop: int, keep_all: bool, first: bool) -> _Kind:
    return _Kind(frames, drop, keep_all, first)
