"""`fastinst-hf demo`: the Gradio demo app (image, video and webcam tabs) in the browser.

Needs the optional extra `pip install "fastinst-hf[demo]"`; gradio is imported inside `run()` so that the other
commands (and `--help`) neither need it nor wait for it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

from ..utils.arguments import HelpFormatter
from ..utils.errors import InputError
from .options import add_device_argument, add_model_argument


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="serve the demo app (images, videos, webcam) in the browser",
        description="Serve the Gradio demo app: an image tab, a video tab and a webcam tab (needs the `demo` extra).",
        formatter_class=HelpFormatter,
    )
    add_model_argument(parser)
    add_device_argument(parser)
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.set_defaults(run=run)


def validate(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    if importlib.util.find_spec("gradio") is None:
        raise InputError('the demo needs gradio: pip install "fastinst-hf[demo]"')


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    from ..demo.app import build_app

    app = build_app(args.model, device=args.device)
    print(f"fastinst-hf demo: serving on http://{args.host}:{args.port}", flush=True)
    try:
        app.queue().launch(server_name=args.host, server_port=args.port, show_error=True, quiet=True)
    except OSError as error:  # gradio: "Cannot find empty port in range ..."
        raise InputError(f"--host {args.host} --port {args.port}: cannot serve there: {error}") from error
    return 0
