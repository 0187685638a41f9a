"""Where the arms of an equal-compute experiment meet: the rule's pair fixes the main mark, and an
arm that stopped early meets its own pair at a smaller mark without moving the others' rows."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.experiments.arms import evaluate_arms, mark_label, paired


def _run(root: Path, name: str, flops_per_image: float, marks: list[float], final: int
         ) -> dict:
    """A run folder as the loop leaves it: one snapshot per mark reached, then the final
    model, each with its progress record."""
    run = root / name

    def progress(d: Path, images: int) -> None:
        d.mkdir(parents=True)
        (d / "progress.json").write_text(json.dumps(
            {"images_seen": images, "train_seconds": images / 1000,
             "train_flops": images * flops_per_image}))

    for i, m in enumerate(marks):
        images = int(-(-m // flops_per_image))
        if images <= final:
            progress(run / "snapshots" / f"{i:03d}", images)
    progress(run / "model", final)
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
    rows, details, curves, mark, at = evaluate_arms(
        refs, marks, "train_flops", "flops", _evaluate, 8, 4, pairs)

    assert mark == 8e4  # the rule's pair (dit, dimr), not the slowest arm, sets the main mark
    tags = {r["tag"]: r for r in rows}
    assert {t for t in tags if t.endswith("@flops")} == {"dit@flops", "dimr@flops"}
    assert at == {("dit", "dimr"): "flops", ("dit", "unet"): "flops (20,000)",
                  ("dit", "adaln"): "flops (40,000)", ("dimr", "adaln"): "flops (40,000)"}
    for tag, m in [("unet@flops (20,000)", 2e4), ("dit@flops (20,000)", 2e4),
                   ("adaln@flops (40,000)", 4e4), ("dimr@flops (40,000)", 4e4)]:
        r = tags[tag]
        assert r["mark"] == m and m <= r["train_flops"] < m + 10, tag
        assert r["budget"] == tag.split("@")[1]
    assert "dit@flops (40,000)" in tags and len(rows) == 4 + 2 + 5  # time, main, pair rows
    assert all(len(curves[a]) >= 2 for a in refs)

    comps = paired({k: {**v, "intervals": {"metrics": {}}} for k, v in details.items()},
                   [(f"{a}@{at[a, b]}", f"{b}@{at[a, b]}", at[a, b]) for a, b in pairs])
    assert [c["budget"] for c in comps] == ["flops", "flops (20,000)", "flops (40,000)",
                                            "flops (40,000)"]


def test_without_pairs_every_arm_meets_at_the_common_mark(tmp_path):
    refs = {"a": _run(tmp_path, "a", 1.0, [10, 20, 40], 50),
            "b": _run(tmp_path, "b", 1.0, [10, 20, 40], 30)}
    rows, _, _, mark, at = evaluate_arms(refs, [10, 20, 40], "images_seen", "images",
                                         _evaluate, 8, 4)
    assert mark == 20 and at == {}
    assert {r["tag"] for r in rows} == {"a@time", "b@time", "a@images", "b@images"}


def test_mark_labels():
    assert mark_label(1.25e16) == "1.25e16" and mark_label(7.5e16) == "7.5e16"
    assert mark_label(128000) == "128,000"
