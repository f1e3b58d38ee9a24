"""The `mactuner` command.

    mactuner studio [--host 127.0.0.1] [--port 7860] [--root DIR] [--share] [--auth USER:PASS] [--no-auth]
    mactuner device                      print this machine's device profile
    mactuner models [--root DIR]         list local models
    mactuner info MODEL_ID [--token T]   Hub info without download
    mactuner download MODEL_ID [--token T]
    mactuner train CONFIG.yaml [--root DIR] [--name N] [--nproc 2] [--detach]   queue a LoRA run and follow it
    mactuner train --example             print a TrainConfig YAML with every setting and its help
    mactuner train CONFIG.yaml --machines N --name RUN [--head IP]   the commands for N machines (torchrun,
                                         accelerate, SkyPilot); under those launchers `train`/`resume` is one process
    mactuner runs [--root DIR]           list training runs
    mactuner stop RUN [--root DIR]       stop a run at its next step end (it saves a checkpoint)
    mactuner resume RUN [--checkpoint step-N] [--root DIR] [--detach]
    mactuner export run SOURCE [--name N] [--outtype f16] [--quant Q8_0]... [--no-validate] [--base-model B]
                                         merge (if an adapter) -> GGUF -> quantize -> validate -> Modelfiles
    mactuner export merge ADAPTER [--base-model B] [--name N]      exports/<name>/merged/
    mactuner export convert HF_DIR [--outtype f16] [--name N]      exports/<name>/<name>-f16.gguf
    mactuner export quantize GGUF --quant Q8_0 [--quant Q4_K_M]    beside the GGUF
    mactuner export validate GGUF [--hf DIR] [--base-model DIR] [--prompt TEXT]
    mactuner export list | architectures
    mactuner push EXPORT REPO_ID [--token T] [--public] [--what adapter,merged,gguf]   publish an export to the Hub
    mactuner rag list [--root DIR]                                 knowledge bases
    mactuner rag ingest KB FILE... [--create] [--password P]      add PDF / .txt / .md documents
    mactuner rag search KB "query" [--top-k 5] [--mode hybrid]    ranked passages (no model)
    mactuner rag delete KB | rebuild KB                          delete one; make a damaged one again from its documents
    mactuner rag ask KB "question" [--model GGUF_OR_HF_DIR]       a cited answer (default: the embedded model)

Only `studio` (pipelines.studio_cmd) imports gradio (lazily), so the other subcommands stay light.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import studio_cmd
from .errors import MacTunerError
from .workspace import Workspace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mactuner", description="MacTuner: download, fine-tune, quantize small LLMs locally.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    studio_cmd.add_parser(sub)

    d = sub.add_parser("device", help="print the device profile")
    d.set_defaults(fn=lambda a: print(json.dumps(__import__("pipelines.device").device.profile().as_dict(), indent=2)) or 0)

    m = sub.add_parser("models", help="list local models")
    m.add_argument("--root", default=None)

    def _models(a):
        from .models import list_local_models  # noqa: PLC0415

        print(json.dumps(list_local_models(Workspace.open(a.root)), indent=2))
        return 0

    m.set_defaults(fn=_models)

    i = sub.add_parser("info", help="Hub info of a model, without downloading")
    i.add_argument("model_id")
    i.add_argument("--token", default=None)
    i.set_defaults(fn=lambda a: print(json.dumps(__import__("pipelines.models").hub.hub_info(a.model_id, a.token).as_dict(), indent=2)) or 0)

    dl = sub.add_parser("download", help="download a model from the Hub into the HF cache")
    dl.add_argument("model_id")
    dl.add_argument("--token", default=None)

    def _download(a):
        from .hub import download  # noqa: PLC0415

        print(download(a.model_id, a.token, lambda f, msg: print(f"{100 * f:5.1f}%  {msg}", file=sys.stderr)))
        return 0

    dl.set_defaults(fn=_download)

    _add_training(sub)
    _add_export(sub)
    from .export.push import add_cli as _add_push  # noqa: PLC0415 - light: huggingface_hub only when pushing

    _add_push(sub)
    _add_rag(sub)

    args = ap.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except MacTunerError as e:
        print(f"mactuner: {e.message}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------------------------ training


def _example_config() -> str:
    from .training import TrainConfig  # noqa: PLC0415

    helps = TrainConfig.help()
    out = ["# MacTuner training config: mactuner train THIS.yaml"]
    for line in TrainConfig().to_yaml().splitlines():
        key = line.split(":", 1)[0]
        if key in helps:
            out.append(f"# {helps[key]}")
        out.append(line)
    return "\n".join(out) + "\n"


def _print_row(r: dict) -> None:
    if r.get("event"):
        print(f"-- {r['event']} from step {r.get('step')}", flush=True)
        return
    ev = f"  eval {r['eval_loss']:.4f}" if "eval_loss" in r else ""
    print(f"step {r['step']}/{r['total_steps']}  loss {r['loss']:.4f}{ev}  lr {r['learning_rate']:.2e}  "
          f"{r['tokens_per_s']:.0f} tok/s", flush=True)


def _follow(run, poll: float = 1.0) -> int:
    """Print the run's metrics as they come until it ends (runs.follow); Ctrl-C asks it to stop (a second one leaves
    it running)."""
    from . import runs  # noqa: PLC0415 - the training modules load only for the commands that need them

    printed, said, stopping = 0, None, False
    while True:
        try:
            seen = 0
            for up in runs.follow(run, interval=poll):  # after a Ctrl-C a new follower repeats the rows: skip them
                for r in up.rows:
                    seen += 1
                    if seen > printed:
                        printed = seen
                        _print_row(r)
                st = up.status
                if st.state != said and st.state != "running":
                    print(f"[{run.name}] {st.state}" + (f": {st.reason}" if st.reason else ""), flush=True)
                said = st.state
                if up.final:
                    return 0 if st.state in ("finished", "stopped") else 1
        except KeyboardInterrupt:
            if stopping:
                print(f"Leaving {run.name} running; `mactuner stop {run.name}` stops it.", file=sys.stderr)
                return 130
            stopping = True
            runs.stop(run)
            print("Stopping at the end of this step (Ctrl-C again to leave it running)...", file=sys.stderr)


def _add_training(sub) -> None:
    t = sub.add_parser("train", help="queue a LoRA fine-tuning run from a YAML config and follow it")
    t.add_argument("config", nargs="?", help="TrainConfig as YAML (see --example)")
    t.add_argument("--root", default=None, help="workspace folder (default ~/.mactuner, or $MACTUNER_HOME)")
    t.add_argument("--name", default=None, help="run name (default: date-dataset)")
    t.add_argument("--nproc", type=int, default=1, help="training processes (>1: DDP under torchrun)")
    t.add_argument("--detach", action="store_true", help="return once queued; the run goes on in the background")
    t.add_argument("--example", action="store_true", help="print an example config with every setting and exit")
    t.add_argument("--machines", type=int, default=0, help="print the commands that train on this many machines")
    t.add_argument("--head", default="HEAD_IP", help="with --machines: the address the other machines reach")

    def _train(a):
        if a.example:
            print(_example_config(), end="")
            return 0
        if not a.config:
            print("mactuner train: give a CONFIG.yaml (or --example to get one)", file=sys.stderr)
            return 2

        from . import multinode, runs  # noqa: PLC0415
        from .training import TrainConfig  # noqa: PLC0415

        ws = Workspace.open(a.root)
        if a.machines or multinode.launched():
            return _multinode_train(a, ws, Path(a.config))
        run = runs.launch(ws, TrainConfig.from_yaml(Path(a.config)), name=a.name, nproc=a.nproc)
        print(f"run {run.name}: {run.status().state} ({run.path})", flush=True)
        return 0 if a.detach else _follow(run)

    t.set_defaults(fn=_train)

    r = sub.add_parser("runs", help="list training runs")
    r.add_argument("--root", default=None)

    def _runs(a):
        from . import runs  # noqa: PLC0415

        print(json.dumps(runs.list_runs(Workspace.open(a.root)), indent=2, default=str))
        return 0

    r.set_defaults(fn=_runs)

    s = sub.add_parser("stop", help="stop a training run at its next step end (a checkpoint is saved)")
    s.add_argument("run")
    s.add_argument("--root", default=None)

    def _stop(a):
        from . import runs  # noqa: PLC0415

        st = runs.stop(runs.get_run(Workspace.open(a.root), a.run))
        print(f"{a.run}: {st.state}" + (f" ({st.reason})" if st.reason else ""))
        return 0

    s.set_defaults(fn=_stop)

    rs = sub.add_parser("resume", help="resume a stopped or failed run from a checkpoint (default: its latest)")
    rs.add_argument("run")
    rs.add_argument("--checkpoint", default=None, help="step-N (default: the latest complete checkpoint)")
    rs.add_argument("--root", default=None)
    rs.add_argument("--detach", action="store_true")

    def _resume(a):
        from . import multinode, runs  # noqa: PLC0415

        ws = Workspace.open(a.root)
        if multinode.launched():  # one process of a launch on several machines
            return multinode.run_rank(ws, None, a.run, a.checkpoint)
        run = runs.resume(ws, runs.get_run(ws, a.run), a.checkpoint)
        print(f"run {run.name}: {run.status().state}", flush=True)
        return 0 if a.detach else _follow(run)

    rs.set_defaults(fn=_resume)


def _multinode_train(a, ws, config) -> int:
    """`train --machines N`: print the commands; under torchrun / accelerate launch: be one training process."""
    from . import multinode  # noqa: PLC0415

    if multinode.launched():
        return multinode.run_rank(ws, config, a.name)
    from .multinode_commands import commands  # noqa: PLC0415
    from .training import TrainConfig, validate  # noqa: PLC0415

    cmds = commands(a.config, a.machines, run_name=a.name or "", root=str(ws.root), head=a.head,
                    cfg=validate(TrainConfig.from_yaml(config), ws))
    print(f"# on every machine (torchrun):\n{cmds.torchrun}\n\n# or accelerate.yaml:\n{cmds.accelerate_config}")
    print("\n".join(f"# machine {i}:\n{c}" for i, c in enumerate(cmds.accelerate)))
    print(f"\n# or a SkyPilot task (sky launch -c mactuner TASK.yaml):\n{cmds.skypilot}", end="")
    return 0


# ------------------------------------------------------------------------------------------------ export


def _export_args(a) -> dict:
    """The step's args (pipelines.export.job.STEPS) from the command line."""
    if a.step == "run":
        from .export import DEFAULT_QUANTS  # noqa: PLC0415

        return {"source": a.source, "name": a.name or "", "base_model": a.base_model or "",
                "outtypes": a.outtype or ["f16"], "quants": a.quant if a.quant is not None else list(DEFAULT_QUANTS),
                "validate": not a.no_validate, "system": a.system or ""}
    if a.step == "merge":
        return {"source": a.source, "base_model": a.base_model, "name": a.name}
    if a.step == "convert":
        return {"hf_dir": a.hf_dir, "outtypes": a.outtype or ["f16"], "name": a.name}
    if a.step == "quantize":
        return {"gguf": a.gguf, "quants": a.quant or []}
    return {"gguf": a.gguf, "hf": a.hf, "base_model": a.base_model, "prompt": a.prompt}


