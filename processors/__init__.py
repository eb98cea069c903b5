"""Pipecat services and the synchronous engines under them."""
