"""Errors shared by the components under the agent."""


class SetupError(Exception):
    """A component cannot start because of one of its settings.

    The message is one sentence that names the setting (e.g. ``STT_MODEL_PATH``) and says what
    is allowed or how to fix it; ``agent.phone`` prints it and exits with status 2.
    """
