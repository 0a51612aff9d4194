"""Hand-built Profiles for the time-model and search tests: BERT-shaped, no model needed."""

import random

from autofit.plan import Plan
from autofit.profiler.schema import BlockActivations, BlockProfile, LinearLayer, Profile, ShapeFit
from autofit.techniques.lora import BASE_KINDS, TARGET_CHOICES, activation_key
from autofit.workload import LengthHistogram, Workload


def _activations(h: int, grad_bytes: int) -> dict[str, BlockActivations]:
    """Roughly BERT's: ~18 hidden-sized tensors saved per token, eager attention's scores and probs. The
    backward transient holds the block's own fresh gradients, as a measured one does."""
    result = {}
    for precision, size in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        saved = ShapeFit(per_token=18 * h * size + 4 * h, per_token_seq=24 * size)
        first = ShapeFit(per_token=16 * h * size + 4 * h, per_token_seq=24 * size)
        result[precision] = BlockActivations(
            saved=saved, saved_first_trainable=first, output=ShapeFit(per_token=4 * h),
            forward_transient=ShapeFit(per_token=8 * h * size, per_token_seq=12 * size),
            backward_transient=ShapeFit(const=grad_bytes, per_token=12 * h * size, per_token_seq=24 * size))
    return result


def _adapted(h: int, kind: str) -> dict[str, BlockActivations]:
    """LoRA fits at rank 8, roughly: the adapters keep their inputs and rank-8 outputs, the frozen base keeps
    only what input gradients need; all-linear keeps more; the head trains its classifier copy."""
    result = {}
    for targets in TARGET_CHOICES:
        per = {"embeddings": 0, "layer": 8 if targets == "attention" else 12, "head": 2}[kind]
        for base in BASE_KINDS:
            for precision, size in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
                saved = ShapeFit(per_token=per * h * size, per_token_seq=(16 if kind == "layer" else 0) * size)
                result[activation_key(targets, base, precision)] = BlockActivations(
                    saved=saved, saved_first_trainable=saved, output=ShapeFit(per_token=4 * h),
                    forward_transient=ShapeFit(per_token=8 * h * size, const=(4 * h * h * size if base == "nf4" else 0)),
                    backward_transient=ShapeFit(per_token=8 * h * size, per_token_seq=12 * size))
    return result


def make_profile(hidden=768, layers=12, vocab=30000, device="meta", times=None, adapters=False) -> Profile:
    """A BERT-shaped profile built by hand; with `adapters`, LoRA fits (`adapted`) at rank 8 too, as the
    profiler's adapters=True makes them. `times` maps kind -> precision -> TimeFit (measured)."""
    h, times = hidden, times or {}
    fits = _adapted if adapters else (lambda h, kind: {})
    linears = [LinearLayer(name=f"attention.{n}", out_features=h, in_features=h, attention=True)
               for n in ("query", "key", "value", "output")]
    linears += [LinearLayer(name="intermediate", out_features=4 * h, in_features=h, attention=False),
                LinearLayer(name="output", out_features=h, in_features=4 * h, attention=False)]
    layer_numels = [h * h] * 4 + [4 * h * h] * 2 + [h] * 9 + [4 * h]
    blocks = [
        BlockProfile(name="embeddings", kind="embeddings", param_numels=[vocab * h, 512 * h, 2 * h, h, h],
                     embedding_numels=[vocab * h, 512 * h, 2 * h], param_bytes=4 * (vocab + 516) * h,
                     flops_forward=ShapeFit(per_token=10 * h), activations=_activations(h, 4 * (vocab + 516) * h),
                     time=times.get("embeddings", {}), adapted=fits(h, "embeddings")),
        BlockProfile(name="layer", kind="layer", count=layers, param_numels=layer_numels,
                     param_bytes=4 * sum(layer_numels), flops_forward=ShapeFit(per_token=24 * h * h,
                                                                               per_token_seq=4 * h),
                     activations=_activations(h, 4 * sum(layer_numels)), time=times.get("layer", {}),
                     linears=linears, adapted=fits(h, "layer")),
        BlockProfile(name="head", kind="head", param_numels=[h * h, h, 2 * h, 2],
                     param_bytes=4 * (h * h + 3 * h + 2), flops_forward=ShapeFit(per_token=2 * h * h),
                     activations=_activations(h, 4 * (h * h + 3 * h + 2)), time=times.get("head", {}),
                     task_head_numels=[2 * h, 2], adapted=fits(h, "head")),
    ]
    return Profile(model_id="tiny-bert", model_type="bert", task="classification", num_layers=layers,
                   hidden_size=h, vocab_size=vocab, attn_implementation="eager", device=device, blocks=blocks,
                   lora_profile_rank=8 if adapters else 0)


def skewed_workload(n=2000, batch_size=32, seed=0) -> Workload:
    rng = random.Random(seed)
    lengths = [min(512, 8 + int(rng.expovariate(1 / 60))) for _ in range(n)]
    return Workload(lengths=LengthHistogram.from_lengths(lengths), batch_size=batch_size)


def searched_plan(policy: str = "quality-first", budget_mb: int = 700) -> Plan:
    """A real plan: a search on a hand-built 4-layer profile for an A100, with its alternatives."""
    from autofit.devices import get_device
    from autofit.search import alternatives, search

    a100 = get_device("a100")
    profile = make_profile(hidden=128, layers=4, vocab=4000)
    workload = skewed_workload(n=300, batch_size=16)
    budget = budget_mb * 2**20
    result = search(profile, workload, a100, budget, policy)
    return Plan(model_id=profile.model_id, model_type=profile.model_type, num_layers=profile.num_layers,
                num_params=profile.num_params, task=profile.task, budget_bytes=budget, device=a100,
                policy=result.policy, headroom_bytes=result.headroom_bytes, knobs=result.knobs,
                predicted=result.memory, time=result.time, workload=workload, alternatives=alternatives(result),
                search=result.info(), profile_device=profile.device,
                versions={"autofit": "0.1.0", "torch": "2.13.0"}, created="2026-01-01T00:00:00Z")


# --- adapters: a profile with LoRA fits, and stand-in models until memory.py and cost.py price adapters ------


def adapted_profile(hidden=256, layers=4, vocab=30000) -> Profile:
    """`make_profile` with what adapters are planned from: LoRA fits for both target sets and bases under
    every precision."""
    return make_profile(hidden=hidden, layers=layers, vocab=vocab, adapters=True)


def cached_models():
    """dict(predict_memory=..., predict_time=...) for `search`: the real memory and time models, which are
    pure, memoised per (profile, workload, device, knobs) so brute forces and studies share predictions."""
    from autofit.cost import predict_time
    from autofit.memory import predict_peak

    def cached(fn):
        memo = {}

        def wrapped(profile, knobs, workload, device, **cluster):
            key = (id(profile), id(workload), device.name, knobs, tuple(cluster.items()))
            if key not in memo:
                memo[key] = fn(profile, knobs, workload, device, **cluster)
            return memo[key]

        return wrapped

    return dict(predict_memory=cached(predict_peak), predict_time=cached(predict_time))
