"""Errors a user can act on: each message is one line naming the input and what is allowed."""


class InputError(ValueError):
    """A request input is invalid; the message starts with the input's name."""


class WeightsError(RuntimeError):
    """The model folder is missing, incomplete or unsafe to load."""


class SafetyError(RuntimeError):
    """Every output of a prediction was flagged by the safety checker; the message says what to try."""
