"""The fire-core command, run as a subprocess (``python -m fire_core``).

Every projected tensor is compared with ``fire_core.reinit`` on the same
weight, with the layout and the q/k/v blocks written out here by hand (not
through ``fire_core.conventions``), and with ``fire_core.torch.apply`` /
``fire_core.flax.apply`` on the same model where those adapters exist.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import flax_params

import fire_core
from fire_core import cli
from fire_core.tools import _files  # the file formats, split from cli (monkeypatched below)

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def run(*args, code: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    """``python -m fire_core ARGS``; with ``code``, that Python code runs first and then ``cli.main(ARGS)``."""
    args = [str(a) for a in args]
    if code is None:
        cmd = [sys.executable, "-m", "fire_core", *args]
    else:
        cmd = [sys.executable, "-c", f"{code}\nimport sys\nfrom fire_core.cli import main\nsys.exit(main({args!r}))"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_rows(w, k=3):
    return np.split(w, k, axis=0)


# --------------------------------------------------------------------------- safetensors, torch convention


def torch_style_state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.normal(size=(20, 8)),
        "attn.in_proj_weight": rng.normal(size=(24, 8)),
        "attn.in_proj_bias": rng.normal(size=24),
        "attn.out_proj.weight": rng.normal(size=(8, 8)),
        "up.weight": rng.normal(size=(8, 6, 3, 3)),  # ConvTranspose2d(8, 6): (in, out, kh, kw)
        "up.bias": rng.normal(size=6),
        "conv.weight": rng.normal(size=(6, 8, 3, 3)).astype(np.float32),
        "c_attn.weight": rng.normal(size=(12, 4)),
        "fc.weight": rng.normal(size=(5, 6)).astype(np.float16),
        "quant.weight": rng.integers(-128, 127, size=(5, 6)).astype(np.int8),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def torch_style_expected(sd, **kw):
    out = dict(sd)
    for name in ("attn.in_proj_weight", "c_attn.weight"):
        out[name] = np.concatenate([fire_core.reinit(b, "oi", **kw) for b in split_rows(sd[name])])
    for name, layout in (("attn.out_proj.weight", "oi"), ("up.weight", "iohw"), ("conv.weight", "oihw"),
                         ("fc.weight", "oi")):
        out[name] = fire_core.reinit(sd[name], layout, **kw)
    return out


PROJECTED = ("attn.in_proj_weight", "attn.out_proj.weight", "up.weight", "conv.weight", "c_attn.weight", "fc.weight")
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3}


@pytest.fixture(scope="module")
def st_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    sd = torch_style_state()
    src, out = d / "model.safetensors", d / "out.safetensors"
    safetensors_numpy.save_file(sd, str(src), metadata={"format": "pt", "note": "kept"})
    before = digest(src)
    res = run("project", src, "-o", out, "--layout", "up=iohw", "--split", "c_attn=3")
    return dict(sd=sd, src=src, out=out, res=res, before=before, dir=d)


def test_project_safetensors_equals_reinit_per_weight(st_run):
    assert st_run["res"].returncode == 0, st_run["res"].stderr
    got = safetensors_numpy.load_file(str(st_run["out"]))
    expected = torch_style_expected(st_run["sd"], steps=5)
    for name in PROJECTED:
        assert got[name].dtype == st_run["sd"][name].dtype
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=TOL[got[name].dtype], err_msg=name)


def test_project_copies_non_targets_bit_exact(st_run):
    got = safetensors_numpy.load_file(str(st_run["out"]))
    assert set(got) == set(st_run["sd"])
    for name in set(st_run["sd"]) - set(PROJECTED):
        assert got[name].dtype == st_run["sd"][name].dtype and got[name].tobytes() == st_run["sd"][name].tobytes()


def test_project_never_modifies_the_input(st_run):
    assert digest(st_run["src"]) == st_run["before"]


def test_project_keeps_safetensors_metadata(st_run):
    from safetensors import safe_open

    with safe_open(str(st_run["out"]), framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}


def test_project_prints_the_report(st_run):
    text = st_run["res"].stdout
    for name in ("attn.in_proj_weight[q]", "attn.in_proj_weight[v]", "c_attn.weight[2]", "up.weight", "fc.weight"):
        assert re.search(rf"^{re.escape(name)}\s", text, re.M), name
    assert not re.search(r"^(embed|quant)\.weight\s", text, re.M)  # no rows: left alone, with the reasons
    assert "left alone (an embedding, by its name): embed.weight (20x8)" in text
    assert "left alone (not floating point (int8)): quant.weight (5x6)" in text
    assert "projected 10 weights" in text


def test_project_leaves_no_temporary_files(st_run):
    assert sorted(p.name for p in st_run["dir"].iterdir()) == ["model.safetensors", "out.safetensors"]


def test_inspect_reports_dfi_and_spectrum_and_writes_nothing(st_run):
    d = st_run["dir"]
    listing = sorted(p.name for p in d.iterdir())
    res = run("inspect", st_run["src"], "--layout", "up=iohw", "--split", "c_attn=3")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in d.iterdir()) == listing and digest(st_run["src"]) == st_run["before"]
    rows = {}
    for line in res.stdout.split("\nDfI: ")[0].splitlines():
        cells = line.split()
        if len(cells) == 9 and cells[0] != "name" and not cells[0].startswith("-"):
            rows[cells[0]] = cells
    sd = st_run["sd"]
    weights = {"attn.out_proj.weight": (sd["attn.out_proj.weight"], "oi"), "up.weight": (sd["up.weight"], "iohw"),
               "conv.weight": (sd["conv.weight"], "oihw"),
               "attn.in_proj_weight[k]": (split_rows(sd["attn.in_proj_weight"])[1], "oi")}
    for name, (w, layout) in weights.items():
        report = fire_core.reinit_many([(name, w.astype(np.float64), layout)], write=lambda *a: None)
        assert rows[name][2] == layout
        assert float(rows[name][4]) == pytest.approx(report[name]["dfi_before"], rel=1e-3)
        # singular values of each tap's matrix over the reference scale sqrt(d_out/d_in)/taps, by hand
        mats = fire_core.to_matrices(w.astype(np.float64), layout)
        taps, d_out, d_in = mats.shape
        s = np.linalg.svd(mats / (np.sqrt(d_out / d_in) / taps), compute_uv=False).ravel()
        assert [float(c) for c in rows[name][6:9]] == pytest.approx([s.min(), np.median(s), s.max()], rel=1e-2)
    assert set(rows) == {"attn.in_proj_weight[q]", "attn.in_proj_weight[k]", "attn.in_proj_weight[v]",
                         "attn.out_proj.weight", "up.weight", "conv.weight", "c_attn.weight[0]",
                         "c_attn.weight[1]", "c_attn.weight[2]", "fc.weight"}


def test_method_steps_and_scale_pass_through(tmp_path):
    sd = {k: v for k, v in torch_style_state(1).items() if k in ("attn.out_proj.weight", "conv.weight", "embed.weight")}
    src, out = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    safetensors_numpy.save_file(sd, str(src))
    res = run("project", src, "-o", out, "--method", "fast", "--steps", "8", "--scale", "variance")
    assert res.returncode == 0, res.stderr
    got = safetensors_numpy.load_file(str(out))
    kw = dict(steps=8, method="fast", scale="variance")
    want = fire_core.reinit(sd["attn.out_proj.weight"], "oi", **kw)
    np.testing.assert_allclose(got["attn.out_proj.weight"], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["conv.weight"], fire_core.reinit(sd["conv.weight"], "oihw", **kw), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- npz, flax convention


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


FLAX_LAYOUTS = {"Dense_0/kernel": "io", "Conv_0/kernel": "hwio", "attn/query/kernel": "ioo",
                "attn/key/kernel": "ioo", "attn/value/kernel": "ioo", "attn/out/kernel": "iio"}


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    flat = {"params/" + k: v for k, v in flatten(flax_params()).items()}
    src, out = d / "params.npz", d / "out.npz"
    np.savez_compressed(src, **flat)
    res = run("project", src, "-o", out)  # convention detected: flax
    return dict(flat=flat, src=src, out=out, res=res)


def test_project_npz_flax_equals_reinit_per_kernel(npz_run):
    assert npz_run["res"].returncode == 0, npz_run["res"].stderr
    assert "convention flax" in npz_run["res"].stdout
    with np.load(npz_run["out"]) as z:
        got = {k: z[k] for k in z.files}
    assert set(got) == set(npz_run["flat"])
    for name, value in npz_run["flat"].items():
        layout = FLAX_LAYOUTS.get(name.removeprefix("params/"))
        if layout is None:
            assert got[name].tobytes() == value.tobytes(), name
        else:
            want = fire_core.reinit(value, layout, steps=5)
            np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-12, err_msg=name)


def test_project_npz_keeps_compression(npz_run):
    with zipfile.ZipFile(npz_run["out"]) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}


def test_project_npz_equals_flax_apply(npz_run, x64):
    pytest.importorskip("flax")
    try:
        import fire_core.flax as fc_flax
    except ImportError as e:
        pytest.skip(f"fire_core.flax not importable: {e}")
    import jax  # float64 through the x64 fixture, restored after the test

    expected = flatten(jax.tree_util.tree_map(np.asarray, fc_flax.apply(flax_params(), 5)))
    with np.load(npz_run["out"]) as z:
        for name, value in expected.items():
            np.testing.assert_allclose(z["params/" + name], value, rtol=0, atol=1e-12, err_msg=name)


# --------------------------------------------------------------------------- torch files


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 16)
            self.attn = nn.MultiheadAttention(16, 4)
            self.norm = nn.LayerNorm(16)
            self.conv = nn.Conv2d(3, 8, 3)
            self.up = nn.ConvTranspose2d(8, 4, 3)
            self.fc = nn.Linear(16, 8)
            self.head = nn.Linear(16, 20, bias=False)
            self.head.weight = self.embed.weight  # tied

    model = Net().double()
    opt = torch.optim.Adam(model.parameters())
    model.fc(torch.ones(2, 16, dtype=torch.float64)).sum().backward()
    opt.step()
    d = tmp_path_factory.mktemp("pt")
    src, out = d / "ckpt.pt", d / "out.pt"
    torch.save({"model": model.state_dict(), "epoch": 3, "optimizer": opt.state_dict()}, src)
    res = run("project", src, "-o", out, "--layout", "model.up=iohw")
    return dict(torch=torch, model=model, src=src, out=out, res=res)


def test_project_pt_restores_nesting_and_other_values(torch_run):
    torch = torch_run["torch"]
    assert torch_run["res"].returncode == 0, torch_run["res"].stderr
    got = torch.load(torch_run["out"], weights_only=True)
    src = torch.load(torch_run["src"], weights_only=True)
    assert list(got) == ["model", "epoch", "optimizer"] and got["epoch"] == 3
    assert list(got["model"]) == list(src["model"])
    assert got["optimizer"]["param_groups"] == src["optimizer"]["param_groups"]
    for k, state in src["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(got["optimizer"]["state"][k][key], value)
    assert "note: 'optimizer' copied unchanged" in torch_run["res"].stdout
    assert "optimizer state is now stale for the projected weights" in torch_run["res"].stdout


def test_project_pt_equals_reinit_per_weight(torch_run):
    torch = torch_run["torch"]
    sd = {k: v.numpy() for k, v in torch.load(torch_run["src"], weights_only=True)["model"].items()}
    got = torch.load(torch_run["out"], weights_only=True)["model"]
    expected = {
        "attn.in_proj_weight": np.concatenate(
            [fire_core.reinit(b, "oi") for b in split_rows(sd["attn.in_proj_weight"])]
        ),
        "attn.out_proj.weight": fire_core.reinit(sd["attn.out_proj.weight"], "oi"),
        "conv.weight": fire_core.reinit(sd["conv.weight"], "oihw"),
        "up.weight": fire_core.reinit(sd["up.weight"], "iohw"),
        "fc.weight": fire_core.reinit(sd["fc.weight"], "oi"),
        "head.weight": fire_core.reinit(sd["head.weight"], "oi"),
        "embed.weight": fire_core.reinit(sd["head.weight"], "oi"),  # tied to head
    }
    for name, value in got.items():
        want = expected.get(name, sd[name])
        np.testing.assert_allclose(value.numpy(), want, rtol=0, atol=1e-12 if name in expected else 0, err_msg=name)


def test_project_pt_keeps_tied_weights_tied(torch_run):
    got = torch_run["torch"].load(torch_run["out"], weights_only=True)["model"]
    assert got["embed.weight"].data_ptr() == got["head.weight"].data_ptr()


def test_project_pt_equals_torch_apply(torch_run):
    try:
        import fire_core.torch as fc_torch
    except ImportError as e:
        pytest.skip(f"fire_core.torch not importable: {e}")
    torch = torch_run["torch"]
    model = torch_run["model"]
    model.load_state_dict(torch.load(torch_run["src"], weights_only=True)["model"])
    fc_torch.apply(model, 5)
    got = torch.load(torch_run["out"], weights_only=True)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-12, msg=name)


def test_project_pt_projects_tied_targets_once(tmp_path):
    torch = pytest.importorskip("torch")
    w = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    src, out = tmp_path / "t.pt", tmp_path / "o.pt"
    torch.save({"enc.weight": w, "dec.weight": w}, src)  # one tensor under two names
    res = run("project", src, "-o", out)
    assert res.returncode == 0, res.stderr
    assert "projected 1 weights" in res.stdout and re.search(r"^enc\.weight \(= dec\.weight\)\s", res.stdout, re.M)
    got = torch.load(out, weights_only=True)
    assert got["dec.weight"].data_ptr() == got["enc.weight"].data_ptr()
    torch.testing.assert_close(got["enc.weight"], fire_core.reinit(w, "oi"), rtol=0, atol=1e-12)


def test_project_pt_keeps_parameters_parameters(tmp_path):
    torch = pytest.importorskip("torch")
    w = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    src, out = tmp_path / "p.pt", tmp_path / "o.pt"
    params = {"fc.weight": torch.nn.Parameter(w.clone()),
              "frozen.weight": torch.nn.Parameter(w.clone(), requires_grad=False)}
    torch.save(params, src)
    res = run("project", src, "-o", out)
    assert res.returncode == 0, res.stderr
    got = torch.load(out, weights_only=True)
    for name, grad in (("fc.weight", True), ("frozen.weight", False)):
        assert type(got[name]) is torch.nn.Parameter and got[name].requires_grad is grad and got[name].grad_fn is None
        torch.testing.assert_close(got[name].detach(), fire_core.reinit(w, "oi"), rtol=0, atol=1e-12)


def test_npz_imports_no_framework(small):
    report = ("import atexit, sys; atexit.register(lambda: print('loaded:', "
              "[m for m in ('torch', 'jax', 'cupy') if m in sys.modules], file=sys.stderr))")
    res = run("project", small, "-o", small.with_name("o.npz"), code=report)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "loaded: []"


def test_project_bfloat16_safetensors_through_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    src, out = tmp_path / "bf.safetensors", tmp_path / "o.safetensors"
    save_file({"fc.weight": w, "fc.bias": torch.zeros(16, dtype=torch.bfloat16)}, str(src))
    res = run("project", src, "-o", out)
    assert res.returncode == 0, res.stderr
    got = load_file(str(out))
    assert got["fc.weight"].dtype == torch.bfloat16
    # The same float32 math in another process: equal up to one bfloat16 ulp (2^-7 relative).
    torch.testing.assert_close(got["fc.weight"].float(), fire_core.reinit(w, "oi").float(), rtol=2.0**-7, atol=0)
    assert torch.equal(got["fc.bias"], torch.zeros(16, dtype=torch.bfloat16))


# --------------------------------------------------------------------------- output safety and options


@pytest.fixture
def small(tmp_path):
    src = tmp_path / "m.npz"
    np.savez(src, **{"fc.weight": np.random.default_rng(0).normal(size=(4, 6)), "fc.bias": np.zeros(4)})
    return src


def test_existing_output_is_refused_without_force(small):
    out = small.with_name("o.npz")
    out.write_bytes(b"keep me")
    res = run("project", small, "-o", out)
    assert res.returncode == 2 and "exists; pass --force" in res.stderr
    assert out.read_bytes() == b"keep me"


def test_force_overwrites_the_output(small):
    out = small.with_name("o.npz")
    out.write_bytes(b"old")
    res = run("project", small, "-o", out, "--force")
    assert res.returncode == 0, res.stderr
    with np.load(out) as z:
        with np.load(small) as original:
            want = fire_core.reinit(original["fc.weight"], "oi")
        np.testing.assert_allclose(z["fc.weight"], want, rtol=0, atol=1e-12)


def test_output_equal_to_input_is_refused_even_with_force(small):
    before = digest(small)
    res = run("project", small, "-o", small, "--force")
    assert res.returncode == 2 and "never modifies its input" in res.stderr
    assert digest(small) == before


def test_plot_writes_a_png(small):
    plot = small.with_name("spectra.png")
    res = run("project", small, "-o", small.with_name("o.npz"), "--plot", plot)
    assert res.returncode == 0, res.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra_and_writes_nothing(small):
    out = small.with_name("o.npz")
    res = run("project", small, "-o", out, "--plot", small.with_name("p.png"),
              code="import sys; sys.modules['matplotlib'] = None")
    assert res.returncode == 1
    assert res.stderr.strip() == "fire-core: error: --plot needs matplotlib: pip install 'fire-core[plot]'"
    assert not out.exists()


def test_failed_write_leaves_no_partial_output(tmp_path):
    out = tmp_path / "o.npz"
    out.write_bytes(b"previous")

    def writer(tmp):
        Path(tmp).write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cli._atomic_write(str(out), writer)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["o.npz"]


@pytest.mark.parametrize("text, value", [("fire", "fire"), ("variance", "variance"), ("norm", "norm"),
                                         ("none", None), ("0.5", 0.5)])
def test_scale_option_values(text, value):
    assert cli._parse_scale(text) == value


def test_demo_delegates_its_arguments(monkeypatch):
    seen = []
    fake = type(sys)("fire_core.demo")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fire_core.demo", fake)
    monkeypatch.setattr(fire_core, "demo", fake, raising=False)
    assert cli.main(["demo", "--quick", "--seed", "3"]) == 0
    assert seen == [["--quick", "--seed", "3"]]


def test_demo_missing_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fire_core.demo", None)
    monkeypatch.delattr(fire_core, "demo", raising=False)
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err.strip() == (
        "fire-core: error: this installation of fire_core has no demo (fire_core/demo.py is missing)"
    )


def test_console_script_runs():
    script = Path(sys.executable).with_name("fire-core")
    if not script.exists():
        pytest.skip("the fire-core script is not installed next to this Python")
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == f"fire-core {fire_core.__version__}"


# --------------------------------------------------------------------------- bad inputs


class Payload:
    """Unpickling this creates the file ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _valid_safetensors(path):
    safetensors_numpy.save_file({"fc.weight": np.ones((4, 4))}, str(path))
    return path


