"""fire_core.flax.apply and report on linen MLPs: compiled, op by op and under jax.jit, on CPU.

Run from the repository root (needs the ``jax`` extra):

    python benchmarks/flax_apply.py           # writes benchmarks/results/flax_apply-cpu.md
    python benchmarks/flax_apply.py --quick   # the small MLP only, a smoke test of the script

Models: linen MLPs (Dense layers, float32, random normal weights), a small
one (784 -> 256 -> 128 -> 10, 0.2M parameters) and a large one (784 -> 2048
-> 2048 -> 2048 -> 10, 10.0M parameters; its two 2048 x 2048 kernels go in
one batched call).

Timings, in milliseconds (minimum over repeats, each ending in
``jax.block_until_ready``), for each model in a fresh process state:

* apply, first call and warm: ``fire_core.flax.apply(params)`` called
  eagerly, which checks the leaves and runs the projection as one compiled
  program per tree structure (the first call includes that compilation);
* op by op: the core's own eager path on the same leaves
  (``plan.reinit_many(..., report=False)``, what ``apply`` ran until it
  compiled), where JAX compiles every operation for every new shape on the
  first call;
* jit compile and jit run: ``jax.jit(apply).lower(params).compile()`` and
  the compiled call;
* report, first call and warm: ``fire_core.flax.report(params, new)`` (its
  two device steps compiled once per shape), and op by op
  (``plan.measure`` without them).

Each path runs in a process of its own, so both first calls start with
nothing compiled.

The script also measures the first Adam update after a task-boundary reset
(``fire_core.flax.reset_opt_state``), with and without resetting Adam's step
count, against a fresh Adam, for several counts reached before the reset.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fire_core.flax as ff
from fire_core.plan import measure, reinit_many

RESULTS = Path(__file__).resolve().parent / "results"


class MLP(nn.Module):
    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for w in self.widths[:-1]:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.widths[-1])(x)


def random_params(widths, d_in, seed=0):
    shapes = jax.eval_shape(
        MLP(widths).init, jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((1, d_in), jnp.float32)
    )["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / math.sqrt(s.shape[0]), jnp.float32), shapes
    )


def timed(fn, repeats, block=True):
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if block:
            jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def time_path(path, params, steps, method, repeats) -> dict:
    """One path's timings, in a process that has run nothing else (so first calls compile from cold).

    ``compiled``: apply (first, warm), jax.jit(apply) (compile, run) and, for "fire", report.
    ``op``: the core's op-by-op path for the same leaves, then its differences from apply's results.
    """
    items = [(name, _leaf(params, name), layout) for name, layout in ff.select(params).items()]
    apply = lambda: ff.apply(params, steps, method=method)  # noqa: E731
    if path == "compiled":
        t = dict(first=timed(apply, 1), warm=timed(apply, repeats))
        compiled = jax.jit(lambda p: ff.apply(p, steps, method=method))
        t0 = time.perf_counter()
        compiled = compiled.lower(params).compile()
        t.update(compile=1e3 * (time.perf_counter() - t0), run=timed(lambda: compiled(params), repeats))
        new, jitted = apply(), compiled(params)
        t["jit_diff"] = max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(jitted))
        )
        if method == "fire":
            report = lambda: ff.report(params, new)  # noqa: E731
            t.update(report_first=timed(report, 1, block=False), report_warm=timed(report, repeats, block=False))
        return t

    def op_by_op():
        out = {}
        reinit_many(items, steps=steps, method=method, write=out.__setitem__, report=False)
        return out

    t = dict(op_first=timed(op_by_op, 1), op_warm=timed(op_by_op, repeats))
    theirs = op_by_op()
    if method == "fire":
        pairs = [(name, array, theirs[name], layout) for name, array, layout in items]
        t.update(report_op_first=timed(lambda: measure(pairs), 1, block=False),
                 report_op_warm=timed(lambda: measure(pairs), repeats, block=False))
    ours = apply()
    t["diff"] = max(float(jnp.max(jnp.abs(_leaf(ours, name) - theirs[name]))) for name in theirs)
    if method == "fire":
        a, b = ff.report(params, ours), measure([(n, w, _leaf(ours, n), lay) for n, w, lay in items])
        t["report_rel"] = max(
            abs(a[r["name"]][k] - r[k]) / max(abs(r[k]), 1e-300) for r in b.rows for k in ("sfe", "dfi_before", "dfi_after")
        )
    return t


def in_fresh_process(*args) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _leaf(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def adam_reset_effect(params, counts):
    """|first update| of the projected kernels after reset_opt_state, relative to a fresh Adam's."""
    tx = optax.adam(1e-3)
    rng = np.random.default_rng(1)
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    new = ff.apply(params)
    kernels = lambda u: jnp.sqrt(sum(jnp.sum(v["kernel"] ** 2) for v in u.values()))  # noqa: E731
    others = lambda u: jnp.sqrt(sum(jnp.sum(v["bias"] ** 2) for v in u.values()))  # noqa: E731
    fresh, _ = tx.update(grads, tx.init(new), new)
    rows = []
    for count in counts:
        state = tx.init(params)
        for _ in range(3):  # mature moments for the leaves FIRE leaves alone
            _, state = tx.update(grads, state, params)
        state = optax.tree_utils.tree_set(state, count=jnp.asarray(count, jnp.int32))
        keep, _ = tx.update(grads, state, params)  # the update with nothing reset
        with_count, _ = tx.update(grads, ff.reset_opt_state(state, params, new), new)
        without, _ = tx.update(grads, ff.reset_opt_state(state, params, new, reset_count=False), new)
        rows.append(
            (
                count,
                float(kernels(without) / kernels(fresh)),
                float(kernels(with_count) / kernels(fresh)),
                float(others(with_count) / others(keep)),
            )
        )
    return rows


