"""The fast step of the streaming engine: per-stream slots, static shapes and CUDA graphs.

The eager step (``conformer_stream_step``) rebuilds NeMo ``Hypothesis`` objects, stacks caches
and synchronises with the GPU many times per chunk; on a GPU it is bound by the host, not by the
arithmetic. :class:`FastStepper` does the same computation with the same NeMo modules, arranged
so that one chunk of a batch of streams is a fixed sequence of kernels:

* every stream owns a *slot* in preallocated pools: encoder caches kept in place (per layer a
  ring of attention inputs and a convolution window, see ``processors.nemotron.encoder_step``),
  prediction-network state; a step reads its rows, runs the encoder step and the greedy RNN-T
  search, and writes only what changed;
* a batch whose slots are one aligned run (a full house: slots 1..N in order) reads its rows as
  views; any other batch gathers them by slot index;
* the batch is padded to a power-of-two bucket; padding rows point at slot 0, a scratch slot
  no stream owns, so whatever they compute is never read;
* the greedy search is NeMo's label-looping greedy search (same joint and prediction-network
  calls, same ``max_symbols`` rule) unrolled to ``frames x max_symbols`` masked iterations, so
  it needs no host synchronisation: the only one left is reading the new tokens back;
* on CUDA each (input shape, bucket, rows) is captured once in a ``torch.cuda.CUDAGraph`` and
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

import numpy as np
import torch
from loguru import logger

from processors.nemotron.encoder_step import StepCaches, encoder_step
from processors.nemotron.fused import fused
from processors.nemotron.model import GRAPH_OWNER_ATTR, check_no_graphs
from processors.nemotron.slots import PendingTokens, Rows, SlotLease, SlotPools, batch_dim

# Batches of at least this many streams whose slots are one aligned run read their rows in place
# (one graph per run start); smaller ones gather, which costs little and needs one graph per bucket.
IN_PLACE_MIN_BUCKET = 128


@dataclass(frozen=True)
class _Kind:
    """What fixes a step's kernels: input frames, history frames dropped, final or not, first or not."""

    frames: int
    drop: int
    keep_all: bool
    first: bool


