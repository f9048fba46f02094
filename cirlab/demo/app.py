"""`cirlab-demo RUN`: the command. Checks its arguments, loads the run, and serves the page on this
machine only unless told otherwise (a warning when it is served to the network without a login)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import signal
import socket
import sys
import time
from pathlib import Path

from cirlab.demo.backend import load_backend, set_query_threads
from cirlab.demo.page import CSS
from cirlab.demo.ui import ShownImages, build_app
from cirlab.errors import CirlabError, exit_on_user_error


def is_loopback(host: str) -> bool:
    """Whether `host` serves this machine only (anything else reaches the network)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """--auth / CIRLAB_DEMO_AUTH: USER:PASSWORD (the password may hold ':'), or None for no login."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise CirlabError("--auth (or CIRLAB_DEMO_AUTH) needs USER:PASSWORD, e.g. --auth alice:s3cret")
    return user, password


def exposure_warning(host: str, auth) -> str | None:
    """The line printed when the page is served to the network without a login."""
    if is_loopback(host) or auth:
        return None
    return (
        f"cirlab-demo: warning: --host {host} serves this page to the network and it has no authentication: "
        "anyone who reaches the port can search the gallery and upload images (set CIRLAB_DEMO_AUTH=USER:PASSWORD "
        "or --auth USER:PASSWORD for a login, or keep --host 127.0.0.1)"
    )


def bind_error(host: str, port: int) -> OSError | None:
    """Why the page cannot be served on host:port (a port another server holds, an address not this
    machine's), or None when it can."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as err:
        return err
    return None


def launch(app, theme, shown: ShownImages, host: str, port: int, auth=None, block: bool = True) -> None:
    """Serve the page. Gradio may serve only the copies in `shown.folder` (and its own uploads and
    cache): no folder of the user's. A port or host it cannot serve on is a CirlabError naming them (Gradio
    raises an OSError, "Cannot find empty port")."""
    unusable = bind_error(host, port)  # asked before Gradio binds: afterwards the port is its own
    try:
        app.launch(
            server_name=host,
            server_port=port,
            share=False,
            quiet=True,
            show_error=True,
            ssr_mode=False,
            css=CSS,
            theme=theme,
            allowed_paths=[str(shown.folder)],
            auth=auth,
            prevent_thread_lock=not block,
        )
    except OSError as err:
        if unusable is None:  # not the address: shown as it is
            raise
        why = unusable
        if unusable.errno == errno.EADDRINUSE:
            why = f"port {port} is taken (another cirlab-demo or server?)"
        raise CirlabError(
            f"cannot serve on {host}:{port}: {why}. Pick a free port with --port N (e.g. --port 7861), "
            "or check --host (an address of this machine; default 127.0.0.1)"
        ) from err


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cirlab-demo", description="Interactive retrieval page over a finished cirlab run."
    )
    parser.add_argument("run", help="run folder (or a stage checkpoint .ckpt)")
    parser.add_argument(
        "--gallery",
        default=None,
        help="folder of gallery images (searched recursively); default: the run's own test gallery",
    )
    parser.add_argument("--port", type=int, default=7860, help="default 7860")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="default 127.0.0.1 (this machine only); another address serves the network (see --auth)",
    )
    parser.add_argument(
        "--auth",
        default=os.environ.get("CIRLAB_DEMO_AUTH"),
        metavar="USER:PASSWORD",
        help="a login for the page (default: $CIRLAB_DEMO_AUTH, which keeps the password off the command "
        "line; none when unset)",
    )
    parser.add_argument("-k", type=int, default=10, help="results shown at first (default 10)")
    parser.add_argument("--device", default=None, help="e.g. cuda; default cpu")
    parser.add_argument(
        "--query-threads",
        type=int,
        default=1,
        help="CPU threads per query after start-up (default 1: one small query gains nothing "
        "from more, and on a busy machine they wait on each other; 0 keeps torch's default)",
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> Path:
    """The run folder, once the arguments and the optional Gradio install are known to be usable."""
    if args.k < 1:
        raise CirlabError(f"-k {args.k}: need at least 1")
    parse_auth(args.auth)
    run = Path(args.run)
    if not run.exists():
        raise CirlabError(f"{run} does not exist: give a run folder (outputs/runs/<run>)")
    if run.is_dir() and not (run / ".hydra" / "config.yaml").is_file():
        raise CirlabError(
            f"{run} is not a cirlab run folder (no .hydra/config.yaml): give outputs/runs/<run>"
        )
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CirlabError("the demo needs Gradio: pip install 'cirlab[demo]'") from None
    return run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    with exit_on_user_error("cirlab-demo"):
        run = check_args(args)
        backend = load_backend(run, args.gallery, args.device)
        set_query_threads(args.query_threads)
    auth = parse_auth(args.auth)
    shown = ShownImages()
    # Gradio's own copies of what it serves go with ours (removed at exit), not into /tmp/gradio for good
    gradio_dir_is_ours = "GRADIO_TEMP_DIR" not in os.environ
    if gradio_dir_is_ours:
        os.environ["GRADIO_TEMP_DIR"] = str(shown.folder / "gradio")
    try:
        app, theme = build_app(backend, run, shown, args.k)
        warning = exposure_warning(args.host, auth)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        print(
            f"cirlab-demo: serving http://{args.host}:{args.port} (start-up {time.perf_counter() - start:.1f} s; "
            "Ctrl-C stops)",
            flush=True,
        )
        # a SIGTERM stops the server as Ctrl-C does, so the copies are removed below
        before = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            with exit_on_user_error("cirlab-demo"):
                launch(app, theme, shown, args.host, args.port, auth)
        finally:
            signal.signal(signal.SIGTERM, before)
    finally:
        if gradio_dir_is_ours:  # (main may run inside a longer process: a test, a notebook)
            os.environ.pop("GRADIO_TEMP_DIR", None)
        shown.close()
