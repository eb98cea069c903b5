"""Local stand-in servers (LLM, TTS) that speak the real servers' wire protocols.

Used by the tests, the benchmarks and the simulated call; they listen on 127.0.0.1 only.
"""
