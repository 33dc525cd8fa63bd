"""One exception type for problems a user can fix; the CLI prints it as one line and exits 2."""


class TwostepError(Exception):
    """A user-facing error: the message names the problem and what to do about it."""
