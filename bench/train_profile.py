"""Where a training step's time goes (`bench/train.py --method profile`): our step on bench/train.py's run (default
model, its fixed chat dataset, LoRA r=16 all-linear, batch 4, max length 256, --dtype) under torch.profiler, each
op's own time put in one class, and each class's share of the step and its achieved FLOP/s beside the matmul peak
this CPU reaches in the same run (torch.matmul of the step's own shapes, float32 and bf16):

  decoder matmuls   the frozen projections of the 18 layers (q k v o, gate up down), forward and input gradient
  LoRA              the adapter's dropout, A and B matmuls, scaling and sum, forward and backward
  attention         scaled-dot-product attention kernels
  output + loss     everything after the decoder: the output layer over the 262k-token vocabulary at the label
                    positions, the cross-entropy and its gradient (also ops on vocabulary-wide tensors elsewhere)
  elementwise/norm  the rest of the decoder: RMSNorm, RoPE, GELU, residual sums, copies, embedding
  optimizer         gradient clipping, AdamW, zero_grad
  data              the batch's tensors (collate)

How an op is classed: forward ops by the region they run in (profiler ranges opened by module hooks on the
decoder, on each LoRA layer and on its base layer); backward ops by the forward op that made their autograd node
(the same sequence number), so a LoRA matmul's gradient counts as LoRA; inside a LoRA layer a matmul with a
rank-sized dimension is LoRA's, the others the frozen projection's (fused_lora runs both in one function). Prints
the table once per dtype asked, with the step's time without the profiler beside it: the profiler's cost per op
weighs most on the classes of many small ops (LoRA, elementwise), so read shares with that in mind.

    .venv/bin/python bench/train.py --method profile [--model PATH] [--steps 3] [--warmup 1] [--dtype float32]

`--method levers`: one process holds a float32 and a bf16 session; per round every variant (a lever on or off) takes
one optimizer step on that round's batches, in turn, so a busy machine slows them alike; the fastest round of each
is compared with our float32 step before the levers (fused_lora.py and its dropout masks, fused_norm.py, loss.py's
trained_rows, LogitsBuffers and block softmax), wall and process CPU time (the steadier figure on a shared machine).
The first step of every variant is also taken from the same weights and seed: its loss and gradient norm against the
float32 one before the levers (the same masks where they are drawn by bernoulli_; fused_lora's own masks are other
draws of the same law). The bf16/fp32 line also gives the median of the rounds' own ratios: the fastest rounds of
the two may come from different batches, whose padding differs.
--compile adds each dtype with the decoder layers under torch.compile (inductor; its compile time is printed as
the first step's). --levers short leaves out the one-lever lines.

    .venv/bin/python bench/train.py --method levers [--rounds 3] [--warmup 0] [--threads 1] [--compile]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

CLASSES = ("decoder matmuls", "LoRA", "attention", "output + loss", "elementwise/norm", "optimizer", "data")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}


def session_for(args, dtype: str):
    """A training session (pipelines.training.session.setup) on bench/train.py's run in `dtype`."""
    from train import _setup

    from pipelines.training import session as torch_session

    tmp = tempfile.mkdtemp(prefix="mt-prof-")
    args.dtype = dtype
    ws, cfg = _setup(Path(tmp), args)
    cfg.max_steps = 10_000  # the session is stepped by hand here
    return torch_session.setup(cfg, ws.runs / "bench", ws, None, lambda m: print(m, file=sys.stderr),
                               torch_session.Processes())


def train_step(s) -> float:
    """One optimizer step as loop.fit takes it (objective step, clipping, AdamW); returns its loss."""
    from torch.profiler import record_function

    with record_function("mt:data"):
        micro = s.micro_batches()
    out = s.objective.step(s, micro)
    with record_function("mt:optimizer"):
        s.clip_gradients()
        s.optimizer_step()
    return out.loss


