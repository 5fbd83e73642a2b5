"""The per-step host work made cheaper keeps its records: the store's rebind after a user's ``zero_grad()``, and the
engine's watch over parameters trainable after the build, which walks the model again only when it changed."""

import gc

import pytest
import torch
from torch import nn
from triaccel_rl.kernels.flat_store import FlatParameterStore

from triaccel_rl.engine import StepEngine
from triaccel_rl.errors import DetachedParametersError


def _store() -> tuple[FlatParameterStore, list[nn.Parameter]]:
    params = [nn.Parameter(torch.full((3,), float(i + 1))) for i in range(4)]
    return FlatParameterStore([params[:2], params[2:]]), params


def _post_accumulate_hooks(param: torch.Tensor) -> int:
    return len(param._post_accumulate_grad_hooks or {})


def test_a_rebind_of_none_and_given_gradients_keeps_the_records_of_a_per_parameter_rebind():
    """Gradients None (zeroed views, hooked, recorded), one given (copied, dropped from the records), one kept: the
    records a rebind per parameter kept, and a backward reaching one parameter leaves the others without a gradient."""
    store, params = _store()
    params[3].requires_grad_(False)  # frozen since the build: no hook, reported without a gradient
    for p in params:
        p.grad.fill_(5.0)  # written since the build: a None gradient is bound to a zeroed view
    params[0].grad = None
    params[1].grad = torch.full((3,), 2.0)
    params[3].grad = None
    assert store.rebind_grads(after_backward=True) == 3
    assert all(p.grad is view for p, (_, view, _) in zip(params, store._grad_views, strict=True))
    assert params[0].grad.tolist() == [0.0] * 3
    assert params[1].grad.tolist() == [2.0] * 3
    assert params[2].grad.tolist() == [5.0] * 3
    assert store._rebound_from_none == set()  # found None after the backward: recorded as such, no hook needed
    assert store._none_after_backward == {0, 3}
    assert [_post_accumulate_hooks(p) for p in params] == [0, 0, 0, 0]
    params[1].grad = torch.ones(3)  # given again: was never None, nothing recorded
    params[0].grad = torch.ones(3)  # given after being found None: dropped from the records
    assert store.rebind_grads() == 2
    assert store._none_after_backward == {3}
    assert store.take_params_without_grad() == [3]

    for p in params:
        p.grad = None
    store.zero_grad()
    assert store.rebind_grads() == 4
    assert store._rebound_from_none == {0, 1, 2, 3}
    (params[1] * 2).sum().backward()
    assert store._accumulated == {1}
    assert store.take_params_without_grad() == [0, 2, 3]
    assert [_post_accumulate_hooks(p) for p in params] == [1, 1, 1, 0]  # installed once, not at each rebind


def test_a_parameter_unfrozen_after_the_first_rebind_gets_its_hook_at_the_next():
    store, params = _store()
    params[2].requires_grad_(False)
    for p in params:
        p.grad = None
    store.rebind_grads()
    assert [_post_accumulate_hooks(p) for p in params] == [1, 1, 0, 1]
    params[2].requires_grad_(True)
    for p in params:
        p.grad = None
    store.rebind_grads()
    assert [_post_accumulate_hooks(p) for p in params] == [1, 1, 1, 1]


def test_a_moved_parameter_is_refused_before_anything_is_rebound():
    store, params = _store()
    params[0].grad = None
    params[2].data = params[2].data.clone()
    with pytest.raises(DetachedParametersError) as error:
        store.rebind_grads()
    assert error.value.params == [params[2]]
    assert params[0].grad is None and store._rebound_from_none == set()


def _engine() -> tuple[StepEngine, nn.Sequential]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    engine = StepEngine(model, torch.optim.SGD(model[4].parameters(), lr=0.1), torch.device("cpu"), fused=False)
    return engine, model


def _watched(engine: StepEngine) -> set[int]:
    return set(engine._unheld_ids)


def test_the_unheld_watch_walks_the_model_again_only_after_it_changed(monkeypatch):
    """Model[2] trainable at the build is watched there; model[0], frozen, once unfrozen; a replaced head, a parameter
    set on a module, a module inserted (no hook from torch) or appended: each at the next check. Nothing changed: no
    walk."""
    engine, model = _engine()
    assert _watched(engine) == {id(p) for p in model[2].parameters()}
    walks = []
    walk = engine._walk_model
    monkeypatch.setattr(engine, "_walk_model", lambda: walks.append(1) or walk())
    engine._watch_unheld_since_built()
    engine._watch_unheld_since_built()
    assert len(walks) == 1  # the first check walks; the second, nothing changed, does not

    model[0].requires_grad_(True)
    engine._watch_unheld_since_built()
    assert len(walks) == 1
    assert _watched(engine) >= {id(p) for p in model[0].parameters()}

    model[4] = nn.Linear(4, 2)
    engine._watch_unheld_since_built()
    assert len(walks) == 2
    assert _watched(engine) >= {id(p) for p in model[4].parameters()}

    model[2].extra = nn.Parameter(torch.ones(2))
    engine._watch_unheld_since_built()
    assert id(model[2].extra) in _watched(engine)

    model.insert(1, nn.Linear(4, 4))  # Sequential.insert writes _modules directly: the size tells
    engine._watch_unheld_since_built()
    assert _watched(engine) >= {id(p) for p in model[1].parameters()}

    model.append(nn.Linear(2, 2))
    engine._watch_unheld_since_built()
    assert _watched(engine) >= {id(p) for p in model[-1].parameters()}
    assert len(walks) == 5
    engine._watch_unheld_since_built()
    assert len(walks) == 5
    engine.remove()


def test_the_global_registration_hooks_go_with_the_engine():
    hooks = (
        nn.modules.module._global_module_registration_hooks,
        nn.modules.module._global_parameter_registration_hooks,
    )
    before = [len(registry) for registry in hooks]
    engine, _ = _engine()
    engine._watch_unheld_since_built()
    assert [len(registry) for registry in hooks] == [n + 1 for n in before]
    engine.remove()
    assert [len(registry) for registry in hooks] == before
    engine, _ = _engine()
    engine._watch_unheld_since_built()
    del engine  # collected without remove(): its hooks go along
    gc.collect()
    assert [len(registry) for registry in hooks] == before
