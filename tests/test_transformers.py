"""fire_core.transformers: FIRECallback on real, short Trainer runs (tiny GPT-2 and LLaMA, synthetic tokens)."""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_scheduler,
)

import fire_core.torch as fire_torch  # noqa: E402
import fire_core.transformers as fire_hf  # noqa: E402
from fire_core.schedule import DfIAbove, DormantAbove, When, target_dfi  # noqa: E402
from fire_core.transformers import FIRECallback, attach  # noqa: E402

torch.set_num_threads(1)
VOCAB, LENGTH = 64, 16


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, the labels the inputs (the model shifts them)."""

    def __init__(self, n=64, seed=0):
        self.x = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    ))


MODELS = {"gpt2": gpt2, "llama": llama}


def arguments(path, max_steps=12, **kw):
    kw = {"save_strategy": "no", "warmup_steps": 3, **kw}
    return TrainingArguments(
        output_dir=str(path), max_steps=max_steps, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        logging_steps=1, disable_tqdm=True, seed=0, **kw,
    )


def opt_state(optimizer, model):
    """{parameter name: {key: tensor copy}} of the torch optimizer inside the AcceleratedOptimizer."""
    inner = optimizer.optimizer
    return {n: {k: v.clone() for k, v in inner.state[p].items()} for n, p in model.named_parameters() if p in inner.state}


class Spy(TrainerCallback):
    """Copies the model and the optimizer state at on_step_end of step ``at``."""

    def __init__(self, at):
        self.at, self.model, self.state = at, None, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.at:
            self.model = copy.deepcopy(model)
            self.state = opt_state(optimizer, model)


FIRE_AT = 6


@pytest.fixture(scope="module", params=sorted(MODELS))
def run(request, tmp_path_factory):
    """One Trainer run per model: FIRE at step 6 of 12, the model and optimizer copied just before and after."""
    model = MODELS[request.param]()
    trainer = Trainer(model=model, args=arguments(tmp_path_factory.mktemp(request.param)), train_dataset=Tokens())
    before, after = Spy(FIRE_AT), Spy(FIRE_AT)
    trainer.add_callback(before)
    callback = attach(trainer, [FIRE_AT])
    trainer.add_callback(after)
    output = trainer.train()
    return {"name": request.param, "trainer": trainer, "callback": callback, "before": before, "after": after,
            "output": output}


def test_fires_at_the_scheduled_step_only(run):
    assert [f.step for f in run["callback"].history] == [FIRE_AT]
    assert [h["step"] for h in run["trainer"].state.log_history if "fire/fired" in h] == [FIRE_AT]


def test_weights_equal_apply_on_a_copy_taken_just_before_the_firing(run):
    expected = copy.deepcopy(run["before"].model)
    report = fire_torch.apply(expected, optimizer=None)
    got = dict(run["after"].model.named_parameters())
    projected = {r["name"].split("[")[0] for r in report} | {a for r in report for a in r.get("aliases", [])}
    old = dict(run["before"].model.named_parameters())
    for name, p in expected.named_parameters():
        if name in projected:
            torch.testing.assert_close(got[name], p, rtol=1e-6, atol=1e-7)
            assert not torch.equal(got[name], old[name])
        else:  # biases, norms, embeddings (other than the tied head): the bits they had
            assert torch.equal(got[name], old[name]), name


def test_adamw_state_of_exactly_the_projected_parameters_is_fresh(run):
    report = run["callback"].last_report
    written = {r["name"].split("[")[0] for r in report} | {a for r in report for a in r.get("aliases", [])}
    before, after = run["before"].state, run["after"].state
    names = set(before)
    assert written & names and names - written
    for name in names:
        if name in written:
            assert name not in after, f"{name} kept its AdamW state"  # the next step starts it as for a new parameter
        else:
            assert after[name].keys() == before[name].keys()
            for key in before[name]:
                assert torch.equal(after[name][key], before[name][key]), (name, key)


def test_report_totals_are_logged_through_the_trainer(run):
    report = run["callback"].last_report
    (entry,) = [h for h in run["trainer"].state.log_history if "fire/fired" in h]
    assert entry["fire/sfe"] == pytest.approx(report.total("sfe"), rel=1e-12)
    assert entry["fire/dfi_before"] == pytest.approx(report.total("dfi_before"), rel=1e-12)
    assert entry["fire/dfi_after"] == pytest.approx(report.total("dfi_after"), rel=1e-12)
    assert entry["fire/weights"] == len(report.rows)
    assert entry["fire/skipped"] == len(report.skipped)
    losses = [h["step"] for h in run["trainer"].state.log_history if "loss" in h]
    assert losses == list(range(1, 13)), "the Trainer's own loss log at the firing step went missing"


def test_training_goes_on_after_the_firing(run):
    assert run["trainer"].state.global_step == 12
    later = [h["loss"] for h in run["trainer"].state.log_history if "loss" in h and h["step"] > FIRE_AT]
    assert len(later) == 12 - FIRE_AT and all(math.isfinite(x) for x in later)


def test_fused_and_separate_attention_projections(run):
    names = run["callback"].last_report.names
    if run["name"] == "gpt2":  # Conv1D c_attn, layout io, split as the reference splits it; tied head once
        for block in "qkv":
            assert f"transformer.h.0.attn.c_attn.weight[{block}]" in names
        assert "transformer.h.0.attn.c_attn.weight" not in names
        assert run["callback"].last_report["lm_head.weight"]["aliases"] == ["transformer.wte.weight"]
    else:  # LLaMA: separate q/k/v, grouped-query k and v
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.1.self_attn.{proj}.weight" in names
        assert run["callback"].last_report["model.layers.0.self_attn.k_proj.weight"]["shape"] == (16, 32)


def test_fused_gate_up_and_qkv_projections_are_split():
    config = transformers.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    names = fire_torch.apply(transformers.Phi3ForCausalLM(config), dry_run=True).names
    assert {"model.layers.0.mlp.gate_up_proj.weight[gate]", "model.layers.0.mlp.gate_up_proj.weight[up]",
            "model.layers.0.self_attn.qkv_proj.weight[q]", "model.layers.0.self_attn.qkv_proj.weight[k]"} <= set(names)


def test_restart_warmup_gives_a_fresh_schedulers_learning_rates(tmp_path):
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=14), train_dataset=Tokens())
    attach(trainer, [FIRE_AT], restart_warmup=True)
    trainer.train()
    lrs = {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=trainer.args.learning_rate)
    fresh = get_scheduler("linear", opt, num_warmup_steps=3, num_training_steps=14)
    expected = []
    for _ in range(14):
        expected.append(fresh.get_last_lr()[0])
        opt.step()
        fresh.step()
    assert [lrs[s] for s in range(1, FIRE_AT + 1)] == pytest.approx(expected[:FIRE_AT], rel=1e-12)
    assert [lrs[s] for s in range(FIRE_AT + 1, 15)] == pytest.approx(expected[: 14 - FIRE_AT], rel=1e-12)
    assert lrs[FIRE_AT + 1] == 0.0  # the warm-up starts again


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A run saving every 4 steps, FIRE at step 10: checkpoints at 4 and 8 come before the boundary, 12 after."""
    path = tmp_path_factory.mktemp("resume")
    trainer = Trainer(model=gpt2(), args=arguments(path, max_steps=16, save_strategy="steps", save_steps=4),
                      train_dataset=Tokens())
    callback = attach(trainer, [10])
    trainer.train()
    return path, trainer, callback


