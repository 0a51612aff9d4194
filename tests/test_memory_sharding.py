"""The memory and time models with several processes: DDP replicas and FSDP2 shards (techniques/sharding.py).

The measured side (2 processes training under FSDP2/DDP on the CPU, per-rank live-tensor peaks) is in
tests/executor and benchmarks/accuracy_e2e.py; these check the model's own arithmetic and its invariants."""

import pytest

from autofit.cluster import Cluster
from autofit.cost import predict_time
from autofit.devices import get_device
from autofit.knobs import Knobs, Precision
from autofit.memory import offloaded_bytes_per_machine, param_state, predict_peak, predict_step_peak, step_timeline
from autofit.techniques import sharding
from autofit.techniques.accumulation import deal_step, process_batch_size, step_layout

from _profiles import make_profile, skewed_workload

CPU, A100 = get_device("cpu"), get_device("a100")
TWO, FOUR = Cluster(processes=2), Cluster(processes=4)


@pytest.fixture(scope="module")
def profile():
    return make_profile(hidden=128, layers=4, vocab=4000)


def test_fsdp_keeps_one_shard_of_weights_gradients_and_state_per_process(profile):
    weights, grads, state, _ = param_state(profile, Knobs())
    for cluster in (TWO, FOUR):
        # the optimizer step's moment holds every gradient: compare the states there
        m = predict_step_peak(profile, Knobs(strategy="fsdp"), 1, 8, A100, cluster=cluster)
        assert m.weights == int(weights / cluster.processes)
        assert m.optimizer_state == int(state / cluster.processes)
        assert m.gradients <= grads / cluster.processes + profile.blocks[-1].param_bytes + profile.blocks[0].param_bytes


def test_on_a_cpu_device_fsdp_also_holds_the_callers_whole_model(profile):
    """FSDP shards a twin; the caller's model waits whole in host memory until the trained weights are gathered
    back into it: on a GPU that is not the card's memory, on the CPU it is the memory the budget counts."""
    weights = param_state(profile, Knobs())[0]
    for knobs in (Knobs(strategy="fsdp"), Knobs(strategy="ddp")):
        on_gpu = predict_step_peak(profile, knobs, 1, 8, A100, cluster=TWO)
        on_cpu = predict_step_peak(profile, knobs, 1, 8, CPU, cluster=TWO)
        waiting = weights if knobs.strategy == "fsdp" else 0  # DDP wraps the caller's model itself
        assert on_cpu.weights == on_gpu.weights + waiting


def test_fsdp_gathers_the_root_and_two_units_at_most_while_a_layer_runs(profile):
    g = sharding.gathered(profile, Knobs(strategy="fsdp"), TWO)
    layer = next(b for b in profile.blocks if b.kind == "layer")
    root = sum(b.param_bytes for b in profile.blocks if b.kind != "layer")
    assert (g.root, g.layer, g.layer_grads) == (root, layer.param_bytes, layer.param_bytes)
    assert g.forward(0) == root + 2 * layer.param_bytes
    assert g.backward(3) == root + 2 * layer.param_bytes  # the top unit: nothing reduced before it
    assert g.backward(1) == root + 3 * layer.param_bytes  # unit 2's reduce-scatter input still waits
    assert g.backward(0) == root + 2 * layer.param_bytes  # nothing below to prefetch
    assert g.backward(None, head=True) == root + layer.param_bytes
    assert g.backward(None) == root
    assert g.forward(None) == 2 * root  # the root's own flat buffer, until the first layer's gather
    assert g.forward(None, head=True) == root + layer.param_bytes  # the top unit's flat buffer


def test_a_coarse_units_upper_layers_keep_their_gradients_until_it_is_reduced(profile):
    g = sharding.gathered(profile, Knobs(strategy="fsdp", fsdp_unit_layers=2), TWO)
    layer = next(b for b in profile.blocks if b.kind == "layer").param_bytes
    # layer 2, the lower layer of the top unit (2, 3): layer 3's gradients wait for the unit's reduce-scatter
    assert g.backward(2) == g.root + 2 * layer + 2 * layer + layer
    assert g.backward(3) == g.root + 2 * layer + 2 * layer  # the unit itself and the prefetched one below


def test_keeping_units_gathered_after_forward_costs_memory_and_saves_traffic(profile):
    resharded, kept = Knobs(strategy="fsdp"), Knobs(strategy="fsdp", reshard_after_forward=False)
    workload = skewed_workload(n=200, batch_size=8)
    assert predict_peak(profile, kept, workload, CPU, TWO).peak_bytes > \
        predict_peak(profile, resharded, workload, CPU, TWO).peak_bytes
    assert sharding.traffic(profile, kept, TWO).micro_batch_bytes < \
        sharding.traffic(profile, resharded, TWO).micro_batch_bytes


def test_the_top_unit_holds_the_layers_left(profile):
    """Four layers in units of three: (0, 1, 2) and (3). The top unit gathers one layer, not three."""
    g = sharding.gathered(profile, Knobs(strategy="fsdp", fsdp_unit_layers=3), TWO)
    assert g.forward(3) == g.root + 2 * g.layer and g.forward(0) == g.root + 6 * g.layer
    assert g.backward(None, head=True) == g.root + g.layer


