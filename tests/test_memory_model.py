"""The pure memory model (autofit/memory.py) on hand-built profiles: no model, no torch work."""

import itertools

import pytest

from autofit.devices import get_device
from autofit.intmath import ceil_div
from autofit.knobs import Knobs, Precision
from autofit.memory import input_bytes, param_state, predict_peak, predict_step_peak
from autofit.techniques.accumulation import step_layout
from autofit.profiler.schema import BlockActivations, BlockProfile, Profile, ShapeFit
from autofit.techniques.optimizer import BNB_BLOCK_SIZE, BNB_MIN_8BIT_SIZE, state_bytes
from autofit.workload import LengthHistogram, Workload

from _profiles import make_profile, skewed_workload

CPU = get_device("cpu")  # no context, no allocator reserve: peak == allocated
A100 = get_device("a100")
FIXED = Workload(lengths=LengthHistogram.fixed(128, 256), batch_size=16)
LAYERS = 4

# --- an exact profile: per-token constants, so every expected byte count can be written down --------------

EMB = dict(saved=100, first=10, out=64, fwd=0, bwd=0)
LAYER = dict(saved=1000, first=700, out=64, fwd=50, bwd=100)
HEAD = dict(saved=30, first=20, out=8, fwd=0, bwd=0)
EMB_NUMELS, LAYER_NUMELS, HEAD_NUMELS = [1000 * 16, 16], [4096, 64], [128]


def _acts(saved, first, out, fwd, bwd):
    act = BlockActivations(saved=ShapeFit(per_token=saved), saved_first_trainable=ShapeFit(per_token=first),
                           output=ShapeFit(per_token=out), forward_transient=ShapeFit(per_token=fwd),
                           backward_transient=ShapeFit(per_token=bwd))
    return {p.value: act for p in Precision}


def exact_profile(layers=LAYERS, head_backward=10**6, scale=1.0, optimizer_transient=None) -> Profile:
    """Activations are `scale` x the constants above per token. A huge head backward transient pins the peak
    at the start of backward, where everything kept for backward is live."""
    s = {k: {n: v * scale for n, v in d.items()} for k, d in (("e", EMB), ("l", LAYER), ("h", HEAD))}
    blocks = [
        BlockProfile(name="embeddings", kind="embeddings", param_numels=EMB_NUMELS,
                     embedding_numels=EMB_NUMELS[:1], param_bytes=4 * sum(EMB_NUMELS),
                     flops_forward=ShapeFit(), activations=_acts(**s["e"])),
        BlockProfile(name="layer", kind="layer", count=layers, param_numels=LAYER_NUMELS,
                     param_bytes=4 * sum(LAYER_NUMELS), flops_forward=ShapeFit(), activations=_acts(**s["l"])),
        BlockProfile(name="head", kind="head", param_numels=HEAD_NUMELS, param_bytes=4 * sum(HEAD_NUMELS),
                     flops_forward=ShapeFit(), activations=_acts(**dict(s["h"], bwd=head_backward))),
    ]
    return Profile(model_id="exact", model_type="bert", task="classification", num_layers=layers, hidden_size=16,
                   vocab_size=1000, attn_implementation="eager", device="meta", blocks=blocks,
                   optimizer_transient_per_param=optimizer_transient or {})


def freeze(depth: int, **kw) -> Knobs:
    """depth 0: nothing frozen; 1: embeddings; 1 + k: embeddings and the bottom k layers."""
    return Knobs(freeze_embeddings=depth >= 1, freeze_layers=max(0, depth - 1), **kw)


B, S = 2, 32
T = B * S


def kept_per_token(depth: int, layers: int = LAYERS) -> int:
    """What the exact profile keeps for backward per token, frozen to `depth`, nothing checkpointed."""
    if depth == 0:  # embeddings train but need no input grad; every block above needs one
        return EMB["first"] + layers * LAYER["saved"] + HEAD["saved"]
    frozen = depth - 1
    if frozen == layers:  # only the head trains, and its input needs no gradient
        return HEAD["first"]
    return LAYER["first"] + (layers - frozen - 1) * LAYER["saved"] + HEAD["saved"]


@pytest.mark.parametrize("depth", range(LAYERS + 2))
def test_frozen_blocks_below_the_boundary_keep_no_activations(depth):
    m = predict_step_peak(exact_profile(), freeze(depth), B, S, CPU)
    assert m.peak_phase == "backward"
    assert m.activations == kept_per_token(depth) * T + input_bytes(exact_profile(), B, S)


