"""The error type for mistakes in a user's input (data, paths, settings).

The CLI turns these into a one-line message and exit status 2 instead of a traceback;
anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message says what, where, and what to try."""


def check_minimum(key: str, value: float | None, minimum: float, *, inclusive: bool = True) -> None:
    """The rule for a numeric setting with a lower bound, checked when a module or data module is
    built (before any model loads): raise :class:`UserInputError` ``'<key> must be >= <minimum>,
    got <value>'`` (``> minimum`` when not ``inclusive``). None (unset) passes; NaN fails."""
    if value is None or (value >= minimum if inclusive else value > minimum):
        return
    raise UserInputError(f"{key} must be {'>=' if inclusive else '>'} {minimum}, got {value}")
