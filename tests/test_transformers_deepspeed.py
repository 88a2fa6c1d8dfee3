"""The Hugging Face ``Trainer`` with DeepSpeed ZeRO-2 and ZeRO-3 and ``FIRECallback``, on 2 gloo ranks.

A tiny GPT-2 (fused ``c_attn`` split into q, k, v; the LM head tied to the
embedding) trains under ``TrainingArguments(deepspeed=...)`` with the
documented ``create_optimizer`` override (FIRE's weights in a parameter group
of their own). FIRE fires at steps 3 and 6; a checkpoint is saved at step 4.
Recorder callbacks read DeepSpeed's fp32 masters just before and just after
the firing (DeepSpeed's own ``safe_get_full_fp32_param``); here the masters
after are compared with plain ``fire_core.torch.apply`` on the masters
before, in one process. A second process resumes each run from step 4: the
firing at 3 is not repeated, the one at 6 happens again, with the same
weights as in the uninterrupted run. Without the override the run is refused
when training starts.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fire_core.torch as ft  # noqa: E402
from ranks import run_ranks  # noqa: E402

# Newton-Schulz in float32 on two sides (a rank, this process) whose BLAS may block the products differently:
# each of the steps' products rounds at about 1e-7 of the weight's scale (about 1 here), amplified by the
# iteration's few steps; 1e-5 leaves room for that, and FIRE's change to the weights is above 0.05.
FP32_NS = 1e-5

MODEL = textwrap.dedent(
    """
    import torch


    def build():
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                            eos_token_id=0)
        return GPT2LMHeadModel(config)
    """
)

SCRIPT = MODEL + textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from ranks import finish


    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            x = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": x, "labels": x}


    def run(rank, rendezvous, out, phase, root):
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=2)
        import deepspeed
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip an unused JIT build
        from deepspeed.utils import safe_get_full_fp32_param
        from transformers import Trainer, TrainerCallback, TrainingArguments
        import fire_core.torch as ft
        from fire_core.transformers import FIRECallback

        class FIRETrainer(Trainer):  # docs/transformers.md: FIRE's weights in a parameter group of their own
            def create_optimizer(self, model=None):
                if self.optimizer is None:
                    cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
                    self.optimizer = cls(ft.param_groups(model or self.model), **kwargs)
                return self.optimizer

        class Recorder(TrainerCallback):
            def __init__(self, tag):
                self.tag, self.seen = tag, {}

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step in (3, 6):  # every rank reads (a collective)
                    self.seen[state.global_step] = {
                        n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in model.named_parameters()
                    }

        arrays, info = {}, {}
        for stage in (2, 3):
            cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "gradient_clipping": "auto",
                   "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
            args = TrainingArguments(f"{root}/z{stage}", per_device_train_batch_size=4, max_steps=6,
                                     learning_rate=1e-3, deepspeed=cfg, report_to=[], save_strategy="steps",
                                     save_steps=4, logging_steps=1, disable_tqdm=True, max_grad_norm=0.0,
                                     seed=0, data_seed=0)
            trainer = FIRETrainer(model=build(), args=args, train_dataset=Data())
            before, after = Recorder("before"), Recorder("after")
            trainer.add_callback(before)
            fire = FIRECallback([3, 6], trainer=trainer)
            trainer.add_callback(fire)
            trainer.add_callback(after)
            trainer.train(resume_from_checkpoint=f"{root}/z{stage}/checkpoint-4" if phase == "resume" else None)
            for step in after.seen:
                for k, v in before.seen.get(step, {}).items():
                    arrays[f"z{stage}/{step}/before/{k}"] = v.numpy()
                for k, v in after.seen[step].items():
                    arrays[f"z{stage}/{step}/after/{k}"] = v.numpy()
            losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            info[f"z{stage}"] = dict(fired=[f.step for f in fire.history],
                                     logged=[e["fire/fired"] for e in trainer.state.log_history if "fire/fired" in e],
                                     losses=losses, optimizer=type(trainer.optimizer.optimizer).__name__)

        if phase == "fresh":  # the Trainer's own optimizer: one group holds FIRE's weights and the embedding
            cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
            args = TrainingArguments(f"{root}/plain", per_device_train_batch_size=4, max_steps=2, deepspeed=cfg,
                                     report_to=[], save_strategy="no", disable_tqdm=True, max_grad_norm=0.0)
            trainer = Trainer(model=build(), args=args, train_dataset=Data())
            trainer.add_callback(FIRECallback([1], trainer=trainer))
            try:
                trainer.train()
                info["refused"] = None
            except ValueError as err:
                info["refused"] = str(err)
            info["refused_step"] = trainer.state.global_step

        finish(rank, out, arrays, info)


    if __name__ == "__main__":
        mp.spawn(run, args=tuple(sys.argv[1:5]), nprocs=2)
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer_deepspeed")
    fresh = run_ranks(SCRIPT, tmp, 2, args=("fresh", tmp / "out"), name="fresh")
    resumed = run_ranks(SCRIPT, tmp, 2, args=("resume", tmp / "out"), name="resume")
    return fresh, resumed


def _part(arrays, prefix):
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


@pytest.mark.parametrize("stage", [2, 3])
def test_firing_writes_the_masters_plain_pytorch_fire_gives(runs, stage):
    fresh, _ = runs
    arrays, info = fresh[0]
    assert info[f"z{stage}"]["fired"] == [3, 6]
    assert info[f"z{stage}"]["optimizer"] == ("DeepSpeedZeroOptimizer" if stage == 2 else "DeepSpeedZeroOptimizer_Stage3")
    for step in (3, 6):
        before, after = _part(arrays, f"z{stage}/{step}/before/"), _part(arrays, f"z{stage}/{step}/after/")
        namespace = {}
        exec(MODEL, namespace)
        model = namespace["build"]()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()}, strict=False)
        report = ft.apply(model)
        assert len(report.names) == 2 * 6 + 1  # per block: c_attn q, k, v, attn c_proj, c_fc, mlp c_proj; the head
        for name, p in model.named_parameters():
            np.testing.assert_allclose(after[name], p.detach().numpy(), rtol=0, atol=FP32_NS, err_msg=f"{step} {name}")
        moved = float(np.abs(after["transformer.h.0.attn.c_attn.weight"] - before["transformer.h.0.attn.c_attn.weight"]).max())
        assert moved > 0.05


@pytest.mark.parametrize("stage", [2, 3])
def test_every_rank_fires_alike_and_training_goes_on(runs, stage):
    fresh, _ = runs
    for _, info in fresh:
        case = info[f"z{stage}"]
        assert case["fired"] == [3, 6] and case["logged"] == [1.0, 2.0]
        assert len(case["losses"]) == 6 and all(np.isfinite(case["losses"]))


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_in_a_new_process_neither_repeats_nor_loses_a_firing(runs, stage):
    fresh, resumed = runs
    for _, info in resumed:
        assert info[f"z{stage}"]["fired"] == [3, 6]  # 3 restored from the checkpoint, 6 fired again
    again = _part(resumed[0][0], f"z{stage}/6/after/")
    assert again and not _part(resumed[0][0], f"z{stage}/3/after/")  # nothing fired at 3 after the resume
    first = _part(fresh[0][0], f"z{stage}/6/after/")
    for name in first:
        np.testing.assert_allclose(again[name], first[name], rtol=0, atol=1e-5, err_msg=name)


def test_a_group_shared_with_the_embedding_is_refused_when_training_starts(runs):
    fresh, _ = runs
    for _, info in fresh:
        assert info["refused"] is not None and "parameter group of their own" in info["refused"]
        assert "transformer.wpe.weight" in info["refused"] and info["refused_step"] == 0
