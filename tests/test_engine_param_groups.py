"""The param groups' parameters after the engine is built: what each path refuses, what it follows.

Only the number of groups was checked (found 2026-12-07): a parameter appended to a group was never trained by the
fused step (and trained outside the engine by the reference path's ``optimizer.step()``), and one moved to another
group kept its old group's LR and decay on the fused path, silently. Now a parameter added, taken out or listed twice,
or a group removed, is refused on both paths, naming the parameters; a parameter moved is refused on the fused path,
which laid out each layer's LR and decay by the groups it was built with, and followed on the reference path, as
``torch.optim`` follows it. Parameters sharing memory send the default (``fused=None``) to the reference path.
"""

import os

import pytest
import torch
from torch import nn

from triaccel_rl.engine import StepEngine, _fused_unsupported

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 1), nn.Linear(1, 3)).to(DEVICE)


def _two_groups(model):
    """Layers 0 and 2 in group 0 (LR 0.1), layer 3 in group 1 (LR 0.01), with momentum and weight decay."""
    groups = [
        {"params": [*model[0].parameters(), *model[2].parameters()], "lr": 0.1, "weight_decay": 1e-2},
        {"params": list(model[3].parameters()), "lr": 0.01, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9)


def _batch(i):
    return torch.randn(4, 7, generator=torch.Generator().manual_seed(100 + i)).to(DEVICE)


def _loss(model, i):
    return model(_batch(i)).pow(2).mean()


def _weights(model):
    return [p.detach().cpu().clone() for p in model.parameters()]


def _move_layer_2_to_group_1(optimizer, model):
    moved = {id(p) for p in model[2].parameters()}
    optimizer.param_groups[0]["params"] = [p for p in optimizer.param_groups[0]["params"] if id(p) not in moved]
    optimizer.param_groups[1]["params"].extend(model[2].parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_a_parameter_appended_to_a_group_is_refused_naming_it(fused):
    """The head, outside the optimizer when the engine was built, appended to its group later (not a new group): the
    fused step never trained it (it moved by 0 while the reference path moved it by 0.1). Refused on both paths now,
    nothing updated, the optimizer's gradients zeroed."""
    model = _model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    engine.backward_and_step(_loss(model, 0))
    optimizer.param_groups[0]["params"].extend(model[2].parameters())
    before = _weights(model)
    with pytest.raises(ValueError, match=r"parameters \['2\.weight', '2\.bias'\] were added to param groups \[0\] "
                       r"after the controller was built.*close\(\) this controller and build a new one"):  # fmt: skip
        engine.backward_and_step(_loss(model, 1))
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before, strict=True))
    assert all(not p.grad.any() for p in optimizer.param_groups[0]["params"])  # (layer 3's are no optimizer's)


@pytest.mark.parametrize("fused", [False, True])
def test_a_parameter_taken_out_of_the_groups_is_refused_naming_it(fused):
    """Taken out of every group, the fused step trained it on; the reference path counted it in the statistics."""
    model = _model()
    optimizer = _two_groups(model)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    optimizer.param_groups[0]["params"].pop()  # 2.bias
    with pytest.raises(ValueError, match=r"parameters \['2\.bias'\] were taken out of the optimizer's param groups .*"
                       r"freeze them \(requires_grad_\(False\)\)"):  # fmt: skip
        engine.backward_and_step(_loss(model, 0))


@pytest.mark.parametrize("fused", [False, True])
def test_a_removed_param_group_has_its_own_message(fused):
    """A group removed was refused as a group "it cannot take", naming "parameters []"."""
    model = _model()
    optimizer = _two_groups(model)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    optimizer.param_groups.pop()
    with pytest.raises(ValueError, match=r"the optimizer has 1 param groups; it had 2 when the controller was built "
                       r"from its parameters, and it cannot follow one removed \(parameters in no group now: "
                       r"\['3\.weight', '3\.bias'\]\)"):  # fmt: skip
        engine.backward_and_step(_loss(model, 0))
    # Its parameters moved into the group left first: none is in no group, and the message says where they went
    optimizer = _two_groups(model)
    engine.remove()
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    optimizer.param_groups[0]["params"].extend(optimizer.param_groups.pop()["params"])
    with pytest.raises(ValueError, match=r"cannot follow one removed \(its parameters moved to others\)"):
        engine.backward_and_step(_loss(model, 0))