class Regions:
    """Profiler ranges around module forwards (opened by a pre-hook, closed by a hook), removed by close()."""

    def __init__(self):
        self.handles = []

    def mark(self, module, name: str) -> None:
        from torch.profiler import record_function

        stack = []

        def pre(_m, _a):
            rf = record_function(name)
            rf.__enter__()
            stack.append(rf)

        def post(_m, _a, _o):
            stack.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def mark_model(s) -> Regions:
    """Regions: mt:decoder (the decoder), mt:lora (each LoRA layer), mt:base (the frozen layer inside it)."""
    from peft.tuners.lora import LoraLayer

    regions = Regions()
    decoder, _head = s.loss_mod.parts()
    regions.mark(decoder, "mt:decoder")
    for m in decoder.modules():
        if isinstance(m, LoraLayer):
            regions.mark(m, "mt:lora")
            regions.mark(m.base_layer, "mt:base")
    with_data = s.objective._batch  # collate: the data class

    def batch(items):
        from torch.profiler import record_function

        with record_function("mt:data"):
            return with_data(items)

    s.objective._batch = batch  # instrumentation of this bench's own session only
    return regions


def _region(ev) -> str | None:
    """The innermost mt:* range above `ev` (or ev itself)."""
    while ev is not None:
        if ev.name.startswith("mt:"):
            return ev.name
        ev = ev.cpu_parent
    return None


def _grad_node(ev):
    """The autograd-engine node event above `ev` (a backward op), or None for a forward op."""
    while ev is not None:
        if ev.name.startswith("autograd::engine::evaluate_function"):
            return ev
        ev = ev.cpu_parent
    return None


def _has_dim(ev, size: int) -> bool:
    return any(size in shape for shape in (ev.input_shapes or []) if isinstance(shape, (list, tuple)))


def classify(events, vocab: int, rank: int) -> tuple[dict, dict, dict]:
    """({class: own-time seconds}, {class: matmul FLOPs}, {(class, op name): own-time seconds}) over the
    profiler's events."""
    fwd_region = {}  # sequence number of a forward op -> the region it ran in
    for ev in events:
        if ev.sequence_nr >= 0 and _grad_node(ev) is None and ev.name.startswith("aten::"):
            fwd_region.setdefault((ev.thread, ev.sequence_nr), _region(ev))
    secs, flops, ops = defaultdict(float), defaultdict(float), defaultdict(float)
    for ev in events:
        own = ev.self_cpu_time_total / 1e6
        if own <= 0 or ev.name.startswith("mt:") or ev.name.startswith("ProfilerStep"):
            secs["unclassed"] += max(own, 0.0) if not ev.name.startswith("mt:") else 0.0
            continue
        node = _grad_node(ev)
        region = _region(ev)
        if node is not None and region in (None, "mt:decoder", "mt:lora", "mt:base"):
            region = fwd_region.get((node.thread, node.sequence_nr), region)
            region = region or "mt:head"  # a backward node made outside the decoder: the loss's
        elif node is None and region is None:
            region = "mt:head"  # forward ops of the objective step outside the decoder
        cls = _class_of(ev, region, vocab, rank)
        secs[cls] += own
        ops[cls, ev.name] += own
        flops[cls] += float(getattr(ev, "flops", 0) or 0)
    return secs, flops, ops


def _class_of(ev, region, vocab: int, rank: int) -> str:
    if region == "mt:optimizer":
        return "optimizer"
    if region == "mt:data":
        return "data"
    if "scaled_dot_product" in ev.name or "flash_attention" in ev.name:
        return "attention"
    if region == "mt:head" or _has_dim(ev, vocab):
        return "output + loss"
    if ev.name in MATMULS and region in ("mt:lora", "mt:base"):  # fused_lora runs both in one function
        return "LoRA" if _has_dim(ev, rank) else "decoder matmuls"
    if region == "mt:lora":
        return "LoRA"
    return "elementwise/norm"


def matmul_peak(shapes, dtype, threads: int, seconds: float = 0.5) -> float:
    """FLOP/s of torch.matmul on `shapes` ((m, k, n) each) in `dtype`: the best of a few timed runs of each."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.matmul(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.matmul(a, b)
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def peak_shapes(tokens: int, cfg) -> list[tuple[int, int, int]]:
    """The step's representative matmul shapes: a decoder projection and the output layer at `tokens` rows."""
    return [(tokens, cfg.hidden_size, cfg.intermediate_size), (tokens, cfg.intermediate_size, cfg.hidden_size),
            (tokens, cfg.hidden_size, 16384)]


