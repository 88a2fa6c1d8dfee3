"""reinit_many's chunk size: time and peak memory at 16, 64 and 256 MiB a chunk.

``fire_core.core.plan`` projects each group of same-shaped matrices in
batched calls of at most ``chunk_bytes`` (in bytes of the compute dtype).
On a GPU the default is ``GPU_CHUNK_BYTES`` (64 MiB), chosen without a GPU;
this script measures that choice against 16 and 256 MiB.

Run from the repository root (needs the ``torch`` extra):

    python benchmarks/chunks.py --device cuda --out benchmarks/results/chunks-cuda.md
    python benchmarks/chunks.py --quick      # small weights on the CPU, chunks of 1/64 the size: a smoke test

Weight sets, float32, random normal, as an adapter hands them to
``fire_core.reinit_many`` (``(name, tensor, layout)``):

* GPT-2 medium shaped: 24 blocks, d = 1024; q, k, v and out 1024x1024
  (the fused qkv split, as ``split=`` does), MLP 4096x1024 and 1024x4096
  (302M weights);
* ResNet-50 shaped: every conv kernel (``oihw``: the 7x7 stem, 1x1 and 3x3
  taps, downsamples) and the 1000x2048 head (25.5M weights);
* Llama-2-7B shaped, one decoder layer: q, k, v, o 4096x4096, gate and up
  11008x4096, down 4096x11008 (202M weights; a 4096x4096 matrix is 64 MiB,
  so a 16 MiB chunk holds one of them).

Per set and chunk size: the number of batched calls; the time of
``reinit_many`` with its report (the adapters' default) and without, the
minimum over interleaved rounds after a warm-up, in ms; on a GPU the peak
extra memory of the call with its report (``torch.cuda.max_memory_allocated``
during the call minus what was allocated before it: the weights, their
saved copy and the reference result); and the largest difference from the
64 MiB result (chunking changes how matrices are batched, not the math).
Each result is written into its weight in place (``copy_``, as
``fire_core.torch`` does), and the original weights are restored, untimed,
before every call.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import fire_core
from fire_core.core import plan
from common import machine  # the machine line of every results file

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


# --- weight sets: (name, shape, layout) ------------------------------------------------


def gpt(d: int, blocks: int) -> list[tuple]:
    out = []
    for b in range(blocks):
        for part in ("q", "k", "v"):
            out.append((f"h.{b}.attn.{part}", (d, d), "oi"))
        out += [(f"h.{b}.attn.c_proj", (d, d), "oi"), (f"h.{b}.mlp.c_fc", (4 * d, d), "oi"),
                (f"h.{b}.mlp.c_proj", (d, 4 * d), "oi")]
    return out


def resnet50(width: int = 64, classes: int = 1000) -> list[tuple]:
    out = [("conv1", (width, 3, 7, 7), "oihw")]
    cin = width
    for stage, (blocks, mult) in enumerate(((3, 1), (4, 2), (6, 4), (3, 8))):
        mid = width * mult
        cout = 4 * mid
        for b in range(blocks):
            p = f"layer{stage + 1}.{b}"
            out += [(f"{p}.conv1", (mid, cin, 1, 1), "oihw"), (f"{p}.conv2", (mid, mid, 3, 3), "oihw"),
                    (f"{p}.conv3", (cout, mid, 1, 1), "oihw")]
            if b == 0:
                out.append((f"{p}.downsample", (cout, cin, 1, 1), "oihw"))
            cin = cout
    out.append(("fc", (classes, cin), "oi"))
    return out


def llama(d: int, hidden: int, layers: int) -> list[tuple]:
    out = []
    for k in range(layers):
        out += [(f"layers.{k}.attn.{p}", (d, d), "oi") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(f"layers.{k}.mlp.gate_proj", (hidden, d), "oi"), (f"layers.{k}.mlp.up_proj", (hidden, d), "oi"),
                (f"layers.{k}.mlp.down_proj", (d, hidden), "oi")]
    return out


def weight_sets(quick: bool) -> list[tuple[str, list[tuple]]]:
    """Cheapest first: what was measured before a time limit is kept."""
    if quick:
        return [("ResNet-50 shape, width/16", resnet50(4, 10)), ("GPT shape, 2 blocks, d=64", gpt(64, 2)),
                ("Llama shape, 1 layer, d=128", llama(128, 344, 1))]
    return [("ResNet-50", resnet50()), ("GPT-2 medium (24 x d=1024)", gpt(1024, 24)),
            ("Llama-2-7B, 1 layer (d=4096, MLP 11008)", llama(4096, 11008, 1))]


# --- measuring -------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_calls(weights, write, chunk_bytes: int) -> int:
    """The batched projections one reinit_many makes at ``chunk_bytes`` (counted on an untimed call)."""
    calls = 0
    run_chunk = plan._run_chunk

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return run_chunk(*args, **kwargs)

    plan._run_chunk = counted
    try:
        fire_core.reinit_many(weights, write=write, chunk_bytes=chunk_bytes)
    finally:
        plan._run_chunk = run_chunk
    return calls


def measure(spec: list[tuple], device: str, sizes_mib: list[float], repeat: int, reference_mib: float) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)  # drawn where they live: a host draw of 200M is seconds
    params = {n: torch.randn(shape, generator=gen, dtype=torch.float32, device=device) for n, shape, _ in spec}
    layouts = {n: lay for n, _, lay in spec}
    saved = {n: p.clone() for n, p in params.items()}
    weights = [(n, params[n], layouts[n]) for n in params]
    cuda = device.startswith("cuda")

    @torch.no_grad()
    def write(name, new):
        params[name].copy_(new)

    @torch.no_grad()
    def restore():
        for n, p in params.items():
            p.copy_(saved[n])
        _sync(device)

    def run(mib: float, report: bool):
        return fire_core.reinit_many(weights, write=write, chunk_bytes=int(mib * MIB), report=report)

    restore()
    run(reference_mib, True)
    reference = {n: p.clone() for n, p in params.items()}
    rows = []
    for mib in sizes_mib:
        restore()
        calls = count_calls(weights, write, int(mib * MIB))
        diff = max(float((params[n] - reference[n]).abs().max()) for n in params)
        peak = None
        if cuda:
            restore()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run(mib, True)
            _sync(device)
            peak = (torch.cuda.max_memory_allocated() - before) / MIB
        rows.append({"mib": mib, "calls": calls, "diff": diff, "peak_mib": peak, "report": [], "noreport": []})
    for report in (True, False):  # warm-up of every configuration
        for mib in sizes_mib:
            restore()
            run(mib, report)
    _sync(device)
    for _ in range(repeat):  # rounds interleaved over the chunk sizes: a slow spell hits them alike
        for row in rows:
            for report in (True, False):
                restore()
                t0 = time.perf_counter()
                run(row["mib"], report)
                _sync(device)
                row["report" if report else "noreport"].append((time.perf_counter() - t0) * 1e3)
    return rows


def _mib(x: float) -> str:
    return f"{x:g}"


def table(label: str, spec: list[tuple], rows: list[dict], default_mib: float, reference_mib: float) -> list[str]:
    count = sum(torch.Size(shape).numel() for _, shape, _ in spec)
    lines = [f"### {label}: {len(spec)} weights, {count / 1e6:.3g}M entries, {4 * count / MIB:.3g} MiB (float32)", "",
             "| chunk MiB | batched calls | ms, report | ms, no report | peak extra MiB | max abs diff vs "
             f"{_mib(reference_mib)} MiB |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = "n/a (CPU)" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        mark = " (default)" if r["mib"] == default_mib else ""
        lines.append(f"| {_mib(r['mib'])}{mark} | {r['calls']} | {min(r['report']):.1f} | {min(r['noreport']):.1f} | "
                     f"{peak} | {r['diff']:.1e} |")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--quick", action="store_true", help="small weight sets and chunks of 1/64 the size (smoke test)")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds (default 3; quick 1)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/chunks-<device>.md)")
    args = ap.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    kind = device.split(":")[0]
    scale = 1 / 64 if args.quick else 1
    sizes = [16 * scale, 64 * scale, 256 * scale]
    default = (plan.GPU_CHUNK_BYTES if kind == "cuda" else plan.CHUNK_BYTES) / MIB  # marked where measured
    repeat = args.repeat or (1 if args.quick else 3)
    out = Path(args.out) if args.out else RESULTS / f"chunks-{kind}{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    lines = [f"# reinit_many's chunk size ({kind}{', quick: not for quoting' if args.quick else ''})", "",
             f"{machine(kind)}; float32 weights, fire 5 steps, torch allow_tf32={tf32}.",
             f"Defaults: GPU_CHUNK_BYTES = {plan.GPU_CHUNK_BYTES // MIB} MiB, CHUNK_BYTES = "
             f"{plan.CHUNK_BYTES // MIB} MiB (host memory). Times: minimum of {repeat} interleaved round(s) after a "
             "warm-up. Peak extra: torch.cuda.max_memory_allocated during one call (with its report) minus what "
             "was allocated before it.", ""]
    for label, spec in weight_sets(args.quick):
        rows = measure(spec, device, sizes, repeat, reference_mib=64 * scale)
        lines += table(label, spec, rows, default, reference_mib=64 * scale)
        out.write_text("\n".join(lines) + "\n")  # after every set: a run stopped later keeps what it measured
        print("\n".join(lines[-len(rows) - 5:]), flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
