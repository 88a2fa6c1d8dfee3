"""``fire-core demo``: FIRE at a task switch, against doing nothing, in about 20 seconds on a CPU.

The experiment (also the base of ``benchmarks/plasticity.py``):

1. a small ReLU MLP (64-128-128-10) learns scikit-learn's handwritten digits
   with *shuffled* labels until it has memorized them (phase 1). Fitting
   noise is the classic way to make a network lose plasticity: its weights
   grow and its features collapse;
2. at the switch to the true labels the network is copied: one copy goes on
   as it is, the other gets ``fire_core.torch.apply(model, optimizer=opt)``;
   a freshly initialized network runs alongside as the reference;
3. all three learn the true labels for the same number of epochs (phase 2)
   and their test accuracy is printed as they go.

Only PyTorch and scikit-learn are needed (``pip install "fire-core[demo]"``);
the data set ships inside scikit-learn, nothing is downloaded. Everything is
seeded, so a run repeats exactly on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

try:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn
except ImportError as exc:  # reported by main() in one line
    _MISSING: ImportError | None = exc
else:
    _MISSING = None

__all__ = [
    "main",
    "digits",
    "make_mlp",
    "make_optimizer",
    "train",
    "accuracy",
    "hidden_activations",
    "INSTALL_HINT",
]

INSTALL_HINT = (
    'pip install "fire-core[demo]" (on a machine without CUDA install the CPU build of torch first: '
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)"
)

HIDDEN = 128
LR = 1e-3
BATCH = 64
CHECKPOINTS = (0, 1, 2, 5, 10, 20)


# --- the experiment's parts (shared with benchmarks/plasticity.py) ------------------------


def digits(split_seed: int = 0):
    """scikit-learn's 8x8 digits as float32 tensors in [0, 1]: (x_train, y_train, x_test, y_test).

    A stratified 75/25 split, fixed by ``split_seed``.
    """
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.25, random_state=split_seed, stratify=y
    )
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def make_mlp(seed: int, hidden: int = HIDDEN, n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """A two-hidden-layer ReLU MLP with torch's default initialization, drawn from ``seed``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(
            nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
        )
    finally:
        torch.random.set_rng_state(gen_state)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR)


def train(model, optimizer, x, y, epochs: int, *, seed: int, after_step=None, after_epoch=None) -> None:
    """Minibatch cross-entropy training; batch order drawn from ``seed``.

    ``after_step(model)`` runs after every optimizer step (SWR hooks in
    there), ``after_epoch(epoch, model)`` after every epoch (1-based).
    """
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], BATCH):
            idx = order[start : start + BATCH]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
        if after_epoch is not None:
            after_epoch(epoch, model)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).to(torch.float64).mean())


def hidden_activations(model: nn.Sequential, x) -> list:
    """The output of every ReLU of a ``make_mlp`` network on ``x``; the last is the penultimate features."""
    out, h = [], x
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                out.append(h)
    return out


def _clone(model, optimizer):
    """An independent copy of a model and of its optimizer's state."""
    twin = copy.deepcopy(model)
    opt = make_optimizer(twin)
    opt.load_state_dict(optimizer.state_dict())
    return twin, opt