def resume(path, checkpoint, tmp):
    trainer = Trainer(model=gpt2(), args=arguments(tmp, max_steps=16), train_dataset=Tokens())
    callback = attach(trainer, [10])
    trainer.train(resume_from_checkpoint=str(path / f"checkpoint-{checkpoint}"))
    return trainer, callback


def test_checkpoint_saves_the_schedule_progress(checkpointed):
    path, _, callback = checkpointed
    assert [f.step for f in callback.history] == [10]
    saved = {k: json.loads((path / f"checkpoint-{k}" / "trainer_state.json").read_text())["stateful_callbacks"]
             for k in (8, 12)}
    assert saved[8]["FIRECallback"]["attributes"]["schedule"]["history"] == []
    assert [f["step"] for f in saved[12]["FIRECallback"]["attributes"]["schedule"]["history"]] == [10]


def test_resumed_before_the_boundary_fires_exactly_once(checkpointed, tmp_path):
    path, first, _ = checkpointed
    trainer, callback = resume(path, 8, tmp_path)
    assert [f.step for f in callback.history] == [10]
    assert [h["step"] for h in trainer.state.log_history if "fire/fired" in h] == [10]
    assert trainer.state.global_step == 16
    for (name, p), q in zip(trainer.model.named_parameters(), first.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)  # the same run, interrupted


