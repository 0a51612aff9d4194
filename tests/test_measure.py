"""The peak-memory meter: exact byte counts for known tensors, views, in-place ops, training steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from autofit.measure import PeakMemoryMeter


def test_counts_allocations_and_frees_exactly():
    with PeakMemoryMeter("cpu") as meter:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # 4000 B
        assert meter.current_bytes == 8000
        del a
        assert meter.current_bytes == 4000
        c = torch.zeros(250, dtype=torch.int16)  # 500 B
        assert meter.current_bytes == 4500
        del b, c
        assert meter.current_bytes == 0
    assert meter.peak_bytes == 8000


def test_views_share_their_base_storage():
    with PeakMemoryMeter("cpu") as meter:
        base = torch.zeros(64, 64)
        views = [base.view(-1), base[3:], base.t(), base.transpose(0, 1)[1:, :5], base.reshape(4096)]
        assert meter.current_bytes == 64 * 64 * 4
        del base
        assert meter.current_bytes == 64 * 64 * 4  # the views keep the storage alive
        del views
        assert meter.current_bytes == 0


def test_inplace_ops_allocate_nothing_and_nested_temporaries_count():
    with PeakMemoryMeter("cpu") as meter:
        x = torch.ones(1000)
        x.add_(1).mul_(3).clamp_(max=5)
        assert meter.current_bytes == 4000
        meter.reset_peak()
        y = (x + 1) * 2  # the temporary x + 1 lives until the multiply has allocated its output  # noqa: F841
        assert meter.current_bytes == 8000
        assert meter.peak_bytes == 12000


def test_tracked_tensors_count_from_the_start():
    existing = torch.zeros(2000)
    module = nn.Linear(10, 10)  # 110 floats
    with PeakMemoryMeter("cpu", track=[existing, module]) as meter:
        assert meter.current_bytes == 8000 + 440
        assert meter.peak_bytes == 8440
        existing.add_(1)  # already known: not counted again
        assert meter.current_bytes == 8440


def test_reset_peak_starts_from_current():
    with PeakMemoryMeter("cpu") as meter:
        big = torch.empty(10_000)
        del big
        keep = torch.empty(100)
        assert meter.peak_bytes == 40_000
        meter.reset_peak()
        assert meter.peak_bytes == 400 == meter.current_bytes
        del keep


def test_tensors_made_outside_the_dispatcher_are_found_when_used():
    import numpy as np

    with PeakMemoryMeter("cpu") as meter:
        x = torch.from_numpy(np.ones(100, dtype=np.float32))  # no op ran: not seen yet
        y = x * 2  # x is an input of an op now
        assert meter.current_bytes == 800
        del x, y


def _training_step(model, optimizer, batch):
    loss = model(batch).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_training_step_peak_holds_weights_grads_and_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randn(8, 64)
    param_bytes = sum(p.numel() for p in model.parameters()) * 4
    with PeakMemoryMeter("cpu", track=[model, optimizer]) as meter:
        _training_step(model, optimizer, batch)  # creates the AdamW state inside the meter
        _training_step(model, optimizer, batch)
    state_bytes = 2 * param_bytes + 4 * len(list(model.parameters()))  # exp_avg, exp_avg_sq, step
    assert meter.peak_bytes >= param_bytes * 2 + state_bytes  # weights + grads + state live at step()
    # after zero_grad: weights, AdamW state and the batch (used by an op) remain
    assert meter.current_bytes == param_bytes + state_bytes + batch.numel() * 4


def test_sees_backward_checkpoint_recompute_and_autocast():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    x = torch.randn(512, 256, requires_grad=True)  # activations outweigh autocast's bf16 weight copies
    weights = sum(p.numel() for p in layer.parameters()) * 4
    hidden = 512 * 1024 * 4

    def measure(use_checkpoint: bool, dtype=None) -> tuple[int, int]:
        """(bytes kept from forward for backward, peak of the whole step)."""
        with PeakMemoryMeter("cpu", track=[layer, x]) as meter:
            start = meter.current_bytes
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
            kept = meter.current_bytes - start
            out.float().sum().backward()
            del out
            layer.zero_grad(set_to_none=True)
            x.grad = None
        return kept, meter.peak_bytes

    kept, peak = measure(False)
    assert kept >= 2 * hidden  # the 1024-wide pre- and post-GELU activations
    assert peak >= 2 * weights + hidden  # backward: weights + their grads + a 1024-wide gradient
    kept_ckpt, peak_ckpt = measure(True)
    assert kept_ckpt < hidden  # only the layer's output is left after forward
    assert peak_ckpt >= 2 * weights + hidden  # the recompute inside backward was seen
    kept_bf16, _ = measure(False, torch.bfloat16)
    assert kept_bf16 < kept  # half-width saved activations (plus bf16 weight copies)


def test_bitsandbytes_8bit_state_on_cpu():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    try:
        optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
        with PeakMemoryMeter("cpu", track=[model, optimizer]) as meter:
            for _ in range(2):
                _training_step(model, optimizer, torch.randn(4, 256))
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"bitsandbytes 8-bit AdamW does not run on this CPU: {error}")
    state = sum(v.untyped_storage().nbytes() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    weight_bytes = sum(p.numel() for p in model.parameters()) * 4
    assert 256 * 256 * 2 <= state < 256 * 256 * 3  # two 1-byte moments + block scales for the matrix
    assert meter.current_bytes == weight_bytes + state


@pytest.mark.gpu
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_uses_allocator_statistics():
    with PeakMemoryMeter("cuda") as meter:
        before = meter.current_bytes
        x = torch.empty(1 << 20, device="cuda")  # 4 MiB
        del x
    assert meter.peak_bytes - before >= 4 << 20
    assert meter.peak_reserved_bytes >= meter.peak_bytes


# ---- FSDP2: DTensors and resized storages ------------------------------------------------------------------


def test_resized_storage_is_counted():
    """FSDP2 frees and re-gathers parameters with storage.resize_, which no dispatch mode sees."""
    original = torch.UntypedStorage.resize_
    with PeakMemoryMeter("cpu") as meter:
        x = torch.empty(1000)
        x.untyped_storage().resize_(0)
        assert meter.current_bytes == 0
        x.untyped_storage().resize_(8000)
        assert meter.current_bytes == 8000
        del x
        assert meter.current_bytes == 0
    assert meter.peak_bytes == 8000
    assert torch.UntypedStorage.resize_ is original  # the watch ends with the meter


def test_dtensor_counts_as_its_local_shard():
    """A DTensor's own storage is a data-less wrapper of its *global* size: the memory is the local shard."""
    from _dist import single_process_group
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    with single_process_group():
        mesh = init_device_mesh("cpu", (1,))
        local = torch.ones(10, 4)  # 160 B, claimed to be one half of a (20, 4) tensor
        sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size([20, 4]),
                                     stride=(4, 1))
        assert sharded.untyped_storage().nbytes() == 320
        with PeakMemoryMeter("cpu", track=[sharded]) as meter:
            assert meter.current_bytes == 160
            doubled = sharded * 2  # a DTensor op: seen as the local multiply it runs
            assert isinstance(doubled, DTensor)
            assert meter.current_bytes == 320
            del doubled
            assert meter.current_bytes == 160


def test_fsdp2_steps_leave_nothing_behind():
    """fully_shard on a 1-process group: gathered parameters are freed by resize_ after each unit, so what
    is live after every step is the same (without the resize_ watch each step leaked the gathered weights)."""
    from _dist import single_process_group
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    batch = torch.randn(8, 64)
    param_bytes = sum(p.numel() for p in model.parameters()) * 4
    with single_process_group():
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ends = []
        with PeakMemoryMeter("cpu", track=[model, optimizer]) as meter:
            assert meter.current_bytes == param_bytes  # the shards (all of it on one process)
            for _ in range(3):
                _training_step(model, optimizer, batch)
                ends.append(meter.current_bytes)
    assert ends[1] == ends[2]
    assert ends[1] <= 3 * param_bytes + 4 * 4 + batch.numel() * 4 + 2 * 128 * 64 * 4
    assert meter.peak_bytes >= 4 * param_bytes  # shards, gathered weights, grads and AdamW state at step()
