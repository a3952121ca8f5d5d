"""Error types that the command line maps to exit codes.

`InputError` is anything the user can fix: a bad config key or value, a bad
command-line argument, a malformed input file or row. `q2e` prints its message
as one line on stderr and exits with code 2. Every other exception exits with 1.
"""

from __future__ import annotations


class InputError(ValueError):
    """A problem with user input (config, arguments, data) that the user can fix.

    The message names what is wrong, where (dotted config field, or file, row
    and column) and, where one exists, the fix.
    """


class ConfigError(InputError):
    """A bad configuration key or value."""


class DataError(InputError):
    """A bad input file or row."""