# --- the command ------------------------------------------------------------------------


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="fire-core demo",
        description="FIRE at a task switch on scikit-learn's digits: memorize shuffled labels, "
        "then learn the true ones, with and without FIRE at the switch.",
    )
    p.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests (numbers are not meaningful)")
    p.add_argument("--seed", type=int, default=0, help="seed of the network, the shuffled labels and the batches")
    p.add_argument("--steps", type=int, default=10, help="Newton-Schulz steps (the reference uses 10 for vision)")
    p.add_argument("--method", default="fire", choices=("fire", "fast", "svd"), help="projection method")
    p.add_argument("--epochs1", type=int, default=None, help="phase-1 epochs on shuffled labels (default 300)")
    p.add_argument("--epochs2", type=int, default=None, help="phase-2 epochs on true labels (default 20)")
    args = p.parse_args(argv)
    if args.epochs1 is None:
        args.epochs1 = 20 if args.quick else 300
    if args.epochs2 is None:
        args.epochs2 = 2 if args.quick else 20
    for name in ("epochs1", "epochs2", "steps"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    """Run the demo; returns the exit status (0 on success, 1 if torch or scikit-learn is missing)."""
    args = _parse(argv)
    if _MISSING is not None:
        missing = {"sklearn": "scikit-learn"}.get(_MISSING.name.split(".")[0], _MISSING.name)
        print(f"fire-core demo needs PyTorch and scikit-learn ({missing} is missing): {INSTALL_HINT}", file=sys.stderr)
        return 1
    import fire_core.torch
    from fire_core.diagnostics import dormant_ratio, srank

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a network this small runs fastest on one core
    try:
        x_train, y_train, x_test, y_test = digits()
        shuffled = y_train[torch.randperm(y_train.shape[0], generator=torch.Generator().manual_seed(args.seed))]
        hidden = 32 if args.quick else HIDDEN
        print(
            f"fire-core demo: FIRE at a task switch (scikit-learn digits, {x_train.shape[0]} train / "
            f"{x_test.shape[0]} test images, MLP 64-{hidden}-{hidden}-10, Adam lr {LR:g}, seed {args.seed})\n"
        )

        model = make_mlp(args.seed, hidden)
        opt = make_optimizer(model)
        train(model, opt, x_train, shuffled, args.epochs1, seed=args.seed)
        print(
            f"phase 1: {args.epochs1} epochs on shuffled labels; the network memorized "
            f"{100 * accuracy(model, x_train, shuffled):.1f}% of them (test accuracy on true labels "
            f"{100 * accuracy(model, x_test, y_test):.1f}%, chance 10%)"
        )

        runs = {"no intervention": _clone(model, opt), "FIRE": _clone(model, opt)}
        fresh = make_mlp(args.seed + 10_000, hidden)
        runs["fresh network"] = (fresh, make_optimizer(fresh))

        fire_model, fire_opt = runs["FIRE"]
        print(f"\nswitch to the true labels: fire_core.torch.apply(model, steps={args.steps}, "
              f"method={args.method!r}, optimizer=opt)\n")
        report = fire_core.torch.apply(fire_model, steps=args.steps, method=args.method, optimizer=fire_opt)
        print(report)

        def features_summary(m):
            acts = hidden_activations(m, x_train)
            return int(srank(acts[-1])), 100 * float(dormant_ratio(acts))

        print("\nright after the switch      memorized labels kept   feature srank   dormant units")
        for name in ("no intervention", "FIRE", "fresh network"):
            m = runs[name][0]
            rank, dormant = features_summary(m)
            print(f"  {name:<26}{100 * accuracy(m, x_train, shuffled):>19.1f}%{rank:>16d}{dormant:>15.1f}%")

        marks = sorted({c for c in CHECKPOINTS if c <= args.epochs2} | {args.epochs2})
        curves = {}
        for name, (m, o) in runs.items():
            curve = curves[name] = {0: accuracy(m, x_test, y_test)}

            def record(epoch, trained, curve=curve):
                curve[epoch] = accuracy(trained, x_test, y_test)

            train(m, o, x_train, y_train, args.epochs2, seed=10 * args.seed + 1, after_epoch=record)

        print(f"\nphase 2: {args.epochs2} epochs on the true labels; test accuracy (%)")
        print("  epoch" + "".join(f"{name:>18}" for name in runs))
        for epoch in marks:
            print(f"  {epoch:>5}" + "".join(f"{100 * curves[name][epoch]:>18.1f}" for name in runs))

        final = {name: 100 * curves[name][args.epochs2] for name in runs}
        gain = final["FIRE"] - final["no intervention"]
        print(
            f"\nresult: final test accuracy with FIRE {final['FIRE']:.1f}% vs {final['no intervention']:.1f}% "
            f"without ({gain:+.1f} points; a fresh network reaches {final['fresh network']:.1f}%), "
            f"{time.perf_counter() - started:.1f} s"
        )
        if args.quick:
            print("(--quick: too short to be meaningful; run without --quick for the real comparison)")
        return 0
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