def test_checkpointed_layers_keep_only_their_input():
    profile = exact_profile()
    m = predict_step_peak(profile, Knobs(checkpoint_layers=tuple(range(LAYERS))), B, S, CPU)
    # embeddings keep theirs; each checkpointed layer keeps the output of the block below it (64 B/token)
    expected = EMB["first"] + LAYERS * EMB["out"] + HEAD["saved"]
    assert m.activations == expected * T + input_bytes(profile, B, S)
    # with a frozen boundary, the first checkpointed trainable layer keeps its input as well
    m = predict_step_peak(profile, freeze(2, checkpoint_layers=(1, 2, 3)), B, S, CPU)
    assert m.activations == ((LAYERS - 1) * LAYER["out"] + HEAD["saved"]) * T + input_bytes(profile, B, S)


def test_checkpointed_frozen_layers_are_ignored():
    profile = exact_profile()
    plain = predict_step_peak(profile, freeze(3), B, S, CPU)
    assert predict_step_peak(profile, freeze(3, checkpoint_layers=(0, 1)), B, S, CPU) == plain


def test_the_recompute_of_a_checkpointed_layer_shows_at_the_peak():
    """Without the huge head transient, checkpointing all layers puts the peak in a layer's backward, where
    that layer's saved tensors come back (recompute) on top of the inputs kept by the layers."""
    scale = 10.0  # activations well above the gradients, so the optimizer step is not the peak
    profile = exact_profile(head_backward=0, scale=scale)
    m = predict_step_peak(profile, Knobs(checkpoint_layers=tuple(range(LAYERS))), B, S, CPU)
    assert m.peak_phase == "backward"
    # the recomputed saved tensors, then the larger of the recompute's workspace (while the incoming gradient
    # waits) and the backward's (whose measurement already holds that gradient)
    assert m.temporaries == scale * (LAYER["saved"] + max(LAYER["out"] + LAYER["fwd"], LAYER["bwd"])) * T
    plain = predict_step_peak(profile, Knobs(), B, S, CPU)
    assert plain.temporaries < m.temporaries
    assert m.peak_bytes < plain.peak_bytes


@pytest.mark.parametrize("depth", [0, 1, 3, LAYERS + 1])
def test_gradients_and_state_only_for_trainable_parameters(depth):
    profile = exact_profile()
    weights, grads, state, trainable = param_state(profile, freeze(depth))
    layer_trainable = LAYERS - max(0, depth - 1)
    assert weights == 4 * (sum(EMB_NUMELS) + LAYERS * sum(LAYER_NUMELS) + sum(HEAD_NUMELS))
    assert trainable == (sum(EMB_NUMELS) if depth == 0 else 0) + layer_trainable * sum(LAYER_NUMELS) \
        + sum(HEAD_NUMELS)
    assert grads == 4 * trainable
    assert state == 8 * trainable  # 32-bit AdamW: two fp32 moments


def test_accumulation_holds_every_gradient_during_the_micro_batches():
    profile = exact_profile()
    single = predict_step_peak(profile, Knobs(micro_batch_size=B), B, S, CPU)
    accumulating = predict_step_peak(profile, Knobs(micro_batch_size=B), B, S, CPU, grads_held=True)
    _, all_grads, _, _ = param_state(profile, Knobs())
    # the huge head transient pins the peak in the head's backward: a single step holds no gradients yet
    # (the head's own are part of its measured transient); with accumulation, all of them
    assert single.gradients == 0
    assert accumulating.gradients == all_grads
    assert accumulating.peak_bytes - single.peak_bytes == all_grads
    assert (accumulating.activations, accumulating.temporaries) == (single.activations, single.temporaries)


@pytest.mark.parametrize("bits", [32, 8])
def test_the_optimizer_step_is_the_peak_when_activations_are_tiny(bits):
    profile = exact_profile(head_backward=0, scale=1e-3, optimizer_transient={"32": 16.0, "8": 6.0})
    knobs = freeze(2, optimizer_bits=bits)
    m = predict_step_peak(profile, knobs, B, S, CPU)
    weights, grads, state, trainable = param_state(profile, knobs)
    assert m.peak_phase == "optimizer"
    assert (m.activations, m.gradients) == (0, grads)
    assert m.temporaries == int({32: 16.0, 8: 6.0}[bits] * trainable)
    assert (m.weights, m.optimizer_state) == (weights, state)
    assert m.peak_bytes == weights + grads + state + m.temporaries


