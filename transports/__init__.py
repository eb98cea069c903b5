"""Audio transports (PulseAudio) and the private PulseAudio rig used by tests and benchmarks."""
