"""One error type for everything a user can fix; the CLI prints it without a traceback."""


class CirlabError(Exception):
    """A problem with the user's input, data or configuration. The message says what to do."""
