"""Barge-in: the caller's voice while Annie speaks pauses her, then her words decide.

``core`` is the decision (pure, tested by tables), ``strategy`` its pipecat adapter (a user-turn
start strategy), ``recording`` what a decision saw and did, and its replay through the core.
"""
