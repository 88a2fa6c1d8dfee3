"""fire_core.testing: backends(), compare(), assert_consistent() and the pytest plugin, against the real libraries."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from array_api_compat import is_torch_array

import fire_core
import fire_core.testing as ft

torch = pytest.importorskip("torch")


def _row(table, backend, dtype):
    (row,) = [r for r in table.rows if (r.backend, r.dtype) == (backend, dtype)]
    return row


def test_import_loads_no_framework():
    code = "import sys, fire_core.testing; print([m for m in ('torch', 'jax', 'cupy', 'pytest') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_backends_lists_every_backend_with_a_reason_when_absent():
    found = ft.backends()
    assert [b.name for b in found] == list(ft.BACKENDS)
    assert found[0].available and found[0].backend.xp is np
    for b in found:
        assert b.available == (b.backend is not None)
        assert b.available or b.reason  # absent: says why
    assert ft.backends(["torch"])[0].backend.device == "cpu"


def test_get_names_the_reason_of_an_absent_backend(monkeypatch):
    monkeypatch.setitem(ft._CACHE, "cupy", ft.Availability("cupy", None, "no CUDA device here"))
    with pytest.raises(ft.Unavailable, match="cupy unavailable: no CUDA device here"):
        ft.get("cupy")
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        ft.get("tensorflow")


def test_compare_measures_the_distance_to_numpy_float64_of_the_rounded_inputs():
    w = np.random.default_rng(3).normal(size=(2, 40, 24))
    table = ft.compare(lambda x: fire_core.project(x, 10, method="fast"), w, backends=["numpy", "torch"])
    assert table.ok
    # independently: torch float32 against NumPy float64 on the float32-rounded input
    got = fire_core.project(torch.asarray(w.astype(np.float32)), 10, method="fast").double().numpy()
    want = fire_core.project(w.astype(np.float32).astype(np.float64), 10, method="fast")
    row = _row(table, "torch", "float32")
    assert row.max_abs == pytest.approx(float(np.max(np.abs(got - want))), rel=1e-12)
    assert row.max_rel == pytest.approx(row.max_abs / max(1.0, float(np.max(np.abs(want)))), rel=1e-12)
    assert _row(table, "numpy", "float64").max_abs == 0.0  # the reference itself


def test_compare_generates_seeded_inputs_from_shapes():
    seen = []
    ft.compare(lambda x: seen.append(np.asarray(x)) or x, (4, 3), backends=["numpy"], dtypes=["float64"], seed=7)
    np.testing.assert_array_equal(seen[0], np.random.default_rng(7).normal(size=(4, 3)))


def test_compare_flags_a_backend_that_disagrees():
    def off_on_torch(x):  # a port that is wrong by 1e-6 on torch only
        y = fire_core.reinit(x, "oi")
        return y + 1e-6 if is_torch_array(y) else y

    table = ft.compare(off_on_torch, (24, 16), backends=["numpy", "torch"])
    assert not table.ok
    assert [(r.backend, r.dtype) for r in table.failures] == [("torch", "float64")]  # 1e-6 is within float32's 3e-5
    assert "FAIL" in str(table)


def test_assert_consistent_raises_with_the_table():
    with pytest.raises(AssertionError, match=r"(?s)torch .*float64 .*FAIL.*1 row\(s\) beyond tolerance"):
        ft.assert_consistent(lambda x: x + 1e-9 if is_torch_array(x) else x, (5, 5), backends=["numpy", "torch"])


def test_assert_consistent_passes_and_returns_the_table():
    table = ft.assert_consistent(lambda x: fire_core.reinit(x, "oihw", steps=10), (8, 3, 3, 3),
                                 backends=["numpy", "array_api_strict", "torch"])
    assert all(r.ok for r in table.rows)


def test_assert_consistent_fails_when_a_named_backend_is_absent(monkeypatch):
    monkeypatch.setitem(ft._CACHE, "cupy", ft.Availability("cupy", None, "no CUDA device here"))
    with pytest.raises(AssertionError, match="requested backends absent: cupy"):
        ft.assert_consistent(lambda x: x, (3, 3), backends=["numpy", "cupy"])
    table = ft.compare(lambda x: x, (3, 3), backends=["numpy", "cupy"])  # compare only lists it
    assert table.ok and _row(table, "cupy", "float64").note == "no CUDA device here"


def test_bfloat16_rows_skip_libraries_without_it_and_hold_one_ulp_elsewhere():
    table = ft.compare(lambda x: fire_core.project(x, 10, method="svd"), (3, 32, 16),
                       backends=["numpy", "torch"], dtypes=["bfloat16"])
    assert _row(table, "numpy", "bfloat16").ok is None
    assert _row(table, "numpy", "bfloat16").note == "numpy has no bfloat16"
    row = _row(table, "torch", "bfloat16")
    assert row.ok and 0 < row.max_rel <= 2.0**-7


def test_round_to_bfloat16_is_torchs_rounding():
    x = np.random.default_rng(1).normal(size=1000) * np.geomspace(1e-3, 1e3, 1000)
    want = torch.asarray(x).to(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(ft.round_to(x, "bfloat16"), want)


def test_compare_uses_the_reference_given():
    def loop_reinit(x):  # the FIRE target of each column block, written independently by SVD
        u, _, vh = np.linalg.svd(x, full_matrices=False)
        return (u @ vh) * np.sqrt(x.shape[0] / x.shape[1])

    table = ft.compare(lambda x: fire_core.reinit(x, "oi", method="svd"), (20, 12),
                       backends=["numpy", "torch"], reference=loop_reinit)
    assert table.ok
    zero = ft.compare(lambda x: fire_core.reinit(x, "oi", method="svd"), (20, 12), backends=["numpy"],
                      reference=np.zeros_like)  # measured against the reference, not against fn itself
    assert not zero.ok and len(zero.failures) == 2


def test_compare_reads_tuples_and_dicts_and_fails_a_shape_mismatch():
    table = ft.compare(lambda x: {"a": x, "b": (x * 2, x[:1])}, (3, 2), backends=["numpy"], dtypes=["float64"])
    assert table.ok
    wrong = ft.compare(lambda x: x.T if is_torch_array(x) else x, (3, 2), backends=["torch"], dtypes=["float64"],
                       reference=lambda x: x)
    assert _row(wrong, "torch", "float64").note == "shape (2, 3), the reference's is (3, 2)"


def test_compare_refuses_unknown_dtypes_and_integer_inputs():
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        ft.compare(lambda x: x, (2, 2), dtypes=["float16"])
    with pytest.raises(TypeError, match="floating arrays or shapes"):
        ft.compare(lambda x: x, np.arange(4))


def test_requested_backends_reads_fire_core_backends():
    assert ft.requested_backends("numpy, torch:cuda") == (["numpy", "torch:cuda"], True)
    assert ft.requested_backends("") == (list(ft.DEFAULT_TEST_BACKENDS), False)
    with pytest.raises(ValueError, match="unknown backends"):
        ft.requested_backends("numpy,tf")


USER_TEST = """
import numpy as np
import fire_core

