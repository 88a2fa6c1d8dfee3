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

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def run(*args, code: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    """``python -m fire_core ARGS``; with ``code``, that Python code runs first and then ``cli.main(ARGS)``."""
    args = [str(a) for a in args]
    if code is None:
        cmd = [sys.executable, "-m", "fire_core", *args]
    else:
        cmd = [sys.executable, "-c", f"{code}\nimport sys\nfrom fire_core.cli import main\nsys.exit(main({args!r}))"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


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
    assert "embed.weight" not in text and "quant.weight" not in text
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
    for line in res.stdout.splitlines():
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


def test_project_npz_equals_flax_apply(npz_run):
    pytest.importorskip("flax")
    try:
        import fire_core.flax as fc_flax
    except ImportError as e:
        pytest.skip(f"fire_core.flax not importable: {e}")
    import jax

    jax.config.update("jax_enable_x64", True)
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
    assert "optimizer state was copied unchanged" in torch_run["res"].stdout


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
    assert "projected 1 weights" in res.stdout and "dec.weight shares storage with enc.weight" in res.stdout
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
    assert res.returncode == 1 and "exists; pass --force" in res.stderr
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
    assert res.returncode == 1 and "never modifies its input" in res.stderr
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
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
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
    if case == "output-directory-missing":
        p = _valid_safetensors(t / "m.safetensors")
        return ["project", p, "-o", t / "no" / "where.safetensors"], None, None
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
    "truncated-safetensors": "not a readable safetensors file",
    "truncated-pt": "not a readable torch checkpoint",
    "npz-object-array": "refused: Object arrays cannot be loaded",
    "unsupported-extension": "unsupported file type '.txt'",
    "pt-not-a-dict": "holds a Tensor, not a state dict",
    "no-tensors": "holds no tensors",
    "malicious-torch-zip": "refused: it holds objects other than tensors",
    "malicious-pickle": "refused: it holds objects other than tensors",
    "nan-weight": "fc.weight: contains NaN or Inf",
    "no-targets": "none of its 2 tensors is a FIRE target",
    "unreadable": "cannot read",
    "bfloat16-without-torch": "holds bfloat16/float8 tensors, which NumPy cannot hold; install torch",
    "bad-layout-option": "fc.weight: layouts pattern 'fc' gives 'xyz'",
    "output-extension": "give it the extension .safetensors",
    "output-directory-missing": "does not exist",
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
