"""Pure logic of the batcher: packing, splitting failed batches, grouping requests."""

from __future__ import annotations

from concurrent.futures import wait

import numpy as np
import pytest

from embedq.encode.base import Tokenized
from embedq.errors import EncoderError
from embedq.worker.batcher import Batcher, encode_all, pack
from embedq.worker.cache import pack_vector, unpack_vector
from tests.helpers import DictCache, FakeAsyncEncoder, FakeEncoder


def test_pack_puts_every_position_in_exactly_one_batch():
    lengths = np.random.default_rng(0).integers(1, 257, size=1000)
    batches = pack(lengths, max_tokens=4096, max_items=64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))


def test_pack_respects_token_budget_and_item_cap():
    lengths = np.random.default_rng(1).integers(1, 257, size=500)
    for batch in pack(lengths, max_tokens=2048, max_items=32):
        assert lengths[batch].max() * len(batch) <= 2048
        assert len(batch) <= 32


def test_pack_sorts_longest_first_so_batches_pad_little():
    lengths = np.array([5, 100, 7, 99, 6, 98])
    batches = pack(lengths, max_tokens=300, max_items=10)
    assert [sorted(lengths[b].tolist()) for b in batches] == [[98, 99, 100], [5, 6, 7]]


def test_pack_gives_an_oversized_text_its_own_batch():
    batches = pack(np.array([600, 3, 3]), max_tokens=512, max_items=10)
    assert [b.tolist() for b in batches] == [[0], [1, 2]]


def test_pack_of_nothing_is_no_batches():
    assert pack(np.array([], dtype=np.int64), 512, 8) == []


def _tok(n: int) -> Tokenized:
    return Tokenized([[i] * (1 + i % 3) for i in range(n)], np.zeros(n, dtype=bool))


def test_out_of_memory_halves_the_batch_and_loses_nothing():
    encoder = FakeEncoder(oom_above=3)
    out = encode_all(encoder, _tok(16), True, max_tokens=1000, max_items=16)
    assert out.failed == {}
    assert out.vectors[:, 0].tolist() == list(range(16))
    assert max(encoder.batch_sizes) <= 3


def test_a_poisonous_text_fails_alone():
    encoder = FakeEncoder(poison=5)
    out = encode_all(encoder, _tok(16), True, max_tokens=1000, max_items=16)
    assert list(out.failed) == [5]
    assert "poisoned" in out.failed[5]
    good = [i for i in range(16) if i != 5]
    assert out.vectors[good, 0].tolist() == good


def test_the_next_batch_starts_before_the_last_is_fetched():
    encoder = FakeAsyncEncoder()
    out = encode_all(encoder, _tok(6), True, max_tokens=1000, max_items=2)
    assert out.vectors[:, 0].tolist() == list(range(6)) and out.failed == {}
    # Longest first: batches start at 5, 2 (lengths 3,3 then 2,2), then 0 and 3... as packed.
    kinds = [entry.split()[0] for entry in encoder.log]
    assert kinds == ["launch", "launch", "fetch", "launch", "fetch", "fetch"]


def test_a_batch_failing_late_or_early_is_redone_split_and_oom_is_reported():
    oom: list[int] = []
    late = FakeAsyncEncoder(poison=4)
    out = encode_all(late, _tok(8), True, max_tokens=1000, max_items=4)
    assert list(out.failed) == [4]
    early = FakeAsyncEncoder(oom_above=2)
    out = encode_all(early, _tok(8), True, 1000, 4, on_oom=lambda: oom.append(1))
    assert out.failed == {} and out.vectors[:, 0].tolist() == list(range(8))
    assert oom, "the tuner hears of the out-of-memory split"


def test_on_batch_reports_padded_cost():
    seen: list[tuple[int, int]] = []
    tok = Tokenized([[1] * 4, [2] * 2, [3] * 1], np.zeros(3, dtype=bool))
    encode_all(FakeEncoder(), tok, True, 100, 10, on_batch=lambda n, p, _t, _s: seen.append((n, p)))
    assert seen == [(3, 12)]


def test_cache_value_round_trips_with_truncation_flag():
    vector = np.arange(4, dtype=np.float32)
    for flag in (True, False):
        back, cut = unpack_vector(pack_vector(vector, flag))
        assert cut is flag
        np.testing.assert_array_equal(back, vector)


def test_batcher_groups_waiting_requests_and_restores_each_order():
    encoder = FakeEncoder()
    batcher = Batcher(encoder, DictCache(), wait_s=0.05, max_batch_size=64)
    futures = []
    for i in range(10):
        texts = [f"{10 * i + j} w" for j in range(3)][:: -1 if i % 2 else 1]
        futures.append((texts, batcher.submit(texts, normalize=True)))
    wait([f for _, f in futures], timeout=10)
    for texts, future in futures:
        rows = future.result().vectors
        assert rows[:, 0].tolist() == [int(t.split()[0]) for t in texts]
    assert batcher.stats.batches < 10
    batcher.close()


def test_batcher_fails_only_requests_that_hold_a_poisonous_text():
    batcher = Batcher(FakeEncoder(poison=7), DictCache(), wait_s=0.05, max_batch_size=64)
    bad = batcher.submit(["7 x", "8 y"], normalize=True)
    good = batcher.submit(["9 z"], normalize=True)
    with pytest.raises(EncoderError, match="1 of 2 texts"):
        bad.result(timeout=10)
    assert good.result(timeout=10).vectors[0, 0] == 9
    batcher.close()


def test_batcher_serves_repeats_from_its_cache():
    encoder = FakeEncoder()
    batcher = Batcher(encoder, DictCache(), wait_s=0.0, max_batch_size=64)
    batcher.submit(["1 a", "2 b", "1 a"], normalize=True).result(timeout=10)
    assert batcher.stats.texts_encoded == 2
    again = batcher.submit(["2 b", "1 a"], normalize=True).result(timeout=10)
    assert batcher.stats.texts_encoded == 2
    assert again.vectors[:, 0].tolist() == [2, 1]
    batcher.close()


def test_memory_cap_lowers_the_token_budget():
    from embedq.encode.base import Encoder

    class Sized(Encoder):
        max_seq_tokens = 256
        batch_tokens_setting = 4096

        def tokenize(self, texts):
            raise NotImplementedError

        def embed_ids(self, ids, normalize):
            raise NotImplementedError

        def bytes_per_token(self, seq_len):
            return 1000

    encoder = Sized()
    encoder.memory_cap = 10**9
    assert encoder.max_batch_tokens == 4096  # the setting binds
    encoder.memory_cap = 10**6
    assert encoder.max_batch_tokens == 1000  # the memory cap binds
    encoder.memory_cap = 10
    assert encoder.max_batch_tokens == 256  # never below one full-length text