def test_resumed_after_the_boundary_does_not_fire_again(checkpointed, tmp_path):
    path, _, _ = checkpointed
    trainer, callback = resume(path, 12, tmp_path)
    assert [f.step for f in callback.history] == [10]  # the firing restored from the checkpoint, none new
    assert callback.last_report is None
    assert [h["step"] for h in trainer.state.log_history if "fire/fired" in h and h["step"] > 12] == []
    assert trainer.state.global_step == 16


def test_data_free_trigger_fires_from_the_weights(tmp_path):
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=6), train_dataset=Tokens())
    trigger = DfIAbove(0.5, every=3)  # a fresh GPT-2 init reads about 0.97: far from FIRE's target
    callback = attach(trainer, trigger)
    trainer.train()
    assert [f.step for f in callback.history] == [3]
    assert callback.history[0].reasons[0].startswith("DfI/n (mean over 13 layers)")
    assert trigger.last_check == 6 and trigger.last_value < 0.5  # measured again after FIRE: below, no firing


def test_activation_trigger_reads_the_probe_and_drift_is_logged(tmp_path):
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=4), train_dataset=Tokens())
    probe = {"input_ids": Tokens(n=4, seed=1).x}
    callback = attach(trainer, DormantAbove(0.0, every=4, tau=1.0), probe=probe)  # tau=1: below-average units
    trainer.train()
    assert [f.step for f in callback.history] == [4]
    reason = callback.history[0].reasons[0]
    assert reason.startswith("dormant ratio (tau=1") and "; highest transformer.h." in reason, reason
    (entry,) = [h for h in trainer.state.log_history if "fire/fired" in h]
    assert entry["fire/drift"] == pytest.approx(callback.last_report.drift) and entry["fire/drift"] > 0


def test_without_the_trainer_to_log_through_training_does_not_start(tmp_path):
    model = gpt2()
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=4), train_dataset=Tokens(),
                      callbacks=[FIRECallback([2])])
    with pytest.raises(ValueError, match="attach"):
        trainer.train()
    assert trainer.state.global_step == 0 and all(torch.equal(p, old[n]) for n, p in model.named_parameters())


def test_bind_and_log_false(tmp_path):
    silent, bound = FIRECallback([2], log=False), FIRECallback([3], exclude="lm_head")
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=3), train_dataset=Tokens(),
                      callbacks=[silent, bound])
    bound.bind(trainer)
    trainer.train()
    assert [f.step for f in silent.history] == [2]
    assert [h["step"] for h in trainer.state.log_history if "fire/fired" in h] == [3]
    assert "lm_head.weight" in silent.last_report.names
    assert "lm_head.weight" not in bound.last_report.names


def test_selection_typo_fails_before_training(tmp_path):
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=3), train_dataset=Tokens())
    attach(trainer, [2], include="transformer.h.9")
    with pytest.raises(ValueError, match="include"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"schedule": [10], "stepz": 5}, TypeError, "stepz"),
        ({"schedule": [10], "method": "newton"}, ValueError, "method"),
        ({"schedule": [10], "scale": "huge"}, ValueError, "scale"),
        ({"schedule": [10], "restart_warmup": 1}, TypeError, "restart_warmup"),
        ({"schedule": [10], "dry_run": True}, ValueError, "dry_run"),
        ({"schedule": DormantAbove(0.5)}, ValueError, "probe="),
        ({}, TypeError, "restore_callback_states_from_checkpoint"),
        ({"schedule": "often"}, TypeError, "schedule="),
    ],
)
def test_bad_options_are_errors_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FIRECallback(**kwargs)