MODELS = {"small": ((256, 128, 10), 784), "large": ((2048, 2048, 2048, 10), 784)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small MLP and one repeat: a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="where to write the markdown table")
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)  # path model method steps repeats
    args = parser.parse_args()
    if args.child:
        path, label, method, steps, repeats = args.child
        params = random_params(*MODELS[label])
        print(json.dumps(time_path(path, params, int(steps), method, int(repeats))))
        return

    models = {k: v for k, v in MODELS.items() if not (args.quick and k == "large")}
    methods = (("fire", 5),) if args.quick else (("fire", 5), ("fast", 8))
    repeats = 1 if args.quick else 3
    machine = f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or platform.machine()}"
    lines = [
        f"# fire_core.flax.apply on CPU{' (quick)' if args.quick else ''}",
        "",
        f"linen MLPs, float32: {'; '.join(f'{k} ' + ' -> '.join(map(str, (d, *w))) for k, (w, d) in models.items())}; "
        f"{machine}. Milliseconds, minimum of {repeats} repeat(s). Each path of each row runs in a fresh process, "
        "so its first call compiles from cold.",
        "",
        "| model | parameters | method | steps | apply, first call | apply, warm | op by op, first call | op by op, warm "
        "| jit compile | jit run | max abs(apply - op by op) | max abs(apply - jit) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    report_lines = [
        "",
        "## `report`",
        "",
        "`fire_core.flax.report(params, new)` after `apply` (fire, 5 steps) in the same process, against "
        "`plan.measure` op by op after the op-by-op projection; the largest relative difference of SFE and DfI "
        "between the two on the same weights.",
        "",
        "| model | report, first call | report, warm | op by op, first call | op by op, warm | max rel. difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, (widths, d_in) in models.items():
        params = random_params(widths, d_in)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
        for method, steps in methods:
            t = {**in_fresh_process("compiled", label, method, steps, repeats), **in_fresh_process("op", label, method, steps, repeats)}
            lines.append(
                f"| {label} | {n_params / 1e6:.1f}M | {method} | {steps} | {t['first']:.1f} | {t['warm']:.1f} | "
                f"{t['op_first']:.1f} | {t['op_warm']:.1f} | {t['compile']:.1f} | {t['run']:.1f} | "
                f"{t['diff']:.2g} | {t['jit_diff']:.2g} |"
            )
            print(lines[-1], flush=True)
            if method == "fire":
                report_lines.append(
                    f"| {label} | {t['report_first']:.1f} | {t['report_warm']:.1f} | {t['report_op_first']:.1f} | "
                    f"{t['report_op_warm']:.1f} | {t['report_rel']:.2g} |"
                )
    lines += report_lines

    lines += [
        "",
        "## Adam after `reset_opt_state`",
        "",
        "Norm of the first update of the projected kernels after zeroing their moments, relative to a",
        "fresh Adam's first update (optax.adam defaults, b1 = 0.9, b2 = 0.999), for the step count",
        "reached before the reset; and, with the count reset, the biases' update (moments kept)",
        "relative to their update without any reset.",
        "",
        "| count before | kernels, count kept | kernels, count reset | biases, count reset |",
        "|---:|---:|---:|---:|",
    ]
    counts = (100, 10_000) if args.quick else (10, 100, 1000, 10_000)
    for count, without, with_count, others in adam_reset_effect(params, counts):
        lines.append(f"| {count} | {without:.3f} | {with_count:.3f} | {others:.3f} |")
        print(lines[-1], flush=True)

    out = args.out or RESULTS / f"flax_apply-cpu{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