class _Runner:
    """Static buffers and (on CUDA) the captured graph for one kind, bucket size and row layout.

    ``start``: the rows are slots ``start .. start + bucket - 1``, read in place; None: gathered
    through ``slots``.
    """

    def __init__(self, stepper: FastStepper, kind: _Kind, bucket: int, start: int | None = None):
        self.kind, self.bucket, self.start = kind, bucket, start
        s = stepper
        self.mel = torch.zeros(bucket, s.features, kind.frames, device=s.device)
        self.mel_len = torch.full((bucket,), kind.frames, dtype=torch.long, device=s.device)
        self.slots = torch.zeros(bucket, dtype=torch.long, device=s.device)
        if start is not None:
            self.slots.copy_(torch.arange(start, start + bucket))
        self.tokens: torch.Tensor | None = None  # [bucket, decoder frames x max_symbols], made by the first run
        self.graph: torch.cuda.CUDAGraph | None = None
        self._stepper = s

    def body(self, start: int | None = None) -> None:
        out = self._stepper.compute(self.kind, self.mel, self.mel_len, self.slots, start)
        if self.tokens is None:
            self.tokens = torch.empty_like(out)
        self.tokens.copy_(out)

    def capture(self, pool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        real = self.slots.clone()
        with torch.cuda.stream(side):
            # Warm-up (cuBLAS/cuDNN handles and workspaces) on the scratch slot: it runs for real,
            # and must not step the streams whose rows the graph will read.
            self.slots.zero_()
            for _ in range(2):
                self.body()
            self.slots.copy_(real)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.body(self.start)

    def set_slots(self, slots: Sequence[int]) -> None:
        """Point the batch's rows at ``slots`` (the rest at scratch slot 0); no host synchronisation."""
        if self.start is not None:
            return  # fixed rows, set at creation
        index = torch.zeros(self.bucket, dtype=torch.long, pin_memory=self.slots.is_cuda)
        index[: len(slots)] = torch.as_tensor(slots, dtype=torch.long)
        self.slots.copy_(index, non_blocking=True)  # pinned: the allocator keeps it until the copy is done

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body(self.start)


class FastStepper:
    """Slot pools plus graphed (CUDA) or eager (CPU) static-shape steps for one model.

    ``autocast`` is a zero-argument callable returning the autocast context the eager path uses
    (bf16 on CUDA), so both paths run the same arithmetic. ``graphs`` captures CUDA graphs.
    ``cache_dtype``: the encoder caches' dtype in the pools (None: the encoder's). ``ring_kernel``:
    batches take the attention core as one Triton kernel where it runs (CUDA, bf16 caches).
    ``fuse``: batches run the elementwise work between the products compiled
    (``processors.nemotron.fused``).
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
        ring_kernel: bool = True,
        fuse: bool = False,
    ):
        self.model = model
        self.device = device
        self.autocast = autocast
        self.graphs = bool(graphs and device.type == "cuda")
        self.final_frames = final_frames
        self.max_batch = max_batch
        self.cache_dtype = cache_dtype
        self.ring_kernel = ring_kernel
        self.fuse = fuse
        self.features = int(model.preprocessor.featurizer.nfilt)
        decoding = model.decoding.decoding
        self.max_symbols = int(getattr(decoding, "max_symbols", None) or 10)
        self.blank = int(model.decoding.blank_id)
        self._free: list[int] = []
        self._used = 0
        self._lock = threading.Lock()
        self._runners: dict[tuple, _Runner] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._pools = SlotPools(initial_slots + 1, self._state_like())
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
        start = self._run_start(slots, bucket)
        key = (kind, bucket, capture, start)
        runner = self._runners.get(key)
        with torch.inference_mode():
            if runner is None:
                runner = _Runner(self, kind, bucket, start)
                if self.graphs and capture:
                    try:
                        runner.capture(self._graph_pool)
                        logger.debug(f"captured ASR step graph: {kind}, batch {bucket}, rows from {start or 'gathered'}")
                    except Exception as e:  # keep serving, eagerly, rather than lose the call
                        logger.warning(f"CUDA graph capture failed ({type(e).__name__}: {e}); ASR steps run without graphs")
                        self.graphs = False
                        runner.graph = None
                        torch.cuda.synchronize()
                self._runners[key] = runner
            if n < bucket or mel.shape[-1] < kind.frames:
                runner.mel.zero_()
            runner.mel[:n, :, : mel.shape[-1]].copy_(mel[:, :, : kind.frames])
            if n < bucket:
                runner.mel_len.fill_(kind.frames)
            runner.mel_len[:n].copy_(lengths)
            runner.set_slots(slots)
            runner.run()
            return runner.tokens[:n].clone()  # a later part of the same step may replay this runner

    @staticmethod
    def _run_start(slots: Sequence[int], bucket: int) -> int | None:
        """The first slot if the batch is a whole aligned run (read in place), else None (gathered)."""
        n, first = len(slots), int(slots[0])
        if n != bucket or bucket < IN_PLACE_MIN_BUCKET or (first - 1) % bucket or slots[-1] != first + n - 1:
            return None
        return first if (np.diff(np.asarray(slots)) == 1).all() else None

    def compute(self, kind: _Kind, mel, mel_len, slots, start: int | None = None) -> torch.Tensor:
        """The step itself, static shapes, no host synchronisation: returns [B, frames x max_symbols] labels.

        ``start``: the batch is slots ``start .. start + B - 1``, read and written as views.
        """
        batch = mel.shape[0]
        pools = self._pools.tensors
        rows = Rows(slots, start)
        count = torch.zeros(batch, dtype=torch.long, device=self.device) if kind.first else rows.read(pools["count"])
        caches = StepCaches(pools["channel"], pools["time"], rows, count, kind.first, self.ring_kernel, self.fuse and batch > 1)
        with self.autocast():
            encoded, encoded_len, count = encoder_step(self.model.encoder, mel, mel_len, caches, kind.drop, kind.keep_all)
            # Decoder frames: exactly the encoder's static output width (rows past their length emit nothing).
            projected = self.model.joint.project_encoder(encoded.transpose(1, 2))
            if kind.first:
                dec_out, state = self._start_decoder(batch, projected)
            else:
                state = (rows.read(pools["h"], 1).contiguous(), rows.read(pools["c"], 1).contiguous())  # cuDNN wants them whole
                dec_out = rows.read(pools["dec_out"])
            labels, dec_out, state = self._greedy(projected, encoded_len, dec_out, state)
        rows.write(pools["count"], count)
        rows.write(pools["h"], state[0], 1)
        rows.write(pools["c"], state[1], 1)
        rows.write(pools["dec_out"], dec_out)
        return labels

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
        kept for rows that emitted nothing (``batch_replace_states_mask``'s ``torch.where``, LSTM
        state). Rows past their length emit nothing. Batches may run the pieces around the
        prediction network fused (``self.fuse``).
        """
        model, blank = self.model, self.blank
        bucket, frames = projected.shape[0], projected.shape[1]
        fuse = self.fuse and bucket > 1
        pick, keep = fused(_pick_label, fuse), fused(_keep_emitted, fuse)
        out = []
        for t in range(frames):
            active = lengths > t
            enc_t = projected[:, t].unsqueeze(1)
            for _ in range(self.max_symbols):
                labels, active = pick(model.joint, enc_t, dec_out, active, blank)
                out.append(labels)
                new_out, new_state, *_ = model.decoder.predict(labels.unsqueeze(1), state, add_sos=False, batch_size=bucket)
                dec_out, state = keep(model.joint, active, new_out, new_state, dec_out, state)
        return torch.stack(out, dim=1), dec_out, state

    def _state_like(self) -> dict[str, torch.Tensor]:
        """One slot's state, for the pools' shapes and dtypes: the encoder's empty caches, and the
        prediction network's state after one eager greedy frame (as a step leaves it)."""
        encoder = self.model.encoder
        channel, time_cache, _ = encoder.get_initial_cache_state(batch_size=1, device=self.device)
        dtype = self.cache_dtype or channel.dtype
        with torch.inference_mode(), self.autocast():
            projected = self.model.joint.project_encoder(torch.zeros(1, 1, encoder.d_model, device=self.device))
            lengths = torch.ones(1, dtype=torch.long, device=self.device)
            _, dec_out, state = self._greedy(projected, lengths, *self._start_decoder(1, projected))
        return {
            "channel": channel.to(dtype),
            "time": time_cache.to(dtype),
            "count": torch.zeros(1, dtype=torch.long, device=self.device),
            "h": state[0],
            "c": state[1],
            "dec_out": dec_out,
        }


def _pick_label(joint, enc_t, dec_out, active, blank: int):
    """One greedy symbol's label: (labels, blank where the row is done; rows still emitting)."""
    logits = joint.joint_after_projection(enc_t, dec_out).squeeze(1).squeeze(1)
    labels = logits.max(-1)[1]
    active = torch.logical_and(active, labels != blank)
    return torch.where(active, labels, blank), active


def _keep_emitted(joint, active, new_out, new_state, dec_out, state):
    """The prediction network's new output and state for rows that emitted, the old for the rest."""
    new_out = joint.project_prednet(new_out)
    keep = active.unsqueeze(-1)
    state = tuple(torch.where(keep, new, old) for new, old in zip(new_state, state))
    return torch.where(active[:, None, None], new_out, dec_out), state


def new_kind(frames: int, drop: int, keep_all: bool, first: bool) -> _Kind:
    return _Kind(frames, drop, keep_all, first)
