"""fire_core.flax.apply on a 10M-parameter linen MLP: eager and under jax.jit, on CPU.

Run from the repository root (needs the ``jax`` extra):

    python benchmarks/flax_apply.py           # writes benchmarks/results/flax_apply-cpu.md
    python benchmarks/flax_apply.py --quick   # a small MLP, a smoke test of the script

Model: a linen MLP 784 -> 2048 -> 2048 -> 2048 -> 10 (Dense layers, float32,
random normal weights), 10.0M parameters; apply projects its four kernels,
the two 2048 x 2048 ones in one batched call.

Timings, in milliseconds (minimum over repeats, each ending in
``jax.block_until_ready``):

* eager, first call: op-by-op dispatch, including JAX's compilation of each
  op for these shapes; eager, warm: the same call again;
* jit, compile: ``jax.jit(apply).lower(params).compile()``; jit, run: the
  compiled call.

The script also measures the first Adam update after a task-boundary reset
(``fire_core.flax.reset_opt_state``), with and without resetting Adam's step
count, against a fresh Adam, for several counts reached before the reset.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fire_core.flax as ff

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


def timed(fn, repeats):
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def time_apply(params, steps, method, repeats):
    def eager():
        return ff.apply(params, steps, method=method)

    first = timed(eager, 1)
    warm = timed(eager, repeats)
    jitted = jax.jit(lambda p: ff.apply(p, steps, method=method))
    t0 = time.perf_counter()
    compiled = jitted.lower(params).compile()
    compile_ms = 1e3 * (time.perf_counter() - t0)
    run = timed(lambda: compiled(params), repeats)
    eager_out, jit_out = eager(), compiled(params)
    diff = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(eager_out), jax.tree_util.tree_leaves(jit_out))
    )
    return first, warm, compile_ms, run, diff


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small MLP and one repeat: a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="where to write the markdown table")
    args = parser.parse_args()

    widths, d_in, repeats = ((256, 256, 10), 64, 1) if args.quick else ((2048, 2048, 2048, 10), 784, 3)
    params = random_params(widths, d_in)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    shapes = " -> ".join(map(str, (d_in, *widths)))

    lines = [
        f"# fire_core.flax.apply on CPU{' (quick)' if args.quick else ''}",
        "",
        f"linen MLP {shapes}, float32, {n_params / 1e6:.1f}M parameters; "
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or platform.machine()}. "
        f"Milliseconds, minimum of {repeats} repeat(s).",
        "",
        "| method | steps | eager, first call | eager, warm | jit compile | jit run | max abs(eager - jit) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, steps in (("fire", 5),) if args.quick else (("fire", 5), ("fast", 8)):
        first, warm, compile_ms, run, diff = time_apply(params, steps, method, repeats)
        lines.append(f"| {method} | {steps} | {first:.1f} | {warm:.1f} | {compile_ms:.1f} | {run:.1f} | {diff:.2g} |")
        print(lines[-1], flush=True)

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
