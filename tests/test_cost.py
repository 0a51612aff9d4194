import pytest

from autofit.cost import (
    LAUNCH_SECONDS_PER_PASS,
    MICRO_BATCH_SECONDS,
    OPTIMIZER_STEP_SECONDS,
    block_passes,
    matmul_flops_per_second,
    micro_batch_seconds,
    optimizer_step_seconds,
    predict_time,
)
from autofit.devices import get_device
from autofit.knobs import Knobs, Precision
from autofit.profiler.schema import ShapeFit, TimeFit
from autofit.techniques.bucketing import choose_boundaries
from autofit.workload import LengthHistogram, Workload

from _profiles import make_profile, skewed_workload

FIXED = Workload(lengths=LengthHistogram.fixed(128, 1024), batch_size=32)
A100 = get_device("a100")


def epoch(knobs, profile=None, workload=FIXED, device=A100) -> float:
    return predict_time(profile or make_profile(), knobs, workload, device).epoch_seconds


def test_checkpointing_more_layers_is_slower():
    times = [epoch(Knobs(micro_batch_size=8, checkpoint_layers=tuple(range(n))))
             for n in (0, 4, 12)]
    assert times[0] < times[1] < times[2]


def test_checkpointing_frozen_layers_costs_nothing():
    base = Knobs(freeze_embeddings=True, freeze_layers=4, micro_batch_size=8)
    assert epoch(base.model_copy(update={"checkpoint_layers": (0, 1, 2, 3)})) == pytest.approx(epoch(base))


def test_freezing_more_is_faster():
    times = [epoch(Knobs(freeze_embeddings=n >= 0, freeze_layers=max(n, 0), micro_batch_size=8)) for n in (-1, 0, 3, 6, 12)]
    assert all(a > b for a, b in zip(times, times[1:]))


def test_backward_rule_at_the_frozen_boundary():
    profile = make_profile(layers=4)
    passes = dict((b.kind, p) for b, p in block_passes(profile, Knobs(freeze_embeddings=True, freeze_layers=2,
                                                                      checkpoint_layers=(0, 2, 3))))
    assert (passes["embeddings"].backward_full, passes["embeddings"].backward_weights) == (0, 0)
    layer = passes["layer"]
    assert (layer.forward, layer.backward_full, layer.backward_weights, layer.recompute) == (4, 1, 1, 2)
    assert passes["head"].backward_full == 1
    trainable_all = dict((b.kind, p) for b, p in block_passes(profile, Knobs()))
    assert trainable_all["embeddings"].backward_weights == 1 and trainable_all["layer"].backward_full == 4
    head_only = dict((b.kind, p) for b, p in block_passes(profile, Knobs(freeze_embeddings=True, freeze_layers=4)))
    assert (head_only["head"].backward_full, head_only["head"].backward_weights) == (0, 1)


def test_half_precision_is_faster_on_cuda_and_bf16_falls_back_without_support():
    fp32 = Knobs(micro_batch_size=8)
    bf16 = fp32.model_copy(update={"precision": Precision.bf16})
    assert epoch(bf16) < 0.5 * epoch(fp32)
    t4 = get_device("t4")  # no bf16 tensor cores: bf16 runs at fp32 speed there
    assert epoch(bf16, device=t4) == pytest.approx(epoch(fp32, device=t4), rel=0.01)
    assert epoch(fp32.model_copy(update={"precision": Precision.fp16}), device=t4) < 0.5 * epoch(fp32, device=t4)


def test_a_token_budget_on_buckets_reduces_epoch_time_on_skewed_lengths():
    """Steps are random examples either way; a token budget cuts them into micro-batches of similar length."""
    workload = skewed_workload()
    plain = Knobs(micro_batch_size=32)
    bucketed = plain.model_copy(update={"bucket_boundaries": choose_boundaries(workload.lengths, 8)})
    budgeted = bucketed.model_copy(update={"tokens_per_micro_batch": 32 * bucketed.bucket_boundaries[0]})
    p, b, t = (predict_time(make_profile(), k, workload, A100) for k in (plain, bucketed, budgeted))
    assert b.epoch_seconds == pytest.approx(p.epoch_seconds, rel=0.01)  # boundaries alone change no micro-batch
    assert t.epoch_seconds < 0.8 * p.epoch_seconds
    assert p.padding_efficiency < t.padding_efficiency <= 1.0


def test_tiny_micro_batches_with_accumulation_are_slower():
    one_big = epoch(Knobs(micro_batch_size=32))
    tiny = epoch(Knobs(micro_batch_size=1))
    assert tiny > 2 * one_big
    # Both keep the effective batch, so they take the same number of optimizer steps.
    a = predict_time(make_profile(), Knobs(micro_batch_size=32), FIXED, A100)
    assert a.step_seconds == pytest.approx(a.epoch_seconds / 32)
    assert a.samples_per_second == pytest.approx(1024 / a.epoch_seconds)


def test_eight_bit_state_makes_the_optimizer_step_faster():
    profile = make_profile()
    t32 = optimizer_step_seconds(profile, Knobs(), A100)
    t8 = optimizer_step_seconds(profile, Knobs(optimizer_bits=8), A100)
    assert t8 < t32
    # ~110M params x 28 B / (1555 GB/s x 0.7) + fixed cost: a few ms, as on a real A100.
    assert 0.003 < t32 < 0.01


