"""Chatterbox TTS over HTTP streaming: the pipecat service, its WAV stream parser, a smoke tool."""
