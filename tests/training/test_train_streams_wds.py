"""The training stream as a webdataset pipeline: it yields what the plain per-shard loops it
replaced defined (same seed: same samples, flips and positions), resumes exactly from any
position and through the loader with several workers and with fewer shards than streams,
decodes each image as it yields it, and reads ``s3://`` shards through the storage layer."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from webdataset.tariterators import tar_file_expander

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import debug_config, write_shards  # noqa: E402

from common.shards import decode_rgb, iter_records  # noqa: E402
from training import streams  # noqa: E402
from training.data import ShardData  # noqa: E402
from training.streams import iter_stream, list_shard_urls, stream_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LAYOUTS = [([7, 5, 9, 3, 6], 2), ([7, 5, 9, 3, 6], 4), ([11, 6, 4], 4), ([13], 3)]
LAYOUT_IDS = ["5-shards-2-streams", "5-shards-4-streams", "3-shards-4-streams",
              "1-shard-3-streams"]


def _plain_plan(n: int, n_streams: int, g: int, seed: int, epoch: int) -> list[tuple]:
    perm = np.random.default_rng([seed, 11, epoch]).permutation(n)
    if n >= n_streams:
        return [(int(s), 1, 0) for s in perm[g::n_streams]]
    users = [h for h in range(n_streams) if h % n == g % n]
    return [(int(perm[g % n]), len(users), users.index(g))]


def _plain_stream(shards: list[str], g: int, n_streams: int, seed: int) -> Iterator[tuple]:
    """Stream g as the plain loops defined it: (key, label, image, flip, position)."""
    for epoch in itertools.count():
        for slot, (s, mod, res) in enumerate(_plain_plan(len(shards), n_streams, g, seed,
                                                         epoch)):
            recs = [r for i, r in enumerate(iter_records(shards[s])) if i % mod == res]
            rng = np.random.default_rng([seed, 13, epoch, s, g])
            order, flips = rng.permutation(len(recs)), rng.random(len(recs)) < 0.5
            for k, j in enumerate(order):
                yield (recs[j]["key"], recs[j]["label"], decode_rgb(recs[j]["data"]),
                       bool(flips[j]), [epoch, slot, k + 1])


def _ours(it: Iterator[tuple], n: int) -> list[tuple]:
    return [(x["key"], x["label"], x["image"], f, p) for x, f, p in itertools.islice(it, n)]


def _same(a: list[tuple], b: list[tuple]) -> None:
    assert [(k, y, f, p) for k, y, _, f, p in a] == [(k, y, f, p) for k, y, _, f, p in b]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("sizes", "n_streams"), LAYOUTS, ids=LAYOUT_IDS)
def test_the_pipeline_yields_what_the_plain_loops_defined(tmp_path, sizes, n_streams):
    write_shards(tmp_path, sizes)
    shards = list_shard_urls(str(tmp_path))
    n = 3 * sum(sizes) // n_streams  # about three epochs
    for g in range(n_streams):
        _same(_ours(iter_stream(shards, g, n_streams, 5, [0, 0, 0], flip=True), n),
              list(itertools.islice(_plain_stream(shards, g, n_streams, 5), n)))


@pytest.mark.parametrize(("sizes", "n_streams"), LAYOUTS, ids=LAYOUT_IDS)
def test_a_stream_resumed_at_any_position_goes_on_as_if_uninterrupted(tmp_path, sizes,
                                                                       n_streams):
    """Every position of the first two epochs, including the end of a stream's only shard of
    an epoch (with fewer shards than streams, every one of them)."""
    write_shards(tmp_path, sizes)
    shards = list_shard_urls(str(tmp_path))
    for g in range(n_streams):
        straight = _ours(iter_stream(shards, g, n_streams, 5, [0, 0, 0], flip=True),
                         2 * sum(sizes) // n_streams + 8)
        for k in range(len(straight) - 8):
            resumed = iter_stream(shards, g, n_streams, 5, straight[k][4], flip=True)
            _same(_ours(resumed, 8), straight[k + 1:k + 9])


def _batches(data: list[ShardData], n: int) -> list[dict]:
    return [d.batch(step, d.rank) for step in range(n) for d in data]


@pytest.mark.parametrize("sizes", [[7, 5, 9, 3, 6], [11, 6, 4]],
                         ids=["5-shards-4-streams", "3-shards-4-streams"])
def test_resume_is_exact_through_the_loader_with_workers(tmp_path, sizes):
    """Two ranks of two loader workers each (G = 4 streams), stopped after an odd number of
    batches (the resumed loader's worker 0 plays the other stream): the same next batches."""
    write_shards(tmp_path / "shards", sizes)
    cfg = debug_config(tmp_path, "data.source=shards", f"data.url={tmp_path / 'shards'}",
                       "data.num_workers=2")

    def ranks() -> list[ShardData]:
        return [ShardData(cfg, r, 2, 3, torch.device("cpu")) for r in range(2)]

    straight = _batches(ranks(), 12)
    first = ranks()
    _batches(first, 5)
    states = [d.state_dict() for d in first]
    resumed = ranks()
    assert all(d.load_state_dict(states, d.rank) is None for d in resumed)
    for a, b in zip(straight[10:], _batches(resumed, 7), strict=True):
        assert a["keys"] == b["keys"]
        torch.testing.assert_close(a["images"], b["images"], rtol=0, atol=0)
        torch.testing.assert_close(a["labels"], b["labels"])
    assert len({k for b in straight for k in b["keys"]}) == sum(sizes)  # epochs went by


def test_webdatasets_own_tar_expansion_gives_the_same_stream(tmp_path):
    write_shards(tmp_path, [7, 5, 9])
    shards = list_shard_urls(str(tmp_path))
    ours = stream_pipeline(shards, 5, 1, 2, 0, 1, [0, 0, 0], flip=True)
    theirs = stream_pipeline(shards, 5, 1, 2, 0, 1, [0, 0, 0], flip=True,
                             expand=tar_file_expander)
    assert isinstance(ours, wds.DataPipeline)
    a, b = list(itertools.islice(ours, 30)), list(itertools.islice(theirs, 30))
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))


