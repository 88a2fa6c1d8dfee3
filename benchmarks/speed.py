"""What FIRE costs: fire_core.project against its matmul floor and against exact polar factors.

Run from the repository root (needs the ``bench`` extra):

    python benchmarks/speed.py            # full run, writes benchmarks/results/speed-<device>.md
    python benchmarks/speed.py --quick    # small sizes, a smoke test of the script
    python benchmarks/speed.py --device cuda   # GPU run (torch, jax and cupy on the GPU)

Sections:

1. ``project`` (fire 5 steps, fast 8 steps) against the bare matmuls the
   iteration needs (two per cubic step, three per quintic step), timed the
   same way on the same backend: the ratio is the overhead of everything
   else (normalization, elementwise terms, casts, checks).
2. ``fast`` to isometry against exact polar factors (SVD-based in torch,
   numpy, scipy; QDWH in jax): time and the DfI/n each reaches.
3. How far the paper's ``fire`` iteration gets in 5/10/20 steps on a Gaussian
   matrix and on weights of a trained network.
4. ``fire_core.torch.apply`` against the reference's per-layer, per-tap loop
   (from ``benchmarks/torch_apply.py``).

Times are the minimum over repeats after a warm-up call, in milliseconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import fire_core
from common import machine  # the machine line of every results file

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


class Backend:
    """Array creation, synchronization and a jit-compiled matmul chain per library."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device
        if name == "numpy":
            self.xp = np
        elif name == "torch":
            import torch

            self.torch = torch
            self.dev = torch.device(device)
        elif name == "jax":
            import jax

            jax.config.update("jax_enable_x64", True)
            self.jax = jax
        elif name == "cupy":
            import cupy

            self.cupy = cupy

    def asarray(self, a: np.ndarray, dtype: str | None = None):
        """``a`` on this backend's device, cast to ``dtype`` there (bfloat16 has no NumPy type)."""
        dtype = dtype or a.dtype.name
        if self.name == "numpy":
            return a.astype(dtype)
        if self.name == "torch":
            return self.torch.asarray(a, device=self.dev).to(getattr(self.torch, dtype))
        if self.name == "jax":
            import jax.numpy as jnp

            return self.jax.device_put(jnp.asarray(a, dtype=getattr(jnp, dtype)))
        return self.cupy.asarray(a).astype(dtype)

    def sync(self, out):
        if self.name == "torch" and self.dev.type == "cuda":
            self.torch.cuda.synchronize()
        elif self.name == "jax":
            self.jax.block_until_ready(out)
        elif self.name == "cupy":
            self.cupy.cuda.Device().synchronize()
        return out

    def project_fn(self, steps: int, method: str):
        f = lambda x: fire_core.project(x, steps, method=method)  # noqa: E731
        return self.jax.jit(f) if self.name == "jax" else f

    def floor_fn(self, steps: int, matmuls_per_step: int):
        """The bare matmuls of ``steps`` Newton–Schulz steps on a tall x (m >= n).

        Each product feeds the next (so a compiler cannot merge them), and x
        has orthonormal columns, so the values stay O(1) throughout.
        """

        def chain(x):
            for _ in range(steps):
                a = x.T @ x
                if matmuls_per_step == 3:
                    a = a @ a
                x = x @ a
            return x

        return self.jax.jit(chain) if self.name == "jax" else chain


