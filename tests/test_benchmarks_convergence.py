"""The convergence benchmark's pure helpers (benchmarks/convergence.py): the generated task and the
tolerance rule. No model is loaded."""

import statistics

import pytest

from benchmarks.convergence import NEGATIVE, POSITIVE, collate, length_summary, make_task, verdict


def majority(text: str) -> int:
    """The label read back from a text: each sentiment word counts for its polarity, flipped after "not"."""
    words, score = text.split(), 0
    for i, word in enumerate(words):
        sign = 1 if word in POSITIVE else -1 if word in NEGATIVE else 0
        if sign and i > 0 and words[i - 1] == "not":
            sign = -sign
        score += sign
    assert score != 0, text  # an odd number of mentions: never a tie
    return int(score > 0)


def test_task_is_deterministic_balanced_and_its_label_is_the_majority():
    rows = make_task(600, seed=0)
    assert rows == make_task(600, seed=0) and rows != make_task(600, seed=1)
    assert 0.4 < statistics.fmean(r["label"] for r in rows) < 0.6
    assert all(majority(r["text"]) == r["label"] for r in rows)
    # a close majority is common, and negated mentions too: one word does not decide the label
    assert sum(" not " in f" {r['text']} " for r in rows) > 0.5 * len(rows)


def test_task_lengths_are_skewed_with_a_long_tail():
    words = [len(r["text"].split()) for r in make_task(1000, seed=0)]
    s = length_summary(words)
    assert s["median"] <= 20 and s["mean"] > 1.3 * s["median"]  # most short, mean pulled up by the tail
    assert s["max"] >= 150 and s["p99"] >= 4 * s["median"]
    assert 0.005 <= s["fraction_over_128"] <= 0.05
    assert min(words) >= 3 + 3 and max(words) <= 230 + 2 * (3 + 2 * 230 // 15)


def test_length_summary():
    s = length_summary([1, 2, 3, 4, 200])
    assert (s["examples"], s["median"], s["max"], s["fraction_over_128"]) == (5, 3, 200, 0.2)
    assert s["mean"] == pytest.approx(42.0)


def test_verdict_passes_within_the_plain_loops_own_spread():
    plain = [0.50, 0.52, 0.48, 0.51, 0.49]
    v = verdict([x * 1.02 for x in plain], plain, [0.8] * 5, [0.79, 0.81, 0.8, 0.8, 0.8], held_out=400)
    sd = statistics.stdev(plain) / statistics.fmean(plain)
    assert v["loss_ratio_autofit_over_plain"] == pytest.approx(1.02)
    assert v["loss_tolerance"] == pytest.approx(2 * sd) and v["loss_ok"] and v["accuracy_ok"] and v["pass"]
    assert v["paired_loss_difference_mean"] == pytest.approx(0.02 * statistics.fmean(plain))


def test_verdict_fails_beyond_the_spread_and_on_lost_accuracy():
    plain = [0.50, 0.52, 0.48]
    worse = verdict([0.60, 0.62, 0.58], plain, [0.8] * 3, [0.8] * 3, held_out=400)
    assert not worse["loss_ok"] and not worse["pass"]
    better = verdict([0.40, 0.42, 0.38], plain, [0.8] * 3, [0.8] * 3, held_out=400)
    assert better["pass"] and not better["loss_within_noise_both_ways"]  # better is no failure, but is flagged
    # identical plain accuracies: the tolerance is one held-out example, not zero
    lost = verdict(plain, plain, [0.79] * 3, [0.8] * 3, held_out=200)
    assert lost["accuracy_tolerance"] == pytest.approx(1 / 200) and not lost["accuracy_ok"] and not lost["pass"]
    assert verdict(plain, plain, [0.796] * 3, [0.8] * 3, held_out=200)["accuracy_ok"]


def test_verdict_needs_two_paired_seeds():
    with pytest.raises(ValueError):
        verdict([0.5], [0.5], [0.8], [0.8], held_out=10)
    with pytest.raises(ValueError):
        verdict([0.5, 0.5], [0.5, 0.4, 0.6], [0.8] * 2, [0.8] * 3, held_out=10)


def test_collate_pads_to_the_longest_with_a_mask():
    b = collate([[101, 5, 102], [101, 102]], [1, 0])
    assert b["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]] and b["labels"].tolist() == [1, 0]
