"""The simulated call (``python -m agent.phone --simulate``): its line, servers and stand-ins."""