def profile_dtype(args, dtype: str) -> dict:
    """Warm-up steps, then `args.steps` profiled steps of our trainer in `dtype`: the classes' seconds and FLOPs
    per step, the step's wall time, the label rows and tokens per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    s = session_for(args, dtype)
    plain = 0.0
    for _ in range(max(1, args.warmup)):  # the last one timed without the profiler: its overhead shows beside it
        t0 = time.perf_counter()
        train_step(s)
        plain = time.perf_counter() - t0
    regions = mark_model(s)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        for _ in range(args.steps):
            train_step(s)
    wall = (time.perf_counter() - t0) / args.steps
    regions.close()
    vocab = s.loss_mod.parts()[1].weight.shape[0]
    secs, flops, ops = classify(prof.events(), vocab, s.cfg.rank)
    cfg = getattr(s.model.config, "text_config", None) or s.model.config
    return {"dtype": dtype, "wall": wall, "plain": plain, "secs": {k: v / args.steps for k, v in secs.items()},
            "flops": {k: v / args.steps for k, v in flops.items()},
            "ops": {k: v / args.steps for k, v in ops.items()}, "cfg": cfg, "threads": torch.get_num_threads()}


def print_profile(res: dict, peaks: dict) -> None:
    secs, flops, wall = res["secs"], res["flops"], res["wall"]
    peak = peaks[res["dtype"]]
    total = sum(secs.values())
    print(f"\n{res['dtype']}: {wall:.2f} s/step wall under the profiler ({res['plain']:.2f} s for a step without it), "
          f"{total:.2f} s of ops classed; "
          f"matmul peak here {peak / 1e9:.0f} GFLOP/s ({res['dtype']})")
    print(f"  {'class':18} {'s/step':>7} {'share':>6} {'GFLOP':>7} {'GFLOP/s':>8} {'of peak':>7}")
    for cls in CLASSES + ("unclassed",):
        t, f = secs.get(cls, 0.0), flops.get(cls, 0.0)
        rate = f / t if t > 0 and f else 0.0
        top = sorted(((v, name) for (c, name), v in res["ops"].items() if c == cls), reverse=True)[:4]
        print(f"  {cls:18} {t:7.2f} {t / total:6.1%} {f / 1e9:7.1f} "
              + (f"{rate / 1e9:8.1f} {rate / peak:7.1%}" if f else f"{'':8} {'':7}")
              + "  " + ", ".join(f"{name.removeprefix('aten::')} {v:.2f}" for v, name in top if v >= 0.01))
    f_all = sum(flops.values())
    print(f"  {'whole step':18} {total:7.2f} {1:6.1%} {f_all / 1e9:7.1f} {f_all / total / 1e9:8.1f} "
          f"{f_all / total / peak:7.1%}   (roofline: the step's matmul FLOPs at peak = {f_all / peak:.2f} s)")


def main_profile(args) -> int:
    import torch

    from pipelines import device as devicemod

    prof = devicemod.profile()
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    print(f"model {args.model}; {prof.name}, {prof.physical_cores} cores, threads {args.threads or prof.threads}; "
          f"LoRA r=16 all-linear, batch 4, max length 256, {args.warmup} warm-up + {args.steps} profiled steps")
    results = [profile_dtype(args, d) for d in dtypes]
    cfg, threads = results[0]["cfg"], results[0]["threads"]
    shapes = peak_shapes(512, cfg)
    peaks = {d: matmul_peak(shapes, getattr(torch, d), threads) for d in ("float32", "bfloat16")}
    print(f"matmul peak (torch.matmul, shapes {shapes}, {threads} threads): "
          + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    for res in results:
        print_profile(res, peaks)
    return 0


# --------------------------------------------------------------------------------------------- levers


class Lever(NamedTuple):
    name: str
    session: str  # the dtype, or compiled-<dtype>
    fused: bool  # LoRA layers in one autograd function (fused_lora.py)
    rows: bool  # the chunked loss over the trained token rows (loss.py)
    torch_masks: bool = False  # the fused function's dropout masks drawn by torch's bernoulli_, as before
    fresh_logits: bool = False  # the loss's logits memory allocated anew at every call, as before (LogitsBuffers)
    model_norms: bool = False  # the model's own RMSNorm forward, as before (fused_norm.py)
    whole_softmax: bool = False  # the loss's softmax over each whole chunk of logits, as before (loss.BLOCK_BYTES)


def _bernoulli_keep(x, p: float):
    import torch

    return torch.empty_like(x).bernoulli_(1 - p)


_CHEAP_KEEP: dict = {}  # fused_lora's own dropout_keep, kept while a lever swaps it
_BLOCK_BYTES: dict = {}  # loss.BLOCK_BYTES as the trainer has it, kept while a lever raises it
_KEPT_LOGITS: dict = {}  # each session's LogitsBuffers, kept while a lever takes it away


def _variant(s, lever: Lever) -> None:
    from pipelines.training import fused_lora, fused_norm, loss

    (fused_lora.fuse_lora if lever.fused else fused_lora.unfuse_lora)(s.model)
    # "before" (no fused LoRA) means before every lever: the model's own norms too
    (fused_norm.unfuse_rms_norms if lever.model_norms or not lever.fused else fused_norm.fuse_rms_norms)(s.model)
    s.loss_mod.chunked_rows = lever.rows
    cheap = _CHEAP_KEEP.setdefault("fn", fused_lora.dropout_keep)
    fused_lora.dropout_keep = _bernoulli_keep if lever.torch_masks else cheap  # bench only: the lever itself
    kept = _KEPT_LOGITS.setdefault(id(s), s.loss_mod.buffers)
    s.loss_mod.buffers = None if lever.fresh_logits else kept
    block = _BLOCK_BYTES.setdefault("bytes", loss.BLOCK_BYTES)
    loss.BLOCK_BYTES = loss.CHUNK_BYTES if lever.whole_softmax else block  # bench only: the lever itself


LEVERS = [
    Lever("fp32 before (PEFT LoRA, head module)", "float32", False, False),
    Lever("fp32 + fused LoRA, bernoulli_ masks", "float32", True, False, True),
    Lever("fp32 + chunked loss with token rows", "float32", False, True),
    Lever("fp32 both, bernoulli_ masks", "float32", True, True, True),
    Lever("fp32 both, fresh logits memory", "float32", True, True, False, True),
    Lever("fp32 both, the model's RMSNorm", "float32", True, True, False, False, True),
    Lever("fp32 both (default now)", "float32", True, True),
    Lever("bf16 before (PEFT LoRA, head module)", "bfloat16", False, False),
    Lever("bf16 both, fresh logits memory", "bfloat16", True, True, False, True),
    Lever("bf16 both, the model's RMSNorm", "bfloat16", True, True, False, False, True),
    Lever("bf16 both, softmax over whole chunks", "bfloat16", True, True, whole_softmax=True),
    Lever("bf16 both (default now)", "bfloat16", True, True),
]


def compiled_session(args, dtype: str):
    """A session whose decoder layers run through torch.compile (inductor, dynamic shapes)."""
    s = session_for(args, dtype)
    decoder, _head = s.loss_mod.parts()
    for layer in decoder.layers:
        layer.compile(dynamic=True)
    return s


def _first_loss(s, batches, seed: int = 123) -> tuple[float, float]:
    """(loss, gradient norm) of one objective step on `batches` from the session's current weights, undone."""
    import torch

    torch.manual_seed(seed)  # the same dropout masks for every variant
    out = s.objective.step(s, batches)
    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in s.params if p.grad is not None])))
    s.optimizer.zero_grad(set_to_none=True)
    return out.loss, norm