def test_coarser_units_gather_more_at_once(profile):
    one, two = (sharding.gathered(profile, Knobs(strategy="fsdp", fsdp_unit_layers=n), TWO) for n in (1, 2))
    assert two.forward(3) - two.root == 2 * (one.forward(3) - one.root)
    assert sharding.traffic(profile, Knobs(strategy="fsdp", fsdp_unit_layers=2), TWO).micro_batch_collectives < \
        sharding.traffic(profile, Knobs(strategy="fsdp"), TWO).micro_batch_collectives


def test_ddp_holds_its_gradient_buckets_in_every_micro_batch(profile):
    """A replica on each process, with gradients always present (DDP's buckets): the one-process peak of a
    micro-batch that follows another, whatever its place in the step."""
    alone = predict_step_peak(profile, Knobs(), 4, 64, CPU, grads_held=True)
    replica = predict_step_peak(profile, Knobs(), 4, 64, CPU, grads_held=False, cluster=TWO)
    assert replica.peak_bytes == alone.peak_bytes
    assert replica.gradients == param_state(profile, Knobs())[1]


def test_cpu_offload_leaves_only_gathered_units_and_activations_on_the_device(profile):
    knobs = Knobs(strategy="fsdp", cpu_offload=True)
    m = predict_step_peak(profile, knobs, 4, 64, A100, cluster=FOUR)
    assert (m.weights, m.optimizer_state) == (0, 0) and m.gathered > 0
    weights, grads, state, _ = param_state(profile, knobs)
    cluster = Cluster(processes=4, machines=2)
    assert offloaded_bytes_per_machine(profile, knobs, cluster) == int((weights + grads + state) / 4 * 2)
    assert offloaded_bytes_per_machine(profile, Knobs(strategy="fsdp"), cluster) == 0


@pytest.mark.parametrize("knobs", [Knobs(strategy="fsdp"), Knobs(strategy="fsdp", reshard_after_forward=False),
                                   Knobs(strategy="ddp", micro_batch_size=2),
                                   Knobs(strategy="fsdp", micro_batch_size=2, checkpoint_layers=(0, 1))])
def test_the_timeline_peaks_exactly_at_the_predicted_peak(profile, knobs):
    workload = skewed_workload(n=200, batch_size=8)
    timeline = step_timeline(profile, knobs, workload, CPU, TWO)
    assert max(m.peak_bytes for _, m in timeline) == predict_peak(profile, knobs, workload, CPU, TWO).peak_bytes


def test_each_process_checks_its_share_of_a_step(profile):
    """Four processes cut steps of 32 into shares of 8: their micro-batches are a one-process step of 8's."""
    workload = skewed_workload(n=400, batch_size=32)
    knobs = Knobs(micro_batch_size=8)
    shared = predict_peak(profile, knobs, workload, CPU, FOUR)
    alone = predict_peak(profile, knobs, workload.model_copy(update={"batch_size": 8}), CPU)
    assert shared.peak_shape == alone.peak_shape
    assert shared.peak_bytes >= alone.peak_bytes  # plus DDP's resident gradients
    layout = step_layout(knobs, workload.lengths, 32, processes=4)
    assert (layout.batch_size, layout.processes, layout.process_batch_size) == (32, 4, 8)
    assert layout.micro_batches_per_step == (1, 1)


def test_deal_step_gives_every_process_the_same_mix_of_lengths():
    lengths = [5, 50, 7, 400, 9, 60, 8, 300]
    shares = deal_step(range(8), lengths, 2)
    assert sorted(shares[0] + shares[1]) == list(range(8))
    assert [lengths[i] for i in shares[0]] == [400, 60, 9, 7]
    assert [lengths[i] for i in shares[1]] == [300, 50, 8, 5]
    assert deal_step([3], lengths, 2) == [[3], []]  # a short last step: a process may get nothing
    assert process_batch_size(30, 4) == 8
    with pytest.raises(ValueError, match="cannot give each of 4 processes one"):
        process_batch_size(3, 4)


def test_sharing_a_step_shortens_it_and_slower_links_lengthen_it(profile):
    workload = skewed_workload(n=400, batch_size=32)
    knobs = Knobs(precision=Precision.bf16, micro_batch_size=8)
    alone = predict_time(profile, knobs, workload, A100).epoch_seconds
    four = predict_time(profile, knobs, workload, A100, cluster=FOUR).epoch_seconds
    assert four < alone / 2
    fsdp = knobs.model_copy(update={"strategy": "fsdp"})
    nvlink = predict_time(profile, fsdp, workload, A100, cluster=Cluster(processes=4, interconnect="nvlink"))
    ethernet = predict_time(profile, fsdp, workload, A100, cluster=Cluster(processes=4, machines=2))
    assert nvlink.epoch_seconds < ethernet.epoch_seconds


def test_traffic_follows_ring_collectives(profile):
    _, grads, _, _ = param_state(profile, Knobs())
    ddp = sharding.traffic(profile, Knobs(), FOUR)
    assert ddp.step_bytes == pytest.approx(2 * 3 / 4 * grads) and ddp.micro_batch_bytes == 0
    fsdp = sharding.traffic(profile, Knobs(strategy="fsdp"), FOUR)
    layers = sum(b.param_bytes * b.count for b in profile.blocks if b.kind == "layer")
    assert fsdp.micro_batch_bytes == pytest.approx(3 / 4 * (grads + grads + layers))  # gather, re-gather, reduce
    assert sharding.traffic(profile, Knobs(), Cluster()).step_bytes == 0
