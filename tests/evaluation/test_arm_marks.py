"""Where the arms of an equal-compute experiment meet: the rule's pair fixes the main mark, and an
arm that stopped early meets its own pair at a smaller mark without moving the others' rows; arms
trained for different lengths meet at equal time through the longer run's time-mark snapshot."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.experiments.arms import evaluate_arms, mark_label, paired


def _run(root: Path, name: str, flops_per_image: float, marks: list[float], final: int,
         time_marks: tuple[float, ...] = (), limit_s: float | None = None) -> dict:
    """A run folder as the loop leaves it (1,000 images a second): one snapshot per FLOP mark
    and time mark reached, then the final model, each with its progress record (and, with
    ``limit_s``, the final model's training config holding that time limit)."""
    run = root / name

    def progress(d: Path, images: int) -> None:
        d.mkdir(parents=True)
        (d / "progress.json").write_text(json.dumps(
            {"images_seen": images, "train_seconds": images / 1000,
             "train_flops": images * flops_per_image}))

    at = [int(-(-m // flops_per_image)) for m in marks] + [int(t * 1000) + 1 for t in time_marks]
    for images in sorted(set(at)):
        if images <= final:
            progress(run / "snapshots" / f"{images:09d}", images)
    progress(run / "model", final)
    if limit_s is not None:  # the training config: its time limit and time marks
        (run / "model" / "config.json").write_text(json.dumps({"training": {
            "train": {"time_limit_s": limit_s},
            "checkpoint": {"snapshot_seconds": [t for t in time_marks if t < limit_s]}}}))
    return {"run_dir": str(run)}


def _evaluate(arm: str, key: str, model_dir: str, n: int, intervals: bool):
    images = int(key.split("@")[1])
    return {"n": n, "FD": 100 - images / 1000}, {"images": images}


def test_an_arm_that_stopped_early_meets_its_pair_at_its_own_mark(tmp_path):
    marks = [1e4, 2e4, 4e4, 8e4]
    refs = {"dit": _run(tmp_path, "dit", 10.0, marks, 10_000),     # reaches 8e4 (1e5 FLOPs)
            "dimr": _run(tmp_path, "dimr", 10.0, marks, 9_000),    # reaches 8e4 (9e4)
            "unet": _run(tmp_path, "unet", 5.0, marks, 5_000),     # 2.5e4: reaches 2e4 only
            "adaln": _run(tmp_path, "adaln", 10.0, marks, 5_000)}  # 5e4: reaches 4e4
    pairs = [("dit", "dimr"), ("dit", "unet"), ("dit", "adaln"), ("dimr", "adaln")]
    rows, details, curves, mark, meet = evaluate_arms(
        refs, marks, "train_flops", "flops", _evaluate, 8, 4, pairs)

    assert mark == 8e4  # the rule's pair (dit, dimr), not the slowest arm, sets the main mark
    tags = {r["tag"]: r for r in rows}
    assert {t for t in tags if t.endswith("@flops")} == {"dit@flops", "dimr@flops"}
    at = {(a.split("@")[0], b.split("@")[0]): budget for a, b, budget in meet
          if budget != "time"}
    assert at == {("dit", "dimr"): "flops", ("dit", "unet"): "flops (20,000)",
                  ("dit", "adaln"): "flops (40,000)", ("dimr", "adaln"): "flops (40,000)"}
    # runs that recorded no time limit meet at their final models, as runs of one budget do
    assert [(a, b) for a, b, budget in meet if budget == "time"] == [
        (f"{a}@time", f"{b}@time") for a, b in pairs]
    for tag, m in [("unet@flops (20,000)", 2e4), ("dit@flops (20,000)", 2e4),
                   ("adaln@flops (40,000)", 4e4), ("dimr@flops (40,000)", 4e4)]:
        r = tags[tag]
        assert r["mark"] == m and m <= r["train_flops"] < m + 10, tag
        assert r["budget"] == tag.split("@")[1]
    assert "dit@flops (40,000)" in tags and len(rows) == 4 + 2 + 5  # time, main, pair rows
    assert all(len(curves[a]) >= 2 for a in refs)

    comps = paired({k: {**v, "intervals": {"metrics": {}}} for k, v in details.items()}, meet)
    assert [c["budget"] for c in comps] == ["time", "flops", "time", "flops (20,000)", "time",
                                            "flops (40,000)", "time", "flops (40,000)"]


def test_without_pairs_every_arm_meets_at_the_common_mark(tmp_path):
    refs = {"a": _run(tmp_path, "a", 1.0, [10, 20, 40], 50),
            "b": _run(tmp_path, "b", 1.0, [10, 20, 40], 30)}
    rows, _, _, mark, meet = evaluate_arms(refs, [10, 20, 40], "images_seen", "images",
                                           _evaluate, 8, 4)
    assert mark == 20 and meet == []
    assert {r["tag"] for r in rows} == {"a@time", "b@time", "a@images", "b@images"}


def test_runs_of_different_lengths_meet_at_equal_time_through_a_time_mark(tmp_path):
    marks, times = [1e4, 2e4], (2.0, 4.0)
    refs = {"a": _run(tmp_path, "a", 1.0, marks, 6_050, times, limit_s=6.0),
            "b": _run(tmp_path, "b", 1.0, marks, 4_050, times, limit_s=4.0),
            "c": _run(tmp_path, "c", 1.0, marks, 5_050, times, limit_s=5.0),
            "d": _run(tmp_path, "d", 1.0, marks, 4_020, times, limit_s=4.0)}
    pairs = [("a", "b"), ("b", "c"), ("a", "c"), ("b", "d")]
    rows, _, _, _, meet = evaluate_arms(refs, marks, "images_seen", "images", _evaluate, 8, 4,
                                        pairs)
    time = [(x, y) for x, y, budget in meet if budget == "time"]
    # b's 4 s budget: a's and c's snapshots at their 4 s time marks; d had the same budget
    # (final models); a has no 5 s mark, so a and c (6 and 5 s) do not meet at equal time
    assert time == [("a@time (4 s)", "b@time"), ("b@time", "c@time (4 s)"),
                    ("b@time", "d@time")]
    row = next(r for r in rows if r["tag"] == "a@time (4 s)")
    assert row["mark"] == 4.0 and 4.0 <= row["train_seconds"] < 4.05


def test_mark_labels():
    assert mark_label(1.25e16) == "1.25e16" and mark_label(7.5e16) == "7.5e16"
    assert mark_label(128000) == "128,000"