def main_levers(args) -> int:
    """Each lever's step time against our fp32 step before the levers, alternated in one process on the same
    batches (per round: every variant steps once on that round's batches), the fastest round of each."""
    import os

    from pipelines import device as devicemod

    prof = devicemod.profile()
    print(f"model {args.model}; {prof.name}, {prof.physical_cores} cores, threads {args.threads or prof.threads}; "
          f"LoRA r=16 all-linear, dropout 0.05, batch 4, max length 256; {args.rounds} rounds after "
          f"{args.warmup} warm-up; load average {os.getloadavg()[0]:.2f} at start")
    sessions = {d: session_for(args, d) for d in ("float32", "bfloat16")}
    levers = list(LEVERS)
    if getattr(args, "levers", "all") == "short":  # before and both of each dtype
        levers = [lv for lv in LEVERS
                  if lv.fused == lv.rows and not (lv.torch_masks or lv.fresh_logits or lv.model_norms
                                                  or lv.whole_softmax)]
    if getattr(args, "compile", False):
        for d in ("float32", "bfloat16"):
            sessions[f"compiled-{d}"] = compiled_session(args, d)
            levers.append(Lever(f"{d[:2]}{d[-2:]} both + torch.compile of the layers".replace("fl32", "fp32"),
                                f"compiled-{d}", True, True))
    first = sessions["float32"].micro_batches()
    checks = {}
    for lever in levers:  # the same batch from the same initial weights and masks
        _variant(sessions[lever.session], lever)
        t0 = time.perf_counter()
        checks[lever.name] = _first_loss(sessions[lever.session], first)
        name = lever.name
        print(f"{name}: first step {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    times, cpu = defaultdict(list), defaultdict(list)
    for r in range(args.warmup + args.rounds):
        batches = sessions["float32"].micro_batches()
        tokens = sum(len(it[0]) for mb in batches for it in mb)
        for lever in levers:
            s, name = sessions[lever.session], lever.name
            _variant(s, lever)
            t0, c0 = time.perf_counter(), time.process_time()
            s.objective.step(s, batches)
            s.clip_gradients()
            s.optimizer_step()
            if r >= args.warmup:
                times[name].append((time.perf_counter() - t0) / tokens * 1000)
                cpu[name].append((time.process_time() - c0) / tokens * 1000)
        print(f"round {r + 1}: {tokens} tokens, " + ", ".join(f"{t[-1]:.1f}" for t in times.values())
              + " ms/token", file=sys.stderr, flush=True)
    base_name = levers[0].name
    base, (base_loss, base_norm) = min(times[base_name]), checks[base_name]
    base_cpu = min(cpu[base_name])
    print(f"\nfirst step from the same weights and masks, fp32 before: loss {base_loss:.6f}, grad norm {base_norm:.5f}")
    for name, dtype, *_ in levers:
        best, (loss, norm) = min(times[name]), checks[name]
        family = dtype.removeprefix("compiled-")
        same_dtype = checks[next(lv.name for lv in levers if lv.session == family)]
        print(f"{name:40} {best:6.2f} ms/token (fastest of {len(times[name])})  ratio vs fp32 before "
              f"{base / best:5.2f}x (CPU time: {min(cpu[name]):6.2f} ms/token, ratio {base_cpu / min(cpu[name]):5.2f}x)  loss {loss:.6f} (rel. to fp32 before {abs(loss - base_loss) / base_loss:.1e}, "
              f"to its dtype's before {abs(loss - same_dtype[0]) / same_dtype[0]:.1e})  grad norm rel. "
              f"{abs(norm - base_norm) / base_norm:.1e}")
    b16, f32 = (next(lv.name for lv in levers if lv.session == k and lv == Lever(lv.name, k, True, True))
                for k in ("bfloat16", "float32"))
    b16_before = next(lv.name for lv in levers if lv.session == "bfloat16" and not (lv.fused or lv.rows))
    same_round = statistics.median(f / b for f, b in zip(times[f32], times[b16]))  # both on the same batches
    print(f"bf16/fp32 ratio, both with the levers: {min(times[f32]) / min(times[b16]):.2f}x (CPU time "
          f"{min(cpu[f32]) / min(cpu[b16]):.2f}x; median of the rounds' ratios {same_round:.2f}x); before them: "
          f"{base / min(times[b16_before]):.2f}x (CPU time {base_cpu / min(cpu[b16_before]):.2f}x)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0
