"""Language benchmark: FIRE in continual language-model pre-training, on CPU, nothing downloaded.

A small decoder-only transformer in the style of nanoGPT (Karpathy's
nanoGPT, the model the FIRE reference code uses for its language
experiments) learns bytes of one corpus until it overfits, then keeps
training on a mixture of that corpus and a new one. The FIRE paper (Han et
al., ICLR 2026, arXiv 2602.08040) runs this kind of continual pre-training
with a GPT of about 0.1B parameters on OpenWebText; here the same protocol
is shrunk to CPU minutes:

* **model**: byte vocabulary (256), token + position embeddings,
  2 pre-LayerNorm blocks (width 64, 4 heads, context 64 bytes: ``FULL``) of causal self-attention (one fused
  ``c_attn = Linear(d, 3d)`` for q, k, v, then ``c_proj``) and an MLP
  (``c_fc`` to 4d, ``nn.GELU``, ``c_proj``), a final LayerNorm and an
  ``lm_head`` tied to the token embedding ``wte`` (as nanoGPT); nanoGPT's
  initialization (normal, std 0.02; residual projections 0.02/sqrt(2 layers));
  no dropout;
* **corpora** (built from text that ships with Python, see :func:`corpora`):
  A = the English prose of the language reference help texts
  (``pydoc_data.topics``), B = Python source code of a fixed list of standard
  library modules. Each has a training part and a held-out validation part;
  sizes and SHA-256 hashes go into the results;
* **phase 1**: AdamW on A alone for ``--steps1`` steps, long enough that the
  model overfits A (validation loss on A rises again while the training loss
  falls; the table shows both at their minimum and at the end);
* **the boundary**: one intervention per method (below);
* **phase 2**: ``--steps2`` steps on the mixture: every batch is half A, half B.

Learning rate: linear warm-up over 30 steps, then constant (a
constant rate makes phase 1 overfit steadily; the warm-up is what
"restarting the schedule" restarts). Every method starts phase 2 with a
fresh AdamW (all state cleared, as the reference does) and the warm-up
restarted; nothing else differs between them but the intervention:

* ``none``: the weights as phase 1 left them;
* ``reset``: every parameter back to its initial value (a full reset);
* ``S&P 0.8``: shrink and perturb in the reference's one-coefficient form
  ``theta <- (1 - lam) theta + lam theta_0`` (``benchmarks/plasticity.py``'s
  ``shrink_perturb``; 0.8 as the reference's warm-start script), on every
  parameter; ``S&P tuned``: the same at the ``lam`` of ``SNP_GRID`` with the
  lowest final phase-2 validation loss on A+B on held-out seeds;
* ``FIRE default``: ``fire_core.torch.apply(model)`` with no options;
* ``FIRE ref``: the reference's language setting (docs/reference.md): every
  Linear, ``c_attn`` as three blocks q, k, v (``split={"*.c_attn": 3}``), 5
  Newton-Schulz steps, the tied ``lm_head``/``wte`` projected, AdamW state
  cleared, warm-up restarted. With this model the library's defaults select
  exactly the same (``c_attn`` is split by default, the tied head is a
  Linear): when the weights after ``FIRE default`` equal those after ``FIRE
  ref`` bit for bit, its phase 2 is not run again and its rows are FIRE
  ref's, marked so (the same for any two methods that land on identical
  weights);
* ``FIRE best-scale``: ``FIRE ref`` with the ``scale=`` rule of
  ``SCALE_GRID`` that is best on the held-out seeds (``"variance"`` equals
  ``"fire"`` for Linear weights and is not run);
* ``FIRE@DfI``, ``FIRE@dormant``: FIRE ref's call only when
  ``benchmarks/common.WhenNeeded`` says so: checked on the initial network
  (its baseline), at the boundary, and every ``steps2 / 5`` phase-2 steps
  (a firing inside phase 2 also clears AdamW and restarts the warm-up, as
  FIRE ref at the boundary). A trigger rides along the run that starts from
  its network (none's, or FIRE ref's if it fired at the boundary) and only
  trains on its own from a later firing: the same numbers as its own run
  (tested), without training one network twice. Weights from ``fire_core.torch.select`` with
  FIRE ref's selection; features from ``fire_core.torch.activations`` (the
  GELU outputs) on a fixed probe batch of A;
* ``FIRE when needed`` (``common.NEEDED``): FIRE ref's call when
  ``fire_core.schedule.when_needed()`` (``common.WhenNeeded("when_needed")``)
  fires: checked on the initial network (step 0, no trial) and at the
  boundary only, where the data shifts (phase 2 is one fixed mixture, and a
  check costs 2 x 200 trial steps, more than phase 2's 200 steps). The trial
  is ``fire_core.torch.trial`` with FIRE ref's options, Adam lr 1e-3, the
  benchmark's next-byte cross-entropy, on ``TRIAL_BATCHES`` (4) batches of
  ``batch`` windows (half A, half B, as phase 2's) and a held-out probe of
  4 x ``batch`` windows, all non-overlapping windows of the *training*
  parts of A and B drawn by their own generator (:func:`trial_data`; torch's
  RNG is restored, so the other methods' runs do not move). Its run is the
  run of the network it starts from (none's, or FIRE ref's when it fired).
  Its cost is reported per check and as a share of the seed's training
  steps: about 2 x 200 steps of the full model, twice phase 2's training.

Measured for every (method, seed): validation loss on A and on B right
after the intervention, every 20 phase-2 steps and at the end;
the trial's losses and ratio, its wall time;
FIRE's own wall time as a fraction of the phase-2 training time
(``common.fire_fraction``); when the triggers fired and the values they read.
Mean ± standard error over seeds, the paired per-seed difference to ``none``
and of FIRE ref and FIRE default to S&P tuned, and what that says about the
paper's two claims here ("FIRE beats tuned S&P", "a full reset fails").

    python benchmarks/language.py --jobs 2    # full run: 5 seeds + 2 held-out tuning seeds, ~10 min on 2 idle
                                              # cores (20.1 min with FIRE when needed, the cores shared)
    python benchmarks/language.py --quick     # ~20 s on 2 idle cores, numbers not meaningful

The full run's time is extrapolated: one training step of the full model
takes 66 ms on one idle core; a seed is 600 + 6 x 200 steps (none, reset,
S&P 0.8, S&P tuned, FIRE ref, FIRE best-scale; the rest share their runs), a
tuning seed 600 + 7 x 200, and the 7 jobs take 4 rounds on 2 workers; FIRE when needed adds 2 x 200
trial steps a seed.

Writes ``benchmarks/results/language.md``, ``language.png`` and the raw
per-seed numbers ``language.json`` (``--quick``: ``language-quick.*``);
``--replot language.json`` redraws from the latter.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fire_core.torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DFI_RATIO, DORMANT_SHARE, NEEDED, NEEDED_TABLE, WhenNeeded, add_run_options, command_line, fire_fraction, fmt,
    goals, goals_cell, load_run, mean_se, names, save_run, seed_runner, write_outputs,
)
from plasticity import shrink_perturb  # noqa: E402

METHODS = ("none", "reset", "S&P 0.8", "S&P tuned", "FIRE ref", "FIRE default", "FIRE best-scale", "FIRE@DfI",
           "FIRE@dormant", NEEDED)
SNP_COEF = 0.8
SNP_GRID = (0.2, 0.4, 0.6, 0.8)
SCALE_GRID = {"fire": "fire", "norm": "norm", "None": None}  # "variance" is "fire" for Linear weights
TUNE_SEEDS = (100, 101)  # held out: not among the reported seeds
FIRE_REF = dict(steps=5, split={"*.c_attn": 3})  # the reference's language setting (docs/reference.md)
CHECKS = 5  # the triggers look at the boundary and every steps2 / CHECKS phase-2 steps
TRIAL_BATCHES = 4  # FIRE when needed's trial: this many phase-2 batches, and a probe of as many windows, held out
STDLIB_MODULES = (  # corpus B: these files of the standard library, in this order, until it is full
    "argparse.py", "bisect.py", "calendar.py", "colorsys.py", "configparser.py", "difflib.py", "fractions.py",
    "functools.py", "heapq.py", "shlex.py", "statistics.py", "string.py", "textwrap.py",
)
# Sizes: phase 1 overfits A (12 kB) at about step 400 of 600 with lr 3e-3 (measured on seed 0: validation
# loss on A 2.24 at step 400, 2.47 at 600, while the training loss falls from 1.31 to 0.79); the full run
# fits ~12 minutes at --jobs 2 on a 2-core machine.
FULL = dict(seeds=5, layers=2, d=64, heads=4, ctx=64, batch=32, lr=3e-3, warmup=30, steps1=600, steps2=200,
            eval1=50, eval2=20, a_bytes=12_000, b_bytes=48_000, val_bytes=8_000)
QUICK = dict(seeds=2, layers=1, d=32, heads=2, ctx=32, batch=8, lr=3e-3, warmup=5, steps1=40, steps2=20,
             eval1=20, eval2=10, a_bytes=4_000, b_bytes=8_000, val_bytes=1_000)
BLOCK = 1024  # corpora are cut into blocks of this many bytes; every VAL_EVERY-th block is validation
VAL_EVERY = 5


# --- data ---------------------------------------------------------------------------------------------


def _split(text: bytes, train_bytes: int, val_bytes: int, what: str) -> tuple[bytes, bytes]:
    """Blocks of ``BLOCK`` bytes: every ``VAL_EVERY``-th to validation, the rest to training, each cut to size."""
    blocks = [text[k : k + BLOCK] for k in range(0, len(text), BLOCK)]
    val = b"".join(b for k, b in enumerate(blocks) if k % VAL_EVERY == VAL_EVERY - 1)[:val_bytes]
    train = b"".join(b for k, b in enumerate(blocks) if k % VAL_EVERY != VAL_EVERY - 1)[:train_bytes]
    if len(train) < train_bytes or len(val) < val_bytes:
        raise ValueError(f"corpus {what} holds {len(text)} bytes, too few for {train_bytes} + {val_bytes}")
    return train, val


def corpora(train_bytes_a: int, train_bytes_b: int, val_bytes: int) -> dict:
    """The two corpora as ``{"A": (train, val), "B": (train, val)}`` of bytes, and how they were made.

    A: the help texts of ``pydoc_data.topics.topics`` (the language
    reference's prose, with its few code examples), joined in sorted key
    order. B: the source files ``STDLIB_MODULES`` of this interpreter's
    standard library, concatenated in that order. The same Python minor
    version gives the same bytes (patch releases may edit a file: the hashes
    in the results tell).
    """
    from pydoc_data.topics import topics

    text_a = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text_b = b"\n\n".join((stdlib / name).read_bytes() for name in STDLIB_MODULES)
    parts = {"A": _split(text_a, train_bytes_a, val_bytes, "A"), "B": _split(text_b, train_bytes_b, val_bytes, "B")}
    parts["info"] = {
        name: {"train_bytes": len(tr), "val_bytes": len(va), "sha256": hashlib.sha256(tr + va).hexdigest()}
        for name, (tr, va) in parts.items()
    }
    parts["info"]["python"] = platform.python_version()
    return parts


def as_tokens(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(tokens: torch.Tensor, ctx: int) -> torch.Tensor:
    """Non-overlapping ``(n, ctx + 1)`` windows (inputs and their next bytes) covering ``tokens``."""
    n = (tokens.numel() - 1) // ctx
    return torch.stack([tokens[k * ctx : k * ctx + ctx + 1] for k in range(n)])


def batch(tokens: torch.Tensor, rows: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    """``rows`` random windows of ``ctx + 1`` bytes."""
    start = torch.randint(0, tokens.numel() - ctx - 1, (rows,), generator=gen)
    return torch.stack([tokens[s : s + ctx + 1] for s in start.tolist()])


# --- model --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.c_attn = nn.Linear(d, 3 * d)  # q, k, v fused, as nanoGPT
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()  # a module, so fire_core.torch.activations reads its outputs
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(d), CausalSelfAttention(d, heads), nn.LayerNorm(d), MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A byte-level nanoGPT: ``forward(idx)`` gives next-byte logits ``(batch, tokens, 256)``."""

    def __init__(self, layers: int, d: int, heads: int, ctx: int, vocab: int = 256):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as nanoGPT
        for name, p in self.named_parameters():  # nanoGPT's initialization
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))
            elif p.ndim == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_model(seed: int, cfg: dict) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg["layers"], cfg["d"], cfg["heads"], cfg["ctx"])