def test_restart_warmup_refuses_a_scheduler_it_cannot_restart(tmp_path):
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # follows a metric: there is no warm-up to restart
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=Tokens(),
                      optimizers=(opt, plateau))
    attach(trainer, [2], restart_warmup=True)
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_missing_transformers_is_an_import_error_naming_the_extra():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import fire_core, fire_core.torch\n"
            "assert 'fire_core.transformers' not in sys.modules\n"
            "try:\n    import fire_core.transformers\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "pip install 'fire-core[transformers]'" in out.stdout


# --- resuming in a new process (issue 21, items 1 and 3) --------------------------------------------


class Switch:
    """A module-level callable object: a task switch at the given steps (its identity is its class, no address)."""

    def __init__(self, steps):
        self.steps = tuple(steps)

    def __call__(self, moment):
        return moment.step in self.steps


def switched(moment, at=()):
    """A module-level function, used through functools.partial."""
    return moment.step in at


SCHEDULES = {
    "switch": lambda: When(Switch((5, 11))),
    "partial": lambda: When(functools.partial(switched, at=(7, 13))),
}

# One Trainer run in a child process: the callbacks built from SCHEDULES or step lists, every one bound,
# a checkpoint every save_steps; prints what fired and what was logged, as JSON on its last line.
CHILD = r"""
import json, logging, sys
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
import test_transformers as T
from transformers import Trainer
import fire_core.transformers as fire_hf

cfg = json.loads(sys.argv[1])
lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
fire_hf.logger.addHandler(handler)
fire_hf.logger.setLevel(logging.INFO)
trainer = Trainer(model=T.gpt2(), train_dataset=T.Tokens(), args=T.arguments(
    cfg["out"], max_steps=cfg["max_steps"], save_strategy="steps", save_steps=cfg["save_steps"]))
callbacks = []
for spec in cfg["callbacks"]:
    schedule = T.SCHEDULES[spec["schedule"]]() if isinstance(spec["schedule"], str) else spec["schedule"]
    callbacks.append(fire_hf.attach(trainer, schedule, name=spec.get("name")) if spec.get("name")
                     else fire_hf.attach(trainer, schedule))
error = None
try:
    trainer.train(resume_from_checkpoint=cfg.get("resume"))
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps({
    "error": error,
    "histories": [[f.step for f in c.history] for c in callbacks],
    "logged": [[h["step"], h["fire/fired"]] for h in trainer.state.log_history if "fire/fired" in h],
    "lines": lines,
    "global_step": trainer.state.global_step,
}))
"""


