"""Errors a user can fix. The CLI prints their message without a traceback (unless ``--debug``)."""


class AutosegError(Exception):
    """A problem with the user's input or set-up; the message says what and how to fix it."""


class SchemaError(AutosegError):
    """A JSON file does not match the schema it is read as."""


class TrainingInterrupted(AutosegError):
    """Ctrl-C or SIGTERM during training; the state was saved and ``--resume`` continues it."""
