"""fire_core.torch.apply against the reference's one-call-per-layer-and-tap loop.

Run from the repository root (needs the ``torch`` extra):

    python benchmarks/torch_apply.py            # ResNet-18 and GPT-small shapes, writes
                                                # benchmarks/results/torch_apply-<device>.md
    python benchmarks/torch_apply.py --quick    # smaller models, a smoke test of the script
    python benchmarks/torch_apply.py --device cuda

Models (float32, built from plain nn layers, random weights):

* ResNet-18 shaped: 7x7 stem, four stages of two basic blocks (64-512
  channels, 3x3 convs, 1x1 downsamples), 512 x 1000 head: 21 conv layers and
  one Linear, 11.7M weights.
* GPT-small shaped: 12 blocks, d = 768, a fused qkv ``c_attn`` (2304 x 768,
  split into q, k, v as the reference does), 768 x 768 attention output,
  3072 x 768 and 768 x 3072 MLP; no embedding or head (the reference would
  also project a head tied to the 50257 x 768 embedding, which would dominate
  both timings).

The reference loop is written here from the reference's description
(github.com/isaac7778/FIRE, ``interventions/fire.py``): for each Linear and
Conv2d, one Newton–Schulz call per 2-D matrix (per spatial tap of a conv, per
q/k/v block of ``c_attn``), then the ``sqrt(d_out/d_in)/taps`` scale. Both
sides run the same number of steps; ``apply`` is timed with its report (SFE,
DfI before/after per layer) and without (``report=False``). Times are the
minimum over interleaved rounds (15 by default), in milliseconds; the speed-up
is also given as the median over rounds of each round's own ratio, which a
slow spell of the machine moves less than it moves the minimum.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import fire_core.torch as ft
from common import machine  # the machine line of every results file

RESULTS = Path(__file__).resolve().parent / "results"


# --- models --------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def resnet18(width: int = 64, classes: int = 1000) -> nn.Module:
    model = nn.Module()
    model.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    cin = width
    for k, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        stage = nn.Sequential(BasicBlock(cin, cout, 1 if k == 0 else 2), BasicBlock(cout, cout, 1))
        setattr(model, f"layer{k + 1}", stage)
        cin = cout
    model.fc = nn.Linear(cin, classes)
    return model


def gpt(d: int = 768, blocks: int = 12) -> nn.Module:
    model = nn.Module()
    model.h = nn.ModuleList()
    for _ in range(blocks):
        block = nn.Module()
        block.ln_1, block.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        block.attn = nn.Module()
        block.attn.c_attn = nn.Linear(d, 3 * d)
        block.attn.c_proj = nn.Linear(d, d)
        block.mlp = nn.Module()
        block.mlp.c_fc = nn.Linear(d, 4 * d)
        block.mlp.c_proj = nn.Linear(4 * d, d)
        model.h.append(block)
    return model


# --- the reference loop --------------------------------------------------------------


def newton_schulz(m: torch.Tensor, steps: int) -> torch.Tensor:
    """One matrix: tall side, X / ||X||_F, then X <- 1.5 X - 0.5 X (X^T X)."""
    wide = m.shape[1] > m.shape[0]
    x = m.T if wide else m
    x = x / x.norm()
    for _ in range(steps):
        x = 1.5 * x - 0.5 * x @ (x.T @ x)
    return x.T if wide else x


@torch.no_grad()
def reference_loop(model: nn.Module, steps: int) -> None:
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        w = mod.weight.detach().clone()
        if name.endswith("c_attn"):
            blocks = w.chunk(3)
            out = [newton_schulz(b, steps) * math.sqrt(b.shape[0] / b.shape[1]) for b in blocks]
            mod.weight.copy_(torch.cat(out))
            continue
        new = torch.empty_like(w)
        if w.ndim == 4:
            for i in range(w.shape[2]):
                for j in range(w.shape[3]):
                    new[:, :, i, j] = newton_schulz(w[:, :, i, j], steps)
            taps = w.shape[2] * w.shape[3]
        else:
            new = newton_schulz(w, steps)
            taps = 1
        mod.weight.copy_(new * (math.sqrt(w.shape[0] / w.shape[1]) / taps))


# --- timing --------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_all(fns: dict, repeat: int, device: str, restore) -> dict[str, list[float]]:
    """Wall times of each function in ms, one per round, repeats interleaved (fair under changing load).

    ``restore()`` puts the original weights back before every call (untimed):
    FIRE applied over and over shrinks conv kernels by about 1/taps each time
    until they are denormal, which would time denormal arithmetic instead.
    """
    for fn in fns.values():
        restore()
        fn()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            restore()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def models(quick: bool, only=None):
    if quick:
        found = [
            ("resnet", "ResNet-18 shape, width/4", lambda: resnet18(16, 100), None),
            ("gpt", "GPT shape, 2 blocks, d=256", lambda: gpt(256, 2), {"*.c_attn": 3}),
        ]
    else:
        found = [("resnet", "ResNet-18", resnet18, None), ("gpt", "GPT-small (12 x d=768)", gpt, {"*.c_attn": 3})]
    return [(label, make, split) for key, label, make, split in found if only is None or key in only]


def check_agreement(make, split, steps: int, device: str) -> float:
    """max |apply - reference loop| over all weights (float32), a sanity check of the timed calls."""
    torch.manual_seed(0)
    a = make().to(device)
    b = make().to(device)
    b.load_state_dict(a.state_dict())
    ft.apply(a, steps, split=split, report=False)
    reference_loop(b, steps)
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def rows(quick: bool, device: str, repeat: int, only=None) -> list[dict]:
    out = []
    for label, make, split in models(quick, only):
        torch.manual_seed(0)
        model = make().to(device)
        saved = [p.detach().clone() for p in model.parameters()]

        @torch.no_grad()
        def restore():
            for p, q in zip(model.parameters(), saved):
                p.copy_(q)

        for steps in (5, 10):
            fns = {
                "reference": lambda: reference_loop(model, steps),
                "apply": lambda: ft.apply(model, steps, split=split),
                "apply_noreport": lambda: ft.apply(model, steps, split=split, report=False),
            }
            t = time_all(fns, repeat, device, restore)
            paired = statistics.median(r / a for r, a in zip(t["reference"], t["apply"]))
            out.append(
                dict(
                    model=label, steps=steps, weights=sum(p.numel() for p in model.parameters() if p.ndim > 1),
                    **{k: min(v) for k, v in t.items()}, paired=paired, err=check_agreement(make, split, steps, device),
                )
            )
    return out


def markdown_table(quick: bool = False, device: str = "cpu", repeat: int | None = None, only=None) -> list[str]:
    repeat = repeat or (3 if quick else 15)
    lines = [
        "| model | steps | reference loop (ms) | apply (ms) | apply, report=False (ms) | speed-up (with report) | "
        "same, median of rounds | speed-up (no report) | report cost | max abs diff vs loop |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(quick, device, repeat, only):
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['reference']:.1f} | {r['apply']:.1f} | {r['apply_noreport']:.1f} | "
            f"{r['reference'] / r['apply']:.2f}x | {r['paired']:.2f}x | {r['reference'] / r['apply_noreport']:.2f}x | "
            f"{100 * (r['apply'] / r['apply_noreport'] - 1):+.0f}% | {r['err']:.1e} |"
        )
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models, fewer repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--models", default=None, help="comma-separated subset of: resnet, gpt")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/torch_apply-<device>.md)")
    args = parser.parse_args(argv)
    only = args.models.split(",") if args.models else None
    table = markdown_table(args.quick, args.device, args.repeat, only)
    kind = args.device.split(":")[0]
    text = "\n".join(
        [
            f"# fire_core.torch.apply vs the reference loop ({kind}{', quick' if args.quick else ''})",
            "",
            machine(args.device) + ", float32.",
            "",
            *table,
            "",
        ]
    )
    print(text)
    out = Path(args.out) if args.out else RESULTS / f"torch_apply-{kind}{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