def test_fire_agrees(fire_backend, fire_xp):
    w = np.random.default_rng(0).normal(size=(12, 8))
    got = fire_backend.to_numpy(fire_core.reinit(fire_backend.asarray(w), "oi"))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, fire_core.reinit(w, "oi"), rtol=0, atol=1e-12)
    assert fire_xp is fire_backend.xp
"""


def _pytest(tmp_path, env_backends, conftest=""):
    (tmp_path / "test_user.py").write_text(USER_TEST)
    (tmp_path / "conftest.py").write_text(textwrap.dedent(conftest))
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "FIRE_CORE_BACKENDS": env_backends}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "fire_core._pytest_plugin",
         "test_user.py"], cwd=tmp_path, capture_output=True, text=True, env=env)


def test_plugin_runs_a_users_test_once_per_backend(tmp_path):
    out = _pytest(tmp_path, "")
    assert out.returncode == 0, out.stdout + out.stderr
    have = [b for b in ft.DEFAULT_TEST_BACKENDS if ft.backends([b])[0].available]
    assert f"{len(have)} passed" in out.stdout
    for b in ft.DEFAULT_TEST_BACKENDS:
        if b not in have:
            assert f"backend {b} unavailable" in out.stdout  # skipped with the reason


def test_plugin_errors_on_a_named_backend_that_is_absent(tmp_path):
    hide_torch = """
        import fire_core.testing as ft
        ft._CACHE["torch"] = ft.Availability("torch", None, "hidden by this test")
    """
    out = _pytest(tmp_path, "numpy,torch", hide_torch)
    assert out.returncode == 1, out.stdout
    assert "1 passed" in out.stdout and "1 error" in out.stdout
    assert "named in FIRE_CORE_BACKENDS but unavailable: hidden by this test" in out.stdout


# --- fire-core check ----------------------------------------------------------------------


def test_check_covers_every_layout_method_and_installed_adapter():
    result = ft.check(dtypes=("float64",))
    assert result.ok, str(result)
    names = set(result.tables)
    for method in ("fire", "fast", "svd"):
        assert {f"project {method}", f"reinit oi {method}", f"reinit oihw {method}", f"reinit ioo {method}"} <= names
        assert f"torch.apply {method}" in names  # torch is installed here (this file needs it)
    table = result.tables["torch.apply fast"]
    assert {r.backend for r in table.rows} == {a.name for a in ft.backends(["torch", "torch:cuda"]) if a.available}
    assert "agree" in str(result).splitlines()[-1]


def _wrong_case(monkeypatch):
    def off_on_torch(x):
        return x + 1e-3 if is_torch_array(x) else x

    monkeypatch.setattr(ft, "check_cases", lambda: ([("identity", off_on_torch, None, ((4, 3),), ("numpy", "torch"))],
                                                    []))


def test_check_command_exits_nonzero_on_a_disagreement(monkeypatch, capsys):
    from fire_core import cli

    _wrong_case(monkeypatch)
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "DISAGREE" in out


def test_check_command_writes_markdown_with_versions_and_tf32(monkeypatch, tmp_path, capsys):
    from fire_core import cli

    monkeypatch.setattr(ft, "check_cases", lambda: ([("identity", lambda x: x, None, ((4, 3),), ("numpy",))], []))
    out = tmp_path / "check.md"
    assert cli.main(["check", "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# fire-core check")
    assert f"torch {torch.__version__}" in text and "TF32: torch allow_tf32=" in text and "## Agreement" in text
    with pytest.raises(SystemExit) as exc:  # exists: refused without --force, a usage error
        cli.main(["check", "--output", str(out)])
    assert exc.value.code == 2 and "--force" in capsys.readouterr().err


def test_bench_times_project_against_the_matmul_floor_and_svd():
    rows = ft.bench({name: 64 for name in ft.BACKENDS}, repeat=1)
    present = {a.name for a in ft.backends() if a.available} - {"array_api_strict"}
    assert {(r["backend"], r["method"]) for r in rows} == {(b, m) for b in present for m, _ in ft.BENCH_METHODS}
    for r in rows:
        assert r["n"] == 64 and r["floor_seconds"] == ft._MATMULS_PER_STEP[r["method"]] * r["steps"] * r["matmul_seconds"]
        assert r["efficiency"] == pytest.approx(r["floor_seconds"] / r["seconds"])
    assert "efficiency" in ft.bench_table(rows)
