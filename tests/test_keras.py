"""fire_core.keras on every Keras backend installed: JAX, PyTorch and (where it is installed) TensorFlow.

Keras picks its backend once, from ``KERAS_BACKEND``, when it is first
imported; so the tests that use Keras run in one subprocess per backend:
``test_backend[jax]`` runs this very file under pytest with
``FIRE_KERAS_BACKEND=jax``, which defines :class:`TestOnBackend` (and sets
``KERAS_BACKEND`` before ``import keras``). That process also writes the
weights FIRE gives a fixed model, which ``test_same_result_on_every_backend``
compares across backends with ``fire_core.testing.TOLERANCES``. The outer
process never imports Keras (with TensorFlow installed it would pick the
TensorFlow backend and take its import time), so Keras' absence is a skip
read from ``importlib.util.find_spec``, not ``pytest.importorskip``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
INNER = os.environ.get("FIRE_KERAS_BACKEND")
OUT = os.environ.get("FIRE_KERAS_OUT")
BACKENDS = [b for b, module in (("jax", "jax"), ("torch", "torch"), ("tensorflow", "tensorflow"))
            if importlib.util.find_spec(module) is not None]


# ============================================================================ the outer process

if not INNER:
    needs_keras = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")
    _RUNS: dict = {}

    def _run_backend(backend: str, tmp_root: Path):
        if backend not in _RUNS:
            out = tmp_root / backend
            out.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, FIRE_KERAS_BACKEND=backend, KERAS_BACKEND=backend, FIRE_KERAS_OUT=str(out),
                       TF_CPP_MIN_LOG_LEVEL="3")
            env.pop("PYTEST_XDIST_WORKER", None)
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-p",
                 "no:xdist", "-rfE"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
            )
            _RUNS[backend] = (proc, out)
        return _RUNS[backend]

    @pytest.fixture(scope="session")
    def keras_runs(tmp_path_factory):
        root = tmp_path_factory.mktemp("keras_backends")
        return lambda backend: _run_backend(backend, root)

    @needs_keras
    @pytest.mark.slow
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_backend(backend, keras_runs):
        """Every test of TestOnBackend passes on this backend, in a process of its own."""
        proc, _ = keras_runs(backend)
        tail = (proc.stdout + proc.stderr)[-6000:]
        assert proc.returncode == 0, f"fire_core.keras tests on the {backend} backend failed:\n{tail}"
        passed = re.search(r"(\d+) passed", proc.stdout)
        assert passed and int(passed.group(1)) >= 20, tail

    @needs_keras
    @pytest.mark.slow
    def test_same_result_on_every_backend(keras_runs):
        """One model with the same weights gives the same FIRE weights on every backend (float32 tolerance)."""
        from fire_core.testing import TOLERANCES

        if len(BACKENDS) < 2:
            pytest.skip("needs two Keras backends")
        results = {}
        for backend in BACKENDS:
            proc, out = keras_runs(backend)
            path = out / "same_model.npz"
            assert path.exists(), f"the {backend} run wrote no result:\n{(proc.stdout + proc.stderr)[-3000:]}"
            results[backend] = dict(np.load(path))
        first, *others = BACKENDS
        for other in others:
            assert results[other].keys() == results[first].keys()
            for key, want in results[first].items():
                got = results[other][key]
                err = float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))
                assert err <= TOLERANCES["float32"], f"{key}: {other} differs from {first} by {err:.3g}"


# ============================================================================ inside one backend's process

else:
    os.environ["KERAS_BACKEND"] = INNER  # before the first import of keras
    keras = pytest.importorskip("keras")
    from keras import layers

    import fire_core
    import fire_core.keras as fk
    from fire_core.testing import TOLERANCES

    assert keras.backend.backend() == INNER, (keras.backend.backend(), INNER)
    TOL = TOLERANCES["float32"]
    RNG = np.random.default_rng(0)

    # Keras' own np.array(tensor) calls (convert_to_numpy, inside fit) meet NumPy 2's copy= deprecation: theirs to fix
    pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
    numpy = fk._to_numpy

    def close(got, want, tol=TOL):
        err = float(np.max(np.abs(np.asarray(got, np.float64) - want))) / max(1.0, float(np.max(np.abs(want))))
        assert err <= tol, err

    def model_of(layer, shape, name="m"):
        inp = keras.Input(shape)
        out = layer(inp, inp) if isinstance(layer, layers.MultiHeadAttention) else layer(inp)
        return keras.Model(inp, out, name=name)

    # layer type -> (model builder, {variable path: layout}, {variable path: gate labels})
    LSTM_G, GRU_G = ("i", "f", "c", "o"), ("z", "r", "h")
    CASES = {
        "Dense": (lambda: model_of(layers.Dense(7, name="d"), (5,)), {"d/kernel": "io"}, {}),
        "Conv1D": (lambda: model_of(layers.Conv1D(4, 3, name="c"), (9, 3)), {"c/kernel": "wio"}, {}),
        "Conv2D": (lambda: model_of(layers.Conv2D(6, 3, name="c"), (7, 7, 4)), {"c/kernel": "hwio"}, {}),
        "Conv2D_groups": (lambda: model_of(layers.Conv2D(6, 3, groups=2, name="c"), (7, 7, 4)), {"c/kernel": "hwio"}, {}),
        "Conv3D": (lambda: model_of(layers.Conv3D(4, 2, name="c"), (4, 4, 4, 3)), {"c/kernel": "dhwio"}, {}),
        "Conv1DTranspose": (lambda: model_of(layers.Conv1DTranspose(5, 3, name="t"), (6, 3)), {"t/kernel": "woi"}, {}),
        "Conv2DTranspose": (lambda: model_of(layers.Conv2DTranspose(5, 3, name="t"), (6, 6, 3)), {"t/kernel": "hwoi"}, {}),
        "Conv3DTranspose": (lambda: model_of(layers.Conv3DTranspose(2, 2, name="t"), (3, 3, 3, 4)), {"t/kernel": "dhwoi"}, {}),
        "SeparableConv2D": (lambda: model_of(layers.SeparableConv2D(5, 3, depth_multiplier=2, name="s"), (6, 6, 3)),
                            {"s/pointwise_kernel": "hwio"}, {}),
        "EinsumDense": (lambda: model_of(layers.EinsumDense("abc,cd->abd", output_shape=(None, 6), name="e"), (3, 4)),
                        {"e/kernel": "io"}, {}),
        "MultiHeadAttention": (
            lambda: model_of(layers.MultiHeadAttention(2, 4, name="mha"), (5, 8)),
            {"mha/query/kernel": "ioo", "mha/key/kernel": "ioo", "mha/value/kernel": "ioo",
             "mha/attention_output/kernel": "iio"}, {}),
        "LSTM": (lambda: model_of(layers.LSTM(3, name="l"), (4, 5)),
                 {"l/lstm_cell/kernel": "io", "l/lstm_cell/recurrent_kernel": "io"},
                 {"l/lstm_cell/kernel": LSTM_G, "l/lstm_cell/recurrent_kernel": LSTM_G}),
        "GRU": (lambda: model_of(layers.GRU(3, name="g"), (4, 5)),
                {"g/gru_cell/kernel": "io", "g/gru_cell/recurrent_kernel": "io"},
                {"g/gru_cell/kernel": GRU_G, "g/gru_cell/recurrent_kernel": GRU_G}),
        "GRU_reset_before": (lambda: model_of(layers.GRU(3, reset_after=False, name="g"), (4, 5)),
                             {"g/gru_cell/kernel": "io", "g/gru_cell/recurrent_kernel": "io"},
                             {"g/gru_cell/kernel": GRU_G, "g/gru_cell/recurrent_kernel": GRU_G}),
        "SimpleRNN": (lambda: model_of(layers.SimpleRNN(3, name="r"), (4, 5)),
                      {"r/simple_rnn_cell/kernel": "io", "r/simple_rnn_cell/recurrent_kernel": "io"}, {}),
        "ConvLSTM2D": (lambda: model_of(layers.ConvLSTM2D(2, 3, name="cl"), (2, 5, 5, 3)),
                       {"cl/conv_lstm_cell/kernel": "hwio", "cl/conv_lstm_cell/recurrent_kernel": "hwio"},
                       {"cl/conv_lstm_cell/kernel": LSTM_G, "cl/conv_lstm_cell/recurrent_kernel": LSTM_G}),
    }

    def _by_path(model):
        return {v.path: v for v in model.weights}

    def _gate_blocks(w, layout, labels):
        """``w`` cut along its output axis into the gate blocks (numpy), in order."""
        axis = layout.index("o")
        return np.split(w, len(labels), axis=axis) if labels else [w]

    def _randomize(model, seed=0):
        rng = np.random.default_rng(seed)
        for v in model.weights:
            if "float" in str(v.dtype):
                v.assign(rng.normal(size=tuple(v.shape)).astype("float32"))

    class TestOnBackend:
        """Run by test_backend[...] in a process whose Keras backend is FIRE_KERAS_BACKEND."""

        @pytest.mark.parametrize("kind", list(CASES))
        def test_each_kernel_equals_core_reinit(self, kind):
            build, expected, gates = CASES[kind]
            model = build()
            _randomize(model)
            old = {p: numpy(v).astype(np.float64) for p, v in _by_path(model).items()}
            report = fk.apply(model, steps=7)
            names = {r["name"] for r in report.rows}
            new = _by_path(model)
            for path, layout in expected.items():
                labels = gates.get(path)
                want = [fire_core.reinit(b, layout, steps=7) for b in _gate_blocks(old[path], layout, labels)]
                got = _gate_blocks(numpy(new[path]), layout, labels)
                for g, w in zip(got, want):
                    close(g, w)
                assert {f"{path}[{x}]" for x in labels} <= names if labels else path in names
                assert all(r["layout"] == layout for r in report.rows if r["name"].startswith(path))
            for path, w in old.items():  # everything else is untouched
                if path not in expected:
                    np.testing.assert_array_equal(numpy(new[path]), w.astype(np.float32))

        @pytest.mark.parametrize("kind", list(CASES))
        def test_each_matrix_is_the_svd_polar_factor_times_the_scale(self, kind):
            build, expected, gates = CASES[kind]
            model = build()
            _randomize(model, seed=1)
            old = {p: numpy(v).astype(np.float64) for p, v in _by_path(model).items()}
            fk.apply(model, method="svd")
            new = _by_path(model)
            for path, layout in expected.items():
                labels = gates.get(path)
                for o, n in zip(_gate_blocks(old[path], layout, labels), _gate_blocks(numpy(new[path]), layout, labels)):
                    taps = fire_core.to_matrices(o, layout)
                    u, _, vt = np.linalg.svd(taps, full_matrices=False)
                    d_out, d_in = taps.shape[-2:]
                    scale = np.sqrt(d_out / d_in) / taps.shape[0]
                    close(fire_core.to_matrices(n.astype(np.float64), layout), scale * (u @ vt))

        def test_left_alone_with_the_reason(self):
            class Custom(layers.Layer):
                def build(self, shape):
                    self.w = self.add_weight(shape=(shape[-1], 4), name="w")

                def call(self, x):
                    return x @ self.w

            inp = keras.Input((3,), dtype="int32")
            x = layers.Embedding(10, 6, name="emb")(inp)
            x = layers.LayerNormalization(name="ln")(x)
            x = Custom(name="custom")(x)
            x = layers.Reshape((3, 1, 4))(x)
            x = layers.DepthwiseConv2D(1, name="dw")(x)
            frozen = layers.Dense(5, name="frozen")
            x = frozen(layers.Flatten()(x))
            x = layers.Dense(2, name="head")(x)
            model = keras.Model(inp, x)
            frozen.trainable = False
            before = {v.path: numpy(v) for v in model.weights}
            report = fk.apply(model)
            assert report.names == ["head/kernel"]
            reasons = {s["name"]: s["reason"] for s in report.skipped}
            assert "embedding" in reasons["emb/embeddings"]
            assert "depthwise" in reasons["dw/kernel"]
            assert "no FIRE rule" in reasons["custom/w"] and "Custom" in reasons["custom/w"]
            assert "frozen" in reasons["frozen/kernel"]
            assert not any(n.startswith("ln/") for n in reasons)  # 1-D: no matrix, no listing
            for v in model.weights:
                if v.path != "head/kernel":
                    np.testing.assert_array_equal(numpy(v), before[v.path])
            report = fk.apply(model, frozen=True, layouts={"custom/w": "io", "emb": "oi"})
            assert set(report.names) == {"head/kernel", "frozen/kernel", "custom/w", "emb/embeddings"}

        def test_layouts_none_and_patterns(self):
            model = CASES["MultiHeadAttention"][0]()
            report = fk.apply(model, layouts={"mha/key": None}, exclude="mha/value/kernel", dry_run=True)
            assert set(report.names) == {"mha/query/kernel", "mha/attention_output/kernel"}
            assert report.applied is False
            model = CASES["LSTM"][0]()
            old = numpy(_by_path(model)["l/lstm_cell/kernel"])
            report = fk.apply(model, include="l/lstm_cell/kernel[f]")
            assert report.names == ["l/lstm_cell/kernel[f]"]
            new_gates = np.split(numpy(_by_path(model)["l/lstm_cell/kernel"]), 4, axis=1)
            old_gates = np.split(old, 4, axis=1)
            for k in (0, 2, 3):  # i, c, o: as they were
                np.testing.assert_array_equal(new_gates[k], old_gates[k])
            close(new_gates[1], fire_core.reinit(old_gates[1].astype(np.float64), "io"))

        def test_bad_input_is_a_clear_error_with_nothing_changed(self):
            model, opt = _trained_model()
            before = _state(model, opt)
            v = _by_path(model)["dense_a/kernel"]
            nan = numpy(v).copy()
            nan[0, 0] = np.nan
            v.assign(nan)
            before["dense_a/kernel"] = nan
            with pytest.raises(ValueError, match="dense_a/kernel"):
                fk.apply(model, optimizer=opt)
            _assert_state(model, opt, before)
            with pytest.raises(TypeError, match="unexpected keyword|bogus"):
                fk.apply(model, bogus=1)
            with pytest.raises(ValueError, match="no_such_layer"):
                fk.apply(model, include="no_such_layer")
            with pytest.raises(ValueError, match="matches no variable"):
                fk.apply(model, layouts={"nowhere/*": "io"})
            with pytest.raises(ValueError, match="does not fit"):
                fk.apply(model, layouts={"conv/kernel": "io"})
            with pytest.raises(ValueError, match="unknown"):
                fk.apply(model, exclude="dense_a", method="nope")
            _assert_state(model, opt, before)

        def test_adam_slots_of_exactly_the_projected_variables_restart(self):
            model, opt = _trained_model()
            before = _state(model, opt)
            iterations = int(numpy(opt.iterations))
            report = fk.apply(model, optimizer=opt, exclude="dense_b")
            projected = {r["name"].split("[")[0] for r in report.rows}
            assert {"conv/kernel", "mha/query/kernel", "mha/attention_output/kernel", "dense_a/kernel",
                    "lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel"} <= projected
            assert "dense_b/kernel" not in projected
            for v in model.trainable_variables:
                k = opt._get_variable_index(v)
                for slots in (opt._momentums, opt._velocities):
                    if v.path in projected:
                        assert not np.any(numpy(slots[k])), v.path
                    else:
                        np.testing.assert_array_equal(numpy(slots[k]), before[f"slot:{slots[k].path}"])
            assert int(numpy(opt.iterations)) == iterations  # kept: one counter for all variables
            hist = model.fit(*_data(), epochs=2, batch_size=4, verbose=0)
            assert np.all(np.isfinite(hist.history["loss"]))

        def test_callback_fires_at_its_step_and_logs(self):
            model, _ = _trained_model(fit=False)
            cb = fk.FIRECallback([3], steps=5)
            hist = model.fit(*_data(), epochs=2, batch_size=4, verbose=0, callbacks=[cb])  # 2 steps per epoch
            assert [f.step for f in cb.history] == [3]
            assert cb.history[0].info["fire/fired"] == 1.0 and cb.history[0].info["fire/weights"] > 0
            assert hist.history["fire/fired"] == [0.0, 1.0]
            assert np.isnan(hist.history["fire/sfe"][0]) and hist.history["fire/sfe"][1] > 0
            assert json.loads(json.dumps(cb.state_dict()))["schedule"]["history"][0]["step"] == 3

        def test_callback_epoch_schedule_and_step_zero_poll(self):
            model, _ = _trained_model(fit=False)
            cb = fk.FIRECallback({"every": 1, "unit": "epoch"})
            seen, poll = [], cb.schedule.poll
            cb.schedule.poll = lambda m, **kw: (seen.append((m.step, m.at)), poll(m, **kw))[1]
            model.fit(*_data(), epochs=2, batch_size=4, verbose=0, callbacks=[cb])
            assert seen[:3] == [(0, "step"), (0, "epoch"), (1, "step")]  # the baseline poll of a run from step 0
            assert [(f.step, f.epoch) for f in cb.history] == [(2, 1)]

        def test_a_failed_firing_is_not_recorded(self):
            model, _ = _trained_model(fit=False)
            cb = fk.FIRECallback([1])
            before = cb.state_dict()
            v = _by_path(model)["dense_a/kernel"]
            w = numpy(v).copy()
            w[0, 0] = np.inf
            v.assign(w)
            with pytest.raises(ValueError, match=r"/kernel: contains NaN or Inf"):  # step 1 spread the Inf
                model.fit(*_data(), epochs=1, batch_size=4, verbose=0, callbacks=[cb])
            assert cb.history == [] and cb.state_dict()["schedule"]["history"] == before["schedule"]["history"]

        def test_callback_refuses_bad_options_and_probe(self):
            with pytest.raises(TypeError, match="optimizer"):
                fk.FIRECallback([1], optimizer=None)
            with pytest.raises(TypeError, match="unknown option"):
                fk.FIRECallback([1], stepz=3)
            model, _ = _trained_model(fit=False)
            cb = fk.FIRECallback([1], probe=np.zeros((2, 3), "float32"))
            with pytest.raises(ValueError, match="FIRECallback: the probe"):
                model.fit(*_data(), epochs=1, batch_size=4, verbose=0, callbacks=[cb])
            assert fk.FIRE is fk.FIRECallback

        def test_probe_gives_drift(self):
            model, _ = _trained_model(fit=False)
            report = fk.apply(model, probe=_data()[0][:2])
            assert report.drift is not None and report.drift > 0 and "fire/drift" in report.metrics()

        def test_resume_in_a_new_process_does_not_refire(self, tmp_path):
            model, _ = _trained_model(fit=False)
            cb = fk.FIRECallback([2, 6], name="fire")
            model.fit(*_data(), epochs=2, batch_size=4, verbose=0, callbacks=[cb])  # steps 1..4
            assert [f.step for f in cb.history] == [2]
            model.save(tmp_path / "model.keras")
            (tmp_path / "fire.json").write_text(json.dumps(cb.state_dict()))
            script = textwrap.dedent(f"""
                import json, os
                os.environ["KERAS_BACKEND"] = {INNER!r}
                import keras, numpy as np
                import fire_core.keras as fk
                model = keras.saving.load_model({str(tmp_path / "model.keras")!r})
                cb = fk.FIRECallback([2, 6], name="fire")
                cb.load_state_dict(json.loads(open({str(tmp_path / "fire.json")!r}).read()))
                rng = np.random.default_rng(0)
                x, y = rng.normal(size=(8, 6, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
                model.fit(x, y, epochs=4, initial_epoch=2, batch_size=4, verbose=0, callbacks=[cb])
                print("STEPS", [f.step for f in cb.history], int(model.optimizer.iterations))
            """)
            env = {k: v for k, v in os.environ.items() if k not in ("FIRE_KERAS_BACKEND", "FIRE_KERAS_OUT")}
            proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=900)
            assert proc.returncode == 0, proc.stderr[-4000:]
            assert "STEPS [2, 6] 8" in proc.stdout, proc.stdout[-2000:]

        def test_same_model_result_written_for_the_cross_backend_comparison(self):
            model = _mixed_model()
            _randomize(model, seed=3)
            fk.apply(model, steps=10)
            result = {v.path: numpy(v) for v in model.weights if "float" in str(v.dtype)}
            assert len(result) > 10
            if OUT:
                np.savez(Path(OUT) / "same_model.npz", **result)

        def test_docs_example_runs(self, tmp_path, monkeypatch):
            monkeypatch.chdir(tmp_path)
            blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "keras.md").read_text(), flags=re.S)
            assert blocks
            namespace = {"__name__": "__docs__"}
            for k, code in enumerate(blocks):
                exec(compile(code, f"docs/keras.md[block {k}]", "exec"), namespace)

    def _mixed_model():
        """Conv2D, MultiHeadAttention, Dense, LSTM: the model the issue names."""
        inp = keras.Input((6, 3))
        x = layers.Reshape((6, 3, 1))(inp)
        x = layers.Conv2D(4, (3, 1), padding="same", name="conv")(x)
        x = layers.Reshape((6, 12))(x)
        x = layers.Dense(8, name="dense_a")(x)
        x = layers.MultiHeadAttention(2, 4, name="mha")(x, x)
        x = layers.LSTM(4, name="lstm")(x)
        x = layers.Dense(2, name="dense_b")(x)
        return keras.Model(inp, x, name="mixed")

    def _data():
        rng = np.random.default_rng(0)
        return rng.normal(size=(8, 6, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")

    def _trained_model(fit=True):
        keras.utils.set_random_seed(0)
        model = _mixed_model()
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        if fit:
            model.fit(*_data(), epochs=1, batch_size=4, verbose=0)
        return model, model.optimizer

    def _state(model, opt):
        state = {v.path: numpy(v) for v in model.weights}
        state.update({f"slot:{v.path}": numpy(v) for v in opt.variables})
        return state

    def _assert_state(model, opt, before):
        for key, value in _state(model, opt).items():
            np.testing.assert_array_equal(value, before[key], err_msg=key)
