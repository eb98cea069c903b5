"""Annie, the phone agent: configuration, pipeline assembly and the process entry point."""
