"""The error type for mistakes in a user's input (data, paths, settings).

The CLI turns these into a one-line message and exit status 2 instead of a traceback;
anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message says what, where, and what to try."""