def _export_cmd(a) -> int:
    """Run one export step in the foreground (the studio runs the same step as a job: pipelines.export.job)."""
    from .export.job import run_step  # noqa: PLC0415

    try:
        result = run_step(Workspace.open(a.root), a.step, _export_args(a),
                          lambda f, msg: print(f"{100 * f:5.1f}%  {msg}", file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("mactuner export: cancelled; nothing unfinished was left under a final name", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2, default=str))
    return 0


def _add_export(sub) -> None:
    from .export import OUTTYPES, QUANT_TYPES  # noqa: PLC0415 - light: no torch at import

    e = sub.add_parser("export", help="merge an adapter, convert to GGUF, quantize, validate")
    steps = e.add_subparsers(dest="step", required=True)

    def common(p):
        p.add_argument("--root", default=None, help="workspace folder (default ~/.mactuner, or $MACTUNER_HOME)")
        p.set_defaults(fn=_export_cmd)
        return p

    r = common(steps.add_parser("run", help="the whole export into exports/<name>/"))
    r.add_argument("source", help="a run folder, its adapter/ or a checkpoint, or an HF model folder")
    r.add_argument("--name", default=None)
    r.add_argument("--base-model", default=None, help="the adapter's base (default: from the run's config.yaml)")
    r.add_argument("--outtype", action="append", choices=OUTTYPES, help="GGUF float type (repeatable; default f16)")
    r.add_argument("--quant", action="append", type=str.upper, choices=QUANT_TYPES,
                   help="quantization of the first float GGUF (repeatable; default Q8_0, which keeps a small fine-tune)")
    r.add_argument("--no-quant", dest="quant", action="store_const", const=[], help="no quantization")
    r.add_argument("--no-validate", action="store_true")
    r.add_argument("--system", default=None, help="SYSTEM prompt for the Ollama Modelfiles")
    m = common(steps.add_parser("merge", help="merge an adapter into its base (HF safetensors)"))
    m.add_argument("source")
    m.add_argument("--base-model", default=None)
    m.add_argument("--name", default=None)
    c = common(steps.add_parser("convert", help="HF folder -> GGUF with llama.cpp's converter"))
    c.add_argument("hf_dir")
    c.add_argument("--outtype", action="append", choices=OUTTYPES)
    c.add_argument("--name", default=None, help="export folder name (default: the model folder's name)")
    q = common(steps.add_parser("quantize", help="a float GGUF -> quantized GGUFs beside it"))
    q.add_argument("gguf")
    q.add_argument("--quant", action="append", type=str.upper, choices=QUANT_TYPES)
    v = common(steps.add_parser("validate", help="check a GGUF: loads, template, generations, perplexity, fine-tune"))
    v.add_argument("gguf")
    v.add_argument("--hf", default=None, help="the HF folder it came from (default: from its export.json)")
    v.add_argument("--base-model", default=None, help="the base before fine-tuning (default: from its export.json)")
    v.add_argument("--prompt", default=None, help="a training prompt for the fine-tune-survived check")

    def _list(a):
        from . import export as ex  # noqa: PLC0415

        print(json.dumps(ex.list_exports(Workspace.open(a.root)), indent=2, default=str))
        return 0

    ls = steps.add_parser("list", help="every export with its state and validation table")
    ls.add_argument("--root", default=None)
    ls.set_defaults(fn=_list)
    ar = steps.add_parser("architectures", help="HF architectures the converter supports")
    ar.set_defaults(fn=lambda a: print("\n".join(__import__("pipelines.export").export.supported_architectures())) or 0)


# ------------------------------------------------------------------------------------------------ rag


def _add_rag(sub) -> None:
    r = sub.add_parser("rag", help="knowledge bases: ingest documents, search, ask")
    cmds = r.add_subparsers(dest="rag_cmd", required=True)

    def common(p, fn):
        p.add_argument("--root", default=None, help="workspace folder (default ~/.mactuner, or $MACTUNER_HOME)")
        p.set_defaults(fn=fn)
        return p

    def _list(a):
        from . import rag  # noqa: PLC0415

        print(json.dumps(rag.list_kbs(Workspace.open(a.root)), indent=2, default=str))
        return 0

    def _ingest(a):
        from . import rag  # noqa: PLC0415

        ws = Workspace.open(a.root)
        if a.create and a.kb not in [k["name"] for k in rag.list_kbs(ws)]:
            rag.create(ws, a.kb)
        files = [{"path": str(Path(f).resolve()), "name": Path(f).name, "password": a.password} for f in a.files]
        rep = rag.ingest(ws, a.kb, files, lambda f, m, **_k: print(f"{100 * f:5.1f}%  {m}", file=sys.stderr,
                                                                  flush=True))
        print(json.dumps(rep.as_dict(), indent=2))
        return 0 if rep.added or rep.skipped else 1

    def _search(a):
        from . import rag  # noqa: PLC0415

        kb = rag.open_kb(Workspace.open(a.root), a.kb)
        print(json.dumps([p.as_dict() for p in rag.search(kb, a.query, a.top_k, a.mode)], indent=2))
        return 0

    def _ask(a):
        from . import models, rag  # noqa: PLC0415
        from .chat import ChatParams  # noqa: PLC0415

        ws = Workspace.open(a.root)
        kb = rag.open_kb(ws, a.kb)
        path = Path(a.model) if a.model else models.ensure_default_gguf(ws)
        lm = models.load_gguf(path) if path.is_file() else models.load_hf(path)
        try:
            last = None
            for ev in rag.stream_answer(lm, kb, a.question, ChatParams(max_new_tokens=a.max_new_tokens), a.top_k,
                                        a.mode):
                if ev.refused:
                    print(ev.refused)
                    return 1
                if ev.chunk is not None:
                    print(ev.chunk.text, end="", flush=True)
                    last = ev
            print()
            if last is not None:  # where the wait went, and the passages left out
                print(last.timings.summary(last.chunk) + (f"\n{last.note}" if last.note else ""), file=sys.stderr)
            for i, p in enumerate(last.passages if last else [], 1):
                mark = "*" if i in last.citations else " "
                print(f"{mark}[{i}] {p.file}, page {p.page} (similarity {p.similarity:.2f})", file=sys.stderr)
        finally:
            lm.backend.close()  # a GGUF's worker process ends with it
        return 0

    def _delete(a):
        from . import rag  # noqa: PLC0415

        rag.delete(Workspace.open(a.root), a.kb)
        print(f"Deleted the knowledge base '{a.kb}'.", file=sys.stderr)
        return 0

    def _rebuild(a):
        from . import rag  # noqa: PLC0415

        rep = rag.rebuild(Workspace.open(a.root), a.kb, lambda f, m, **_k: print(f"{100 * f:5.1f}%  {m}",
                                                                                  file=sys.stderr, flush=True))
        print(json.dumps(rep.as_dict(), indent=2))
        return 0 if not rep.failed else 1

    common(cmds.add_parser("list", help="knowledge bases with their documents and chunks"), _list)
    for name, fn, what in (("delete", _delete, "delete a knowledge base (its documents and index)"),
                           ("rebuild", _rebuild, "make a damaged knowledge base again from the documents it keeps")):
        common(cmds.add_parser(name, help=what), fn).add_argument("kb")
    i = common(cmds.add_parser("ingest", help="add documents (PDF, .txt, .md) to a knowledge base"), _ingest)
    i.add_argument("kb")
    i.add_argument("files", nargs="+")
    i.add_argument("--create", action="store_true", help="create the knowledge base if it does not exist")
    i.add_argument("--password", default=None, help="the password of encrypted PDFs")
    for name, fn, what in (("search", _search, "query"), ("ask", _ask, "question")):
        p = common(cmds.add_parser(name, help="ranked passages, no model" if name == "search" else
                                   "a cited answer from a model"), fn)
        p.add_argument("kb")
        p.add_argument(what)
        p.add_argument("--top-k", type=int, default=5)
        p.add_argument("--mode", default="hybrid", choices=["hybrid", "vector", "keyword"])
        if name == "ask":
            p.add_argument("--model", default=None, help="a GGUF file or HF folder (default: the embedded model)")
            p.add_argument("--max-new-tokens", type=int, default=256)


if __name__ == "__main__":
    sys.exit(main())