@pytest.mark.parametrize("fused", [False, True])
def test_a_parameter_listed_in_two_groups_is_refused(fused):
    model = _model()
    optimizer = _two_groups(model)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    optimizer.param_groups[1]["params"].append(model[0].weight)
    with pytest.raises(ValueError, match=r"parameters \['0\.weight'\] are listed more than once in the param groups "
                       r"\(groups \[\[0, 1\]\]\)"):  # fmt: skip
        engine.backward_and_step(_loss(model, 0))


@pytest.mark.parametrize("fused", [False, True])
def test_a_parameter_moved_to_another_group_is_refused(fused):
    """Layer 2 moved from group 0 (LR 0.1, decay 0.01) to group 1 (LR 0.01, no decay): the fused step went on applying
    group 0's LR and decay to it; on the reference path the statistics read group 0's betas, and the shield's rollback
    copy (the optimizer's state_dict, loaded by position) no longer fit the groups."""
    model = _model()
    optimizer = _two_groups(model)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    engine.backward_and_step(_loss(model, 0))
    _move_layer_2_to_group_1(optimizer, model)
    before = _weights(model)
    with pytest.raises(ValueError, match=r"parameters moved to other param groups after the controller was built: "
                       r"2\.weight from group 0 to 1, 2\.bias from group 0 to 1; the controller holds each parameter "
                       r"by the param group and place it was built with"):  # fmt: skip
        engine.backward_and_step(_loss(model, 1))
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before, strict=True))


@pytest.mark.parametrize("fused", [False, True])
def test_two_parameters_swapped_between_groups_are_seen(fused):
    """A swap keeps every group's length: the check compares the parameters themselves, not their counts."""
    model = _model()
    optimizer = _two_groups(model)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    first, second = optimizer.param_groups[0]["params"], optimizer.param_groups[1]["params"]
    first[3], second[1] = second[1], first[3]  # 2.bias and 3.bias, both of shape (1,)
    with pytest.raises(ValueError, match=r"2\.bias from group 0 to 1, 3\.bias from group 1 to 0"):
        engine.backward_and_step(_loss(model, 0))


@pytest.mark.parametrize("fused", [False, True])
def test_a_group_whose_parameters_are_reordered_is_refused(fused):
    """Each parameter's group is the same, but the rollback copy loads the optimizer state by position: after a
    reorder the moments of two same-shaped parameters were exchanged at the next rollback, silently."""
    model = _model()
    optimizer = _two_groups(model)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    engine.backward_and_step(_loss(model, 0))
    optimizer.param_groups[0]["params"].reverse()
    before = _weights(model)
    with pytest.raises(ValueError, match=r"^the parameters of param groups \[0\] were reordered after the controller "
                       r"was built; .*torch loads by position"):  # fmt: skip
        engine.backward_and_step(_loss(model, 1))
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before, strict=True))


def _shared_storage_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(DEVICE)
    model[1].weight = nn.Parameter(model[0].weight.data)  # two Parameter objects over one memory (not one tied)
    return model


def test_parameters_sharing_memory_are_a_reason_against_the_fused_step():
    """``_fused_unsupported`` found no reason, so the default on CUDA built the fused store, which refused them: the
    engine could not be built where the reference path runs. ``fused=True`` says why, as for any other reason."""
    model = _shared_storage_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = StepEngine(model, optimizer, DEVICE, fused=False)
    reason = _fused_unsupported(optimizer, engine.layer_params)
    assert reason == (
        "parameters 0 and 2 (in the order of layers) share memory, shapes (4, 4) and (4, 4): each needs its own "
        "(a weight tied between modules is one parameter, listed once)"
    )
    assert not engine.backward_and_step(model(torch.randn(2, 4, device=DEVICE)).sum())[1]
    engine.remove()
    with pytest.raises(ValueError, match=r"fused=True, but the fused step cannot run this optimizer: parameters 0 "
                       r"and 2 \(in the order of layers\) share memory"):  # fmt: skip
        StepEngine(model, optimizer, DEVICE, fused=True)


def test_parameters_on_several_devices_are_a_reason_against_the_fused_step():
    """A model split across GPUs: the flat store holds one device's parameters and refused it at construction."""
    here, there = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3, device="meta"))
    optimizer = torch.optim.SGD([here, there], lr=0.1)
    assert _fused_unsupported(optimizer, [[here], [there]]) == "parameters are on several devices: ['cpu', 'meta']"
    assert _fused_unsupported(optimizer, [[here]]) == ""  # one device's layers: no reason


@pytest.mark.gpu
def test_parameters_sharing_memory_run_the_reference_path_by_default_on_cuda():
    model = _shared_storage_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = StepEngine(model, optimizer, DEVICE)
    assert not engine.fused
    assert not engine.backward_and_step(model(torch.randn(2, 4, device=DEVICE)).sum())[1]
