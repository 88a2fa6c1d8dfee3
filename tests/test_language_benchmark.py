"""benchmarks/language.py: its corpora, its model and FIRE ref on that model, checked against independent computations."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
language = pytest.importorskip("language")

SIZES = (6_000, 9_000, 2_000)  # A train, B train, validation bytes
TINY = dict(language.QUICK, layers=2, d=16, heads=2, ctx=16, batch=4, steps1=4, steps2=5, eval1=2, eval2=5,
            a_bytes=3_000, b_bytes=3_000, val_bytes=1_000)


def newton_schulz(w: np.ndarray, steps: int) -> np.ndarray:
    """The reference's iteration written out: tall orientation, X0 = W / ||W||_F, X <- 1.5 X - 0.5 X X^T X."""
    tall = w.shape[0] >= w.shape[1]
    x = w if tall else w.T
    x = x / np.linalg.norm(x)
    for _ in range(steps):
        x = 1.5 * x - 0.5 * x @ (x.T @ x)
    return x if tall else x.T


def polar(w: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    return u @ vt


def trained_like(seed=0) -> "language.GPT":
    """A float64 model whose weights are far from orthogonal (as after training), so the projection changes them."""
    model = language.make_model(seed, TINY).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(1 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
                p[: p.shape[0] // 4].mul_(5.0)  # uneven rows: far from any isometry
    return model


# In a fresh interpreter with another hash seed, the corpus builder alone (its constants and functions, taken
# from the benchmark's source so the subprocess does not pay for importing torch).
OTHER_PROCESS = """
import ast, hashlib, platform, sys, sysconfig
from pathlib import Path
tree = ast.parse(Path(sys.argv[1]).read_text())
keep = {"BLOCK", "VAL_EVERY", "STDLIB_MODULES", "_split", "corpora"}
nodes = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in keep)
         or (isinstance(n, ast.Assign) and {getattr(t, "id", None) for t in n.targets} & keep)]
scope = {"hashlib": hashlib, "platform": platform, "sysconfig": sysconfig, "Path": Path}
exec(compile(ast.Module(body=nodes, type_ignores=[]), "language", "exec"), scope)
print(scope["corpora"](*map(int, sys.argv[2:]))["info"])
"""


def test_corpora_are_deterministic_in_this_and_another_process():
    first, second = language.corpora(*SIZES), language.corpora(*SIZES)
    assert first["A"] == second["A"] and first["B"] == second["B"]
    other = subprocess.run([sys.executable, "-c", OTHER_PROCESS, str(BENCH / "language.py"), *map(str, SIZES)],
                           capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}).stdout.strip()
    assert other == str(first["info"])


def test_corpora_have_the_sizes_asked_and_a_and_b_differ():
    parts = language.corpora(*SIZES)
    (a_train, a_val), (b_train, b_val) = parts["A"], parts["B"]
    assert (len(a_train), len(b_train), len(a_val), len(b_val)) == (SIZES[0], SIZES[1], SIZES[2], SIZES[2])
    assert parts["info"]["A"]["sha256"] != parts["info"]["B"]["sha256"]
    # prose against code: code is dense in "def ", "self" and newlines, prose in sentences
    density = lambda text, word: text.count(word) / len(text)  # noqa: E731
    assert density(b_train, b"self") > 10 * density(a_train, b"self")
    assert density(a_train, b". ") > 3 * density(b_train, b". ")
    # validation blocks are not in the training text
    block = a_val[: language.BLOCK]
    assert block not in a_train and b_val[: language.BLOCK] not in b_train


def test_fire_ref_projects_the_three_blocks_of_c_attn_separately():
    model = trained_like()
    before = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    language.intervene("FIRE ref", model, [], {})
    d = TINY["d"]
    for k in range(TINY["layers"]):
        name = f"h.{k}.attn.c_attn.weight"
        new, old = model.get_parameter(name).detach().numpy(), before[name]
        for j in range(3):  # q, k, v: each a d x d block at scale sqrt(d / d) = 1
            rows = slice(j * d, (j + 1) * d)
            np.testing.assert_allclose(new[rows], newton_schulz(old[rows], 5), rtol=0, atol=1e-12)
        whole = newton_schulz(old, 5) * np.sqrt(3)  # what projecting the fused (3d x d) matrix would give
        assert np.abs(new - whole).max() > 1e-2
        for other, (d_out, d_in) in (("attn.c_proj", (d, d)), ("mlp.c_fc", (4 * d, d)), ("mlp.c_proj", (d, 4 * d))):
            name = f"h.{k}.{other}.weight"
            expected = newton_schulz(before[name], 5) * np.sqrt(d_out / d_in)
            np.testing.assert_allclose(model.get_parameter(name).detach().numpy(), expected, rtol=0, atol=1e-12)


def test_the_split_blocks_reach_each_blocks_own_svd_polar_factor_with_method_svd():
    model = trained_like(1)
    old = model.h[0].attn.c_attn.weight.detach().numpy().copy()
    import fire_core.torch

    fire_core.torch.apply(model, **language.FIRE_REF | {"method": "svd"}, report=False)
    new, d = model.h[0].attn.c_attn.weight.detach().numpy(), TINY["d"]
    for j in range(3):
        rows = slice(j * d, (j + 1) * d)
        np.testing.assert_allclose(new[rows], polar(old[rows]), rtol=0, atol=1e-10)
    assert np.abs(new - np.sqrt(3) * polar(old)).max() > 1e-2  # not the polar factor of the fused matrix


def test_the_tied_head_is_projected_and_stays_tied():
    model = trained_like(2)
    old = model.lm_head.weight.detach().numpy().copy()
    for method in ("FIRE ref", "FIRE default"):
        language.intervene(method, model, [], {})
        assert model.lm_head.weight is model.wte.weight
        assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    once = trained_like(2)
    language.intervene("FIRE ref", once, [], {})
    vocab, d = old.shape  # (256, d): wide side first, scale sqrt(d_out / d_in) = sqrt(256 / d)
    np.testing.assert_allclose(once.wte.weight.detach().numpy(), newton_schulz(old, 5) * np.sqrt(vocab / d),
                               rtol=0, atol=1e-12)
    out = once(torch.arange(8).view(1, 8))
    assert out.shape == (1, 8, 256)


def test_shrink_perturb_and_reset_move_every_parameter_to_the_stated_point():
    model = language.make_model(0, TINY)
    initial = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = [p.detach().clone() for p in model.parameters()]
    language.intervene("S&P 0.6", model, initial, {})
    for p, p0, p1 in zip(model.parameters(), initial, moved):
        torch.testing.assert_close(p.detach(), 0.4 * p1 + 0.6 * p0)
    language.intervene("reset", model, initial, {})
    for p, p0 in zip(model.parameters(), initial):
        assert torch.equal(p.detach(), p0)


def test_one_tiny_seed_runs_every_method_and_shares_identical_phase_twos():
    cfg = dict(TINY, methods=list(language.METHODS), snp_coef=0.8, scale="fire")
    out = language.run_seed(0, cfg)
    assert out["FIRE default"]["same_as"] == "FIRE ref"  # the library's defaults are the reference's here
    assert out["S&P tuned"]["same_as"] == "S&P 0.8" and out["FIRE best-scale"]["same_as"] == "FIRE ref"
    for method in language.METHODS:
        curve = out[method]["curve"]
        assert curve["step"] == [0, 5] and all(np.isfinite(curve["A"] + curve["B"]))
    for method in ("FIRE@DfI", "FIRE@dormant"):  # initial, boundary, and one check inside phase 2 (step 1..4)
        assert len(out[method]["values"]) == len(out[method]["checks_at"])
    assert out["none"]["curve"]["A"][0] == out["phase1"]["val_A"][-1]


def test_a_trigger_riding_along_gives_what_its_own_run_gives(monkeypatch):
    import common

    # DfI/n starts near 1 (nanoGPT init, std 0.02) and falls: a ratio below 1 fires at the boundary and, at
    # 0.2, again inside phase 2 (the benchmark itself uses common.WhenNeeded unchanged)
    monkeypatch.setattr(language, "WhenNeeded", lambda kind: common.WhenNeeded(kind, dfi_ratio=0.2))
    cfg = dict(TINY, steps2=10, eval2=2, snp_coef=0.8, scale="fire")
    along = language.run_seed(0, dict(cfg, methods=["none", "FIRE ref", "FIRE@DfI"]))["FIRE@DfI"]
    alone = language.run_seed(0, dict(cfg, methods=["FIRE@DfI"]))["FIRE@DfI"]
    assert along["fired_at"] == alone["fired_at"] and len(alone["fired_at"]) >= 2
    assert along["values"] == alone["values"]
    assert along["curve"] == alone["curve"]


def _fixed_trial(ratio, calls):
    """A stand-in for ``fire_core.torch.trial`` whose lookahead returns (1, ratio); it records what it was given."""
    def trial(model, batches, probe, **options):
        calls.append((model, batches, probe, options))
        return lambda k: (calls.append(("steps", k)), (1.0, ratio))[1]
    return trial


@pytest.mark.parametrize("ratio", [0.5, 0.55])
def test_fire_when_needed_fires_at_the_boundary_iff_the_trial_ratio_is_below_the_threshold(monkeypatch, ratio):
    calls = []
    monkeypatch.setattr(language.fire_core.torch, "trial", _fixed_trial(ratio, calls))
    cfg = dict(TINY, methods=["none", "FIRE ref", language.NEEDED], snp_coef=0.8, scale="fire")
    out = language.run_seed(0, cfg)
    row = out[language.NEEDED]
    fires = ratio < 0.526
    assert row["fired_at"] == ([TINY["steps1"]] if fires else [])
    assert row["same_as"] == ("FIRE ref" if fires else "none")  # the same weights as that method's after the boundary
    assert row["curve"] == out[row["same_as"]]["curve"]
    assert (row["fire_seconds"] is not None) == fires
    assert np.isnan(row["values"][0]) and row["values"][1] == pytest.approx(ratio) and row["losses"][1] == [1.0, ratio]
    assert row["checks_at"] == [0, TINY["steps1"]]
    # one trial, at the boundary, of 200 steps, with FIRE ref's options and the benchmark's loss
    (model, batches, probe, options), steps = calls
    assert steps == ("steps", 200)
    assert options == dict(loss=language.lm_loss, lr=1e-3, report=False, **language.FIRE_REF)
    assert len(batches) == language.TRIAL_BATCHES and probe[0].shape == (language.TRIAL_BATCHES * TINY["batch"], TINY["ctx"])


def test_the_trial_data_is_the_phase_two_training_stream_with_a_held_out_probe():
    parts = language.corpora(TINY["a_bytes"], TINY["b_bytes"], TINY["val_bytes"])
    data = {"A": language.as_tokens(parts["A"][0]), "B": language.as_tokens(parts["B"][0])}
    batches, probe = language.trial_data(data, TINY, 3)
    again, _ = language.trial_data(data, TINY, 3)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(batches, again))  # its own seeded generator
    half = TINY["batch"] // 2
    rows = lambda part: {bytes(w.tolist()) for w in language.windows(data[part], TINY["ctx"])}  # noqa: E731
    seen = set()
    for inputs, targets in batches + [probe]:
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next bytes
        whole = torch.cat([inputs, targets[:, -1:]], dim=1)
        n = whole.shape[0] // 2
        assert {bytes(w.tolist()) for w in whole[:n]} <= rows("A") and {bytes(w.tolist()) for w in whole[n:]} <= rows("B")
        keys = [bytes(w.tolist()) for w in whole]
        assert not seen & set(keys)  # no window in two batches, none of the probe's in a batch
        seen |= set(keys)
    assert all(b[0].shape[0] == 2 * half for b in batches)


def test_fire_when_needed_runs_a_real_trial_and_the_table_has_its_section():
    cfg = dict(TINY, methods=["none", "FIRE ref", language.NEEDED], snp_coef=0.8, scale="fire")
    runs = [language.run_seed(seed, cfg) for seed in (0, 1)]
    for r in runs:
        row = r[language.NEEDED]
        without, with_fire = row["losses"][1]
        assert np.isfinite([without, with_fire]).all() and row["values"][1] == pytest.approx(with_fire / without)
        assert bool(row["fired_at"]) == (row["values"][1] < 0.526) and row["trial_seconds"] > 0
    lines = language.tables({"main": runs}, cfg)
    start = lines.index("### FIRE when needed (`fire_core.schedule.when_needed()`)")
    header = ("| setting | metric | FIRE − none | when needed − none | when needed − FIRE | fired | trial cost per check "
              "| goals |")
    assert header in lines[start:]
    row = lines[lines.index(header, start) + 2]
    assert "/2 seeds" in row and "gain kept:" in row and "never cost:" in row
