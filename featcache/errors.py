"""User-facing errors.

Every problem a user can fix is raised as :class:`FeatcacheError` with one message that names the
problem and the fix. The command-line front ends print it without a traceback and exit non-zero.
"""


class FeatcacheError(Exception):
    """A problem with the user's input or environment, explained in one message."""

    exit_code = 2
