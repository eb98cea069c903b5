"""Lines to test on: the private PulseAudio echo-cancel rig, the simulated line, and speech to play.

Not used by a real call; tests, the demo and the benchmarks share them.
"""
