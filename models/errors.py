"""Errors a user can act on: each message is one line naming the input (or file, or setting) and what is allowed.

Every such error derives from ProjectError, which carries the exit status a command line gives it, so that entry
points map errors to statuses in one place (`except ProjectError as error: return error.exit_code`).
"""


class ProjectError(Exception):
    """An error whose message is meant for the user as it is; exit_code is the status a command exits with."""

    exit_code = 1


class InputError(ProjectError, ValueError):
    """A request input is invalid; the message starts with the input's name."""

    exit_code = 2


class SettingError(ProjectError, ValueError):
    """An environment variable holds a value it cannot take; the message starts with the variable's name."""

    exit_code = 2


class WeightsError(ProjectError):
    """The model folder is missing, incomplete or unsafe to load."""


class FolderError(ProjectError):
    """A folder a command would replace holds something else; the message names it."""


class DownloadError(ProjectError):
    """Building the weights folder failed in a way the user can fix (network, revision, disk)."""


class SafetyError(ProjectError):
    """Every output of a prediction was flagged by the safety checker; the message says what to try."""


class NumericError(ProjectError):
    """An edit produced NaN or infinite values; nothing is returned, and the message says what to try."""


class NotEnoughMemoryError(ProjectError):
    """A request needs more memory than there is; the message names what to lower."""
