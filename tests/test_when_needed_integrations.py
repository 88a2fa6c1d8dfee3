"""``when_needed()`` in the training integrations: each takes ``trial=``, the model's ``Moment.lookahead``.

Lightning, the Hugging Face ``Trainer`` and Stable-Baselines3 pass the model
they project to ``trial`` at a check and hand the result to the schedule as
``Moment.lookahead``. A recorded trial shows what each integration passed
(the model, the trial's length) and that the rule's decision follows the
ratio; the ``Trainer`` case runs a real ``fire_core.torch.trial`` on GPT-2
with the model's own loss. A schedule that needs a trial without one, or a
``trial`` that is not callable, is refused when the callback is built.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import fire_core.torch  # noqa: E402
from fire_core.schedule import LookaheadBelow, when_needed  # noqa: E402


class Recorded:
    """A trial that returns fixed losses and records what it was given."""

    def __init__(self, without: float, with_fire: float):
        self.losses, self.models, self.steps = (without, with_fire), [], []

    def __call__(self, model):
        self.models.append(model)

        def lookahead(k):
            self.steps.append(k)
            return self.losses

        return lookahead


# --- Lightning -------------------------------------------------------------------------------------


def _lightning(schedule, trial, max_steps=6):
    pl = pytest.importorskip("lightning.pytorch")
    from fire_core.integrations.lightning import FIRECallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(48, 8, generator=g), torch.randn(48, 2, generator=g))
    fire = FIRECallback(schedule, trial=trial)
    module = Net()
    pl.Trainer(max_steps=max_steps, callbacks=[fire], accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        module, torch.utils.data.DataLoader(data, batch_size=8))
    return fire, module


@pytest.mark.parametrize("losses, fired", [((1.0, 0.2), [3, 6]), ((1.0, 0.9), [])])
def test_lightning_passes_its_module_and_fires_by_the_ratio(losses, fired):
    trial = Recorded(*losses)
    fire, module = _lightning(when_needed(3), trial)
    assert [f.step for f in fire.history] == fired
    assert trial.models and all(m is module for m in trial.models)  # the LightningModule FIRE projects
    assert set(trial.steps) == {200}  # the measured trial length; no trial at step 0
    if fired:
        assert fire.history[0].reasons[0].startswith("lookahead")


# --- the Hugging Face Trainer ----------------------------------------------------------------------


def test_the_trainer_runs_a_real_trial_with_the_models_own_loss(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from fire_core.integrations.transformers import attach

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, seed):
            self.x = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(seed))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16))
    new = Tokens(7).x
    batches = [({"input_ids": new[i : i + 4], "labels": new[i : i + 4]}, None) for i in range(0, 16, 4)]
    probe = ({"input_ids": new[16:], "labels": new[16:]}, None)
    seen = []

    def trial(m):
        lookahead = fire_core.torch.trial(m, batches, probe, loss=lambda out, _: out.loss)

        def recorded(k):
            seen.append((m, lookahead(k)))
            return seen[-1][1]

        return recorded

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(0))
    schedule = when_needed(4, steps=5)  # a short trial: this checks the wiring, not the rule's threshold
    fire = attach(trainer, schedule, trial=trial, log=False)
    trainer.train()
    assert len(seen) == 1 and seen[0][0] is model
    without, with_fire = seen[0][1]
    assert without > 0 and with_fire > 0
    assert [f.step for f in fire.history] == ([4] if with_fire / without < schedule[0].threshold else [])


# --- Stable-Baselines3 -----------------------------------------------------------------------------


def test_sb3_passes_its_algorithm():
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import DQN

    from fire_core.integrations.sb3 import FIRECallback

    torch.manual_seed(0)
    agent = DQN("MlpPolicy", "CartPole-v1", learning_starts=10, train_freq=1, policy_kwargs={"net_arch": [16]},
                seed=0, device="cpu")
    trial = Recorded(1.0, 0.1)
    fire = FIRECallback(when_needed(40), trial=trial)
    agent.learn(60, callback=fire)
    assert [f.step for f in fire.history] == [40]
    assert trial.models == [agent] and trial.steps == [200]


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("integration", ["lightning", "transformers", "sb3"])
def test_a_schedule_that_needs_a_trial_is_refused_without_one_when_the_callback_is_built(integration):
    pytest.importorskip({"lightning": "lightning", "transformers": "transformers", "sb3": "stable_baselines3"}[integration])
    module = __import__(f"fire_core.integrations.{integration}", fromlist=["FIRECallback"])
    with pytest.raises(ValueError, match=r"LookaheadBelow.*pass trial="):
        module.FIRECallback(when_needed())
    with pytest.raises(TypeError, match="trial must be a callable"):
        module.FIRECallback(when_needed(), trial=(1, 2))
    assert isinstance(when_needed()[0], LookaheadBelow)