def loss_of(model, xy: torch.Tensor) -> torch.Tensor:
    logits = model(xy[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, rows: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) over the fixed windows ``data``."""
    total = 0.0
    for k in range(0, data.shape[0], rows):
        chunk = data[k : k + rows]
        total += float(loss_of(model, chunk)) * chunk.shape[0]
    return total / data.shape[0]


class Trainer:
    """AdamW with a linear warm-up to a constant rate; :meth:`restart` = fresh AdamW, warm-up from 0."""

    def __init__(self, model, cfg: dict):
        self.model, self.cfg = model, cfg
        self.restart()

    def restart(self) -> None:
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg["lr"], betas=(0.9, 0.95), weight_decay=0.1)
        self.since = 0

    def step(self, xy: torch.Tensor) -> float:
        self.since += 1
        for group in self.opt.param_groups:
            group["lr"] = self.cfg["lr"] * min(1.0, self.since / self.cfg["warmup"])
        loss = loss_of(self.model, xy)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())


# --- one seed -----------------------------------------------------------------------------------------


def fingerprint(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def intervene(method: str, model, initial: list[torch.Tensor], cfg: dict) -> float | None:
    """Apply ``method`` at the boundary in place; FIRE's wall time in seconds (None for the others).

    Besides :data:`METHODS`, the tuning runs' ``"S&P <lam>"`` and ``"FIRE scale=<rule>"``.
    """
    if method == "reset":
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), initial):
                p.copy_(p0)
    elif method.startswith("S&P "):
        shrink_perturb(model, initial, cfg["snp_coef"] if method == "S&P tuned" else float(method.split()[1]))
    elif method.startswith("FIRE") and not method.startswith("FIRE@") and method != NEEDED:
        options = {} if method == "FIRE default" else dict(FIRE_REF)
        if method == "FIRE best-scale":
            options["scale"] = SCALE_GRID[cfg["scale"]]
        elif method.startswith("FIRE scale="):
            options["scale"] = SCALE_GRID[method.removeprefix("FIRE scale=")]
        started = time.perf_counter()
        fire_core.torch.apply(model, **options, report=False)
        return time.perf_counter() - started
    elif method != "none":
        raise ValueError(f"unknown method {method!r}")
    return None


def phase2(model, cfg, data, seed, probe, riders: dict[str, WhenNeeded] | None = None) -> dict[str, dict]:
    """``steps2`` steps on the mixture from ``model``: ``{"": its run, method: the run of each rider}``.

    Fresh AdamW and warm-up for every method; the batches are drawn from the
    same seed for all. ``riders`` are triggered methods whose network is, so
    far, this one (``{"FIRE@DfI": its WhenNeeded}``): every ``steps2 //
    CHECKS`` steps each checks the network; a rider that fires leaves with a
    copy of the network, FIRE ref's call, a fresh AdamW and the warm-up
    restarted, and trains on from there with its own trigger; one that never
    fires has this run. Exactly what running it alone would give (the checks
    change nothing), without training the same network twice.
    """
    gen = torch.Generator().manual_seed(10 * seed + 1)
    curve = {"step": [0], "A": [evaluate(model, data["val_A"])], "B": [evaluate(model, data["val_B"])]}
    run = dict(model=model, trainer=Trainer(model, cfg), gen=gen, curve=curve, train_seconds=0.0, fire_seconds=0.0)
    return _train_on(run, 0, None, dict(riders or {}), cfg, data, probe)


def _train_on(run: dict, start: int, own: WhenNeeded | None, riders: dict, cfg, data, probe) -> dict[str, dict]:
    every = max(1, cfg["steps2"] // CHECKS)
    half = cfg["batch"] // 2
    model, trainer, gen, curve = run["model"], run["trainer"], run["gen"], run["curve"]
    branches = []  # (method, its run, its trigger, the step it left at)
    for step in range(start + 1, cfg["steps2"] + 1):
        xy = torch.cat([batch(data["A"], half, cfg["ctx"], gen), batch(data["B"], half, cfg["ctx"], gen)])
        started = time.perf_counter()
        trainer.step(xy)
        run["train_seconds"] += time.perf_counter() - started
        if step % every == 0 and step < cfg["steps2"]:
            if own is not None:
                seconds = fire_when_needed(own, cfg["steps1"] + step, model, probe)
                if seconds is not None:
                    run["fire_seconds"] += seconds
                    trainer.restart()
            for method, trigger in list(riders.items()):
                if trigger.check(cfg["steps1"] + step, **trigger_inputs(model, probe)) is None:
                    continue
                del riders[method]
                fork = copy.deepcopy(model)
                started = time.perf_counter()
                fire_core.torch.apply(fork, **FIRE_REF, report=False)
                seconds = time.perf_counter() - started
                fork_gen = torch.Generator()
                fork_gen.set_state(gen.get_state())
                branch = dict(model=fork, trainer=Trainer(fork, cfg), gen=fork_gen, curve=copy.deepcopy(curve),
                              train_seconds=run["train_seconds"], fire_seconds=run["fire_seconds"] + seconds)
                branches.append((method, branch, trigger, step))
        if step % cfg["eval2"] == 0 or step == cfg["steps2"]:
            curve["step"].append(step)
            curve["A"].append(evaluate(model, data["val_A"]))
            curve["B"].append(evaluate(model, data["val_B"]))
    row = lambda r: {"curve": r["curve"], "train_seconds": r["train_seconds"], "fire_seconds_in_phase2": r["fire_seconds"]}  # noqa: E731
    out = {"": row(run)}
    out.update({method: dict(row(run), rode_along=True) for method in riders})
    for method, branch, trigger, step in branches:  # each branch: the rest of phase 2 after its first firing
        out[method] = dict(_train_on(branch, step, trigger, {}, cfg, data, probe)[""], branched_at=step)
    return out


def trigger_inputs(model, probe) -> dict:
    return dict(weights=fire_core.torch.select(model, split=FIRE_REF["split"]),
                features=fire_core.torch.activations(model, probe))


def fire_when_needed(trigger: WhenNeeded, where: int, model, probe) -> float | None:
    """Check ``trigger`` at step ``where``; FIRE ref's call when it fires. Its wall time, or None."""
    reason = trigger.check(where, **trigger_inputs(model, probe))
    if reason is None:
        return None
    started = time.perf_counter()
    fire_core.torch.apply(model, **FIRE_REF, report=False)
    return time.perf_counter() - started


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The benchmark's loss (:func:`loss_of`) as ``loss(model(inputs), targets)``, for ``fire_core.torch.trial``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def trial_data(data: dict, cfg: dict, seed: int) -> tuple[list, tuple]:
    """FIRE when needed's trial data from the phase-2 training stream: ``TRIAL_BATCHES`` batches and a probe.

    Non-overlapping windows of the *training* parts of A and B (what phase 2
    trains on; no validation byte), shuffled by their own generator (seeded
    from ``seed``, so no other draw of the run moves): ``TRIAL_BATCHES``
    batches of ``batch`` windows, half A, half B, as phase 2's, and a probe
    of ``TRIAL_BATCHES * batch`` other windows, half A, half B, held out of
    them. Each is ``(inputs, next bytes)``.
    """
    gen = torch.Generator().manual_seed(10 * seed + 7)
    half, n = cfg["batch"] // 2, TRIAL_BATCHES * (cfg["batch"] // 2)
    picked = {}
    for part in ("A", "B"):
        w = windows(data[part], cfg["ctx"])
        if w.shape[0] < 2 * n:
            raise ValueError(f"corpus {part}'s training part holds {w.shape[0]} windows, too few for the trial's {2 * n}")
        picked[part] = w[torch.randperm(w.shape[0], generator=gen)[: 2 * n]]
    pairs = lambda xy: (xy[:, :-1], xy[:, 1:])  # noqa: E731
    batches = [pairs(torch.cat([picked["A"][k * half : (k + 1) * half], picked["B"][k * half : (k + 1) * half]]))
               for k in range(TRIAL_BATCHES)]
    return batches, pairs(torch.cat([picked["A"][n:], picked["B"][n:]]))


def needed_trial(model, data: dict, cfg: dict, seed: int):
    """``Moment.lookahead`` at the boundary: ``fire_core.torch.trial`` with FIRE ref's options on the phase-2 data."""
    batches, probe = trial_data(data, cfg, seed)
    return fire_core.torch.trial(model, batches, probe, loss=lm_loss, lr=1e-3, report=False, **FIRE_REF)


def run_seed(seed: int, cfg: dict) -> dict:
    """Phase 1 once, then each method's intervention and phase 2, for one seed; plain floats out."""
    torch.set_num_threads(1)
    parts = corpora(cfg["a_bytes"], cfg["b_bytes"], cfg["val_bytes"])
    data = {"A": as_tokens(parts["A"][0]), "B": as_tokens(parts["B"][0]),
            "val_A": windows(as_tokens(parts["A"][1]), cfg["ctx"]), "val_B": windows(as_tokens(parts["B"][1]), cfg["ctx"])}
    train_probe = windows(data["A"], cfg["ctx"])[: data["val_A"].shape[0]]  # training loss on A, fixed windows
    probe = data["val_A"][: cfg["batch"], :-1]  # the triggers' probe batch of A

    model = make_model(seed, cfg)
    initial = [p.detach().clone() for p in model.parameters()]
    triggers = {kind: WhenNeeded(kind) for kind in ("DfI", "dormant") if f"FIRE@{kind}" in cfg["methods"]}
    inputs = trigger_inputs(model, probe)
    for trigger in triggers.values():
        trigger.check(0, **inputs)  # the baseline: the initial network
    gate = WhenNeeded("when_needed") if NEEDED in cfg["methods"] else None
    if gate is not None:
        gate.check(0)  # the initial network: the schedule's step 0, no trial run, never fires

    trainer = Trainer(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    p1 = {"step": [], "train_A": [], "val_A": [], "val_B": []}
    started, p1["train_seconds"] = time.perf_counter(), 0.0
    for step in range(1, cfg["steps1"] + 1):
        xy = batch(data["A"], cfg["batch"], cfg["ctx"], gen)
        stepped = time.perf_counter()
        trainer.step(xy)
        p1["train_seconds"] += time.perf_counter() - stepped
        if step % cfg["eval1"] == 0 or step == cfg["steps1"]:
            p1["step"].append(step)
            p1["train_A"].append(evaluate(model, train_probe))
            p1["val_A"].append(evaluate(model, data["val_A"]))
            p1["val_B"].append(evaluate(model, data["val_B"]))
    p1["seconds"] = time.perf_counter() - started
    base = copy.deepcopy(model)
    out = {"phase1": p1}
    fire_core.torch.apply(copy.deepcopy(base), **FIRE_REF, report=False)  # untimed: first-call costs are not FIRE's

    # The triggers look at the boundary first; each then rides along the run that starts from its network
    # (none's, or FIRE ref's when it fired: the same call), and leaves it only if it fires later.
    start, rows = {}, {}
    for method in (m for m in cfg["methods"] if m.startswith("FIRE@")):
        trigger = triggers[method.removeprefix("FIRE@")]
        model = copy.deepcopy(base)
        rows[method] = {"fire_seconds": fire_when_needed(trigger, cfg["steps1"], model, probe)}
        start[method] = (fingerprint(model), model)
    done: dict[str, str] = {}  # fingerprint after the intervention -> the method that ran phase 2 from it
    if gate is not None:  # FIRE when needed: a trial on the phase-2 stream at the boundary, FIRE ref's call if it fires
        model = copy.deepcopy(base)
        started = time.perf_counter()
        reason = gate.check(cfg["steps1"], lookahead=needed_trial(model, data, cfg, seed))
        trial_seconds = time.perf_counter() - started
        rows[NEEDED] = {"fire_seconds": None, "trial_seconds": trial_seconds}
        if reason is not None:
            started = time.perf_counter()
            fire_core.torch.apply(model, **FIRE_REF, report=False)
            rows[NEEDED]["fire_seconds"] = time.perf_counter() - started
        needed_start = (fingerprint(model), model)
    for method in (m for m in cfg["methods"] if not m.startswith("FIRE@") and m != NEEDED):
        model = copy.deepcopy(base)
        fire_seconds = intervene(method, model, initial, cfg)
        key = fingerprint(model)
        if key in done:  # the same weights as a method already run: the same phase 2
            out[method] = dict(out[done[key]], same_as=done[key], fire_seconds=fire_seconds)
            continue
        done[key] = method
        riders = {m: triggers[m.removeprefix("FIRE@")] for m, (k, _) in start.items() if k == key and m not in out}
        runs = phase2(model, cfg, data, seed, probe, riders)
        out[method] = dict(runs.pop(""), fire_seconds=fire_seconds)
        for rider, row in runs.items():
            out[rider] = dict(row, **rows[rider])
            if out[rider].pop("rode_along", False):  # never fired after the boundary: this very run
                out[rider]["same_as"] = method
    for method, (_, model) in start.items():
        if method not in out:  # its starting network is no other method's: trained on its own
            trigger = triggers[method.removeprefix("FIRE@")]
            runs = phase2(model, cfg, data, seed, probe, {method: trigger})
            out[method] = dict(runs[method], **rows[method])
            out[method].pop("rode_along", None)
    if gate is not None:  # it does not check inside phase 2: its run is that of the network it starts from
        key, model = needed_start
        if key in done:
            out[NEEDED] = dict(out[done[key]], same_as=done[key], **rows[NEEDED])
        else:
            out[NEEDED] = dict(phase2(model, cfg, data, seed, probe)[""], **rows[NEEDED])
        out[NEEDED].update(fired_at=list(gate.fired_at), values=list(gate.values), losses=list(gate.losses),
                           checks_at=[0, cfg["steps1"]])
    every = max(1, cfg["steps2"] // CHECKS)
    for method in start:
        trigger = triggers[method.removeprefix("FIRE@")]
        out[method].update(fired_at=list(trigger.fired_at), values=list(trigger.values),
                           checks_at=[0, cfg["steps1"]] + [cfg["steps1"] + s for s in range(every, cfg["steps2"], every)])
    return out


# --- aggregation and output ---------------------------------------------------------------------------


def final(row: dict, key: str = "A+B") -> float:
    """Validation loss at the end of phase 2: on A, on B, or their mean (A+B: the mixture trained on)."""
    a, b = row["curve"]["A"][-1], row["curve"]["B"][-1]
    return {"A": a, "B": b, "A+B": 0.5 * (a + b)}[key]


def right_after(row: dict, key: str) -> float:
    return row["curve"][key][0]


def fmt3(values) -> str:
    return fmt(values, 1.0, 3)


def verdict(diffs, better_if_negative: bool, claim: str) -> str:
    """Which way a paired difference goes: beyond 2 standard errors, or not resolved."""
    m, s = mean_se(diffs)
    if not math.isfinite(s):
        return f"{claim}: not resolved (one seed)"
    if abs(m) <= 2 * s:
        return f"{claim}: **not resolved** here (paired difference {m:+.3f} ± {s:.3f} nats, within 2 s.e.)"
    holds = (m < 0) == better_if_negative
    return f"{claim}: **{'holds' if holds else 'does not hold'}** here (paired difference {m:+.3f} ± {s:.3f} nats)"


def fire_time(row: dict) -> float | None:
    seconds = (row.get("fire_seconds") or 0.0) + row.get("fire_seconds_in_phase2", 0.0)
    return fire_fraction(seconds, row["train_seconds"]) if seconds else None


def firing_text(runs: list[dict], method: str, cfg: dict) -> str:
    fired = [r[method]["fired_at"] for r in runs]
    seeds = sum(1 for f in fired if f)
    steps = sorted({s for f in fired for s in f})
    where = ", ".join(("boundary" if s == cfg["steps1"] else f"phase-2 step {s - cfg['steps1']}") for s in steps)
    return f"{seeds}/{len(runs)} seeds" + (f" ({sum(map(len, fired))} firings: {where})" if steps else ", never")


def tables(results: dict, cfg: dict) -> list[str]:
    runs = results["main"]
    methods = cfg["methods"]
    p1 = [r["phase1"] for r in runs]
    at_min = [int(np.argmin(p["val_A"])) for p in p1]
    overfit = sum(p["val_A"][-1] > p["val_A"][k] and p["train_A"][-1] < p["train_A"][k] for p, k in zip(p1, at_min))
    lines = [
        "### Phase 1: training on A alone",
        "",
        f"Validation loss on A reached its minimum at step {fmt([p['step'][k] for p, k in zip(p1, at_min)], 1, 0)} "
        f"of {cfg['steps1']}; it was higher at the end than at that minimum while the training loss was lower "
        f"(the model overfits A) in **{overfit}/{len(runs)} seeds**.",
        "",
        "| | training loss on A | validation loss on A | validation loss on B |",
        "|---|---|---|---|",
        f"| at the minimum of val. A | {fmt3([p['train_A'][k] for p, k in zip(p1, at_min)])} "
        f"| {fmt3([p['val_A'][k] for p, k in zip(p1, at_min)])} | {fmt3([p['val_B'][k] for p, k in zip(p1, at_min)])} |",
        f"| end of phase 1 (step {cfg['steps1']}) | {fmt3([p['train_A'][-1] for p in p1])} "
        f"| {fmt3([p['val_A'][-1] for p in p1])} | {fmt3([p['val_B'][-1] for p in p1])} |",
        "",
        "### Phase 2: the mixture A+B",
        "",
        "Validation losses in nats per byte (lower is better); *A+B* is the mean of the two, the mixture phase 2 "
        "trains on. Paired differences are per seed (same initialization, phase-1 network and phase-2 batches), "
        "negative = lower loss than the reference method.",
        "",
        "| method | val. A right after | val. B right after | val. A end | val. B end | val. A+B end "
        "| paired diff. to none (A+B end) | FIRE time / phase-2 training time | fired |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        col = lambda f, key="A+B": [f(r[method], key) for r in runs]  # noqa: E731
        diff = [final(r[method]) - final(r["none"]) for r in runs] if "none" in methods else None
        fractions = [f for f in (fire_time(r[method]) for r in runs) if f is not None]
        same = {r[method].get("same_as") for r in runs} - {None}
        name = method + (f" (= {', '.join(sorted(same))}: identical weights)" if same else "")
        lines.append(
            f"| {name} | {fmt3(col(right_after, 'A'))} | {fmt3(col(right_after, 'B'))} | {fmt3(col(final, 'A'))} "
            f"| {fmt3(col(final, 'B'))} | {fmt3(col(final))} "
            f"| {'—' if diff is None or method == 'none' else fmt3(diff)} "
            f"| {f'{100 * np.mean(fractions):.2f}% (max {100 * max(fractions):.2f}%)' if fractions else '—'} "
            f"| {firing_text(runs, method, cfg) if method.startswith('FIRE@') or method == NEEDED else '—'} |"
        )
    lines += [""]
    claims = []
    if {"FIRE ref", "S&P tuned"} <= set(methods):
        for fire in ("FIRE ref", "FIRE default"):
            if fire in methods:
                claims.append(verdict([final(r[fire]) - final(r["S&P tuned"]) for r in runs], True,
                                      f'"FIRE beats tuned S&P" ({fire} − S&P tuned, val. A+B at the end)'))
    if {"reset", "none"} <= set(methods):
        claims.append(verdict([final(r["reset"]) - final(r["none"]) for r in runs], False,
                              '"A full reset fails" (reset − none, val. A+B at the end; holds when the reset ends worse)'))
    if claims:
        lines += ["### The paper's claims, here", ""] + [f"* {c}" for c in claims] + [
            "", "A claim is called *holding* or *not holding* when the paired difference is more than 2 standard "
            "errors from 0, *not resolved* otherwise. Computed from the numbers above at every run.", ""]
    trig = [m for m in methods if m.startswith("FIRE@")]
    if trig:
        lines += ["### The triggers", "",
                  f"`common.WhenNeeded` unchanged (DfI: worst layer's DfI/n above {cfg['dfi_ratio']:g} x its value on the "
                  f"initial network; dormant: mean share of tau-dormant GELU units above {cfg['dormant_share']:g}), checked "
                  "on the initial network (the baseline), at the boundary and every "
                  f"{max(1, cfg['steps2'] // CHECKS)} phase-2 steps. The value each check read (mean over seeds):", "",
                  "| trigger | " + " | ".join(("initial", "boundary") + tuple(
                      f"+{s - cfg['steps1']}" for s in runs[0][trig[0]]["checks_at"][2:])) + " | fired |",
                  "|---|" + "---|" * (len(runs[0][trig[0]]["checks_at"]) + 1)]
        for method in trig:
            values = np.array([r[method]["values"] + [np.nan] * (len(r[method]["checks_at"]) - len(r[method]["values"]))
                               for r in runs], dtype=float)
            cells = [f"{v:.3g}" for v in np.nanmean(values, axis=0)]
            lines.append(f"| {method} | {' | '.join(cells)} | {firing_text(runs, method, cfg)} |")
        lines += [""]
    if NEEDED in methods:
        lines += needed_section(runs, cfg)
    for what, grid, key in (("S&P coefficient", "snp_sweep", "snp_coef"), ("FIRE scale rule", "scale_sweep", "scale")):
        if grid in cfg:
            lines += [f"### {what} (held-out seeds {list(TUNE_SEEDS)})", "",
                      f"Chosen: **{cfg[key]}**, the lowest final validation loss on A+B.", "",
                      "| value | val. A end | val. B end | val. A+B end |", "|---|---|---|---|"]
            for value, rows in cfg[grid].items():
                lines.append(f"| {value} | {fmt3([r['A'] for r in rows])} | {fmt3([r['B'] for r in rows])} "
                             f"| {fmt3([r['A+B'] for r in rows])} |")
            lines += [""]
    return lines


def needed_section(runs: list[dict], cfg: dict) -> list[str]:
    """The section every benchmark gives ``fire_core.schedule.when_needed()``: goals against none and FIRE ref."""
    fire = "FIRE ref" if "FIRE ref" in cfg["methods"] else None
    none = "none" if "none" in cfg["methods"] else None
    ratios = [r[NEEDED]["values"][1] for r in runs]
    trial = [r[NEEDED]["trial_seconds"] for r in runs]
    share2 = [r[NEEDED]["trial_seconds"] / r[NEEDED]["train_seconds"] for r in runs]
    share = [r[NEEDED]["trial_seconds"] / (r["phase1"]["train_seconds"] + r[NEEDED]["train_seconds"]) for r in runs]
    fired = sum(1 for r in runs if r[NEEDED]["fired_at"])
    lines = [
        "### FIRE when needed (`fire_core.schedule.when_needed()`)", "",
        "The library's rule as it ships (`common.WhenNeeded(\"when_needed\")`: a trial, FIRE fires when the probe "
        "loss of a FIRE copy over that of an untouched copy, each trained 200 Adam steps at lr 1e-3, is below "
        "0.526), checked on the initial network (step 0: no trial, never fires) and **at the boundary only**, "
        "where the data shifts: phase 2 trains on one fixed mixture, so there is no later shift to look for (and "
        "each check costs 2 x 200 steps, more than phase 2's 200). When it fires, FIRE ref's call is applied, as "
        "FIRE ref and FIRE@DfI apply it. The trial (`fire_core.torch.trial`, FIRE ref's options: 5 Newton–Schulz "
        "steps, `c_attn` as q, k, v) trains on "
        f"{TRIAL_BATCHES} batches of {cfg['batch']} windows of {cfg['ctx']} bytes (half A, half B, as phase 2's) "
        f"and reads its probe loss on {TRIAL_BATCHES * cfg['batch']} other windows, all non-overlapping windows of "
        "the training parts of A and B (the phase-2 stream; no validation byte), drawn by their own generator; "
        "the loss is the benchmark's next-byte cross-entropy. The threshold was chosen on the digits MLP "
        "(classification cross-entropy, FIRE at 10 steps, 4 batches of 64 and a probe of 256) and is applied "
        "unchanged.", "",
        *NEEDED_TABLE,
    ]
    if fire and none:
        val = lambda m: [final(r[m]) for r in runs]  # noqa: E731
        g = goals(val(none), val(fire), val(NEEDED), higher_is_better=False)
        diff = lambda a, b: fmt3([x - y for x, y in zip(val(a), val(b))])  # noqa: E731
        lines.append(
            f"| byte-level nanoGPT ({cfg['layers']} x {cfg['d']}), A then A+B | val. loss A+B at the end, nats/byte "
            f"(lower is better; FIRE = FIRE ref) | {diff(fire, none)} | {diff(NEEDED, none)} | {diff(NEEDED, fire)} "
            f"| {fired}/{len(runs)} seeds | {np.mean(trial):.1f} s ({100 * np.mean(share2):.0f}% of phase 2's "
            f"training time, {100 * np.mean(share):.0f}% of phases 1 + 2) | {goals_cell(g)} |")
    else:
        lines.append("| (none or FIRE ref not run: no differences) | | | | | | | |")
    lines += [
        "",
        f"Differences: mean ± s.e. over {len(runs)} paired seeds, in nats per byte (negative: lower loss than the "
        "second method). Goals (`common.goals`, paired 95% t intervals): *gain kept* is at stake only where FIRE "
        "ref beats none significantly; *never cost*: FIRE when needed not significantly worse than none. Trial "
        "cost: wall time of the check at the boundary (both trial copies), mean over seeds, and its share of the "
        "same seed's training steps (phase 2 alone; phases 1 and 2).",
        "",
        f"Trial ratio (probe loss with FIRE / without) at the boundary: median {np.median(ratios):.3f}, range "
        f"{min(ratios):.3f}–{max(ratios):.3f} (fires below 0.526).",
        "",
        "| seed | probe loss without FIRE | with FIRE | ratio | fired | FIRE ref − none, val. A+B end |",
        "|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(runs):
        without, with_fire = r[NEEDED]["losses"][1]
        gain = f"{final(r[fire]) - final(r[none]):+.3f}" if fire and none else "—"
        lines.append(f"| {k} | {without:.3f} | {with_fire:.3f} | {ratios[k]:.3f} "
                     f"| {'yes' if r[NEEDED]['fired_at'] else 'no'} | {gain} |")
    return lines + [""]


def plot(results: dict, cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["main"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    band = lambda a: (a.mean(0), a.std(0, ddof=1) / math.sqrt(len(a)) if len(a) > 1 else 0 * a.mean(0))  # noqa: E731
    steps = np.array(runs[0]["phase1"]["step"])
    for key, style in (("train_A", "-"), ("val_A", "--"), ("val_B", ":")):
        m, s = band(np.array([r["phase1"][key] for r in runs]))
        axes[0].plot(steps, m, style, color="k", label=key.replace("_", " "))
        axes[0].fill_between(steps, m - s, m + s, color="k", alpha=0.15)
    axes[0].set_title(f"phase 1: A alone (mean ± s.e., {len(runs)} seeds)")
    axes[0].set_xlabel("phase-1 step")
    colors = dict(zip(cfg["methods"], plt.get_cmap("tab10").colors))
    for ax, key in zip(axes[1:], ("A", "B")):
        shared = {m: {r[m].get("same_as") for r in runs} for m in cfg["methods"]}
        for method in cfg["methods"]:
            if len(shared[method]) == 1 and None not in shared[method]:
                continue  # the same curve as another method in every seed: drawn once, under both names
            label = " = ".join([method] + [m for m, src in shared.items() if src == {method}])
            steps = np.array(runs[0][method]["curve"]["step"])
            m, s = band(np.array([r[method]["curve"][key] for r in runs]))
            style = "-" if method.startswith("FIRE") else "--"
            ax.plot(steps, m, style, color=colors[method], label=label)
            ax.fill_between(steps, m - s, m + s, color=colors[method], alpha=0.15)
        ax.set_title(f"phase 2 on A+B: validation loss on {key}")
        ax.set_xlabel("phase-2 step")
    lo = min(min(np.mean([r[m]["curve"][k][-1] for r in runs]) for m in cfg["methods"]) for k in ("A", "B"))
    for ax in axes:
        ax.set_ylabel("cross-entropy (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1:]:
        ax.set_ylim(lo - 0.1, lo + 1.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(results: dict, cfg: dict, path: Path, png: Path, seconds: float) -> None:
    info = cfg["corpora"]
    lines = [
        "# Language benchmark: continual pre-training of a byte-level nanoGPT",
        "",
        f"`{cfg['command']}` — seeds {list(range(cfg['seeds']))}"
        + (f" (tuning on held-out seeds {list(TUNE_SEEDS)})" if "snp_sweep" in cfg else "")
        + f". Wall time {seconds / 60:.1f} min with {cfg['jobs']} worker process(es) on a {os.cpu_count()}-core "
        f"{platform.machine()} CPU ({platform.platform()}), torch {torch.__version__}, python {info['python']}.",
        "",
        f"Model: {cfg['layers']} pre-LayerNorm blocks, width {cfg['d']}, {cfg['heads']} heads, context {cfg['ctx']} "
        f"bytes, fused `c_attn`, GELU MLP (4x), `lm_head` tied to `wte`, nanoGPT init, no dropout "
        f"({cfg['params']} parameters). AdamW (betas 0.9/0.95, weight decay 0.1, gradient clip 1), lr "
        f"{cfg['lr']:g} after a linear warm-up of {cfg['warmup']} steps, then **constant**; batch {cfg['batch']} "
        f"windows. Phase 1: {cfg['steps1']} steps on A; phase 2: {cfg['steps2']} steps on batches half A, half B. "
        "**Every method starts phase 2 with a fresh AdamW and the warm-up restarted** (the reference's language "
        "setting; only the intervention differs).",
        "",
        f"Corpora (nothing downloaded): A = `pydoc_data.topics` help texts, {info['A']['train_bytes']} training + "
        f"{info['A']['val_bytes']} validation bytes (sha256 `{info['A']['sha256'][:16]}…`); B = the standard-library "
        f"sources {', '.join(STDLIB_MODULES)}, {info['B']['train_bytes']} + {info['B']['val_bytes']} bytes "
        f"(sha256 `{info['B']['sha256'][:16]}…`); every {VAL_EVERY}th block of {BLOCK} bytes is validation.",
        "",
        f"Methods: S&P is `theta <- (1 - lam) theta + lam theta_0` on every parameter (S&P 0.8: lam {SNP_COEF}, "
        f"the reference's warm-start value; S&P tuned: lam {cfg['snp_coef']}); FIRE ref = "
        "`fire_core.torch.apply(model, steps=5, split={'*.c_attn': 3})` (every Linear, `c_attn` as q, k, v, the tied "
        f"head projected); FIRE default = `fire_core.torch.apply(model)`; FIRE best-scale = FIRE ref with "
        f"`scale={SCALE_GRID[cfg['scale']]!r}`; FIRE@DfI / FIRE@dormant = FIRE ref's call when "
        "`common.WhenNeeded` fires; FIRE when needed = FIRE ref's call when `fire_core.schedule.when_needed()` "
        "fires at the boundary (its section below). A method whose weights after the intervention are bit-for-bit those of an "
        "earlier one is not trained again (its rows say `= method`).",
        "",
    ]
    if cfg["quick"]:
        lines += ["**Quick mode: a tiny model, few steps, 2 seeds and no tuning (S&P tuned uses lam 0.8 and FIRE "
                  "best-scale `\"fire\"`, fixed): the numbers do not mean anything.**", ""]
    lines += tables(results, cfg)
    lines += [f"![language]({png.name})", ""]
    path.write_text("\n".join(lines))


def _tune(run_all, cfg: dict) -> None:
    """S&P's coefficient and FIRE's scale rule: the lowest final val. A+B on the held-out seeds (one phase 1 each)."""
    runs = {f"S&P {c:g}": c for c in SNP_GRID} | {f"FIRE scale={s}": s for s in SCALE_GRID}
    done = run_all([(seed, dict(cfg, methods=list(runs))) for seed in TUNE_SEEDS])
    summary = {name: [{key: final(r[name], key) for key in ("A", "B", "A+B")} for r in done] for name in runs}
    cfg["snp_sweep"] = {c: summary[name] for name, c in runs.items() if name.startswith("S&P")}
    cfg["scale_sweep"] = {s: summary[name] for name, s in runs.items() if name.startswith("FIRE")}
    best = lambda sweep: min(sweep, key=lambda v: np.mean([r["A+B"] for r in sweep[v]]))  # noqa: E731
    cfg["snp_coef"], cfg["scale"] = best(cfg["snp_sweep"]), best(cfg["scale_sweep"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, 2 seeds, no tuning: < 40 s")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; quick 2)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--steps1", type=int, default=None, help="phase-1 steps (default 600; quick 60)")
    p.add_argument("--steps2", type=int, default=None, help="phase-2 steps (default 200; quick 30)")
    p.add_argument("--snp-coef", type=float, default=None, help="S&P tuned's lam (default: tuned on held-out seeds)")
    p.add_argument("--scale", choices=tuple(SCALE_GRID), default=None,
                   help="FIRE best-scale's rule (default: tuned on held-out seeds)")
    add_run_options(p)
    a = p.parse_args(argv)
    if a.replot is not None:
        cfg, results, seconds = load_run(a.replot)
        for grid in ("snp_sweep",):
            if grid in cfg:
                cfg[grid] = {float(v): rows for v, rows in cfg[grid].items()}
        return write_outputs(a.replot.with_suffix(""), results, cfg, seconds, plot, write_markdown)
    methods = names(p, "methods", a.methods, METHODS)
    methods = [m for m in METHODS if m in methods]  # a fixed order: the identical-weights check runs FIRE ref first
    cfg = dict(QUICK if a.quick else FULL, quick=a.quick, methods=methods, jobs=max(1, a.jobs),
               command=command_line(__file__, argv))
    for key in ("seeds", "steps1", "steps2"):
        if getattr(a, key) is not None:
            cfg[key] = getattr(a, key)
    cfg["corpora"] = corpora(cfg["a_bytes"], cfg["b_bytes"], cfg["val_bytes"])["info"]
    cfg["params"] = sum(p.numel() for p in make_model(0, cfg).parameters())
    cfg["dfi_ratio"], cfg["dormant_share"] = DFI_RATIO, DORMANT_SHARE  # common.WhenNeeded's, recorded
    cfg["snp_coef"] = a.snp_coef if a.snp_coef is not None else SNP_COEF
    cfg["scale"] = a.scale if a.scale is not None else "fire"
    started = time.perf_counter()
    with seed_runner(run_seed, cfg["jobs"]) as run_all:
        tune = not a.quick and ((a.snp_coef is None and "S&P tuned" in methods)
                                or (a.scale is None and "FIRE best-scale" in methods))
        if tune:
            _tune(run_all, cfg)
            if a.snp_coef is not None:
                cfg["snp_coef"] = a.snp_coef
            if a.scale is not None:
                cfg["scale"] = a.scale
        results = {"main": run_all([(seed, cfg) for seed in range(cfg["seeds"])])}
    seconds = time.perf_counter() - started
    stem = a.out / ("language-quick" if a.quick else "language")
    save_run(stem, cfg, results, seconds)
    return write_outputs(stem, results, cfg, seconds, plot, write_markdown)


if __name__ == "__main__":
    sys.exit(main())
