"""The scripted caller of the barge-in benchmark: asks, listens, interrupts, coughs, says "mm-hm".

One :class:`CallerScript` drives one running call. Annie is kept talking by asking her for a
story (the LLM's scripted story is long); every event is played into the caller's microphone at a
random moment of her speech, with a random voice and level. Each event and every caller
utterance is logged with its wall-clock window, so the analysis can tell a barge-in the caller
caused from one nobody caused (echo, or the VAD on its own).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from agent.demo.caller import ScriptedCaller, poll_until
from agent.demo.frames import FrameTimes
from bench import bargein_audio as audio

STORIES = (
    "Once upon a time, a little boat sailed out to sea on a bright summer morning. The sailor sang to "
    "the waves while the gulls circled above the mast. At noon a big grey whale came up beside the "
    "boat and sang back to him, low and slow. They sang together all afternoon, and the sun went "
    "down in gold and pink. Then the sailor rowed home, tired and happy, and told his daughter "
    "every word of the whale's song before she fell asleep.",
    "There was once a baker in a small village who rose every day before the sun. She made round "
    "loaves, sweet buns and a cake for anyone who had a birthday. One winter the snow was so deep "
    "that nobody could reach her shop, so she put on her boots and carried the bread from door to "
    "door. The whole village remembered that winter, and every year since then they have baked her "
    "a cake of her own on the first snowy day.",
    "Long ago a gardener planted an apple tree beside a quiet river. For years it gave no fruit at "
    "all, and the neighbours laughed at him. He watered it anyway and talked to it every evening. "
    "In the tenth spring the tree was covered with white blossom, and by autumn the branches bent "
    "under red apples. He shared them with everyone who had laughed, and they all agreed they had "
    "never tasted anything so good in their lives.",
)
ANSWERS = {
    "weather": "It is sunny and mild today, a good day for a short walk.",
    "day": "Today is Wednesday, the twenty-fifth.",
    "lunch": "Lunch is at half past twelve, as usual.",
    "visit": "Your son is coming to visit on Saturday afternoon.",
}
STORY_REQUEST = "Please tell me a story."
START_TIMEOUT_S = 45.0


def scripted_reply(messages: list[dict]) -> str:
    """The LLM stand-in: a short answer to the known questions, else the next long story."""
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    last = str(last).lower()
    for key, answer in ANSWERS.items():
        if key in last and "story" not in last:
            return answer
    users = sum(1 for m in messages if m.get("role") == "user")
    return STORIES[users % len(STORIES)]


@dataclass
class Event:
    """One thing the caller did, and when (monotonic seconds)."""

    kind: str  # question | interruption | backchannel | cough/door/burst | babble/tv/second_voice
    group: str  # question | interruption | backchannel | burst | noise
    start: float
    end: float
    text: str | None = None
    voice: int = 0
    level_dbfs: float = audio.CALLER_LEVEL_DBFS
    snr_db: float | None = None
    annie_speaking: bool = False
    warmup: bool = False
    decisions: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Plan:
    """How many of each event one pass plays."""

    questions: int = 3
    interruptions: int = 10
    backchannels: int = 8
    bursts: int = 6
    noise_per_snr: int = 1  # per noise kind and SNR
    snrs: tuple[float, ...] = (20.0, 10.0, 5.0, 0.0)
    echo_block_s: float = 30.0
    budget_s: float = 300.0  # no new event starts after this long into the pass

    def events(self, rng: np.random.Generator) -> list[tuple[str, str, float | None]]:
        todo: list[tuple[str, str, float | None]] = []
        todo += [("interruption", "interruption", None)] * self.interruptions
        todo += [("backchannel", "backchannel", None)] * self.backchannels
        todo += [(audio.BURST_KINDS[i % 3], "burst", None) for i in range(self.bursts)]
        todo += [(k, "noise", s) for k in audio.NOISE_KINDS for s in self.snrs for _ in range(self.noise_per_snr)]
        # Every kind spread over the whole pass (shuffled within its group), so a pass that runs
        # out of time still has some of each.
        groups: dict[str, list] = {}
        for item in todo:
            groups.setdefault(item[1], []).append(item)
        keyed = []
        for items in groups.values():
            for i, j in enumerate(rng.permutation(len(items))):
                keyed.append(((i + rng.uniform(0, 1)) / len(items), items[j]))
        return [item for _, item in sorted(keyed, key=lambda k: k[0])]


class CallerScript(ScriptedCaller):
    def __init__(self, line, times: FrameTimes, pause_first, rng: np.random.Generator, log=print,
                 pauses: list[tuple[float, float | None]] | None = None, caller_voice: int | None = None):
        super().__init__(line)
        # One caller's voice for the whole call (the caller-voice gate enrols her), or a new voice
        # for every utterance (None: the decision must not depend on whose voice it is).
        self.caller_voice = caller_voice
        self.times = times
        self.pause_first = pause_first
        self.pauses = pauses if pauses is not None else []
        self.rng = rng
        self.log = log
        self.utterances: list[tuple[float, float, str]] = []  # every caller sound: (start, end, kind)
        self.events: list[Event] = []
        self.echo_blocks: list[tuple[float, float]] = []
        self._n = 0

    # -- state ------------------------------------------------------------------------------
    def annie_speaking(self) -> bool:
        """Annie's reply is playing: started, not stopped, and not held by a pause right now."""
        if not self.times.bot_speaking:
            return False
        if self.pauses and self.pauses[-1][1] is None:
            committed = self.times.by_kind.get("interruption", [])
            return bool(committed) and committed[-1] > self.pauses[-1][0]
        return True

    async def _play(self, pcm: np.ndarray, kind: str) -> tuple[float, float]:
        start, end = await self.play(pcm)
        self.utterances.append((start, end, kind))
        return start, end

    async def _say(self, text: str, kind: str) -> tuple[float, float]:
        self._n += 1
        pcm = await asyncio.to_thread(audio.speech, text, self._voice())
        return await self._play(pcm, kind)

    def _voice(self) -> int:
        return self._n if self.caller_voice is None else self.caller_voice

    # -- the call ---------------------------------------------------------------------------
    async def run(self, plan: Plan, deadline: float) -> None:
        await asyncio.sleep(1.0)
        for i in range(plan.questions + 1):  # the first one warms the models up and is not scored
            await self.question(audio.QUESTIONS[i % len(audio.QUESTIONS)], warmup=i == 0)
        if plan.echo_block_s > 0:
            await self.echo_only(plan.echo_block_s, deadline)
        todo = plan.events(self.rng)
        for n, (kind, group, snr) in enumerate(todo, 1):
            if time.monotonic() > deadline:
                self.log(f"  time is up after {n - 1} of {len(todo)} events")
                break
            await self.event(kind, group, snr)
            self.log(f"  {n}/{len(todo)} {kind}")

    async def question(self, text: str, warmup: bool = False) -> None:
        await poll_until(lambda: not self.annie_speaking(), START_TIMEOUT_S)
        await asyncio.sleep(0.8)
        start, end = await self._say(text, "question")
        self.events.append(Event("question", "question", start, end, text=text, voice=self._voice(), warmup=warmup))
        await poll_until(lambda: self.times.first("bot_started", end) is not None, START_TIMEOUT_S)
        await asyncio.sleep(0.3)
        await poll_until(lambda: not self.annie_speaking(), START_TIMEOUT_S)
        await asyncio.sleep(0.5)

    async def ensure_speaking(self) -> bool:
        if self.annie_speaking():
            return True
        await asyncio.sleep(0.6)
        if self.annie_speaking():
            return True
        _, end = await self._say(STORY_REQUEST, "story request")
        started = await poll_until(lambda: self.times.first("bot_started", end) is not None, START_TIMEOUT_S)
        await asyncio.sleep(0.5)
        return started

    async def echo_only(self, seconds: float, deadline: float) -> None:
        """Annie speaks, the caller stays silent (the echo-only scenario), ``seconds`` in all."""
        spoken = 0.0
        while spoken < seconds and time.monotonic() < deadline:
            if not await self.ensure_speaking():
                return
            start = time.monotonic()
            while self.annie_speaking() and spoken + time.monotonic() - start < seconds:
                await asyncio.sleep(0.1)
            self.echo_blocks.append((start, time.monotonic()))
            spoken += time.monotonic() - start

    async def event(self, kind: str, group: str, snr: float | None) -> None:
        if not await self.ensure_speaking():
            return
        wait = float(self.rng.uniform(0.6, 2.0))
        # The sound is made before the wait, not after the last look at Annie: on a loaded machine
        # synthesis took long enough for her story to end between that look and the sound.
        self._n += 1
        voice = self._voice()
        level = audio.CALLER_LEVEL_DBFS + float(self.rng.choice([-6.0, -3.0, 0.0, 3.0]))
        text = None
        if group == "interruption":
            text = audio.INTERRUPTIONS[self._n % len(audio.INTERRUPTIONS)]
            pcm = await asyncio.to_thread(audio.speech, text, voice, level)
        elif group == "backchannel":
            text = audio.BACKCHANNELS[self._n % len(audio.BACKCHANNELS)]
            pcm = await asyncio.to_thread(audio.speech, text, voice, level)
        elif group == "burst":
            pcm = audio.burst(kind, self.rng, level + 6.0)
        else:
            pcm = await asyncio.to_thread(audio.room_noise, kind, self.rng, snr)
        await asyncio.sleep(wait)
        if not await self.ensure_speaking():
            return
        decided = len(self.pause_first.decisions) if self.pause_first else 0
        speaking = self.annie_speaking()
        start, end = await self._play(pcm, group)
        ev = Event(kind, group, start, end, text=text, voice=voice, level_dbfs=level, snr_db=snr,
                   annie_speaking=speaking)
        self.events.append(ev)
        if group == "interruption":
            # Annie answers the interruption (with a new story): wait for her to start.
            await poll_until(lambda: self.times.first("bot_started", end) is not None, 12)
            await asyncio.sleep(0.5)
        else:
            await asyncio.sleep(end - time.monotonic() + 1.6)
        if self.pause_first:
            ev.decisions = list(self.pause_first.decisions[decided:])
