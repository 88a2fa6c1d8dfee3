"""FSDP through accelerate in the Hugging Face Trainer: FSDP2 projected exactly, FSDP1 refused.

One subprocess spawns 2 gloo ranks twice (a run, then a resume from its
checkpoint in new processes), and the tests below read what the ranks wrote.
The run is a ``Trainer`` on a tiny GPT-2 with ``fsdp_config={"version": 2}``
and a ``FIRECallback`` firing after steps 3 and 5; callbacks placed before
and after it gather the whole weights and look at the optimizer state
around each firing. Each firing is compared with ``fire_core.torch.apply`` on
a single-process plain PyTorch GPT-2 loaded with the weights gathered just
before it.

accelerate 1.16 does not enable FSDP on a machine without an accelerator:
``AcceleratorState`` takes its FSDP branch only for the accelerator
distributed types (``MULTI_GPU``, ``MULTI_XPU``, ...), so with
``use_cpu=True`` a run keeps ``DistributedType.MULTI_CPU``, drops the FSDP
plugin (``Trainer.is_fsdp_enabled`` is False) and trains the model with
DDP, saying nothing; without ``use_cpu`` the Trainer stops with "Using fsdp
only works in distributed training." The ranks therefore take accelerate's
own FSDP branch for ``MULTI_CPU`` (:data:`ENABLE_FSDP_ON_CPU`: the same
assignments accelerate makes for a GPU); everything after it is accelerate's
and transformers' code: ``fully_shard`` of the model by accelerate's FSDP2
preparation, the optimizer re-keyed to the DTensor parameters inside an
``AcceleratedOptimizer``, FSDP2's checkpoint saving and loading.

FSDP1 does not run through accelerate on CPU even so (its wrapper stops with
"Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0"), so
the FSDP1 refusal is tested on models the ranks wrap in torch's
``FullyShardedDataParallel`` themselves (``device_id=cpu``), with both
``use_orig_params`` settings, with and without wrapped blocks, handed to
``fire_core.torch.apply`` and to ``FIRECallback.on_train_begin``.
"""

from __future__ import annotations

import json
import re
import tempfile
import textwrap
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fire_core.torch as ft  # noqa: E402
from ranks import run_script  # noqa: E402

FIRINGS = (3, 5)  # the schedule: after the 3rd and the 5th optimizer step
CHECKPOINT = 4  # the run saves here; the resume starts here, between the two firings

CONFIG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)

ENABLE_FSDP_ON_CPU = textwrap.dedent(
    """
    def enable_fsdp_on_cpu():
        # accelerate's AcceleratorState sets distributed_type = FSDP and keeps the plugin only when the run's type
        # is an accelerator's (MULTI_GPU, MULTI_XPU, ...), then copies the type into PartialState. On CPU the run is
        # MULTI_CPU and the plugin is dropped. Make the same three assignments for MULTI_CPU (no mixed precision here).
        import accelerate.state as state
        from accelerate.utils import DistributedType

        init = state.AcceleratorState.__init__

        def patched(self, *args, fsdp_plugin=None, **kwargs):
            init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin
                state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

        state.AcceleratorState.__init__ = patched
    """
)