def test_images_are_decoded_as_they_are_yielded(tmp_path, monkeypatch):
    write_shards(tmp_path, [40])
    decoded = []
    monkeypatch.setattr(streams, "decode_rgb", lambda data: decoded.append(1) or
                        decode_rgb(data))
    it = iter_stream(list_shard_urls(str(tmp_path)), 0, 1, 5, [0, 0, 0], flip=False)
    next(it), next(it)
    assert len(decoded) == 2  # not the shard's 40


def test_a_stream_of_too_few_samples_for_its_streams_fails_instead_of_hanging(tmp_path):
    write_shards(tmp_path, [2])
    with pytest.raises(RuntimeError, match="found no samples in a whole epoch"):
        next(iter_stream(list_shard_urls(str(tmp_path)), 2, 3, 5, [0, 0, 0], flip=False))


@pytest.mark.s3
def test_s3_shards_stream_through_the_storage_layer(s3_server, tmp_path):
    import boto3

    write_shards(tmp_path, [7, 5, 9])
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="prism-streams")
    for p in sorted(tmp_path.glob("*.tar")):
        s3.upload_file(str(p), "prism-streams", f"shards/{p.name}")
    remote = list_shard_urls("s3://prism-streams/shards")
    assert len(remote) == 3 and remote[0].startswith("s3://")
    for g in range(2):
        _same(_ours(iter_stream(remote, g, 2, 5, [1, 0, 2], flip=True), 20),
              _ours(iter_stream(list_shard_urls(str(tmp_path)), g, 2, 5, [1, 0, 2],
                                flip=True), 20))
