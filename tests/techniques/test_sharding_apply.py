"""sharding's apply side on a 1-process gloo group: FSDP2 wraps a twin (the model stays an ordinary module),
units group consecutive layers, trained weights gather back into the model; DDP wraps the model itself."""

from __future__ import annotations

import pytest
import torch
from _dist import single_process_group
from _tiny import random_batch, tiny_model
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from autofit.knobs import Knobs
from autofit.techniques import checkpointing, sharding

CPU = torch.device("cpu")


def test_units_are_consecutive_layers():
    layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(5))
    position = {id(layer): i for i, layer in enumerate(layers)}
    assert [[position[id(x)] for x in unit] for unit in sharding.units(layers, 2)] == [[0, 1], [2, 3], [4]]
    assert len(sharding.units(layers, 1)) == 5 and len(sharding.units(layers, 8)) == 1


@pytest.fixture
def group():
    with single_process_group():
        yield


def test_fsdp_shards_a_twin_and_gathers_back_into_the_model(group):
    model = tiny_model("gpt2", "causal-lm")  # tied input and output embeddings
    checkpointing.apply(model, [1])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    twin = sharding.wrap(model, Knobs(strategy="fsdp", fsdp_unit_layers=2), 1, CPU)

    assert isinstance(twin, FSDPModule) and twin is not model
    assert not any(isinstance(m, FSDPModule) for m in model.modules())  # fully_shard rebuilt only the twin
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    assert all(isinstance(p, DTensor) for p in twin.parameters())
    assert twin.lm_head.weight is twin.transformer.wte.weight  # still tied
    assert checkpointing.checkpointed_indices(twin) == [1]  # the copy runs the checkpointed forward too
    assert sharding.unwrapped(twin) is twin and sharding.is_fsdp(twin)

    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin(**random_batch(2, 8, task="causal-lm")).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])  # training the twin leaves the model as it was...
    sharding.gather_into(twin, model)
    trained = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name].full_tensor())  # ...until its weights are gathered back
    assert not torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])
    assert model.lm_head.weight is model.transformer.wte.weight


def test_ddp_wraps_the_model_itself(group):
    model = tiny_model("bert")
    wrapped = sharding.wrap(model, Knobs(strategy="ddp"), 1, CPU)
    assert isinstance(wrapped, DistributedDataParallel) and sharding.unwrapped(wrapped) is model
    assert not sharding.is_fsdp(wrapped)
    with wrapped.no_sync():
        wrapped(**random_batch(2, 8)).loss.backward()
    sharding.gather_into(wrapped, model)  # nothing to gather: DDP trained the model in place
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
