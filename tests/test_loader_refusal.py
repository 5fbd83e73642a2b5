"""``Controller.loader()`` on data the memory budget cannot hold: the call is refused and the run stays as it was."""

import pytest
import torch
from torch import nn

from triaccel_rl.config import ConfigError, MemoryBudget
from triaccel_rl.controller import Controller

REFUSED = "is smaller than one sample needs"


def _indexed_data():
    """12 samples of 4 features whose first feature is the sample's index."""
    x = torch.zeros(12, 4)
    x[:, 0] = torch.arange(12).float()
    return x, torch.zeros(12, dtype=torch.long)


def _wide_data():
    """12 samples of 1000 positions of 4 features: a Linear(4, 2) holds 250x the narrow data's activations."""
    return torch.randn(12, 1000, 4), torch.zeros(12, dtype=torch.long)


def _run(budget_bytes=None):
    """A Linear model's controller (within ``budget_bytes``) and a step recording the indices it trained on."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    memory = MemoryBudget(bytes=budget_bytes) if budget_bytes is not None else None
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32", device="cpu", memory=memory)
    trained: list[int] = []

    def step(xb):
        with ctl.autocast():
            ctl.step(model(xb).pow(2).mean())
        trained.extend(xb[:, 0].long().tolist())

    return ctl, step, trained


def _narrow_budget():
    """A budget that holds one narrow sample and not one wide one."""
    ctl, step, _ = _run()
    for xb, _ in ctl.loader(_indexed_data(), batch_size=4):
        step(xb)
        break
    budget = 4 * ctl.predicted_memory_bytes(1)
    ctl.close()
    ctl, _, _ = _run()
    next(iter(ctl.loader(_wide_data(), batch_size=4)))
    assert ctl.predicted_memory_bytes(1) > budget  # the wide data's refusal is the budget's, not the test's
    ctl.close()
    return budget


def _uninterrupted_order():
    """The indices a run trains on in 2 epochs at batch 4, with no refused call."""
    ctl, step, trained = _run()
    for xb, _ in ctl.loader(_indexed_data(), batch_size=4, epochs=2):
        step(xb)
    ctl.close()
    return trained


def _run_state(ctl):
    """What a refused call must leave as it was: the place in the data, batch, LR, costs and memory model."""
    return (
        ctl.state_dict()["loader"],
        ctl.batch_size,
        ctl.lr,
        ctl.progress,
        ctl.costs,
        ctl.memory_model,
        ctl.predicted_memory_bytes(4),
    )


@pytest.mark.parametrize("iterator", ["the open one", "a new call"])
def test_a_budget_refusal_of_other_data_leaves_the_run_on_its_own_data(iterator, caplog):
    """A call on wide data, refused by the budget at its first batch, left the run switched to it: the old data's
    place (epoch, order, position), its iterator, costs and memory model were lost, and the next call on the training
    data started it over from epoch 0. Now the run trains on as if the refused call had never come, sample for
    sample, whether the loop's open iterator goes on or a new call carries it on."""
    budget = _narrow_budget()
    ctl, step, trained = _run(budget)
    data = _indexed_data()
    batches = ctl.loader(data, batch_size=4, epochs=2)
    for i, (xb, _) in enumerate(batches):
        step(xb)
        if i == 3:  # the second epoch's first batch: its order is the run's own
            break
    before = _run_state(ctl)
    assert before[0] == {"n": 12, "seed": 0, "epoch": 1, "cursor": 4, "samples_served": 16}
    with caplog.at_level("WARNING", logger="triaccel_rl"), pytest.raises(ConfigError, match=REFUSED):
        next(iter(ctl.loader(_wide_data(), batch_size=4)))
    after = _run_state(ctl)
    assert after[0] == before[0] and after[1:4] == before[1:4] and after[6] == before[6]
    assert after[4] is before[4] and after[5] is before[5]  # not measured again for data never taken
    assert "another dataset" not in caplog.text  # it did not start the data over
    if iterator == "a new call":
        batches = ctl.loader(data, batch_size=4, epochs=2)
    for xb, _ in batches:
        step(xb)
    assert trained == _uninterrupted_order()
    assert ctl.state_dict()["loader"] == {"n": 12, "seed": 0, "epoch": 2, "cursor": 0, "samples_served": 24}
    ctl.close()


def test_a_budget_refusal_after_a_resume_leaves_the_checkpoint_pending():
    """A call on wide data after ``load_state_dict()``, refused by the budget, took the checkpoint's place as spent:
    the next call on the checkpoint's data started it over from epoch 0. Now it carries on from the checkpoint."""
    budget = _narrow_budget()
    saver, save_step, _ = _run(budget)
    for i, (xb, _) in enumerate(saver.loader(_indexed_data(), batch_size=4, epochs=2)):
        save_step(xb)
        if i == 3:
            break
    checkpoint = saver.state_dict()
    saver.close()
    ctl, step, trained = _run(budget)
    ctl.load_state_dict(checkpoint)
    with pytest.raises(ConfigError, match=REFUSED):
        next(iter(ctl.loader(_wide_data(), batch_size=4, epochs=2)))  # past the checkpoint's epoch: a resume
    assert ctl.state_dict()["loader"] == checkpoint["loader"]
    assert ctl.costs is None and ctl.memory_model is None  # the checkpoint's data measured at its first batch
    for xb, _ in ctl.loader(_indexed_data(), batch_size=4, epochs=2):
        step(xb)
    assert trained == _uninterrupted_order()[16:]
    ctl.close()


def test_a_budget_refusal_of_the_first_data_starts_no_run():
    """A refused first call left a run of the refused data behind: its place in a checkpoint, a ``batch_size`` set
    on it. Now there is no run until a call on data the budget holds starts one, at its own batch size."""
    ctl, step, trained = _run(_narrow_budget())
    with pytest.raises(ConfigError, match=REFUSED):
        next(iter(ctl.loader(_wide_data(), batch_size=4)))
    assert ctl.state_dict()["loader"] is None and ctl.costs is None and ctl.memory_model is None
    with pytest.raises(ValueError, match="no run yet"):
        ctl.batch_size = 2
    for xb, _ in ctl.loader(_indexed_data(), batch_size=3):
        step(xb)
    assert sorted(trained) == list(range(12)) and ctl.steps == 4
    ctl.close()
