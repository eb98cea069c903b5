"""The barge-in decision core, rule by rule, as tables: events at given times in, actions out.

No pipecat, no asyncio, no sleeping: each row is a call on a clock the table sets. The driver
delivers a tick whenever the core asked to be woken before the next event (as the pipecat
adapter's timer does), so the times of the actions are exact.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.bargein.core import (
    BargeInCore,
    BargeInParams,
    Commit,
    Flow,
    Pause,
    Phase,
    StartTurn,
    WakeAt,
    backchannel_words,
)
from agent.bargein.recording import ACTION_NAMES

ECHO = ("once", "upon", "a", "time")  # what Annie is saying in every row
P = BargeInParams()  # window 1.3, quiet 0.3, blip 0.3, grace 0.5, long 0.8, final wait 1.2, late 2.0


def run(events: list[tuple], params: BargeInParams = P, until: float = 10.0, speaking: bool = True,
        in_flight: bool = False):
    """Feed ``events`` — ``(t, "voice")``, ``(t, "quiet")``, ``(t, "partial", text)``,
    ``(t, "final", text)``, ``(t, "earlier final", text)`` (a final the STT marked as a segment's
    that ended before the pause), ``(t, "bot_stopped")``, ``(t, "turn")`` — to a core whose Annie is
    speaking from t=0 (unless not ``speaking``; ``in_flight``: the STT still had the caller's
    audio then); ticks come when asked for, up to ``until``.
    Returns the core and ``[(t, action)]`` with t rounded to the millisecond."""
    core = BargeInCore(params)
    taken: list[tuple[float, str]] = []
    flows: list[Flow] = []

    def note(t, out):
        taken.extend((round(t, 3), ACTION_NAMES[type(a)]) for a in out.actions if not isinstance(a, WakeAt))
        return out

    def ticks_until(t):
        while core.wake_at is not None and core.wake_at <= t:
            at = core.wake_at
            note(at, core.tick(at))

    if speaking:
        core.bot_started(0.0, caller_audio_in_flight=in_flight)
    for t, kind, *arg in events:
        ticks_until(t)
        if kind == "voice":
            out = core.voice_started(t)
        elif kind == "quiet":
            out = core.voice_stopped(t)
        elif kind in ("partial", "final", "earlier final"):
            out = core.words(t, arg[0], final=kind != "partial", annies_words=ECHO, earlier=kind == "earlier final")
        elif kind == "bot_stopped":
            out = core.bot_stopped(t)
        elif kind == "turn":
            out = core.turn_started(t)
        else:
            raise ValueError(kind)
        flows.append(note(t, out).flow)
        if any(isinstance(a, Pause) for a in out.actions):
            note(t, core.playback_paused(t))  # the sink is silent at once
        if any(isinstance(a, (Commit, StartTurn)) for a in out.actions):
            core.turn_started(t)  # pipecat starts the turn, and tells every start strategy
    ticks_until(until)
    return core, taken, flows


CASES = [
    # --- real words commit at once; Annie is never resumed over them
    ("real words commit", [(1.0, "voice"), (1.4, "partial", "stop please")],
     [(1.0, "pause"), (1.4, "commit")]),
    ("real words in a final commit", [(1.0, "voice"), (1.5, "quiet"), (1.6, "final", "what time is it")],
     [(1.0, "pause"), (1.6, "commit")]),
    ("words mixing a backchannel and real words commit", [(1.0, "voice"), (1.3, "partial", "okay but wait")],
     [(1.0, "pause"), (1.3, "commit")]),
    # --- a caller who keeps talking wins at the window's end
    ("kept talking: commit at the window", [(1.0, "voice")], [(1.0, "pause"), (2.3, "commit")]),
    # --- backchannels, hums and silence resume after the quiet hold
    ("backchannel resumes after the final and the hold",
     [(1.0, "voice"), (1.2, "partial", "mm-hm"), (1.6, "quiet"), (1.7, "final", "Mm-hm.")],
     [(1.0, "pause"), (1.9, "reset"), (1.9, "resume")]),
    ("hum spelled oddly is a backchannel", [(1.0, "voice"), (1.2, "partial", "M-M-H-M"), (1.5, "quiet")],
     [(1.0, "pause"), (2.0, "reset"), (2.0, "resume")]),  # no final: the 0.5 s grace after the stop
    ("configured phrase 'i see' is a backchannel", [(1.0, "voice"), (1.2, "partial", "I see."), (1.5, "quiet")],
     [(1.0, "pause"), (2.0, "reset"), (2.0, "resume")]),
    ("a cough with no words: resume after the grace", [(1.0, "voice"), (1.5, "quiet")],
     [(1.0, "pause"), (2.0, "reset"), (2.0, "resume")]),
    # --- a blip (over with the pause, no words) decides at once, after the hold
    ("blip resumes after the hold", [(1.0, "voice"), (1.1, "quiet")], [(1.0, "pause"), (1.4, "reset"), (1.4, "resume")]),
    ("Annie's own words keep a blip a blip", [(1.0, "voice"), (1.05, "partial", "once upon a"), (1.1, "quiet")],
     [(1.0, "pause"), (1.4, "reset"), (1.4, "resume")]),
    ("a hum is not a blip: it waits for the final", [(1.0, "voice"), (1.05, "partial", "mm"), (1.1, "quiet")],
     [(1.0, "pause"), (1.6, "reset"), (1.6, "resume")]),
    ("a final without real words decides at once", [(1.0, "voice"), (1.05, "partial", "mm"), (1.1, "quiet"),
                                                   (1.2, "final", "Mm.")],
     [(1.0, "pause"), (1.4, "reset"), (1.4, "resume")]),
    # --- a caller who pauses at a comma is one utterance
    ("comma after a blip: the voice returns inside the hold", [(1.0, "voice"), (1.1, "quiet"), (1.3, "voice")],
     [(1.0, "pause"), (2.3, "commit")]),
    ("comma at the window's end", [(1.0, "voice"), (1.5, "quiet"), (1.7, "voice")],
     [(1.0, "pause"), (2.3, "commit")]),
    ("voice back during the wait for a final: commit when the wait ends",
     [(1.0, "voice"), (2.0, "quiet"), (2.45, "voice")], [(1.0, "pause"), (3.2, "commit")]),
    # --- a long sound without words waits for its final, even past the window
    ("long sound: real words in a late final commit",
     [(1.0, "voice"), (1.9, "quiet"), (2.7, "final", "stop, call my daughter")], [(1.0, "pause"), (2.7, "commit")]),
    ("long sound: a late backchannel final resumes at once",
     [(1.0, "voice"), (1.9, "quiet"), (2.7, "final", "Mm-hm.")], [(1.0, "pause"), (2.7, "reset"), (2.7, "resume")]),
    ("long sound: no final resumes after the wait", [(1.0, "voice"), (1.9, "quiet")],
     [(1.0, "pause"), (3.1, "reset"), (3.1, "resume")]),
    # --- words after a resume
    ("late real words within the bound commit late", [(1.0, "voice"), (1.5, "quiet"), (2.2, "final", "stop call my daughter")],
     [(1.0, "pause"), (2.0, "reset"), (2.0, "resume"), (2.2, "commit")]),
    ("late real words past the bound are dropped", [(1.0, "voice"), (1.5, "quiet"), (4.1, "final", "stop call my daughter")],
     [(1.0, "pause"), (2.0, "reset"), (2.0, "resume"), (4.1, "reset")]),
    ("a late backchannel stays ignored", [(1.0, "voice"), (1.5, "quiet"), (2.2, "final", "mm-hm okay")],
     [(1.0, "pause"), (2.0, "reset"), (2.0, "resume"), (2.2, "reset")]),
    ("a late echo stays ignored", [(1.0, "voice"), (1.5, "quiet"), (2.2, "final", "once upon a time")],
     [(1.0, "pause"), (2.0, "reset"), (2.0, "resume"), (2.2, "reset")]),
    ("a blip's late words stand as decided", [(1.0, "voice"), (1.2, "quiet"), (1.8, "final", "and then I can")],
     [(1.0, "pause"), (1.5, "reset"), (1.5, "resume"), (1.8, "reset")]),
    ("late words never open a turn once Annie is done",
     [(1.0, "voice"), (1.5, "quiet"), (3.0, "bot_stopped"), (3.2, "partial", "I see"), (3.4, "final", "I see.")],
     [(1.0, "pause"), (2.0, "reset"), (2.0, "resume"), (3.2, "reset"), (3.4, "reset")]),
    ("the previous utterance's late final does not commit the next pause",
     [(1.0, "voice"), (1.1, "quiet"), (1.5, "voice"), (1.6, "final", "tree was going to make him"), (1.7, "quiet")],
     [(1.0, "pause"), (1.4, "reset"), (1.4, "resume"), (1.5, "pause"), (1.6, "reset"), (2.0, "reset"), (2.0, "resume")]),
    ("a waited utterance's late final commits even during the next pause",
     [(1.0, "voice"), (1.5, "quiet"), (2.1, "voice"), (2.2, "final", "stop call my daughter")],
     [(1.0, "pause"), (2.0, "reset"), (2.0, "resume"), (2.1, "pause"), (2.2, "commit")]),
    # --- when Annie is not speaking, a turn starts as usual
    ("voice while Annie is silent starts a turn", [(1.0, "bot_stopped"), (1.5, "voice")], [(1.5, "start_turn")]),
    ("words while Annie is silent start a turn", [(1.0, "bot_stopped"), (1.5, "partial", "hello")], [(1.5, "start_turn")]),
    # --- a turn started elsewhere ends the pending decision
    ("a turn started by another strategy cancels the decision", [(1.0, "voice"), (1.2, "turn")], [(1.0, "pause")]),
]


@pytest.mark.parametrize("events, expected", [pytest.param(e, x, id=name) for name, e, x in CASES])
def test_decision_table(events, expected):
    _, taken, _ = run(events)
    assert taken == expected


# The STT still had the caller's audio in flight when Annie began (the VAD split the question, the
# turn ended on the head's final, the tail's final is on its way): rule 4.
TAIL_CASES = [
    ("the tail's final while Annie answers is dropped, not an interruption", [(1.5, "final", "the day.")],
     [(1.5, "reset")]),
    ("the tail's partials too", [(1.2, "partial", "the"), (1.5, "final", "the day.")], [(1.2, "reset"), (1.5, "reset")]),
    ("after the tail, words with no voice are judged as before", [(1.5, "final", "the day."), (3.0, "final", "stop now")],
     [(1.5, "reset"), (3.0, "commit")]),
    ("the tail's final during the caller's next utterance leaves its pause to the rules",
     [(1.0, "voice"), (1.2, "final", "the day."), (1.5, "quiet")],
     [(1.0, "pause"), (1.2, "reset"), (2.0, "reset"), (2.0, "resume")]),
    ("the caller's own words over Annie still commit", [(1.0, "voice"), (1.2, "final", "the day."),
                                                         (1.4, "partial", "stop please")],
     [(1.0, "pause"), (1.2, "reset"), (1.4, "commit")]),
    ("a final after the caller's next VAD stop is hers, not the tail", [(1.0, "voice"), (1.5, "quiet"),
                                                                         (1.6, "final", "what time is it")],
     [(1.0, "pause"), (1.6, "commit")]),
]


@pytest.mark.parametrize("events, expected", [pytest.param(e, x, id=name) for name, e, x in TAIL_CASES])
def test_the_tail_of_the_answered_turn(events, expected):
    _, taken, _ = run(events, in_flight=True)
    assert taken == expected


# A slow segmented STT (Whisper on a busy CPU) still owes finals of the caller's earlier
# utterances when a new sound pauses Annie; it marks each final with its segment, and the
# strategy tells the core which came from before the pause (processors/stt_in_flight.py).
SEGMENT_CASES = [
    ("a final of an earlier segment does not commit the pause (the STT's backlog)",
     [(1.0, "voice"), (1.5, "quiet"), (1.52, "earlier final", "stop clean what time in it")],
     [(1.0, "pause"), (1.52, "reset"), (2.0, "reset"), (2.0, "resume")]),
    ("the same final unmarked commits, as before the mark (STTs that do not count segments)",
     [(1.0, "voice"), (1.5, "quiet"), (1.52, "final", "stop clean what time in it")],
     [(1.0, "pause"), (1.52, "commit")]),
    ("the sound's own words still commit after an earlier final",
     [(1.0, "voice"), (1.2, "earlier final", "stop clean"), (1.4, "partial", "what time is it")],
     [(1.0, "pause"), (1.2, "reset"), (1.4, "commit")]),
    ("an earlier final of an utterance resumed on is judged by the late-words rule",
     [(1.0, "voice"), (1.5, "quiet"), (2.1, "voice"), (2.5, "quiet"), (2.55, "earlier final", "stop call my daughter")],
     [(1.0, "pause"), (2.0, "reset"), (2.0, "resume"), (2.1, "pause"), (2.55, "commit")]),
]


@pytest.mark.parametrize("events, expected", [pytest.param(e, x, id=name) for name, e, x in SEGMENT_CASES])
def test_finals_of_earlier_segments(events, expected):
    _, taken, _ = run(events)
    assert taken == expected


def test_without_audio_in_flight_words_with_no_voice_commit_as_before():
    """What the rule changes, and only that: the same late final with nothing in flight at Annie's
    start commits (as every version before this rule did)."""
    _, taken, _ = run([(1.5, "final", "the day.")], in_flight=False)
    assert taken == [(1.5, "commit")]


def test_the_tail_is_not_owed_once_annie_stops():
    core = BargeInCore()
    core.bot_started(0.0, caller_audio_in_flight=True)
    core.bot_stopped(1.0)
    core.bot_started(2.0)
    assert [ACTION_NAMES[type(a)] for a in core.words(2.5, "the day.", final=True).actions] == ["commit"]


def test_decisions_record_what_was_decided_and_when():
    core, _, _ = run([(1.0, "voice"), (1.5, "quiet"), (2.2, "final", "stop call my daughter")])
    assert [(d, round(s, 3)) for d, s in core.decisions] == [("resume", 1.0), ("commit late", 0.2)]


def test_frames_that_commit_or_start_a_turn_stop_the_other_strategies():
    _, _, flows = run([(1.0, "voice"), (1.2, "partial", "mm"), (1.4, "partial", "stop")])
    assert flows == [Flow.CONTINUE, Flow.CONTINUE, Flow.STOP]
    _, _, flows = run([(1.0, "voice")], speaking=False)
    assert flows == [Flow.STOP]


def test_states_are_named():
    core = BargeInCore()
    core.bot_started(0.0)
    assert core.phase is Phase.LISTENING
    assert core.voice_started(1.0).actions == [Pause()]
    assert core.phase is Phase.PAUSED and core.wake_at is None
    core.playback_paused(1.02)  # the sink took 20 ms to flush: the window starts there
    assert core.wake_at == pytest.approx(2.32)
    core.voice_stopped(1.1)
    core.tick(1.5)
    assert core.phase is Phase.RESUMED and core.wake_at is None
    core.voice_started(3.0)
    assert core.phase is Phase.PAUSED


def test_an_early_or_stray_tick_does_nothing():
    core = BargeInCore()
    core.bot_started(0.0)
    assert core.tick(0.5).actions == []
    core.voice_started(1.0)
    core.playback_paused(1.0)
    assert core.tick(1.5).actions == [WakeAt(2.3)]
    assert core.phase is Phase.PAUSED


@pytest.mark.parametrize("window_s, quiet_s", [(0.6, 0.1), (3.0, 1.0)])
def test_the_thresholds_come_from_the_params(window_s, quiet_s):
    params = replace(P, window_s=window_s, resume_quiet_s=quiet_s)
    _, taken, _ = run([(1.0, "voice")], params)
    assert taken == [(1.0, "pause"), (round(1.0 + window_s, 3), "commit")]
    _, taken, _ = run([(1.0, "voice"), (1.1, "quiet")], params)
    assert taken[-1] == (round(1.1 + quiet_s, 3), "resume")


def test_params_from_the_settings(make_settings):
    settings = make_settings(enable_barge_in=True, barge_in_decide_ms=900, barge_in_resume_quiet_ms=200,
                             resume_backup_ms=120, backchannel_words="mm-hm, got it")
    params = BargeInParams.from_settings(settings)
    assert (params.window_s, params.resume_quiet_s, params.resume_backup_ms) == (0.9, 0.2, 120)
    assert params.backchannels == backchannel_words(["mm-hm", "got it"]) == {"mm", "hm", "got", "it"}


def test_the_default_backchannels_are_the_settings_default(make_settings):
    assert BargeInParams.from_settings(make_settings()).backchannels == P.backchannels


def test_the_window_and_the_blip_count_from_when_annie_is_silent():
    """A sink that takes 20 ms to flush: a sound 0.31 s after the voice frame but 0.29 s after the
    silence is a blip (Annie's echo stops when she does, not when the frame came)."""
    core = BargeInCore()
    core.bot_started(0.0)
    assert core.voice_started(1.0).actions == [Pause()]
    core.playback_paused(1.02)
    core.voice_stopped(1.31)
    assert core.wake_at == 1.31  # a blip decides at once (after the quiet hold)
    assert core.tick(1.31).actions == [WakeAt(pytest.approx(1.61))]


def test_a_pause_that_completes_after_the_decision_changes_nothing():
    """The caller's words committed while the sink was still flushing: the late 'paused' is ignored."""
    core = BargeInCore()
    core.bot_started(0.0)
    core.voice_started(1.0)
    assert [type(a) for a in core.words(1.01, "stop", final=False).actions] == [Commit]
    assert core.playback_paused(1.02).actions == [] and core.wake_at is None


def test_the_caller_voice_gate_resumes_on_another_voice_and_never_later():
    core = BargeInCore()
    core.bot_started(0.0)
    core.voice_started(1.0)
    core.playback_paused(1.0)
    assert core.voice_verdict(1.6, not_caller=False).actions == []  # the caller, or unsure: the rules decide
    assert core.phase is Phase.PAUSED and core.wake_at == pytest.approx(2.3)
    out = core.voice_verdict(1.7, not_caller=True)  # the TV: resume now, while it still plays
    assert [ACTION_NAMES[type(a)] for a in out.actions] == ["reset", "resume"] and core.wake_at is None
    assert [ACTION_NAMES[type(a)] for a in core.words(1.9, "breaking news tonight", final=False).actions] == ["reset"]
    assert core.voice_verdict(2.0, not_caller=True).actions == [], "a verdict after the decision changes nothing"
    core.voice_started(3.0)  # the caller's own next utterance pauses as usual
    assert core.phase is Phase.PAUSED


def test_a_gate_verdict_after_a_commit_changes_nothing():
    core, taken, _ = run([(1.0, "voice"), (1.2, "partial", "stop please")])
    assert core.voice_verdict(1.5, not_caller=True).actions == []


def test_a_late_final_counts_from_its_own_utterances_resume_not_a_later_one():
    """The previous utterance lasted, got no words in time and was resumed on at 2.1 (WAITED); a
    new sound paused Annie and the gate resumed on it at 4.6 while it still played; the first
    utterance's final comes at 4.9, 2.8 s after its own resume: past ``late_words_s`` (2.0), so
    it does not commit. Before the core kept each resume with its state (until 944eb36) the time
    was counted from the latest resume (0.3 s) and these words committed."""
    core, taken, _ = run([(1.0, "voice"), (1.6, "quiet")], until=2.5)
    assert taken == [(1.0, "pause"), (2.1, "reset"), (2.1, "resume")]
    core.voice_started(4.0)
    core.playback_paused(4.0)
    assert [ACTION_NAMES[type(a)] for a in core.voice_verdict(4.6, not_caller=True).actions] == ["reset", "resume"]
    out = core.words(4.9, "what is the weather like", final=True, annies_words=ECHO)
    assert [ACTION_NAMES[type(a)] for a in out.actions] == ["reset"]
    # Within late_words_s of its own resume the same final still commits, as before.
    core, _, _ = run([(1.0, "voice"), (1.6, "quiet")], until=2.5)
    core.voice_started(3.0)
    core.playback_paused(3.0)
    core.voice_verdict(3.6, not_caller=True)
    out = core.words(3.9, "what is the weather like", final=True, annies_words=ECHO)
    assert [ACTION_NAMES[type(a)] for a in out.actions] == ["commit"]