def test_large_activations_put_the_peak_back_in_the_step():
    """The same optimizer temporaries lose to a backward that needs more."""
    profile = exact_profile(head_backward=0, scale=10.0, optimizer_transient={"32": 16.0})
    assert predict_step_peak(profile, Knobs(), 16, 512, CPU).peak_phase != "optimizer"


def test_device_overhead_is_context_plus_reserve():
    profile = make_profile(hidden=128, layers=4, vocab=2000)
    m = predict_peak(profile, Knobs(micro_batch_size=16), FIXED, A100)
    assert m.overhead == int(A100.context_bytes + A100.allocator_reserve_fraction * m.allocated_bytes)
    assert predict_peak(profile, Knobs(micro_batch_size=16), FIXED, CPU).overhead == 0


# --- monotonicity on the BERT-shaped profile -------------------------------------------------------------

PROFILE = make_profile(hidden=128, layers=6, vocab=4000)
WORKLOADS = [FIXED, skewed_workload(n=400, batch_size=16)]
SETTINGS = list(itertools.product([Precision.fp32, Precision.bf16], [32, 8], [1, 4, 16], WORKLOADS))


def peak(knobs: Knobs, workload=FIXED, device=A100) -> int:
    return predict_peak(PROFILE, knobs, workload, device).peak_bytes


def _knobs(precision, bits, micro, workload, **kw) -> Knobs:
    return Knobs(precision=precision, optimizer_bits=bits, micro_batch_size=micro, **kw)


@pytest.mark.parametrize("precision,bits,micro,workload", SETTINGS)
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_checkpointing_more_layers_never_raises_the_peak(precision, bits, micro, workload, depth):
    frozen = max(0, depth - 1)
    peaks = [peak(_knobs(precision, bits, micro, workload, freeze_embeddings=depth >= 1, freeze_layers=frozen,
                         checkpoint_layers=tuple(range(frozen, frozen + n))), workload)
             for n in range(PROFILE.num_layers - frozen + 1)]
    assert all(a >= b for a, b in zip(peaks, peaks[1:])), peaks
    assert peaks[-1] < peaks[0]  # and checkpointing everything saves something


@pytest.mark.parametrize("precision,bits,micro,workload", SETTINGS)
@pytest.mark.parametrize("checkpoint", [False, True])
def test_freezing_more_never_raises_the_peak(precision, bits, micro, workload, checkpoint):
    def knobs(depth):
        frozen = max(0, depth - 1)
        ckpt = tuple(range(frozen, PROFILE.num_layers)) if checkpoint else ()
        return _knobs(precision, bits, micro, workload, freeze_embeddings=depth >= 1, freeze_layers=frozen,
                      checkpoint_layers=ckpt)

    peaks = [peak(knobs(d), workload) for d in range(PROFILE.num_layers + 2)]
    assert all(a >= b for a, b in zip(peaks, peaks[1:])), peaks
    assert peaks[-1] < peaks[0]


@pytest.mark.parametrize("depth", [0, 1, 4])
@pytest.mark.parametrize("micro", [1, 16])
def test_8bit_state_is_smaller_than_32bit_state(depth, micro):
    frozen = max(0, depth - 1)
    base = Knobs(freeze_embeddings=depth >= 1, freeze_layers=frozen, micro_batch_size=micro)
    m32 = predict_peak(PROFILE, base, FIXED, A100)
    m8 = predict_peak(PROFILE, base.model_copy(update={"optimizer_bits": 8}), FIXED, A100)
    assert m8.optimizer_state < m32.optimizer_state
    assert m8.peak_bytes < m32.peak_bytes
    # the layers' big matrices go to ~2 B/param; state of the embeddings (when trained) stays at 8 B/param
    assert m8.optimizer_state > m32.optimizer_state / 4