def section_floor(backends, shapes, dtypes, repeat, lines):
    lines += [
        "## 1. `project` vs its matmul floor",
        "",
        "Floor: the same number of bare matmuls of the same shapes (2 per `fire` step, 3 per `fast` step),",
        "in the input's dtype. bfloat16 input is projected in float32 (and cast back), so its ratio",
        "compares float32 work with bfloat16 matmuls.",
        "Ratio = project / floor (1.0 = no overhead beyond the matmuls).",
        "",
        "| backend | dtype | shape | fire 5 steps ms | floor ms | ratio | fast 8 steps ms | floor ms | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    rng = np.random.default_rng(0)
    for b in backends:
        for dtype in dtypes:
            if (b.name, dtype) in (("numpy", "bfloat16"), ("cupy", "bfloat16")):
                continue  # no bfloat16 type there
            for m, n in shapes:
                w = rng.normal(size=(m, n)).astype(np.float32 if dtype == "bfloat16" else dtype)
                x = b.asarray(w, dtype)
                tall = b.asarray(np.linalg.qr(w if m >= n else w.T)[0].astype(w.dtype), dtype)
                row = [b.name, dtype, f"{m}x{n}"]
                for method, steps, per in (("fire", 5, 2), ("fast", 8, 3)):
                    proj, floor = b.project_fn(steps, method), b.floor_fn(steps, per)
                    t_proj = timeit(lambda: b.sync(proj(x)), repeat)
                    t_floor = timeit(lambda: b.sync(floor(tall)), repeat)
                    row += [f"{t_proj:.2f}", f"{t_floor:.2f}", f"{t_proj / t_floor:.2f}"]
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
    lines.append("")


def _matrix(rng, n, cond, dtype):
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return ((u * np.geomspace(1, 1 / cond, n)) @ v.T).astype(dtype)


def section_exact(backend_names, n, repeat, device, lines):
    lines += [
        f"## 2. `fast` to isometry vs exact polar factors ({n}x{n})",
        "",
        "Matrices with singular values log-spaced over the given condition number.",
        "`fast` runs the fewest steps that reach DfI/n < 1e-9 (float64-measured).",
        "",
        "| dtype | cond | method | steps | ms | DfI/n reached | rel. error vs float64 U V^T |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    rng = np.random.default_rng(1)
    for dtype in ("float32", "float64"):
        for cond in (1e2, 1e3):
            w = _matrix(rng, n, cond, dtype)
            u, _, vh = np.linalg.svd(w.astype(np.float64))
            exact = u @ vh

            def record(label, steps, ms, q):
                q = np.asarray(q, dtype=np.float64)
                dfi_n = float(fire_core.dfi(q)) / n
                err = np.linalg.norm(q - exact) / np.linalg.norm(exact)
                lines.append(f"| {dtype} | {cond:.0e} | {label} | {steps} | {ms:.1f} | {dfi_n:.1e} | {err:.1e} |")
                print(lines[-1], flush=True)

            steps = next(s for s in range(1, 30) if float(fire_core.dfi(fire_core.project(w, s, method="fast").astype(np.float64))) / n < 1e-9)
            if "torch" in backend_names:
                import torch

                dev = torch.device(device)
                x = torch.asarray(w, device=dev)
                sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

                def run(f):
                    out = f()
                    sync()
                    return out

                q = run(lambda: fire_core.project(x, steps, method="fast"))
                record("fire_core fast (torch)", steps, timeit(lambda: run(lambda: fire_core.project(x, steps, method="fast")), repeat), q.cpu())

                def torch_svd_polar():
                    uu, _, vv = torch.linalg.svd(x, full_matrices=False)
                    return uu @ vv

                record("torch.linalg.svd U V^T", "-", timeit(lambda: run(torch_svd_polar), repeat), run(torch_svd_polar).cpu())
            if device == "cpu":
                q = fire_core.project(w, steps, method="fast")
                record("fire_core fast (numpy)", steps, timeit(lambda: fire_core.project(w, steps, method="fast"), repeat), q)
                record("numpy svd U V^T", "-", timeit(lambda: fire_core.project(w, method="svd"), repeat), fire_core.project(w, method="svd"))
                try:
                    import scipy.linalg

                    record("scipy.linalg.polar", "-", timeit(lambda: scipy.linalg.polar(w), repeat), scipy.linalg.polar(w)[0])
                except ImportError:
                    pass
            if "jax" in backend_names:
                import jax
                import jax.scipy.linalg

                jx = jax.device_put(w)
                qdwh = jax.jit(lambda a: jax.scipy.linalg.polar(a, method="qdwh")[0])
                fast = jax.jit(lambda a: fire_core.project(a, steps, method="fast"))
                record("fire_core fast (jax jit)", steps, timeit(lambda: jax.block_until_ready(fast(jx)), repeat), fast(jx))
                record("jax.scipy.linalg.polar qdwh", "-", timeit(lambda: jax.block_until_ready(qdwh(jx)), repeat), qdwh(jx))
    lines.append("")


def _trained_weight(quick: bool) -> np.ndarray:
    """The 256x256 hidden weight of an MLP trained on scikit-learn's digits."""
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.asarray(x / 16.0, dtype=torch.float32)
    y = torch.asarray(y)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(100 if quick else 1000):
        idx = torch.randint(0, len(x), (128,))
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net[2].weight.detach().double().numpy()


def section_fire_steps(quick: bool, lines):
    lines += [
        "## 3. How far the paper's `fire` iteration gets",
        "",
        "Singular values of the projection (1 = isometry) and DfI/n, float64.",
        "",
        "| matrix | steps | DfI/n | min sv | median sv | max sv |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    mats = [("Gaussian 768x768", np.random.default_rng(0).normal(size=(768, 768)))]
    try:
        mats.append(("trained MLP hidden 256x256 (digits)", _trained_weight(quick)))
    except ImportError as exc:
        lines.append(f"(trained weights skipped: {exc})")
    for label, w in mats:
        for steps in (5, 10, 20):
            q = fire_core.project(w, steps)
            s = np.linalg.svd(q, compute_uv=False)
            lines.append(
                f"| {label} | {steps} | {float(fire_core.dfi(q)) / min(w.shape):.3g} | {s.min():.3g} | {np.median(s):.3g} | {s.max():.3g} |"
            )
            print(lines[-1], flush=True)
    lines.append("")


def section_apply(quick: bool, device: str, lines):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import torch_apply
    except ImportError as exc:
        lines += ["## 4. `fire_core.torch.apply` vs the reference loop", "", f"(skipped: {exc})", ""]
        return
    lines += ["## 4. `fire_core.torch.apply` vs the reference loop", ""]
    lines += torch_apply.markdown_table(quick=quick, device=device)
    lines.append("")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backends", default="numpy,torch,jax")
    ap.add_argument("--sections", default="1,2,3,4")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/speed-<device>.md)")
    ap.add_argument("--exact-n", type=int, default=None, metavar="N",
                    help="matrix size of section 2 (default 4096 on cuda, 1024 on cpu, 256 with --quick)")
    args = ap.parse_args(argv)

    names = [n for n in args.backends.split(",") if n]
    if args.device == "cuda":
        names = [n for n in names if n != "numpy"]
    backends = [Backend(n, args.device) for n in names]
    dtypes = ("float32", "float64")
    if args.quick:
        shapes, repeat, n_exact = [(256, 256), (512, 128)], 2, 256
    elif args.device == "cuda":  # the GPU sizes of the CuPy/GPU issue
        shapes = [(1024, 1024), (2048, 2048), (4096, 4096), (8192, 8192), (8192, 2048), (2048, 8192)]
        repeat, n_exact, dtypes = 5, 4096, ("float32", "bfloat16")
    else:
        shapes = [(256, 256), (512, 512), (1024, 1024), (2048, 2048), (2048, 512), (512, 2048)]
        repeat, n_exact = 5, 1024
    if args.exact_n is not None:
        if args.exact_n < 2:
            ap.error(f"--exact-n must be at least 2, got {args.exact_n}")
        n_exact = args.exact_n
    sections = set(args.sections.split(","))
    lines = [f"# Speed ({args.device})", "", machine(args.device), ""]
    if args.quick:
        lines += ["Quick mode: small sizes, not for quoting.", ""]
    if "1" in sections:
        section_floor(backends, shapes, dtypes, repeat, lines)
    if "2" in sections:
        section_exact(names, n_exact, max(2, repeat // 2), args.device, lines)
    if "3" in sections:
        section_fire_steps(args.quick, lines)
    if "4" in sections:
        section_apply(args.quick, args.device, lines)
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else RESULTS / f"speed-{args.device}{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
