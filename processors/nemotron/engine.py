"""Synchronous cache-aware streaming ASR engine for nvidia/nemotron-speech-streaming-en-0.6b.

torch and NeMo only, no asyncio: the Pipecat service (``processors.nemotron.stt``) runs it on one
worker thread. One :class:`NemotronStreamingEngine` holds the model; each call (stream) has its
own :class:`StreamState`. PCM of any frame size goes in; one ``conformer_stream_step`` per chunk
gives the running hypothesis (the partial transcript); :meth:`NemotronStreamingEngine.finalize`
returns the final text and resets the stream.

Streaming is token-identical to offline inference (fp32, greedy): every step recomputes its mel
frames from the raw samples around them, so each frame is exactly the frame a whole-utterance
pass would produce, and the steps follow NeMo's rules (first chunk of ``chunk_size[0]`` frames
with nothing dropped; later chunks with ``pre_encode_cache_size`` frames of history and
``drop_extra_pre_encoded``; the tail, however short, with ``keep_all_outputs=True``). One
departure: for 80 ms chunks the second step has only one frame of history, and instead of
zero-padding it (NeMo's ``CacheAwareStreamingAudioBuffer`` does, and then differs from offline)
its input starts at frame 0 and the already-emitted encoder frame is dropped.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from processors.errors import SetupError
from processors.nemotron.audio import MODEL_SAMPLE_RATE, pcm16_of, pcm_to_float
from processors.nemotron.mel import MelBatcher
from processors.nemotron.model import LoadedModel, cast_matmul_weights, load_streaming_model, prepare_streaming_model, resolve_device
from processors.nemotron.stream import FrameGeometry, StepBatch, StreamState, eager_stream_step, step_windows
from processors.nemotron.text import TextDecoder

__all__ = ["CHUNK_MS_TO_RIGHT_CONTEXT", "NemotronStreamingEngine", "StreamState"]

# Chunk size (ms) -> right attention context R of att_context_size=[70, R].
CHUNK_MS_TO_RIGHT_CONTEXT: dict[int, int] = {80: 0, 160: 1, 560: 6, 1120: 13}


class NemotronStreamingEngine:
    """A loaded cache-aware RNN-T model plus the streaming rules around it.

    Thread-safe: model calls take a lock, so several worker threads may share one engine; each
    :class:`StreamState` must be used by one thread at a time.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        chunk_ms: int,
        *,
        final_pad_ms: int | None = None,
        fast: bool | None = None,
        cuda_graphs: bool | None = None,
        max_batch: int = 1024,
        ring_kernel: bool = True,
        fuse: bool = False,
    ):
        self._model = loaded.model
        self.device = loaded.device
        self.precision = loaded.precision
        self.chunk_ms = chunk_ms
        self.right_context = CHUNK_MS_TO_RIGHT_CONTEXT[chunk_ms]
        cfg = self._model.encoder.streaming_cfg
        self._first_frames = _pick(cfg.chunk_size, 0)
        self._shift_frames = _pick(cfg.shift_size, 1)
        self._pre_cache = _pick(cfg.pre_encode_cache_size, 1)
        self._drop = cfg.drop_extra_pre_encoded
        self._valid_out = int(cfg.valid_out_len)  # encoder frames per full chunk
        self._final_in_one_step = cfg.last_channel_cache_size % (self.right_context + 1) == 0
        featurizer = self._model.preprocessor.featurizer
        self._hop = int(featurizer.hop_length)
        self._half_fft = int(featurizer.n_fft) // 2
        self._features = int(featurizer.nfilt)
        # Samples before a frame's centre that its window (and pre-emphasis) can reach.
        self._left_frames = -(-(self._half_fft + 1) // self._hop)
        self._geometry = FrameGeometry(self._hop, self._half_fft, self._left_frames, self._pre_cache)
        self.final_pad_ms = chunk_ms if final_pad_ms is None else final_pad_ms
        self._lock = threading.Lock()
        self._mel = MelBatcher(self._model.preprocessor, self.device)
        if self.device.type == "cuda" and self.precision == "bf16":
            self._autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        else:
            self._autocast = contextlib.nullcontext
        # The fast path (slots, static shapes, CUDA graphs on a GPU) is the default on CUDA; the
        # eager NeMo path is the default on the CPU and the reference for the fast one.
        self.fast = self.device.type == "cuda" if fast is None else bool(fast)
        self._stepper = None
        if self.fast:
            from processors.nemotron.encoder_step import supports_in_place_caches

            if (reason := supports_in_place_caches(self._model.encoder)) is not None:
                logger.warning(f"The fast ASR path cannot step this model ({reason}); its steps run eagerly")
                self.fast = False
        if self.fast:
            from processors.nemotron.graphs import FastStepper

            graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
            cache_dtype = None
            if self.device.type == "cuda" and self.precision == "bf16":
                # cache_enabled=False: cached weight casts must not outlive a graph capture
                autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)  # noqa: E731
                cache_dtype = torch.bfloat16  # exact: the caches are only read through bf16 matmuls
                cast_matmul_weights(self._model, torch.bfloat16)  # no weight casts in every step
            else:
                autocast = contextlib.nullcontext
            self._final_width = self._pre_cache + self._shift_frames + self.final_pad_ms // 10 + self._left_frames + 2
            self._stepper = FastStepper(
                self._model, self.device, autocast, graphs=graphs, final_frames=self._final_width, max_batch=max_batch,
                cache_dtype=cache_dtype, ring_kernel=ring_kernel, fuse=fuse,
            )
            self._text = TextDecoder(self._model.decoding)
            if self.device.type == "cuda":  # page-lock the largest batch's staging buffer now, not mid-call
                frames = max(self._final_width, self._first_frames, self._pre_cache + self._shift_frames)
                self._mel.reserve(max_batch, (frames - 1 + self._left_frames) * self._hop + self._half_fft)

    @classmethod
    def load(
        cls,
        model_path: Path | str | None,
        chunk_ms: int,
        device: str = "auto",
        *,
        precision: str = "auto",
        final_pad_ms: int | None = None,
        cuda_graph_decoder: bool = False,
        warm_up: bool = True,
        fast: bool | None = None,
        cuda_graphs: bool | None = None,
        fuse: bool = False,
    ) -> NemotronStreamingEngine:
        """Load a local ``.nemo`` cache-aware RNN-T model for ``chunk_ms`` chunks.

        ``device``: "auto" (CUDA when available, else CPU with a warning), "cuda" or "cpu".
        ``precision``: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32".
        ``final_pad_ms``: digital silence appended at :meth:`finalize` as right context for the
        last words (default: one chunk). ``fast``: slot-pooled static-shape steps (default on
        CUDA); ``cuda_graphs``: capture them in CUDA graphs (default on CUDA); ``fuse``: batches run
        their elementwise work compiled (``processors.nemotron.fused``). Raises
        :class:`SetupError` naming the setting at fault.
        """
        if chunk_ms not in CHUNK_MS_TO_RIGHT_CONTEXT:
            allowed = ", ".join(str(c) for c in CHUNK_MS_TO_RIGHT_CONTEXT)
            raise SetupError(f"Setting ASR_CHUNK_MS is invalid (got {chunk_ms!r}): allowed values are {allowed}.")
        loaded = load_streaming_model(
            model_path,
            right_context=CHUNK_MS_TO_RIGHT_CONTEXT[chunk_ms],
            device=device,
            precision=precision,
            cuda_graph_decoder=cuda_graph_decoder,
        )
        engine = cls(loaded, chunk_ms, final_pad_ms=final_pad_ms, fast=fast, cuda_graphs=cuda_graphs, fuse=fuse)
        if warm_up:
            started = time.perf_counter()
            engine.warm_up()
            logger.debug(f"{engine}: warm-up took {1e3 * (time.perf_counter() - started):.0f} ms")
        return engine

    @classmethod
    def from_model(
        cls,
        model,
        chunk_ms: int,
        device: str = "auto",
        *,
        precision: str = "auto",
        cuda_graph_decoder: bool = False,
        fast: bool | None = None,
        cuda_graphs: bool | None = None,
        max_batch: int = 1024,
        ring_kernel: bool = True,
        fuse: bool = False,
    ) -> NemotronStreamingEngine:
        """Wrap an in-memory NeMo model (benchmarks); the model's streaming context is changed.
        ``ring_kernel=False``: batches take the attention core in PyTorch products (comparisons);
        ``fuse=True``: batches run their elementwise work compiled (``processors.nemotron.fused``)."""
        if chunk_ms not in CHUNK_MS_TO_RIGHT_CONTEXT:
            raise SetupError(f"Setting ASR_CHUNK_MS is invalid (got {chunk_ms!r}).")
        loaded = prepare_streaming_model(
            model,
            right_context=CHUNK_MS_TO_RIGHT_CONTEXT[chunk_ms],
            device=resolve_device(device),
            precision=precision,
            cuda_graph_decoder=cuda_graph_decoder,
        )
        engine = cls(loaded, chunk_ms, fast=fast, cuda_graphs=cuda_graphs, max_batch=max_batch, ring_kernel=ring_kernel,
                     fuse=fuse)
        engine.warm_up()
        return engine

    def close(self) -> None:
        """Release the fast path's CUDA graphs (the engine keeps working, without graphs).

        Needed before another engine is built on the same in-memory model (see
        :func:`processors.nemotron.model.check_no_graphs`); idempotent.
        """
        if self._stepper is not None:
            with self._lock:
                self._stepper.close()

    def __repr__(self) -> str:
        mode = "eager" if not self.fast else ("cuda graphs" if self._stepper.graphs else "static")
        return f"NemotronStreamingEngine({self.chunk_ms} ms, {self.device.type}, {self.precision}, {mode})"

    @property
    def bytes_per_stream(self) -> int | None:
        """Device memory of one stream's slot on the fast path (caches and decoder state)."""
        return None if self._stepper is None else self._stepper.bytes_per_stream

    @property
    def sample_rate(self) -> int:
        return MODEL_SAMPLE_RATE

    @property
    def model(self):
        """The underlying NeMo model (eval mode, streaming context set); for tests and benches."""
        return self._model

    def new_stream(self, sample_rate: int = MODEL_SAMPLE_RATE) -> StreamState:
        """A fresh stream; audio at another ``sample_rate`` is resampled to 16 kHz."""
        return StreamState(sample_rate=sample_rate)

    # ----- audio in -------------------------------------------------------------------------

    def feed(self, state: StreamState, pcm: np.ndarray | bytes) -> None:
        """Append PCM (16-bit bytes, int16 or float array) to the stream; no model work."""
        pcm16, carry = pcm16_of(pcm, state.carry)
        if pcm16 is not None and state.resampler.passes_through:  # converted as it is written
            state.carry = carry
            state.audio_s += pcm16.size / state.sample_rate
            state.window.append_pcm16(pcm16)
            return
        samples, state.carry = pcm_to_float(pcm, state.carry)
        state.audio_s += samples.size / state.sample_rate
        state.window.append(state.resampler(samples))

    def ready(self, state: StreamState) -> bool:
        """Whether the stream holds enough audio for its next encoder step."""
        return self._ready_end(state) is not None

    def _ready_end(self, state: StreamState) -> int | None:
        """The end frame of the stream's next step if it holds the audio for it, else None."""
        end = state.frames_done + (self._first_frames if state.steps == 0 else self._shift_frames)
        return end if self._settled(state.window.total) >= end else None

    def _settled(self, totals):
        """Mel frames whose whole window lies inside the first ``totals`` samples (int or array)."""
        return np.maximum(0, (np.asarray(totals) - self._half_fft) // self._hop + 1)

    def accept(self, state: StreamState, pcm: np.ndarray | bytes) -> str | None:
        """Feed PCM and step every complete chunk; the new partial text if it changed, else None."""
        self.feed(state, pcm)
        changed = None
        while self.ready(state):
            text = self.step([state])[0]
            changed = text if text is not None else changed
        return changed

    # ----- steps ----------------------------------------------------------------------------

    def step(self, states: Sequence[StreamState]) -> list[str | None]:
        """One chunk for every ready stream, batched; per stream the new text if it changed.

        Streams on their first chunk and streams in steady state need different NeMo arguments,
        so they form separate batches (two at most, three for 80 ms chunks). Streams that are not ready are skipped (None).
        """
        before = [s.text for s in states]
        steps = np.array([s.steps for s in states], dtype=np.int64)
        done = np.array([s.frames_done for s in states], dtype=np.int64)
        totals = np.array([s.window.total for s in states], dtype=np.int64)
        ends = done + np.where(steps == 0, self._first_frames, self._shift_frames)
        ready = np.flatnonzero(self._settled(totals) >= ends)
        # The group of each ready stream as one number (see _group_of): -1 for a first step, else its drop.
        drops = np.where(done < self._pre_cache, steps * self._valid_out, self._drop)
        codes = np.where(steps == 0, -1, drops)[ready]
        if codes.size and (codes == codes[0]).all():  # one group (the common case)
            groups = [ready]
        else:
            firsts = np.unique(codes, return_index=True)[1]
            groups = [ready[codes == codes[i]] for i in np.sort(firsts)]  # in order of first appearance
        for rows in groups:
            self._run([states[i] for i in rows.tolist()], ends[rows], keep_all=False)
        return [s.text if s.text != text else None for s, text in zip(states, before)]

    def finalize(self, state: StreamState, pad_ms: int | None = None) -> str:
        """Step the rest of the turn (plus ``pad_ms`` of silence), return its text, reset the stream."""
        return self.finalize_many([state], pad_ms)[0]

    def finalize_many(self, states: Sequence[StreamState], pad_ms: int | None = None) -> list[str]:
        """:meth:`finalize` for several streams; on the fast path their last steps share a batch."""
        pad_ms = self.final_pad_ms if pad_ms is None else pad_ms
        if not self.fast:
            return [self._finalize_eager(s, pad_ms) for s in states]
        for state in states:
            self._append_tail(state, pad_ms)
        pending = list(states)
        while pending:
            # Streams that still need ordinary chunks first (only when fed without stepping).
            behind = [s for s in pending if self._final_end(s) - s.frames_done > self._final_fits(s)]
            if behind:
                done = [s.frames_done for s in behind]
                self.step(behind)
                if done != [s.frames_done for s in behind]:
                    continue
            groups: dict[tuple[bool, int], list[StreamState]] = {}
            for s in pending:
                if self._final_end(s) > s.frames_done:
                    groups.setdefault(self._group_of(s), []).append(s)
            for group in groups.values():
                self._run(group, np.array([self._final_end(s) for s in group], dtype=np.int64), keep_all=True)
            pending = []
        texts = [s.text for s in states]
        for s in states:
            s.reset()
        return texts

    def _final_end(self, state: StreamState) -> int:
        return state.window.total // self._hop  # frame count of an offline pass over the same audio

    def _final_fits(self, state: StreamState) -> int:
        """New frames one static final step can take (history frames come on top)."""
        history = 0 if state.steps == 0 else min(state.frames_done, self._pre_cache)
        return self._final_width - history

    def _append_tail(self, state: StreamState, pad_ms: int) -> None:
        tail = state.resampler(np.zeros(0, dtype=np.float32), last=True)
        state.window.append(tail)
        if state.window.total > 0 and pad_ms > 0:
            state.window.append(np.zeros(MODEL_SAMPLE_RATE * pad_ms // 1000, dtype=np.float32))

    def _finalize_eager(self, state: StreamState, pad_ms: int) -> str:
        self._append_tail(state, pad_ms)
        end = state.window.total // self._hop  # frame count of an offline pass over the same audio
        while end > state.frames_done:
            # One step for all the rest, however many chunks, when the left cache (70 frames)
            # is a whole number of chunks: the chunked attention mask then stays aligned with
            # the offline pass. keep_all_outputs keeps the short last chunk.
            need = self._first_frames if state.steps == 0 else self._shift_frames
            last = self._final_in_one_step or end - state.frames_done <= need
            self._run([state], np.array([end if last else state.frames_done + need]), keep_all=last)
        text = state.text
        state.reset()
        return text

    def warm_up(self) -> None:
        """Run a first, a steady and the final steps on silence so the first call is not slow."""
        state = self.new_stream()
        samples = MODEL_SAMPLE_RATE * 3 * self.chunk_ms // 1000
        self.accept(state, np.zeros(samples, dtype=np.int16))
        self.finalize(state)
        self.accept(state, np.zeros(samples // 6, dtype=np.int16))  # a turn shorter than a chunk: a first step's final
        self.finalize(state)
        if self.fast and self._stepper.fuse:  # compile the batches' pieces now, not in the first call that shares a step
            pair = [self.new_stream(), self.new_stream()]
            for s in pair:
                self.feed(s, np.zeros(samples, dtype=np.int16))
            while any(self.ready(s) for s in pair):
                self.step(pair)
            self.finalize_many(pair)

    # ----- internals ------------------------------------------------------------------------

    def _batch(self, states: list[StreamState], ends: np.ndarray) -> StepBatch:
        """The samples behind the next step's mel frames, history included, for each stream of
        ``states`` (all in one group, see :meth:`_group_of`) up to its end frame in ``ends``.

        NeMo's rules: the first chunk goes in alone with nothing dropped; later chunks carry
        ``pre_encode_cache_size`` frames of history whose extra subsampled outputs are dropped.
        While fewer history frames exist (only 80 ms chunks, second step) the input starts at
        frame 0 and the encoder frames already emitted are dropped: zero-padding the history,
        as NeMo's own buffer does, would not match an offline pass.
        """
        done = np.array([s.frames_done for s in states], dtype=np.int64)
        totals = np.array([s.window.total for s in states], dtype=np.int64)
        w = step_windows(self._geometry, done, ends, totals)
        starts, sizes = w["window_start"].tolist(), w["sizes"].tolist()
        samples = [s.window.slice(a, a + k) for s, a, k in zip(states, starts, sizes)]
        return StepBatch(states, samples, w["sizes"], w["skip"], w["count"], ends, *self._group_of(states[0]))

    def _group_of(self, state: StreamState) -> tuple[bool, int]:
        """Whether the next step is the stream's first, and the subsampled history frames it
        drops: streams step together only when both agree."""
        if state.steps == 0:
            return True, 0
        if state.frames_done < self._pre_cache:
            return False, state.steps * self._valid_out
        return False, self._drop

    def _run(self, states: list[StreamState], ends: np.ndarray, keep_all: bool) -> None:
        """One ``conformer_stream_step`` for each stream of ``states`` (all with the same
        first-step flag and drop) up to its end frame in ``ends``."""
        with self._lock:  # the staging buffers, the model and the slot pools
            if self.fast:
                self._run_fast(states, ends, keep_all)
                return
            batch = self._batch(states, ends)
            inputs, lengths = self._mel(batch)
            with torch.inference_mode(), self._autocast():
                eager_stream_step(self._model, batch.states, inputs, lengths, keep_all, batch.first, batch.drop)
            self._advance(batch)

    def _run_fast(self, states: list[StreamState], ends: np.ndarray, keep_all: bool) -> None:
        """The same step on the fast path: slots, static-shape (graphed on CUDA) steps.

        The streams go in slot order (slots 1..N step in place) and in parts of at most
        ``max_batch``, pipelined: the host stages the next part's audio while the GPU steps the
        last one, and reads a part's tokens while the GPU steps the next. A smaller remainder part
        is staged and launched first, so the GPU waits less for the first part.
        """
        if any(s.lease is None for s in states):
            for s in states:
                if s.lease is None:
                    s.lease = self._stepper.lease()
        slots = np.array([s.lease.slot for s in states], dtype=np.int64)
        if (slots[1:] < slots[:-1]).any():
            order = np.argsort(slots, kind="stable")
            states, ends, slots = [states[i] for i in order.tolist()], ends[order], slots[order]
        size = self._stepper.max_batch
        # Parts of max_batch in slot order (a full house steps them in place); a smaller last part
        # goes first: the GPU starts once its part is staged, and the host stages the next parts
        # while it steps.
        starts = list(range(0, len(states), size))
        if len(starts) > 1 and len(states) % size:
            starts = starts[-1:] + starts[:-1]
        launched = []
        for lo in starts:
            batch = self._batch(states[lo : lo + size], ends[lo : lo + size])
            launched.append((batch, self._launch_fast(batch, slots[lo : lo + size], keep_all)))
        text = self._text
        for batch, pending in launched:
            self._advance(batch)  # host work while the GPU steps
            states = batch.states
            rows, emitted = pending.emitted()  # the part's one synchronisation
            for row, tokens in zip(rows, emitted):
                s = states[row]
                s.tokens.extend(tokens)
                s.decoded, s.text = text.text(s.decoded, s.tokens, tokens)  # only the new tokens decoded

    def _launch_fast(self, batch: StepBatch, slots: np.ndarray, keep_all: bool):
        from processors.nemotron.graphs import new_kind

        inputs, lengths = self._mel(batch)
        width = int(batch.count.max())
        static = keep_all and width <= self._final_width
        kind = new_kind(self._final_width if static else width, batch.drop, keep_all, batch.first)
        return self._stepper.launch(kind, inputs, lengths, slots, capture=not keep_all or static)

    def _advance(self, batch: StepBatch) -> None:
        """Count the step's frames and forget the samples no later frame needs."""
        forget = (np.maximum(batch.ends - self._pre_cache - self._left_frames, 0) * self._hop).tolist()
        for s, end, start in zip(batch.states, batch.ends.tolist(), forget):
            s.frames_done = end
            s.steps += 1
            s.window.forget_before(start)


def _pick(value: int | list[int], index: int) -> int:
    """NeMo streaming sizes are either one int or [first step, later steps]."""
    return int(value[index]) if isinstance(value, (list, tuple)) else int(value)