@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("checkpoint", [(), (0, 1, 2, 3, 4, 5)])
def test_a_larger_micro_batch_needs_more_activation_memory(precision, checkpoint):
    for seq in (64, 256):
        steps = [predict_step_peak(PROFILE, Knobs(precision=precision, micro_batch_size=b,
                                                  checkpoint_layers=checkpoint), b, seq, A100)
                 for b in (1, 2, 4, 8, 16)]
        activations = [m.activations for m in steps]
        assert all(a < b for a, b in zip(activations, activations[1:])), activations
        assert all(a.peak_bytes < b.peak_bytes for a, b in zip(steps, steps[1:]))


def test_half_precision_saves_activation_memory():
    knobs = Knobs(micro_batch_size=16)
    fp32 = predict_peak(PROFILE, knobs, FIXED, A100)
    for half in (Precision.bf16, Precision.fp16):
        m = predict_peak(PROFILE, knobs.model_copy(update={"precision": half}), FIXED, A100)
        assert m.activations < fp32.activations and m.peak_bytes < fp32.peak_bytes
        assert (m.weights, m.optimizer_state) == (fp32.weights, fp32.optimizer_state)  # fp32 master weights


def test_the_peak_is_the_worst_bucket():
    """With buckets, the predicted peak is the largest over the buckets' worst micro-batches, and a token
    budget (fewer long sequences per micro-batch) lowers it."""
    workload = skewed_workload(n=400, batch_size=16)
    plain = Knobs(micro_batch_size=16)
    bucketed = plain.model_copy(update={"bucket_boundaries": (64, 128, 512)})
    budgeted = bucketed.model_copy(update={"tokens_per_micro_batch": 16 * 64})
    p_plain, p_bucket, p_budget = (predict_peak(PROFILE, k, workload, A100) for k in (plain, bucketed, budgeted))
    longest = workload.lengths.max_length
    assert p_plain.peak_shape == (16, -(-longest // 8) * 8)
    # boundaries alone: a random step of 16 still runs as one micro-batch, as without them
    assert p_bucket == p_plain
    # a token budget: the last bucket's micro-batches are small; the step's first opens before any gradient
    # exists, a second one of its own follows it with them
    last = step_layout(budgeted, workload.lengths, 16).buckets[-1]
    assert not last.grads_held and last.later_length is not None
    assert p_budget.peak_bytes < p_bucket.peak_bytes
    assert p_budget.peak_shape[0] * p_budget.peak_shape[1] <= 16 * 64 or p_budget.peak_shape[0] == 1


# --- optimizer state bytes (DESIGN.md) -------------------------------------------------------------------


def test_32bit_state_is_8_bytes_per_parameter():
    numels = [30000 * 64, 64, 4096, 100_000, 3]
    assert state_bytes(numels, [30000 * 64], 32) == 8 * sum(numels)
    assert state_bytes(numels, [], 32) == 8 * sum(numels)


PRIME_NUMEL = 1_000_003
"""A prime: not a multiple of the 256-element block, so its last block is partly full and still has a scale."""


@pytest.mark.parametrize("numel", [BNB_MIN_8BIT_SIZE, BNB_MIN_8BIT_SIZE + 1, 65536, PRIME_NUMEL])
def test_8bit_state_is_2_bytes_per_parameter_plus_block_scales(numel):
    blocks = ceil_div(numel, BNB_BLOCK_SIZE)
    # two moments, each 1 byte per element plus one fp32 scale per 256-element block
    assert state_bytes([numel], [], 8) == 2 * numel + 2 * 4 * blocks
    assert state_bytes([numel], [], 8) < 8 * numel / 3.9


@pytest.mark.parametrize("numel", [1, 255, 256, BNB_MIN_8BIT_SIZE - 1])
def test_small_tensors_keep_32bit_state(numel):
    assert state_bytes([numel], [], 8) == 8 * numel


def test_embeddings_keep_32bit_state_one_for_one():
    vocab = 5000 * 64
    # an embedding and an equally sized non-embedding matrix: only the embedding stays at 32 bits
    assert state_bytes([vocab, vocab], [vocab], 8) == 8 * vocab + state_bytes([vocab], [], 8)
    assert state_bytes([vocab, vocab], [vocab, vocab], 8) == 16 * vocab
    # DeBERTa-v3-base-like split: a ~half-embedding model saves far less than 75% with 8-bit state
    layers = [768 * 768] * 4 * 12 + [768 * 3072] * 2 * 12
    emb = [128100 * 768]
    saving = 1 - state_bytes(emb + layers, emb, 8) / state_bytes(emb + layers, emb, 32)
    assert 0.3 < saving < 0.45


def _with_layer_fits(profile: Profile, kind: str = "layer", **fits: ShapeFit) -> Profile:
    """`profile` with extra fits on every precision's activations of one block kind."""
    blocks = []
    for block in profile.blocks:
        if block.kind == kind:
            acts = {p: a.model_copy(update=fits) for p, a in block.activations.items()}
            block = block.model_copy(update={"activations": acts})
        blocks.append(block)
    return profile.model_copy(update={"blocks": blocks})


def test_equal_length_data_uses_the_unpadded_fits():
    """Batches whose sequences all have the padded length carry no pad tokens: the model skips its mask."""
    base = exact_profile()
    cheaper = {p: a.model_copy(update={"saved": ShapeFit(per_token=LAYER["saved"] - 100)})
               for p, a in base.block("layer").activations.items()}
    profile = _with_layer_fits(base, unpadded=cheaper["fp32"])
    knobs = Knobs(micro_batch_size=B)
    exact = Workload(lengths=LengthHistogram.fixed(S, 64), batch_size=B, from_data=True)
    padded = Workload(lengths=LengthHistogram.fixed(S - 1, 64), batch_size=B, from_data=True)
    assumed = Workload(lengths=LengthHistogram.fixed(S, 64), batch_size=B)  # --seq-len: lengths up to S
    saving = LAYERS * 100 * T
    assert predict_peak(base, knobs, exact, CPU).activations - predict_peak(profile, knobs, exact, CPU).activations \
        == saving
    assert predict_peak(profile, knobs, padded, CPU) == predict_peak(base, knobs, padded, CPU)
    assert predict_peak(profile, knobs, assumed, CPU) == predict_peak(base, knobs, assumed, CPU)


def test_checkpoint_arguments_are_kept_once_for_all_checkpointed_layers():
    extra = 7
    profile = _with_layer_fits(exact_profile(), checkpoint_args=ShapeFit(per_token=extra))
    for checkpoint in [(1,), (0, 2, 3)]:
        with_args = predict_step_peak(profile, Knobs(checkpoint_layers=checkpoint), B, S, CPU)
        without = predict_step_peak(exact_profile(), Knobs(checkpoint_layers=checkpoint), B, S, CPU)
        assert with_args.activations - without.activations == extra * T


def test_embeddings_held_by_the_model_count_when_layer_0_is_frozen():
    """The model's code keeps the embeddings' output until its forward returns. A trainable layer 0 saves
    it anyway; above a frozen layer 0 nothing does, and it sits under every forward peak above."""
    held = 5
    base = _with_layer_fits(exact_profile(head_backward=0), forward_transient=ShapeFit(per_token=10**5))
    profile = _with_layer_fits(base, kind="embeddings", held=ShapeFit(per_token=held))
    for depth, extra in [(1, 0), (2, held * T)]:  # embeddings frozen; then layer 0 too
        a, b = predict_step_peak(profile, freeze(depth), B, S, CPU), predict_step_peak(base, freeze(depth), B, S, CPU)
        assert a.peak_phase == b.peak_phase == "forward"
        assert a.peak_bytes - b.peak_bytes == extra


def test_autocast_weight_copies_of_checkpointed_layers_live_until_the_forward_ends():
    """A checkpointed layer saves nothing, but autocast caches its low-precision weight copies until the
    model's forward returns: every checkpointed layer adds them to the forward, none to the backward."""
    leftover = 3
    big_forward = _with_layer_fits(exact_profile(head_backward=0), kind="head",
                                   forward_transient=ShapeFit(per_token=10**5))  # the peak in the head's forward
    with_copies = _with_layer_fits(big_forward, checkpointed_leftover=ShapeFit(per_token=leftover))
    knobs = Knobs(checkpoint_layers=(0, 1, 2))
    a, b = predict_step_peak(with_copies, knobs, B, S, CPU), predict_step_peak(big_forward, knobs, B, S, CPU)
    assert a.peak_phase == b.peak_phase == "forward"
    assert a.peak_bytes - b.peak_bytes == 3 * leftover * T
    huge_backward = _with_layer_fits(exact_profile(), checkpointed_leftover=ShapeFit(per_token=leftover))
    assert predict_step_peak(huge_backward, knobs, B, S, CPU) == predict_step_peak(exact_profile(), knobs, B, S, CPU)