def _bad(tmp_path, case):
    """Build the bad input ``case``; returns (args, python prelude or None, marker file or None)."""
    t = tmp_path
    out = t / "out" if case != "output-extension" else t / "out.npz"
    if case == "missing":
        return ["project", t / "nope.safetensors", "-o", out.with_suffix(".safetensors")], None, None
    if case == "directory":
        (t / "d.pt").mkdir()
        return ["inspect", t / "d.pt"], None, None
    if case.startswith("empty"):
        ext = case.split("-")[1]
        (t / f"e.{ext}").write_bytes(b"")
        return ["project", t / f"e.{ext}", "-o", out.with_suffix(f".{ext}")], None, None
    if case.startswith("garbage"):
        ext = case.split("-")[1]
        (t / f"g.{ext}").write_bytes(os.urandom(300))
        return ["project", t / f"g.{ext}", "-o", out.with_suffix(f".{ext}")], None, None
    if case == "truncated-safetensors":
        data = _valid_safetensors(t / "v.safetensors").read_bytes()
        (t / "v.safetensors").write_bytes(data[: len(data) // 2])
        return ["project", t / "v.safetensors", "-o", out.with_suffix(".safetensors")], None, None
    if case == "truncated-pt":
        import torch

        torch.save({"fc.weight": torch.ones(64, 64)}, t / "v.pt")
        data = (t / "v.pt").read_bytes()
        (t / "v.pt").write_bytes(data[: len(data) // 2])
        return ["project", t / "v.pt", "-o", out.with_suffix(".pt")], None, None
    if case == "npz-object-array":
        np.savez(t / "o.npz", **{"fc.weight": np.array([{"a": 1}], dtype=object)})
        return ["inspect", t / "o.npz"], None, None
    if case == "unsupported-extension":
        (t / "m.txt").write_text("fc.weight 1 2 3")
        return ["inspect", t / "m.txt"], None, None
    if case == "pt-not-a-dict":
        import torch

        torch.save(torch.ones(3, 3), t / "t.pt")
        return ["inspect", t / "t.pt"], None, None
    if case == "no-tensors":
        safetensors_numpy.save_file({}, str(t / "n.safetensors"))
        return ["inspect", t / "n.safetensors"], None, None
    if case in ("malicious-torch-zip", "malicious-pickle"):
        import torch

        marker = t / "pwned"
        if case == "malicious-torch-zip":
            torch.save({"model": {"fc.weight": torch.ones(2, 2)}, "extra": Payload(marker)}, t / "evil.pt")
        else:
            (t / "evil.pt").write_bytes(pickle.dumps(Payload(marker), protocol=2))
        return ["project", t / "evil.pt", "-o", out.with_suffix(".pt")], None, marker
    if case == "nan-weight":
        w = np.ones((4, 4))
        w[1, 1] = np.nan
        np.savez(t / "n.npz", **{"fc.weight": w, "head.weight": np.eye(4)})
        return ["project", t / "n.npz", "-o", out.with_suffix(".npz")], None, None
    if case == "no-targets":
        np.savez(t / "b.npz", **{"fc.bias": np.ones(4), "quant.weight": np.ones((4, 4), np.int8)})
        return ["project", t / "b.npz", "-o", out.with_suffix(".npz")], None, None
    if case == "unreadable":
        p = _valid_safetensors(t / "u.safetensors")
        p.chmod(0)
        return ["inspect", p], None, None
    if case == "bfloat16-without-torch":
        import torch
        from safetensors.torch import save_file

        save_file({"fc.weight": torch.ones(4, 4, dtype=torch.bfloat16)}, str(t / "bf.safetensors"))
        return ["inspect", t / "bf.safetensors"], "import sys; sys.modules['torch'] = None", None
    if case == "bad-layout-option":
        p = _valid_safetensors(t / "m.safetensors")
        return ["project", p, "-o", out.with_suffix(".safetensors"), "--layout", "fc=xyz"], None, None
    if case == "output-extension":
        p = _valid_safetensors(t / "m.safetensors")
        return ["project", p, "-o", out], None, None
    raise AssertionError(case)


BAD_INPUTS = {
    "missing": "no such file",
    "directory": "is a directory",
    "empty-safetensors": "is empty",
    "empty-npz": "is empty",
    "empty-pt": "is empty",
    "garbage-safetensors": "not a readable safetensors file",
    "garbage-npz": "not a readable .npz archive",
    "garbage-pt": "not a readable torch checkpoint",
    "truncated-safetensors": "is truncated",
    "truncated-pt": "is truncated",
    "npz-object-array": "refused: Object arrays cannot be loaded",
    "unsupported-extension": "unsupported file type '.txt'",
    "pt-not-a-dict": "holds a Tensor, not a state dict",
    "no-tensors": "holds no tensors",
    "malicious-torch-zip": "holds Python objects (io.open), and fire-core loads only tensors",
    "malicious-pickle": "holds Python objects (a plain Python pickle, not written by torch.save)",
    "nan-weight": "fc.weight: contains NaN or Inf",
    "no-targets": "none of its 2 tensors is a FIRE target",
    "unreadable": "cannot read",
    "bfloat16-without-torch": "holds bfloat16/float8 tensors, which NumPy cannot hold; install torch",
    "bad-layout-option": "fc.weight: layouts pattern 'fc' gives 'xyz'",
    "output-extension": "give it the extension .safetensors",
}
TORCH_CASES = {"empty-pt", "garbage-pt", "truncated-pt", "pt-not-a-dict", "malicious-torch-zip",
               "malicious-pickle", "bfloat16-without-torch"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error(tmp_path, case):
    if case in TORCH_CASES:
        pytest.importorskip("torch")
    if case == "unreadable" and hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root reads any file")
    args, prelude, marker = _bad(tmp_path, case)
    listing = sorted(p.name for p in tmp_path.iterdir())
    res = run(*args, code=prelude, cwd=tmp_path)
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fire-core: error: "), res.stderr
    assert BAD_INPUTS[case] in lines[0]
    assert res.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing written, no temporary left
    if marker is not None:
        assert not marker.exists()


def test_malicious_payload_would_run_without_protection(tmp_path):
    """The payload used above is live: plain unpickling runs it (so its absence above means something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()


def test_usage_error_exits_2():
    res = run("project")
    assert res.returncode == 2 and "usage:" in res.stderr


# --------------------------------------------------------------------------- untouched tensors, every format


def tensor_hash(t) -> str:
    """sha256 of a tensor's bytes (C order), dtype and shape: equal only for an exact copy."""
    if hasattr(t, "detach"):  # torch: bytes through a uint8 view, so bfloat16 needs no NumPy dtype
        import torch

        data = t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    else:
        data = np.asarray(t).tobytes(order="C")
    return hashlib.sha256(data + f"|{t.dtype}|{tuple(t.shape)}".encode()).hexdigest()


def numpy_state():
    """fc.weight is the one target; every other kind of tensor a checkpoint holds is left alone."""
    rng = np.random.default_rng(11)
    return {
        "fc.weight": rng.normal(size=(6, 8)),
        "fc.bias": rng.normal(size=6),
        "logit_scale": np.array(2.6592, dtype=np.float32),  # 0-d
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),  # 0-d
        "bn.running_mean": rng.normal(size=6).astype(np.float32),
        "embed.weight": rng.normal(size=(10, 8)).astype(np.float16),
        "pos_table": np.asfortranarray(rng.normal(size=(5, 7))),  # no rule for the name; Fortran order
        "mask": rng.random((4, 4)) > 0.5,
        "quant.weight": rng.integers(-128, 127, size=(5, 6)).astype(np.int8),
        "empty.weight": np.zeros((0, 4)),
        "none": np.zeros(0, dtype=np.float32),
    }


def torch_state(torch):
    sd = {k: torch.from_numpy(np.ascontiguousarray(v) if v.ndim else v.copy()) for k, v in numpy_state().items()}
    sd["embed.weight"] = sd["embed.weight"].to(torch.bfloat16)
    sd["view_table"] = torch.randn(8, 5, dtype=torch.float64).t()[:3]  # a strided view; no rule for its name
    return sd


def _flat(obj, prefix=""):
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif hasattr(v, "shape"):
            out[f"{prefix}{k}"] = v
    return out


def write_checkpoint(fmt, path):
    """A checkpoint in ``fmt``; returns its flat name -> tensor before projection, and a loader of the output."""
    if fmt in ("safetensors", "npz", "npz-compressed"):
        sd = numpy_state()
        if fmt == "safetensors":
            safetensors_numpy.save_file({k: np.ascontiguousarray(v) if v.ndim else v for k, v in sd.items()}, path)
            return sd, lambda out: safetensors_numpy.load_file(out)
        (np.savez_compressed if fmt == "npz-compressed" else np.savez)(path, **sd)

        def load(out):
            with np.load(out) as z:
                return {k: z[k] for k in z.files}

        return sd, load
    torch = pytest.importorskip("torch")
    if fmt == "safetensors-bf16":
        from safetensors.torch import load_file, save_file

        sd = {k: v.contiguous() for k, v in torch_state(torch).items() if v.dtype != torch.bool}
        sd["fc.weight"] = sd["fc.weight"].to(torch.bfloat16)
        save_file(sd, path)
        return sd, lambda out: load_file(out)
    sd = torch_state(torch)
    obj = {"model": sd, "epoch": 3, "note": "kept"}
    if fmt == "lightning":
        obj = lightning_checkpoint(torch, sd)
    torch.save(obj, path, _use_new_zipfile_serialization=fmt != "torch-legacy")
    flat = _flat(obj["state_dict"]) if fmt == "lightning" else _flat(obj)
    load = (lambda out: _flat(torch.load(out, weights_only=True)["state_dict"])) if fmt == "lightning" else (
        lambda out: _flat(torch.load(out, weights_only=True)))
    return flat, load


FILE_FORMATS = {"safetensors": ".safetensors", "safetensors-bf16": ".safetensors", "npz": ".npz",
                "npz-compressed": ".npz", "torch-zip": ".pt", "torch-legacy": ".pth", "lightning": ".ckpt"}


@pytest.mark.parametrize("fmt", list(FILE_FORMATS))
def test_untouched_tensors_are_copied_bit_for_bit_shape_included(tmp_path, capsys, fmt):
    src, out = tmp_path / f"in{FILE_FORMATS[fmt]}", tmp_path / f"out{FILE_FORMATS[fmt]}"
    before, load = write_checkpoint(fmt, str(src))
    assert cli.main(["project", str(src), "-o", str(out)]) == 0, capsys.readouterr().err
    after = load(str(out))
    assert set(after) == set(before)
    target = "model.fc.weight" if fmt in ("torch-zip", "torch-legacy") else "fc.weight"
    for name in set(before) - {target}:
        assert tensor_hash(after[name]) == tensor_hash(before[name]), name
    assert tensor_hash(after[target]) != tensor_hash(before[target])  # the one target was projected


def test_legacy_torch_input_is_written_in_the_legacy_format(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    w = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    src, out = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save({"fc.weight": w}, src, _use_new_zipfile_serialization=False)
    assert cli.main(["project", str(src), "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.read_bytes()[:4] == src.read_bytes()[:4] == b"\x80\x02\x8a\x0a"  # protocol 2, then torch's magic
    torch.testing.assert_close(torch.load(out, weights_only=True)["fc.weight"], fire_core.reinit(w, "oi"),
                               rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- formats by content


def _content(tmp_path, kind):
    """A file of ``kind`` at a temporary path without extension."""
    p = tmp_path / f"{kind}.raw"
    if kind == "safetensors":
        safetensors_numpy.save_file({"fc.weight": np.ones((4, 4))}, str(p))
    elif kind == "npz":
        np.savez(p.with_suffix(".npz"), **{"fc.weight": np.ones((4, 4))})
        p.with_suffix(".npz").rename(p)
    else:
        torch = pytest.importorskip("torch")
        torch.save({"fc.weight": torch.ones(4, 4)}, p, _use_new_zipfile_serialization=kind == "torch")
    return p


@pytest.mark.parametrize(
    "kind, ext, message",
    [
        ("safetensors", ".pt", "is a safetensors file (by its content), not a torch checkpoint as its extension "
                               "says; rename it to x.safetensors"),
        ("npz", ".pt", "is a NumPy .npz archive (by its content), not a torch checkpoint as its extension says; "
                       "rename it to x.npz"),
        ("torch", ".safetensors", "is a torch checkpoint (by its content), not a safetensors file as its "
                                  "extension says; rename it to x.pt"),
        ("torch", ".npz", "is a torch checkpoint (by its content), not a NumPy .npz archive"),
        ("legacy", ".npz", "is a torch checkpoint (by its content), not a NumPy .npz archive"),
        ("safetensors", ".npz", "is a safetensors file (by its content), not a NumPy .npz archive"),
        ("safetensors", ".txt", "unsupported file type '.txt' (by its content it is a safetensors file)"),
    ],
)
def test_an_extension_that_lies_is_named_with_what_the_file_is(tmp_path, capsys, kind, ext, message):
    path = _content(tmp_path, kind).rename(tmp_path / f"x{ext}")
    out = tmp_path / f"o{ext}"
    assert cli.main(["project", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"fire-core: error: {path}: {message}" or message in err, err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_truncated_torch_file_says_it_is_truncated_at_every_cut(tmp_path, capsys, kind):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "full.pt"
    torch.save({"model": {"fc.weight": torch.randn(32, 32, generator=g), "fc.bias": torch.randn(32, generator=g)},
                "epoch": 3}, path, _use_new_zipfile_serialization=kind == "zip")
    data = path.read_bytes()
    cuts = sorted({8, 14, 20, 40, 100, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 20,
                   len(data) - 1})
    for n in cuts:
        cut = tmp_path / f"cut{n}.pt"
        cut.write_bytes(data[:n])
        assert cli.main(["inspect", str(cut)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{cut}: is truncated" in err[0], (n, err)


def test_truncated_safetensors_data_says_it_is_truncated(tmp_path, capsys):
    path = _valid_safetensors(tmp_path / "v.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    assert cli.main(["inspect", str(path)]) == 1
    assert "is truncated: its safetensors header describes" in capsys.readouterr().err


class Hyper(dict):
    """Stands in for Lightning's AttributeDict: a dict subclass, so a pickled object."""


@pytest.mark.parametrize("case", ["namespace", "dict-subclass", "numpy", "plain-pickle-4", "legacy-object"])
def test_a_pickle_holding_python_objects_gets_one_message_of_ours(tmp_path, capsys, case):
    import argparse

    torch = pytest.importorskip("torch")
    path = tmp_path / "x.pt"
    sd = {"fc.weight": torch.ones(4, 4)}
    if case == "namespace":
        torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, path)
        what = "argparse.Namespace"
    elif case == "dict-subclass":
        torch.save({"state_dict": sd, "hyper_parameters": Hyper(lr=0.1)}, path)
        what = f"{__name__}.Hyper"
    elif case == "numpy":
        torch.save({"model": sd, "mean": np.zeros(3)}, path)
        what = "numpy"
    elif case == "plain-pickle-4":
        path.write_bytes(pickle.dumps({"fc.weight": [[1.0, 0.0], [0.0, 1.0]]}, protocol=4))
        what = "a plain Python pickle, not written by torch.save"
    else:
        torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, path, _use_new_zipfile_serialization=False)
        what = "argparse.Namespace"
    assert cli.main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fire-core: error: {path}: holds Python objects ({what}") and "\n" not in err, err
    assert "fire-core loads only tensors" in err
    assert "weights_only=False" not in err and "Unsupported operand" not in err


def test_a_torch_file_saved_with_pickle_protocol_4_says_so(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    path = tmp_path / "p4.pt"
    torch.save({"fc.weight": torch.ones(4, 4)}, path, pickle_protocol=4)
    assert cli.main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "was saved with pickle protocol 4, which torch.load(weights_only=True) cannot read" in err
    assert "Unsupported operand" not in err


# --------------------------------------------------------------------------- Lightning checkpoints


def lightning_checkpoint(torch, state_dict, hyper_parameters=None):
    """What Lightning's Trainer.save_checkpoint writes, built with torch.save (lightning is not installed)."""
    g = torch.Generator().manual_seed(1)
    params = [v for k, v in state_dict.items() if k.endswith("weight") and v.is_floating_point()]
    opt = torch.optim.Adam([torch.nn.Parameter(p.detach().clone().float()) for p in params], lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    sched.step()
    score = torch.tensor(0.25)
    monitor = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1}"
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 120},
                               "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {
            monitor: {"monitor": "val_loss", "best_model_score": score, "best_model_path": "/ckpts/epoch=2.ckpt",
                      "current_score": score, "best_k_models": {"/ckpts/epoch=2.ckpt": score}, "last_model_path": ""},
            "EMA": {"ema_weights": {"model.fc.weight": torch.randn(6, 8, generator=g)}},  # weights, not projected
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters if hyper_parameters is not None else {"lr": 1e-3, "hidden": 16},
    }


def _same(a, b) -> bool:
    """Deep equality of checkpoint contents: tensors bit for bit (dtype and shape), the rest by ==."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "detach"):
        return hasattr(b, "detach") and tensor_hash(a) == tensor_hash(b)
    return a == b


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(2)
    model = nn.Module()
    model.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.LayerNorm(4)).double()
    ckpt = lightning_checkpoint(torch, model.state_dict())
    d = tmp_path_factory.mktemp("ckpt")
    src, out = d / "epoch=3-step=120.ckpt", d / "fired.ckpt"
    torch.save(ckpt, src)
    res = run("project", src, "-o", out)
    return dict(torch=torch, src=src, out=out, res=res)


def test_lightning_checkpoint_projects_its_state_dict(lightning_run):
    torch = lightning_run["torch"]
    assert lightning_run["res"].returncode == 0, lightning_run["res"].stderr
    src = torch.load(lightning_run["src"], weights_only=True)["state_dict"]
    got = torch.load(lightning_run["out"], weights_only=True)["state_dict"]
    assert list(got) == list(src)
    for name, value in got.items():
        if name in ("model.0.weight", "model.2.weight"):
            torch.testing.assert_close(value, fire_core.reinit(src[name], "oi"), rtol=0, atol=1e-12, msg=name)
        else:
            assert tensor_hash(value) == tensor_hash(src[name]), name
    assert re.search(r"^model\.0\.weight\s", lightning_run["res"].stdout, re.M)  # named as in the module


def test_lightning_checkpoint_keeps_everything_else_exactly(lightning_run):
    torch = lightning_run["torch"]
    src = torch.load(lightning_run["src"], weights_only=True)
    got = torch.load(lightning_run["out"], weights_only=True)
    assert list(got) == list(src)
    for key in src:
        if key != "state_dict":
            assert _same(got[key], src[key]), key


def test_lightning_checkpoint_says_its_optimizer_states_are_stale(lightning_run):
    text = lightning_run["res"].stdout
    assert "note: Lightning checkpoint: projected the weights in 'state_dict'" in text
    assert "'optimizer_states'" in text and "optimizer state is now stale for the projected weights" in text


def test_lightning_checkpoint_with_an_object_in_its_hyper_parameters_gets_our_message(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    path = tmp_path / "last.ckpt"
    sd = {"model.fc.weight": torch.ones(4, 4)}
    torch.save(lightning_checkpoint(torch, sd, hyper_parameters=Hyper(lr=1e-3)), path)
    assert cli.main(["project", str(path), "-o", str(tmp_path / "o.ckpt")]) == 1
    err = capsys.readouterr().err
    assert f"holds Python objects ({__name__}.Hyper), and fire-core loads only tensors" in err
    assert not (tmp_path / "o.ckpt").exists()


# --------------------------------------------------------------------------- option values and names


@pytest.mark.parametrize("option", [["--steps", "-3"], ["--steps", "x"], ["--steps", "2.5"], ["--scale", "bogus"],
                                    ["--scale", "nan"], ["--split", "c_attn=x"], ["--split", "c_attn=0"],
                                    ["--split", "c_attn=4,0"], ["--split", "c_attn"], ["--layout", "fc"],
                                    ["--layout", "fc=o-i"]])
def test_a_bad_option_value_exits_2_with_the_usage_line(small, option):
    out = small.with_name("o.npz")
    res = run("project", small, "-o", out, *option)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("usage: fire-core project") and f"argument {option[0]}" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("what", ["include", "exclude"])
def test_a_pattern_that_matches_nothing_is_one_line_naming_the_closest(small, capsys, what):
    out = small.with_name("o.npz")
    assert cli.main(["project", str(small), "-o", str(out), f"--{what}", "fc.wieght"]) == 1
    err = capsys.readouterr().err
    assert err == f"fire-core: error: {what} pattern 'fc.wieght' matches no weight FIRE would project; " \
                  "closest: fc.weight\n"
    assert not out.exists()


def test_split_sizes_on_the_command_line(tmp_path, capsys):
    w = np.random.default_rng(4).normal(size=(12, 8))  # grouped-query attention: q 8 rows, k and v 2 each
    src, out = tmp_path / "m.npz", tmp_path / "o.npz"
    np.savez(src, **{"attn.qkv_proj.weight": w})
    assert cli.main(["project", str(src), "-o", str(out)]) == 1
    assert "--split '*.qkv_proj=Q,K,V'" in capsys.readouterr().err
    assert cli.main(["project", str(src), "-o", str(out), "--split", "*.qkv_proj=8,2,2"]) == 0
    want = np.concatenate([fire_core.reinit(w[:8], "oi"), fire_core.reinit(w[8:10], "oi"),
                           fire_core.reinit(w[10:], "oi")])
    with np.load(out) as z:
        np.testing.assert_allclose(z["attn.qkv_proj.weight"], want, rtol=0, atol=1e-12)


def test_project_and_inspect_list_what_is_left_alone(st_run):
    lines = st_run["res"].stdout.splitlines()
    assert "left alone (an embedding, by its name): embed.weight (20x8)" in lines
    res = run("inspect", st_run["src"], "--layout", "up=iohw", "--exclude", "*.in_proj_weight[k]")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "left alone (excluded by exclude pattern '*.in_proj_weight[k]'): attn.in_proj_weight[k] (8x8)" in lines
    assert "left alone (not floating point (int8)): quant.weight (5x6)" in lines
    assert not any(line.startswith("attn.in_proj_weight[k] ") for line in lines)


# --------------------------------------------------------------------------- GPT-2 and nanoGPT state dicts


def gpt2_expected(sd: dict) -> dict:
    """The reference's treatment of Hugging Face GPT-2, block by block: Conv1D weights are (in, out),
    c_attn is q, k, v along its output (second) axis, the tied head is a Linear."""
    out = dict(sd)
    for name, w in sd.items():
        if name.endswith("attn.c_attn.weight"):
            out[name] = np.concatenate([fire_core.reinit(b, "io") for b in np.split(w, 3, axis=1)], axis=1)
        elif name.endswith(("c_proj.weight", "c_fc.weight")):
            out[name] = fire_core.reinit(w, "io")
    out["lm_head.weight"] = out["transformer.wte.weight"] = fire_core.reinit(sd["lm_head.weight"], "oi")
    return out


def nanogpt(torch, bias):
    """A nanoGPT-style model built from nn.Linear (c_attn (3E, E)), its head tied to the token embedding."""
    from torch import nn

    e, v = 16, 48

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(e), nn.LayerNorm(e)
            self.attn = nn.Module()
            self.attn.c_attn, self.attn.c_proj = nn.Linear(e, 3 * e, bias=bias), nn.Linear(e, e, bias=bias)
            self.mlp = nn.Module()
            self.mlp.c_fc, self.mlp.c_proj = nn.Linear(e, 4 * e, bias=bias), nn.Linear(4 * e, e, bias=bias)

    model = nn.Module()
    model.transformer = nn.ModuleDict(dict(wte=nn.Embedding(v, e), wpe=nn.Embedding(8, e),
                                           h=nn.ModuleList([Block(), Block()]), ln_f=nn.LayerNorm(e)))
    model.lm_head = nn.Linear(e, v, bias=False)
    model.transformer.wte.weight = model.lm_head.weight  # nanoGPT's weight tying
    return model.double()


def nanogpt_expected(sd: dict) -> dict:
    out = dict(sd)
    for name, w in sd.items():
        if name.endswith("attn.c_attn.weight"):
            out[name] = np.concatenate([fire_core.reinit(b, "oi") for b in np.split(w, 3, axis=0)])
        elif name.endswith(("c_proj.weight", "c_fc.weight")):
            out[name] = fire_core.reinit(w, "oi")
    out["lm_head.weight"] = out["transformer.wte.weight"] = fire_core.reinit(sd["lm_head.weight"], "oi")
    return out


@pytest.fixture(scope="module")
def gpt_files(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    hf = transformers.GPT2LMHeadModel(config).double()
    nano = nanogpt(torch, bias=False)
    d = tmp_path_factory.mktemp("gpt")
    files = {}
    for name, model in (("hf", hf), ("nano", nano)):
        src, out = d / f"{name}.pt", d / f"{name}-fired.pt"
        torch.save(model.state_dict(), src)
        files[name] = dict(model=model, src=src, out=out, res=run("project", src, "-o", out))
    return torch, files


@pytest.mark.parametrize("which, expected", [("hf", gpt2_expected), ("nano", nanogpt_expected)])
def test_gpt_state_dict_equals_the_references_block_by_block_treatment(gpt_files, which, expected):
    torch, files = gpt_files
    f = files[which]
    assert f["res"].returncode == 0, f["res"].stderr
    sd = {k: v.numpy() for k, v in torch.load(f["src"], weights_only=True).items()}
    want = expected(sd)
    got = torch.load(f["out"], weights_only=True)
    assert list(got) == list(sd)
    for name, value in got.items():
        np.testing.assert_allclose(value.numpy(), want[name], rtol=0, atol=1e-12 if want[name] is not sd[name] else 0,
                                   err_msg=name)
    assert got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()  # still tied


@pytest.mark.parametrize("which", ["hf", "nano"])
def test_gpt_state_dict_equals_torch_apply_with_the_references_split(gpt_files, which):
    try:
        import fire_core.torch as fc_torch
    except ImportError as e:
        pytest.skip(f"fire_core.torch not importable: {e}")
    torch, files = gpt_files
    model = files[which]["model"]
    model.load_state_dict(torch.load(files[which]["src"], weights_only=True))
    conv1d = {"*.c_attn.weight": "io", "*.c_proj.weight": "io", "*.c_fc.weight": "io"} if which == "hf" else None
    fc_torch.apply(model, 5, split={"*.c_attn": 3}, layouts=conv1d)
    got = torch.load(files[which]["out"], weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-12, msg=name)


def test_gpt2_report_names_the_split_the_conv1d_reading_and_the_tie(gpt_files):
    text = gpt_files[1]["hf"]["res"].stdout
    for block in "qkv":
        assert re.search(rf"^transformer\.h\.0\.attn\.c_attn\.weight\[{block}\]\s+32x32\s+io\s", text, re.M)
    assert re.search(r"^transformer\.h\.1\.mlp\.c_fc\.weight\s+32x128\s+io\s", text, re.M)
    assert re.search(r"^lm_head\.weight \(= transformer\.wte\.weight\)\s+64x32\s+oi\s", text, re.M)
    assert "note: fused weights split into their blocks by default (c_attn as q, k, v" in text
    assert "note: Hugging Face Conv1D weights, stored (in, out), read as 'io'" in text
    assert "left alone (an embedding, by its name): transformer.wpe.weight (16x32)" in text


@pytest.mark.parametrize("pattern", ["transformer.wte", "lm_head"])
def test_excluding_the_tied_head_by_either_name_leaves_both_alone(gpt_files, tmp_path, pattern):
    torch, files = gpt_files
    out = tmp_path / "o.pt"
    res = run("project", files["hf"]["src"], "-o", out, "--exclude", pattern)
    assert res.returncode == 0, res.stderr
    src = torch.load(files["hf"]["src"], weights_only=True)
    got = torch.load(out, weights_only=True)
    for name in ("lm_head.weight", "transformer.wte.weight"):
        assert tensor_hash(got[name]) == tensor_hash(src[name]), name
    assert f"left alone (excluded by exclude pattern {pattern!r}): " \
           "lm_head.weight (= transformer.wte.weight) (64x32)" in res.stdout


@pytest.fixture(scope="module")
def rnn_run(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(6)
    model = nn.Module()
    model.embed = nn.Embedding(20, 8)
    model.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, proj_size=4)
    model.cell = nn.GRUCell(8, 5)
    model.head = nn.Linear(8, 20)
    model = model.double()
    d = tmp_path_factory.mktemp("rnn")
    src, out = d / "rnn.pt", d / "out.pt"
    torch.save(model.state_dict(), src)
    return dict(torch=torch, model=model, src=src, out=out, res=run("project", src, "-o", out))


def test_recurrent_weights_equal_a_per_gate_loop(rnn_run):
    torch = rnn_run["torch"]
    assert rnn_run["res"].returncode == 0, rnn_run["res"].stderr
    sd = torch.load(rnn_run["src"], weights_only=True)
    got = torch.load(rnn_run["out"], weights_only=True)
    for name, w in sd.items():
        w = w.numpy()
        if ".weight_ih" in name or ".weight_hh" in name:
            gates = 4 if name.startswith("lstm") else 3
            want = np.concatenate([fire_core.reinit(b, "oi") for b in np.split(w, gates, axis=0)])
        elif ".weight_hr" in name or name == "head.weight":
            want = fire_core.reinit(w, "oi")
        else:
            want = w
        np.testing.assert_allclose(got[name].numpy(), want, rtol=0, atol=1e-12 if want is not w else 0, err_msg=name)
    assert "note: recurrent weights projected gate by gate" in rnn_run["res"].stdout


def test_recurrent_weights_equal_torch_apply(rnn_run):
    try:
        import fire_core.torch as fc_torch
    except ImportError as e:
        pytest.skip(f"fire_core.torch not importable: {e}")
    torch, model = rnn_run["torch"], rnn_run["model"]
    model.load_state_dict(torch.load(rnn_run["src"], weights_only=True))
    fc_torch.apply(model, 5)
    got = torch.load(rnn_run["out"], weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-12, msg=name)


# --------------------------------------------------------------------------- options checked before any work
# A bad option value, path or combination exits 2 at once with the subcommand's usage line and one message of
# ours; "at once" is checked by the work itself failing the test if it is reached, not by timing.


@pytest.fixture
def no_work(monkeypatch):
    """Make every piece of work the commands do fail the test if it is called."""
    from fire_core import testing

    def reached(*a, **k):
        raise AssertionError("work started before the options were checked")

    for name in ("check", "bench"):
        monkeypatch.setattr(testing, name, reached)
    for name in ("_load", "_check_input", "reinit_many"):
        monkeypatch.setattr(cli, name, reached)


def usage_error(capsys, argv, command):
    """``cli.main(argv)`` must exit 2 with ``command``'s usage line; returns its message (after 'error: ')."""
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: fire-core {command}"), err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fire-core {command}: error: "), err
    return last[len(f"fire-core {command}: error: "):]


@pytest.mark.parametrize("size", ["0", "-4"])
def test_check_size_must_be_positive(no_work, capsys, size):
    assert usage_error(capsys, ["check", "--bench", "--size", size], "check") == (
        f"--size must be a positive integer, got {size}"
    )


def test_check_size_needs_bench(no_work, capsys):
    assert "pass --bench too" in usage_error(capsys, ["check", "--size", "64"], "check")


def test_check_force_needs_output(no_work, capsys):
    assert "pass --output too" in usage_error(capsys, ["check", "--force"], "check")


def read_only_directory(path, monkeypatch):
    """``path`` made a directory no file can be created in (for root too: creating one there is refused)."""
    path.mkdir()
    real = _files.tempfile.TemporaryFile

    def refuse(*a, dir=None, **k):
        if dir is not None and os.path.abspath(dir) == str(path):
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(_files.tempfile, "TemporaryFile", refuse)
    return path


@pytest.mark.parametrize("case", ["missing-folder", "read-only-folder", "a-directory", "exists"])
def test_check_output_path_is_checked_first(no_work, capsys, monkeypatch, tmp_path, case):
    out = {"missing-folder": tmp_path / "no" / "check.md", "read-only-folder": tmp_path / "ro" / "check.md",
           "a-directory": tmp_path, "exists": tmp_path / "check.md"}[case]
    if case == "read-only-folder":
        read_only_directory(tmp_path / "ro", monkeypatch)
    if case == "exists":
        out.write_text("keep me")
    message = usage_error(capsys, ["check", "--output", out], "check")
    want = {"missing-folder": f"directory {tmp_path / 'no'} does not exist",
            "read-only-folder": f"cannot write in directory {tmp_path / 'ro'}: Permission denied",
            "a-directory": "is a directory", "exists": "exists; pass --force to overwrite it"}[case]
    assert message == f"--output {out}: {want}"
    if case == "exists":
        assert out.read_text() == "keep me"


def test_check_output_in_a_read_only_folder_is_refused_by_the_file_system(no_work, capsys, tmp_path):
    """Without the stand-in above: a directory the process really cannot write in (not as root)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes in any directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "cannot write in directory" in usage_error(capsys, ["check", "--output", ro / "c.md"], "check")
    finally:
        ro.chmod(0o700)


def test_check_valid_options_reach_the_work(monkeypatch, tmp_path, capsys):
    """The checks above refuse nothing valid: --bench --size 64 --output (existing, with --force) runs."""
    from fire_core import testing

    seen = {}
    monkeypatch.setattr(testing, "check", lambda: type("R", (), {"ok": True, "__str__": lambda self: "agree"})())
    monkeypatch.setattr(testing, "bench", lambda sizes: seen.setdefault("sizes", sizes) and [])
    monkeypatch.setattr(testing, "bench_table", lambda rows: "table")
    out = tmp_path / "c.md"
    out.write_text("old")
    assert cli.main(["check", "--bench", "--size", "64", "--output", str(out), "--force"]) == 0
    assert set(seen["sizes"].values()) == {64}
    assert "## Speed" in out.read_text()


@pytest.mark.parametrize("case", ["missing-folder", "read-only-folder", "a-directory", "exists", "is-the-input"])
def test_project_output_path_is_checked_before_reading_the_input(no_work, capsys, monkeypatch, small, case):
    t = small.parent
    out = {"missing-folder": t / "no" / "o.npz", "read-only-folder": t / "ro" / "o.npz", "a-directory": t,
           "exists": t / "o.npz", "is-the-input": small}[case]
    if case == "read-only-folder":
        read_only_directory(t / "ro", monkeypatch)
    if case == "exists":
        out.write_bytes(b"keep me")
    message = usage_error(capsys, ["project", small, "-o", out, "--force" if case == "is-the-input" else "--steps=5"],
                          "project")
    want = {"missing-folder": f"directory {t / 'no'} does not exist",
            "read-only-folder": f"cannot write in directory {t / 'ro'}: Permission denied",
            "a-directory": "is a directory", "exists": "exists; pass --force to overwrite it",
            "is-the-input": "is the input file; fire-core never modifies its input"}[case]
    assert message == f"-o/--output {out}: {want}"


@pytest.mark.parametrize("case", ["missing-folder", "read-only-folder", "not-png", "same-as-output", "exists"])
def test_project_plot_path_is_checked_before_reading_the_input(no_work, capsys, monkeypatch, small, case):
    t = small.parent
    out = t / "o.npz"
    plot = {"missing-folder": t / "no" / "p.png", "read-only-folder": t / "ro" / "p.png", "not-png": t / "p.pdf",
            "same-as-output": t / "p.png", "exists": t / "p.png"}[case]
    if case == "same-as-output":
        out = plot
    if case == "read-only-folder":
        read_only_directory(t / "ro", monkeypatch)
    if case == "exists":
        plot.write_bytes(b"keep me")
    message = usage_error(capsys, ["project", small, "-o", out, "--plot", plot], "project")
    want = {"missing-folder": f"--plot {plot}: directory {t / 'no'} does not exist",
            "read-only-folder": f"--plot {plot}: cannot write in directory {t / 'ro'}: Permission denied",
            "not-png": f"--plot {plot}: the plot is written as PNG; name it *.png",
            "same-as-output": f"--plot and -o/--output name the same file ({plot})",
            "exists": f"--plot {plot}: exists; pass --force to overwrite it"}[case]
    assert message == want
    assert not out.exists()