def child(**cfg):
    """Run CHILD in a new Python process; its result (a dict)."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    results = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and results, out.stdout[-3000:] + out.stderr[-5000:]
    return json.loads(results[-1][len("RESULT "):])


def test_several_callbacks_resume_in_a_new_process_each_from_its_latest_state(tmp_path):
    """Three bound FIRECallbacks (a callable object, a partial, a step list named "main"), checkpoints every
    4 steps: the Trainer appends every callback's state at each save, so trainer_state.json holds several of
    each. Resumed in a new process from step 8, with "main" changed from [6] to [6, 14]; then again from
    step 12 (whose file holds the states of both runs)."""
    first = [{"schedule": "switch"}, {"schedule": "partial"}, {"schedule": [6], "name": "main"}]
    one = child(out=str(tmp_path / "a"), max_steps=8, save_steps=4, callbacks=first)
    assert one["error"] is None and one["histories"] == [[5], [7], [6]]
    saved = json.loads((tmp_path / "a" / "checkpoint-8" / "trainer_state.json").read_text())
    assert len(saved["stateful_callbacks"]["FIRECallback"]) == 9  # 3 at the start, 3 per save

    changed = [first[0], first[1], {"schedule": [6, 14], "name": "main"}]
    two = child(out=str(tmp_path / "b"), max_steps=16, save_steps=4, callbacks=changed,
                resume=str(tmp_path / "a" / "checkpoint-8"))
    assert two["error"] is None, two["error"]
    assert two["histories"] == [[5, 11], [7, 13], [6, 14]]  # each fires ahead only: 6 is not repeated
    assert [s for s, _ in two["logged"] if s > 8] == [11, 13, 14]  # log_history holds the first run's too
    assert [n for s, n in two["logged"] if s > 8] == [2, 2, 2]  # fire/fired: each callback's running count
    carried = [line for line in two["lines"] if "resumed the saved schedule" in line]
    assert len(carried) == 1 and "main" in carried[0] and "[6, 14]" in carried[0], two["lines"]

    three = child(out=str(tmp_path / "c"), max_steps=16, save_steps=4, callbacks=changed,
                  resume=str(tmp_path / "b" / "checkpoint-12"))
    assert three["error"] is None, three["error"]
    assert three["histories"] == [[5, 11], [7, 13], [6, 14]]
    assert [s for s, _ in three["logged"] if s > 12] == [13, 14]
    assert not [line for line in three["lines"] if "resumed the saved schedule" in line]  # the same schedules


def test_a_schedule_changed_before_the_checkpoint_is_refused_naming_both(checkpointed, tmp_path):
    path, _, _ = checkpointed  # FIRE at 10; checkpoint 8 comes before it
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=16), train_dataset=Tokens())
    callback = attach(trainer, [6, 10])  # 6 is before the checkpoint and never fired: firing late or not are guesses
    with pytest.raises(ValueError, match=r"AtSteps\(\[10\]\).*AtSteps\(\[6, 10\]\).*never fired"):
        trainer.train(resume_from_checkpoint=str(path / "checkpoint-8"))
    assert trainer.state.global_step == 8 and callback.history == []


def test_a_changed_schedule_carries_over_and_logs_what_it_did(checkpointed, tmp_path):
    path, _, _ = checkpointed  # FIRE at 10; checkpoint 12 comes after it
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=16), train_dataset=Tokens())
    callback = attach(trainer, [10, 14])
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    level = fire_hf.logger.level
    fire_hf.logger.addHandler(handler)
    fire_hf.logger.setLevel(logging.INFO)
    try:
        trainer.train(resume_from_checkpoint=str(path / "checkpoint-12"))
    finally:
        fire_hf.logger.removeHandler(handler)
        fire_hf.logger.setLevel(level)
    assert [f.step for f in callback.history] == [10, 14]
    assert [(h["step"], h["fire/fired"]) for h in trainer.state.log_history if "fire/fired" in h and h["step"] > 12] \
        == [(14, 2)]
    assert any("resumed the saved schedule" in line and "AtSteps([10, 14])" in line for line in lines), lines


def test_name_is_saved_and_checked():
    callback = FIRECallback([3], name="main", log=False)
    assert callback.state()["attributes"]["identity"]["name"] == "main"
    assert FIRECallback([3], log=False).state()["attributes"]["identity"]["spec"] == [
        {"type": "AtSteps", "steps": [3], "unit": "step"}]
    with pytest.raises(TypeError, match="name"):
        FIRECallback([3], name=3)


def test_two_callbacks_with_one_name_are_refused(tmp_path):
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=3), train_dataset=Tokens())
    attach(trainer, [2], name="main")
    attach(trainer, [3], name="main")
    with pytest.raises(ValueError, match="main"):
        trainer.train()
    assert trainer.state.global_step == 0


# --- the step-0 poll: the initial network is the baseline (item 2) ----------------------------------


def test_relative_trigger_baseline_is_the_initial_network(tmp_path):
    model = gpt2()
    initial = [v for _, w, layout in fire_torch.select(model) for v in target_dfi(w, layout).tolist()]
    seen = []
    trigger = DfIAbove(1e9, every=5, relative=True)
    trainer = Trainer(model=model, train_dataset=Tokens(),
                      args=arguments(tmp_path, max_steps=6, gradient_accumulation_steps=2))
    attach(trainer, [trigger, When(lambda m: seen.append(m.step))])
    trainer.train()
    assert trigger.baseline == pytest.approx(sum(initial) / len(initial), rel=1e-6)
    assert trigger.last_check == 5
    assert seen == [1, 2, 3, 4, 5, 6]  # one poll per optimizer step under gradient accumulation, none repeated


# --- the probe runs when training starts (item 5) ---------------------------------------------------


@pytest.mark.parametrize("schedule", [[2], DormantAbove(0.5, every=2)], ids=["drift", "activations"])
def test_a_probe_that_does_not_fit_fails_at_the_start_with_nothing_changed(tmp_path, schedule):
    model = gpt2()
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=Tokens())
    callback = attach(trainer, schedule, probe={"input_idz": Tokens(n=2).x})
    with pytest.raises(ValueError, match=r"FIRECallback.*probe.*input_idz.*GPT2LMHeadModel") as info:
        trainer.train()
    assert "input_ids" in str(info.value.__cause__)  # the model's own error, chained
    assert trainer.state.global_step == 0 and callback.history == []
    for name, p in model.named_parameters():
        assert torch.equal(p, old[name]), name


# --- a failed firing is not recorded (item 6) -------------------------------------------------------


class Poison(TrainerCallback):
    """Puts a NaN in a weight at on_step_end of step ``at`` (added before FIRE, so FIRE meets it there)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")


