"""The shard streams split an epoch over ranks and loader workers with no sample duplicated or
dropped (counted), for more streams than shards and fewer, uneven shards included."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import write_shards  # noqa: E402

from training.streams import iter_stream, list_shard_urls  # noqa: E402


def _epoch(shards: list[str], g: int, n_streams: int) -> list[str]:
    """Stream g's keys in epoch 0 (it moves to epoch 1 after)."""
    keys = []
    for sample, _, (epoch, _, _) in iter_stream(shards, g, n_streams, seed=3, start=[0, 0, 0],
                                               flip=False):
        if epoch > 0:
            break
        keys.append(str(sample["key"]))
    return keys


@pytest.mark.parametrize(("sizes", "world", "workers"), [
    ([7, 5, 9, 3], 2, 1),      # more shards than streams, uneven
    ([7, 5, 9, 3], 2, 2),      # as many
    ([11, 6], 2, 2),           # fewer shards than streams: streams share a shard
    ([13], 3, 1),              # one shard, three ranks
], ids=["4-shards-2-ranks", "4-shards-4-streams", "2-shards-4-streams", "1-shard-3-ranks"])
def test_every_sample_is_seen_exactly_once_per_epoch_across_ranks(tmp_path, sizes, world,
                                                                  workers):
    keys = write_shards(tmp_path / "shards", sizes)
    shards = list_shard_urls(str(tmp_path / "shards"))
    n_streams = world * workers
    seen = Counter(k for g in range(n_streams) for k in _epoch(shards, g, n_streams))
    assert sum(seen.values()) == len(keys)  # nothing dropped or duplicated
    assert set(seen) == set(keys) and max(seen.values()) == 1
