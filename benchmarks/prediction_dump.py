"""Dump the memory and time predictions of 600 random knob sets (2 hand-built profiles, an A100 and the CPU)
and the plans of 24 searches to a JSON file, to check that a refactoring changed no prediction:

    git checkout OLD && python benchmarks/prediction_dump.py /tmp/old.json
    git checkout NEW && python benchmarks/prediction_dump.py /tmp/new.json
    python benchmarks/prediction_dump.py --compare /tmp/old.json /tmp/new.json

The comparison counts predictions that differ and searches whose chosen plan differs. Two runs of the same code
can still list tied runner-ups in another order, and a search that finds no plan can name another plan of the
same smallest budget (ties the TPE sampler breaks at random), so those are not compared.
"""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
if sys.argv[1] == "--compare":
    old, new = (json.loads(Path(f).read_text()) for f in sys.argv[2:4])
    predictions = sum(a != b for a, b in zip(old, new) if not isinstance(a[0], str))
    plans = sum(a[2] != b[2] for a, b in zip(old, new) if isinstance(a[0], str) and isinstance(a[2], dict))
    print(f"{predictions} of {sum(not isinstance(a[0], str) for a in old)} predictions differ; "
          f"{plans} searches chose another plan")
    raise SystemExit(0)
from _profiles import make_profile, skewed_workload
from autofit.knobs import Knobs, Precision
from autofit.memory import predict_peak, predict_eval_peak
from autofit.cost import predict_time
from autofit.devices import get_device
from autofit.search import search, alternatives
out = []
dev = get_device("a100"); cpu = get_device("cpu")
wl = skewed_workload(n=300, batch_size=16)
rng = random.Random(0)
for layers in (3, 6):
    prof = make_profile(hidden=128, layers=layers, vocab=5000)
    for _ in range(150):
        fe = rng.random() < .6
        fl = rng.randint(0, layers) if fe else 0
        ck = tuple(sorted(rng.sample(range(layers), rng.randint(0, layers))))
        k = Knobs(freeze_embeddings=fe, freeze_layers=fl, checkpoint_layers=ck, precision=rng.choice(list(Precision)),
                  optimizer_bits=rng.choice([8, 32]), micro_batch_size=rng.choice([1, 2, 4, 16]),
                  bucket_boundaries=rng.choice([(), (64, 512)]), tokens_per_micro_batch=rng.choice([None, 512]))
        for d in (dev, cpu):
            out.append([k.model_dump(mode="json"), predict_peak(prof, k, wl, d).model_dump(mode="json"),
                        predict_time(prof, k, wl, d).model_dump(mode="json"),
                        predict_eval_peak(prof, k, [(2, 64), (4, 128)], d).model_dump(mode="json")])
    for pol in ("balanced", "quality-first", "minimal-memory", "fastest"):
        for mb in (300, 600, 2000):
            try:
                r = search(prof, wl, dev, mb * 2**20, pol, n_trials=40)
                out.append([pol, mb, r.best.model_dump(mode="json"), [c.knobs.model_dump(mode="json") for c in r.ranked],
                            [(a.knobs.model_dump(mode="json"), a.peak_bytes, a.epoch_seconds) for a in alternatives(r)]])
            except Exception as e:
                out.append([pol, mb, str(e)])
json.dump(out, open(sys.argv[1], "w"), indent=0, sort_keys=True)