def test_a_failed_firing_is_not_recorded_and_leaves_the_scheduler(tmp_path):
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=6), train_dataset=Tokens())
    trainer.add_callback(Poison(3))
    callback = attach(trainer, [3], restart_warmup=True)
    with pytest.raises(ValueError, match=r"c_fc"):
        trainer.train()
    assert trainer.state.global_step == 3
    progress = callback.state()["attributes"]["schedule"]
    assert progress["trigger_state"] == [{"done": []}] and progress["history"] == []
    assert callback.history == [] and callback.last_report is None
    assert not [h for h in trainer.state.log_history if "fire/fired" in h]
    assert trainer.lr_scheduler.last_epoch == 3  # not restarted


# --- logs, one convention (item 7) ------------------------------------------------------------------


def test_fire_is_an_alias_of_firecallback():
    from fire_core.transformers import FIRE

    assert FIRE is FIRECallback and FIRECallback.__name__ == "FIRECallback"
    assert {"FIRE", "FIRECallback", "attach"} <= set(fire_hf.__all__)


def test_report_false_logs_no_numbers_it_did_not_measure_and_fired_counts(tmp_path):
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=4), train_dataset=Tokens())
    callback = attach(trainer, [2, 4], report=False)
    trainer.train()
    entries = [h for h in trainer.state.log_history if "fire/fired" in h]
    assert [(h["step"], h["fire/fired"]) for h in entries] == [(2, 1), (4, 2)]
    for entry, firing in zip(entries, callback.history):
        assert not {"fire/sfe", "fire/dfi_before", "fire/dfi_after"} & set(entry)
        assert entry["fire/weights"] == callback.last_report.projected > 0
        assert firing.info == {k: v for k, v in entry.items() if k.startswith("fire/") and k != "fire/fired"}
    assert callback.state()["attributes"]["schedule"]["history"][0]["info"]["fire/weights"] > 0


def test_a_callback_new_since_the_checkpoint_starts_there_and_passed_boundaries_are_refused(checkpointed, tmp_path):
    path, _, _ = checkpointed  # one FIRECallback [10]; checkpoint 8 comes before it
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=16), train_dataset=Tokens())
    new, old = attach(trainer, [14]), attach(trainer, [10])  # the saved one found at another position
    trainer.train(resume_from_checkpoint=str(path / "checkpoint-8"))
    assert [f.step for f in old.history] == [10] and [f.step for f in new.history] == [14]

    trainer = Trainer(model=gpt2(), args=arguments(tmp_path / "late", max_steps=16), train_dataset=Tokens())
    attach(trainer, [10])
    late = attach(trainer, [4], name="late")  # step 4 passed before the checkpoint, and nothing of it fired
    with pytest.raises(ValueError, match=r"FIRECallback 'late' cannot resume .* step 8: .*AtSteps\(\[4\]\)"):
        trainer.train(resume_from_checkpoint=str(path / "checkpoint-8"))
    assert late.history == [] and trainer.state.global_step == 8