SCRIPT = ENABLE_FSDP_ON_CPU + textwrap.dedent(
    f"""
    import datetime, json, os, sys, types
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    CONFIG = {CONFIG!r}
    FIRINGS = {FIRINGS!r}
    CHECKPOINT = {CHECKPOINT!r}


    def start(rank, rendezvous):
        # the environment accelerate reads for a CPU run, then the process group it finds already started
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{{rendezvous}}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=240))


    def full(model):
        from torch.distributed.tensor import DTensor
        return {{n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().numpy().copy()
                for n, p in model.named_parameters()}}


    def local_state(opt, model):
        from torch.distributed.tensor import DTensor
        out = {{}}
        for n, p in model.named_parameters():
            if p in opt.state:
                out[n] = {{k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
                          for k, v in opt.state[p].items()}}
        return out


    def trainer_run(out, phase):
        from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
        from torch.distributed.tensor import DTensor
        import fire_core.transformers as fire_hf

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**CONFIG))
        tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1))
        data = [{{"input_ids": x, "labels": x}} for x in tokens]
        args = TrainingArguments(
            output_dir=f"{{out}}-trainer", max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
            use_cpu=True, fsdp=True, fsdp_config={{"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}},
            save_strategy="steps", save_steps=CHECKPOINT, report_to=[], logging_steps=1, disable_tqdm=True,
            seed=0, dataloader_num_workers=0,
        )
        arrays, info = {{}}, {{"fired_now": [], "state": {{}}, "steps": {{}}}}
        seen = {{}}

        class Before(TrainerCallback):  # runs before FIRECallback at each step end
            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
                acc = trainer.accelerator
                inner = optimizer.optimizer
                params = list(model.parameters())
                info["begin"] = dict(
                    fsdp_enabled=trainer.is_fsdp_enabled, distributed_type=str(acc.distributed_type),
                    fsdp_version=acc.state.fsdp_plugin.fsdp_version, model=type(model).__name__,
                    unwrapped_is_model=acc.unwrap_model(model) is model,
                    optimizer=type(optimizer).__name__, inner=type(inner).__name__,
                    inner_is_trainers=inner is trainer.optimizer.optimizer,
                    all_dtensor=all(isinstance(p, DTensor) for p in params),
                    same_params=sorted(id(p) for g in inner.param_groups for p in g["params"]) == sorted(map(id, params)),
                )

            def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
                step = state.global_step
                seen["fired"] = len(fire.history)
                if step in FIRINGS:
                    arrays.update({{f"pre{{step}}/{{n}}": v for n, v in full(model).items()}})
                    seen["state"] = local_state(optimizer.optimizer, model)
                if step - 1 in FIRINGS:  # the first step after a firing: whose AdamW state restarted
                    info["steps"][str(step)] = {{n: int(s["step"]) for n, s in local_state(optimizer.optimizer, model).items()}}

        class After(TrainerCallback):  # runs after FIRECallback
            def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
                step = state.global_step
                if len(fire.history) > seen["fired"]:
                    info["fired_now"].append(step)
                if step in FIRINGS:
                    arrays.update({{f"post{{step}}/{{n}}": v for n, v in full(model).items()}})
                    now = local_state(optimizer.optimizer, model)
                    info["state"][str(step)] = {{
                        n: [n in seen["state"], n in now,
                            n in now and n in seen["state"] and all(torch.equal(now[n][k], seen["state"][n][k]) for k in now[n])]
                        for n, _ in model.named_parameters()
                    }}

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Before()])
        fire = fire_hf.attach(trainer, schedule=list(FIRINGS))
        trainer.add_callback(After())
        trainer.train(resume_from_checkpoint=f"{{out}}-trainer/checkpoint-{{CHECKPOINT}}" if phase == "resume" else None)
        arrays.update({{f"final/{{n}}": v for n, v in full(trainer.model).items()}})
        info["history"] = [f.step for f in fire.history]
        info["logs"] = trainer.state.log_history
        info["report"] = fire.last_report.names
        return arrays, info


    def fsdp1_refusals():
        # torch's FSDP1 wrapper around the GPT-2, trained one step; apply and the callback must refuse it, nothing changed
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block
        from transformers.trainer_callback import TrainerControl, TrainerState
        from accelerate.utils import extract_model_from_parallel
        import fire_core.torch as ft
        import fire_core.transformers as fire_hf

        cases = []
        for blocks in (False, True):
            for orig in (True, False):
                torch.manual_seed(0)
                model = FSDP(GPT2LMHeadModel(GPT2Config(**CONFIG)), use_orig_params=orig, device_id=torch.device("cpu"),
                             auto_wrap_policy=ModuleWrapPolicy({{GPT2Block}}) if blocks else None)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
                x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                unwrapped = extract_model_from_parallel(model)  # what accelerate's unwrap_model gives the callback

                def snapshot():
                    return ({{n: p.detach().clone() for n, p in model.named_parameters()}},
                            {{n: {{k: v.clone() for k, v in opt.state[p].items()}} for n, p in model.named_parameters()}})

                before = snapshot()
                stand_in = types.SimpleNamespace(accelerator=types.SimpleNamespace(unwrap_model=extract_model_from_parallel),
                                                 log=lambda logs: None, callback_handler=None)
                callback = fire_hf.FIRECallback(schedule=[1], trainer=stand_in)
                calls = {{
                    "apply(wrapped)": lambda: ft.apply(model, optimizer=opt),
                    "apply(unwrapped)": lambda: ft.apply(unwrapped, optimizer=opt),
                    "select(unwrapped)": lambda: ft.select(unwrapped),
                    "on_train_begin": lambda: callback.on_train_begin(
                        types.SimpleNamespace(deepspeed=None), TrainerState(), TrainerControl(), model=model, optimizer=opt),
                }}
                for call, fn in calls.items():
                    try:
                        fn()
                        error = None
                    except Exception as exc:
                        error = f"{{type(exc).__name__}}: {{exc}}"
                    after = snapshot()
                    unchanged = (before[0].keys() == after[0].keys() and all(torch.equal(before[0][n], after[0][n]) for n in before[0])
                                 and all(before[1][n].keys() == after[1][n].keys()
                                         and all(torch.equal(before[1][n][k], after[1][n][k]) for k in before[1][n]) for n in before[1]))
                    cases.append(dict(blocks=blocks, use_orig_params=orig, call=call, error=error, unchanged=unchanged,
                                      polls=len(callback.schedule.history)))
        return cases


    def run(rank, rendezvous, out, phase):
        start(rank, rendezvous)
        arrays, info = trainer_run(out, phase)
        if phase == "run":
            info["fsdp1"] = fsdp1_refusals()
        if rank == 0:
            np.savez(f"{{out}}-{{phase}}.npz", **arrays)
        with open(f"{{out}}-{{phase}}-{{rank}}.json", "w") as f:
            json.dump(info, f)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # status 0 without the teardown, where gloo's threads can abort the process


    if __name__ == "__main__":
        # imported once here (transformers' Trainer brings peft: seconds on a loaded machine), then each run's two
        # ranks are forked from this process: new processes, with a fresh accelerate state, for the run and the resume
        import accelerate, fire_core.transformers, transformers.models.gpt2.modeling_gpt2  # noqa: F401
        from transformers import Trainer  # noqa: F401
        from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: F401
        enable_fsdp_on_cpu()
        out = sys.argv[3]
        mp.start_processes(run, args=(sys.argv[1], out, "run"), nprocs=2, start_method="fork")
        mp.start_processes(run, args=(sys.argv[2], out, "resume"), nprocs=2, start_method="fork")
    """
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both spawns' outputs: ``{phase: (arrays of rank 0, [json of rank 0, json of rank 1])}``."""
    tmp = tmp_path_factory.mktemp("trainer_fsdp")
    second = tempfile.mktemp(dir=tmp, prefix="rendezvous-")  # a new file for the second spawn (FileStore's rule)
    run_script(SCRIPT, tmp, second, tmp / "r", env={"TRANSFORMERS_VERBOSITY": "error"})  # checkpoints under tmp
    out = {}
    for phase in ("run", "resume"):
        with np.load(tmp / f"r-{phase}.npz") as arrays:
            tensors = {k: arrays[k] for k in arrays.files}
        out[phase] = (tensors, [json.loads((tmp / f"r-{phase}-{rank}.json").read_text()) for rank in range(2)])
    return out


def _weights(arrays, prefix):
    return {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}


def _reference(before: dict):
    """Plain single-process ``fire_core.torch.apply`` on a GPT-2 holding ``before``: (weights after, report)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**CONFIG))
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # the head is tied to transformer.wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    report = ft.apply(model)
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}, report


def _projected(report) -> set:
    """Parameter names the report's rows wrote (a block ``name[q]`` is its weight; a tied weight's aliases too)."""
    names = set()
    for row in report.rows:
        for name in [row["name"], *row.get("aliases", [])]:
            names.add(re.sub(r"\[[^\]]*\]$", "", name))
    return names


def test_the_trainer_shards_with_fsdp2_and_hands_the_callback_dtensors(ranks):
    for info in ranks["run"][1]:
        begin = info["begin"]
        assert begin["fsdp_enabled"] and begin["distributed_type"] == "DistributedType.FSDP"
        assert begin["fsdp_version"] == 2 and begin["model"] == "FSDPGPT2LMHeadModel" and begin["unwrapped_is_model"]
        assert begin["all_dtensor"]  # every parameter is an FSDP2 DTensor when training starts
        # the callback resets the torch AdamW inside accelerate's AcceleratedOptimizer, keyed by those DTensors
        assert begin["optimizer"] == "AcceleratedOptimizer" and begin["inner"] == "AdamW" and begin["inner_is_trainers"]
        assert begin["same_params"]


@pytest.mark.parametrize("step", FIRINGS)
def test_each_firing_equals_plain_pytorch_on_the_gathered_weights(ranks, step):
    arrays, infos = ranks["run"]
    before, after = _weights(arrays, f"pre{step}"), _weights(arrays, f"post{step}")
    expected, report = _reference(before)
    assert after.keys() == before.keys() == expected.keys() - {"lm_head.weight"}
    projected = _projected(report)
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.wte.weight"} <= projected
    for name in after:
        if name in projected:
            scale = np.abs(expected[name]).max()
            np.testing.assert_allclose(after[name], expected[name], rtol=0, atol=1e-5 * scale, err_msg=name)
            assert not np.array_equal(after[name], before[name]), name
        else:  # embeddings' positions, norms, biases: nothing was computed, so not a bit changed
            assert np.array_equal(after[name], before[name]), name
    for info in infos:
        assert info["fired_now"] == list(FIRINGS) and info["history"] == list(FIRINGS)
        assert set(info["report"]) == set(report.names)
    logged = [h for h in infos[0]["logs"] if "fire/fired" in h]
    assert [h["step"] for h in logged] == list(FIRINGS)


@pytest.mark.parametrize("step", FIRINGS)
def test_the_firing_drops_the_adamw_state_of_exactly_the_projected_weights(ranks, step):
    arrays, infos = ranks["run"]
    projected = _projected(_reference(_weights(arrays, f"pre{step}"))[1])
    for info in infos:  # each rank's own shards of the state
        state = info["state"][str(step)]
        assert set(state) == set(_weights(arrays, f"pre{step}"))
        for name, (had, has, kept) in state.items():
            assert had, name
            assert has == (name not in projected), name
            assert kept == (name not in projected), name  # the others' moments and step are the same bytes
        # the next step restarts AdamW for the projected weights only: step 1 there, the run's count elsewhere
        counts = info["steps"][str(step + 1)]
        assert {n: c for n, c in counts.items() if n in projected} == dict.fromkeys(projected & set(counts), 1)
        assert set(c for n, c in counts.items() if n not in projected) == {step + 1}


def test_training_continues_after_the_firings(ranks):
    arrays, infos = ranks["run"]
    losses = {h["step"]: h["loss"] for h in infos[0]["logs"] if "loss" in h}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(v) for v in losses.values())
    final, fired = _weights(arrays, "final"), _weights(arrays, f"post{FIRINGS[-1]}")
    assert all(np.isfinite(v).all() for v in final.values())
    # the step after the last firing moved the projected weights (their AdamW state restarted, not stuck)
    assert not np.array_equal(final["transformer.h.0.attn.c_attn.weight"], fired["transformer.h.0.attn.c_attn.weight"])


def test_a_resume_in_new_processes_keeps_the_fired_state(ranks):
    run_arrays, _ = ranks["run"]
    arrays, infos = ranks["resume"]
    for info in infos:
        # restored from checkpoint-4: the firing at step 3 stays done, the one at 5 fires once
        assert info["history"] == list(FIRINGS) and info["fired_now"] == [5]
    before, after = _weights(arrays, "pre5"), _weights(arrays, "post5")
    expected, report = _reference(before)
    for name in _projected(report):
        if name in after:
            np.testing.assert_allclose(after[name], expected[name], rtol=0, atol=1e-5 * np.abs(expected[name]).max())
    # the resumed run trained from the checkpoint as the first run did (same weights before its firing at 5)
    first = _weights(run_arrays, "pre5")
    for name in before:
        np.testing.assert_allclose(before[name], first[name], rtol=1e-5, atol=1e-6, err_msg=name)


# --- FSDP1: refused before anything changes --------------------------------------------------------


def test_fsdp1_is_refused_before_anything_changes(ranks):
    for info in ranks["run"][1]:
        cases = info["fsdp1"]
        assert len(cases) == 16  # wrapped blocks or not, use_orig_params True or False, four calls each
        for case in cases:
            assert case["error"] is not None, case
            assert case["error"].startswith("ValueError: "), case
            assert "FSDP1" in case["error"] and "fsdp_config {'version': 2}" in case["error"], case
            assert case["unchanged"], case  # parameters and AdamW state: the same bytes
            assert case["polls"] == 0, case
            if case["call"] == "on_train_begin":
                assert "FIRECallback" in case["error"], case
        flat = [c for c in cases if not c["blocks"] and not c["use_orig_params"] and c["call"] == "apply(unwrapped)"]
        assert "FlatParameter" in flat[0]["error"]


def test_the_callback_refuses_accelerates_fsdp1_plugin_at_train_begin():
    """A Trainer whose accelerate FSDP plugin is version 1 is refused from the plugin alone, nothing changed."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.trainer_callback import TrainerControl, TrainerState

    import fire_core.transformers as fire_hf

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plugin = types.SimpleNamespace(fsdp_version=1)
    stand_in = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(unwrap_model=lambda m: m, state=types.SimpleNamespace(fsdp_plugin=plugin)),
        is_fsdp_enabled=True, log=lambda logs: None, callback_handler=None,
    )
    callback = fire_hf.FIRECallback(schedule=[1], trainer=stand_in)
    with pytest.raises(ValueError, match="FSDP1.*fsdp_version=1.*fsdp_config \\{'version': 2\\}"):
        callback.on_train_begin(types.SimpleNamespace(deepspeed=None), TrainerState(), TrainerControl(), model=model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    plugin.fsdp_version = 2  # an FSDP2 plugin on a model with no FSDP1 marks passes this check
    callback.on_train_begin(types.SimpleNamespace(deepspeed=None), TrainerState(), TrainerControl(), model=model)
