"""The `mactuner` command.

    mactuner studio [--host 127.0.0.1] [--port 7860] [--root DIR] [--share] [--auth USER:PASS] [--no-auth]
    mactuner device                      print this machine's device profile
    mactuner models [--root DIR]         list local models
    mactuner info MODEL_ID [--token T]   Hub info without download
    mactuner download MODEL_ID [--token T]

Only `studio` imports gradio (lazily), so the other subcommands stay light.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from .errors import MacTunerError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, share: bool, auth: str | None, no_auth: bool) -> str | None:
    """Why the studio must not start as asked, or None. A public link or a non-loopback host needs --auth
    (or an explicit --no-auth: whoever has the link can use the studio, its files and its models)."""
    if auth is not None:
        user, sep, pwd = auth.partition(":")
        if not sep or not user or not pwd:
            return "--auth expects USER:PASS (both non-empty)."
        return None
    if no_auth:
        return None
    if share:
        return ("--share makes a public link: anyone who has it can use this studio and this machine's files. "
                "Add --auth USER:PASS, or --no-auth if you really want it open.")
    if not _is_loopback(host):
        return (f"--host {host} exposes the studio beyond this machine. Add --auth USER:PASS, or --no-auth if "
                "the network is trusted.")
    return None


def _studio(args) -> int:
    why = check_exposure(args.host, args.share, args.auth, args.no_auth)
    if why:
        print(f"mactuner: refusing to start: {why}", file=sys.stderr)
        return 2
    if args.max_upload_mb <= 0:
        print("mactuner: --max-upload-mb must be positive", file=sys.stderr)
        return 2
    from .models import REGISTRY, load_default_in_background  # noqa: PLC0415
    from .workspace import Workspace  # noqa: PLC0415

    ws = Workspace.open(args.root)
    if not args.no_default:  # overlaps the model load with gradio's import (~1.5 s)
        load_default_in_background(ws, REGISTRY, prepare_hf=not args.no_prepare_hf)
    from studio.app import serve  # noqa: PLC0415 - gradio only for this subcommand
    from studio.handlers import Context  # noqa: PLC0415

    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    serve(host=args.host, port=args.port, share=args.share, auth=auth, max_upload_mb=args.max_upload_mb,
          load_default=False, ctx=Context(ws, REGISTRY, prepare_hf=not args.no_prepare_hf))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mactuner", description="MacTuner: download, fine-tune, quantize small LLMs locally.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("studio", help="serve the browser studio")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--root", default=None, help="workspace folder (default ~/.mactuner, or $MACTUNER_HOME)")
    s.add_argument("--share", action="store_true", help="also serve on a public gradio.live link (needs --auth)")
    s.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    s.add_argument("--no-auth", action="store_true", help="allow --share / a non-loopback host without a login")
    s.add_argument("--max-upload-mb", type=int, default=500, help="largest file a browser may upload (MB)")
    s.add_argument("--no-default", action="store_true", help="do not load the embedded default model at start")
    s.add_argument("--no-prepare-hf", action="store_true",
                   help="do not prepare the default model's HF copy (for training) in the background")
    s.set_defaults(fn=_studio)

    d = sub.add_parser("device", help="print the device profile")
    d.set_defaults(fn=lambda a: print(json.dumps(__import__("pipelines.device").device.profile().as_dict(), indent=2)) or 0)

    m = sub.add_parser("models", help="list local models")
    m.add_argument("--root", default=None)

    def _models(a):
        from .models import list_local_models  # noqa: PLC0415
        from .workspace import Workspace  # noqa: PLC0415

        print(json.dumps(list_local_models(Workspace.open(a.root)), indent=2))
        return 0

    m.set_defaults(fn=_models)

    i = sub.add_parser("info", help="Hub info of a model, without downloading")
    i.add_argument("model_id")
    i.add_argument("--token", default=None)
    i.set_defaults(fn=lambda a: print(json.dumps(__import__("pipelines.models").models.hub_info(a.model_id, a.token).as_dict(), indent=2)) or 0)

    dl = sub.add_parser("download", help="download a model from the Hub into the HF cache")
    dl.add_argument("model_id")
    dl.add_argument("--token", default=None)

    def _download(a):
        from .models import download  # noqa: PLC0415

        print(download(a.model_id, a.token, lambda f, msg: print(f"{100 * f:5.1f}%  {msg}", file=sys.stderr)))
        return 0

    dl.set_defaults(fn=_download)

    args = ap.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except MacTunerError as e:
        print(f"mactuner: {e.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
