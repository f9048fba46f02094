"""One error type for everything a user can fix; the commands print it without a traceback."""

from __future__ import annotations

import contextlib
import sys


class CirlabError(Exception):
    """A problem with the user's input, data or configuration. The message says what to do."""


def user_cause(err: BaseException) -> CirlabError | None:
    """The CirlabError behind `err`: itself, or the one Hydra's instantiate wrapped (at any depth: a target
    may instantiate others); None for anything else (a bug, shown with its traceback). The one unwrap the
    `cirlab`, `cirlab-demo` and `cirlab-query` commands and `cirlab.load` share."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err if isinstance(err, CirlabError) else None


@contextlib.contextmanager
def exit_on_user_error(prog: str):
    """A command's body: what the user can fix (`user_cause`) ends it with one line, `<prog> error:
    <message>` on stderr, and exit code 2; anything else is a bug and propagates with its traceback."""
    try:
        yield
    except Exception as err:
        cause = user_cause(err)
        if cause is None:
            raise
        print(f"{prog} error: {cause}", file=sys.stderr)
        sys.exit(2)
