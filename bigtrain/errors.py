"""The one exception type for bad user input.

Anything raised as `UserError` reaches the CLI, which prints `error: <message>` on one line to
stderr and exits with code 2: no traceback, since the problem is in the input, not in bigtrain.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, data, arguments). The message names the problem and where."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line: the CLI prints it after "error: ".
        super().__init__(" ".join(str(message).split("\n")))