def test_flop_estimate_matches_a_hand_count():
    """bert-base, 32 x 128 tokens, bf16 on an A100: fwd+bwd = 3 x forward FLOPs at 156 x 0.6 x u(4096)."""
    profile, knobs = make_profile(), Knobs(micro_batch_size=32, precision=Precision.bf16)
    tokens, h = 32 * 128, 768
    layer_flops = 12 * (24 * h * h * tokens + 4 * h * tokens * 128)
    head_flops, embedding_flops = 2 * h * h * tokens, 10 * h * tokens
    rate = 156e12 * 0.6 * tokens / (tokens + 2048 * 1.56)
    compute = (3 * layer_flops + 3 * head_flops + 2 * embedding_flops) / rate
    overhead = MICRO_BATCH_SECONDS["cuda"] + LAUNCH_SECONDS_PER_PASS["cuda"] * (2 + 24 + 2)
    seconds = micro_batch_seconds(profile, knobs, A100, 32, 128)
    assert seconds == pytest.approx(compute + overhead, rel=1e-9)
    assert 0.02 < seconds < 0.1


def _measured_times() -> dict:
    def fit(fwd, bwd):
        return TimeFit(forward=ShapeFit(const=1e-4, per_token=fwd), backward=ShapeFit(const=2e-4, per_token=bwd))

    return {"embeddings": {"fp32": fit(1e-7, 1e-7)},
            "layer": {"fp32": fit(2e-6, 4e-6)},
            "head": {"fp32": fit(5e-7, 1e-6)}}


def test_measured_cpu_profile_is_used_directly():
    profile = make_profile(hidden=32, layers=2, vocab=100, device="cpu", times=_measured_times())
    cpu = get_device("cpu")
    knobs = Knobs(micro_batch_size=4, checkpoint_layers=(1,))
    workload = Workload(lengths=LengthHistogram.fixed(16, 64), batch_size=8)
    prediction = predict_time(profile, knobs, workload, cpu)
    assert prediction.measured
    tokens = 4 * 16
    fwd = {"embeddings": 1e-4 + 1e-7 * tokens, "layer": 1e-4 + 2e-6 * tokens, "head": 1e-4 + 5e-7 * tokens}
    bwd = {"embeddings": 2e-4 + 1e-7 * tokens, "layer": 2e-4 + 4e-6 * tokens, "head": 2e-4 + 1e-6 * tokens}
    per_micro_batch = (fwd["embeddings"] + bwd["embeddings"] + 3 * fwd["layer"] + 2 * bwd["layer"]
                       + fwd["head"] + bwd["head"] + MICRO_BATCH_SECONDS["cpu"])
    expected = 16 * per_micro_batch + 8 * optimizer_step_seconds(profile, knobs, cpu)
    assert prediction.epoch_seconds == pytest.approx(expected, rel=1e-6)
    assert optimizer_step_seconds(profile, knobs, cpu) > OPTIMIZER_STEP_SECONDS["cpu"]


def test_flop_estimate_when_the_device_kind_or_precision_was_not_measured():
    cpu_profile = make_profile(hidden=32, layers=2, vocab=100, device="cpu", times=_measured_times())
    workload = Workload(lengths=LengthHistogram.fixed(16, 64), batch_size=8)
    knobs = Knobs(micro_batch_size=8)
    assert not predict_time(cpu_profile, knobs, workload, A100).measured
    assert not predict_time(cpu_profile, Knobs(micro_batch_size=8, precision=Precision.bf16), workload,
                            get_device("cpu")).measured
    assert not predict_time(make_profile(device="meta"), knobs, workload, get_device("cpu")).measured


def test_an_untimed_precision_is_scaled_from_a_timed_one():
    """A profile timed in fp32 only: bf16 on the same device kind starts from the fp32 measurements, scaled
    by the device's throughput ratio, not from FLOPs alone (which would not be comparable with them)."""
    profile = make_profile(hidden=32, layers=2, vocab=100, device="cpu", times=_measured_times())
    cpu = get_device("cpu")
    fp32, bf16 = Knobs(micro_batch_size=8), Knobs(micro_batch_size=8, precision=Precision.bf16)
    rate = {p: matmul_flops_per_second(cpu, p, 8 * 16, 32) for p in (Precision.fp32, Precision.bf16)}
    ratio = rate[Precision.fp32] / rate[Precision.bf16]
    fixed = MICRO_BATCH_SECONDS["cpu"]
    scaled = micro_batch_seconds(profile, bf16, cpu, 8, 16) - fixed
    assert scaled == pytest.approx(ratio * (micro_batch_seconds(profile, fp32, cpu, 8, 16) - fixed), rel=1e-9)
    flops_only = micro_batch_seconds(profile.model_copy(update={"device": "meta"}), bf16, cpu, 8, 16)
    assert scaled != pytest.approx(flops_only - fixed, rel=0.1)


def test_knobs_out_of_range_raise():
    with pytest.raises(ValueError, match="checkpoint_layers"):
        predict_time(make_profile(layers=2), Knobs(checkpoint_layers=(5,)), FIXED, A100)
