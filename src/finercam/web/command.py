"""``finercam web``: serve the demo page on this machine (default http://127.0.0.1:7860), offline.

With no ``--model`` it offers the embedded CNN and ViT and, in a concepts tab, the embedded CLIP, with synthetic
birds as examples. ``--model SPEC`` (with ``--weights``, ``--head``, ``--preprocess`` as for ``finercam explain``)
offers that model instead; ``--clip SPEC`` another CLIP, ``--no-concepts`` none. Every model is loaded before the
page is served, so a bad spec or file is reported at once, as one line.

Wired into :mod:`finercam.cli` by ``add_commands(commands)`` and ``dispatch(args)``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import socket
import tempfile
import time
from typing import Any

from finercam.argtypes import whole_number

COMMAND = "web"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
EXAMPLES = 6


def _port(text: str) -> int:
    rule = "must be a port number from 1 to 65535"
    value = whole_number(text, rule)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{rule}, got {text}")
    return value


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``web`` on the ``finercam`` command line's sub-parsers."""
    from finercam.argtypes import HEAD_HELP, MODEL_HELP, PREPROCESS_HELP, WEIGHTS_HELP

    parser = subparsers.add_parser(
        COMMAND, help="serve the web demo: explain uploaded images and localize text concepts in a browser",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--model", help=MODEL_HELP + " (default: embedded:cnn and embedded:vit)")
    parser.add_argument("--weights", help=WEIGHTS_HELP + " (with --model)")
    parser.add_argument("--head", help=HEAD_HELP + " (with --model)")
    parser.add_argument("--preprocess", help=PREPROCESS_HELP + " (with --model)")
    concepts = parser.add_mutually_exclusive_group()
    concepts.add_argument("--clip", default="embedded:clip",
                          help="CLIP model of the concepts tab: embedded:clip (default), open_clip:ARCH@CHECKPOINT or "
                               "hf:DIR")
    concepts.add_argument("--no-concepts", action="store_true", help="no concepts tab")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to serve on (default {DEFAULT_HOST}: this machine only; 0.0.0.0: every "
                             "interface)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when present)")


def check_address(host: str, port: int) -> None:
    """Refuse, before any model is loaded, a ``--host`` that is no address of this machine and a ``--port`` in use
    (by binding a socket to them once).

    Raises:
        InvalidArgumentError: the host is empty, an IPv6 address without brackets (gradio takes ``[::1]``), not a
            known name, not this machine's, or the port is taken; the message says which.
    """
    from finercam.errors import InvalidArgumentError

    accepted = ("give an address of this machine: 127.0.0.1 (this machine only), 0.0.0.0 (every interface), or an "
                "IPv6 address in brackets, e.g. [::1]")
    if not host.strip():
        raise InvalidArgumentError(f"--host is empty; {accepted}")
    bracketed = host.startswith("[") and host.endswith("]")
    if ":" in host and not bracketed:
        raise InvalidArgumentError(f"--host {host!r} is an IPv6 address: write it in brackets, [{host}]")
    name, family_asked = (host[1:-1], socket.AF_INET6) if bracketed else (host, socket.AF_INET)
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(name, port, family_asked, socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise InvalidArgumentError(f"--host {host!r} is not an address or a known host name ({reason}); {accepted}") \
            from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closing port is free
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise InvalidArgumentError(
                    f"port {port} is in use on {host}; give another --port, or stop what is using it"
                ) from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise InvalidArgumentError(f"--host {host!r} is not an address of this machine; {accepted}") from None
            raise InvalidArgumentError(f"cannot serve on {host}:{port} ({error.strerror or error})") from None


def serve(app: Any, host: str, port: int) -> None:
    """Serve ``app`` until Ctrl-C, saying where once it listens (tests replace this); the server is closed however
    it stops.

    Raises:
        InvalidArgumentError: the port was taken since :func:`check_address` (or gradio cannot serve there).
    """
    from finercam.errors import InvalidArgumentError

    try:
        app.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, show_error=True,
                                                      quiet=True, prevent_thread_lock=True)
        shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
        print(f"finercam web: serving on http://{shown}:{port} (Ctrl-C to stop)", flush=True)
        while True:  # not gradio's block_thread(): it swallows Ctrl-C, so the command would exit 0 with its own lines
            time.sleep(0.5)
    except OSError as error:
        raise InvalidArgumentError(
            f"cannot serve on {host}:{port} ({error}); give another --port, or stop what is using it"
        ) from None
    finally:
        with contextlib.redirect_stdout(io.StringIO()):  # gradio's "Closing server running on port" line
            app.close()


def run_web(args: argparse.Namespace) -> int:
    """``finercam web``; raises finercam errors (printed as one line by :mod:`finercam.cli`)."""
    from finercam.errors import InvalidArgumentError
    from finercam.runtime import resolve_device
    from finercam.web import DEFAULT_MODELS, clip_shelf, example_birds, model_shelf
    from finercam.web.app import build_app

    if args.model is None:
        given = [flag for flag, value in (("--weights", args.weights), ("--head", args.head),
                                           ("--preprocess", args.preprocess)) if value is not None]
        if given:
            raise InvalidArgumentError(f"{given[0]} needs --model: it applies to the model given there")
    check_address(args.host, args.port)  # before the models load: a bad address is said at once
    device = str(resolve_device(args.device))
    models = model_shelf([args.model] if args.model else DEFAULT_MODELS, weights=args.weights, head=args.head,
                         preprocess=args.preprocess, device=device)
    clips = None if args.no_concepts else clip_shelf([args.clip], device=device)
    for label in models.labels:  # load everything now: a bad spec is one line here, not an error on the page
        print(f"loading {label} ...", flush=True)
        models.get(label)
    if clips is not None:
        print(f"loading {args.clip} ...", flush=True)
        clips.get(args.clip)
    with tempfile.TemporaryDirectory(prefix="finercam-web-") as folder:
        examples = example_birds(folder, EXAMPLES)
        serve(build_app(models, clips, examples), args.host, args.port)
    return 0


def dispatch(args: argparse.Namespace) -> int:
    """Run the ``web`` command from parsed arguments; returns the exit status."""
    return run_web(args)
