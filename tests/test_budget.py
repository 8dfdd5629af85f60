"""The adaptive token budget (pure logic: batches are described, not encoded)."""

from __future__ import annotations

from collections.abc import Callable

from embedq.worker.budget import SAMPLES_PER_STEP, BudgetTuner


def feed(tuner: BudgetTuner, tokens_per_s: Callable[[int], float], batches: int = 200) -> None:
    """Full batches at whatever budget the tuner asks for, as fast as the curve says."""
    for _ in range(batches):
        budget = tuner.budget
        tuner.observe(padded=budget, tokens=budget, seconds=budget / tokens_per_s(budget))


def peak_at(best: int) -> Callable[[int], float]:
    return lambda budget: 1000.0 / (1 + abs(budget.bit_length() - best.bit_length()))


def test_it_grows_to_the_fastest_budget_and_settles():
    tuner = BudgetTuner(budget=2048, floor=256, cap=65536)
    feed(tuner, peak_at(16384))
    assert tuner.settled and tuner.budget == 16384
    assert set(tuner.rates) >= {2048, 4096, 8192, 16384, 32768}


def test_it_shrinks_when_smaller_batches_are_faster():
    # CPUs: small batches win (cache locality).
    tuner = BudgetTuner(budget=4096, floor=256, cap=65536)
    feed(tuner, peak_at(1024))
    assert tuner.settled and tuner.budget == 1024


def test_a_flat_curve_keeps_the_starting_budget():
    tuner = BudgetTuner(budget=4096, floor=256, cap=65536)
    feed(tuner, lambda budget: 1000.0)
    assert tuner.settled and tuner.budget == 4096


def test_out_of_memory_halves_the_budget_and_lowers_the_cap_for_good():
    tuner = BudgetTuner(budget=32768, floor=256, cap=65536)
    tuner.too_big()
    assert (tuner.budget, tuner.cap) == (16384, 16384)
    feed(tuner, lambda budget: float(budget))  # bigger is always faster
    assert tuner.budget == 16384


def test_a_batch_over_the_latency_target_steps_down():
    tuner = BudgetTuner(budget=8192, floor=256, cap=65536, latency_target_s=0.5)
    tuner.observe(padded=8192, tokens=8000, seconds=0.9)
    assert tuner.budget == 4096 and tuner.cap == 4096


def test_small_batches_and_a_fixed_budget_teach_nothing():
    tuner = BudgetTuner(budget=4096, floor=256, cap=65536)
    for _ in range(10 * SAMPLES_PER_STEP):
        tuner.observe(padded=100, tokens=90, seconds=0.01)  # light traffic
    assert tuner.budget == 4096 and not tuner.rates
    fixed = BudgetTuner(budget=4096, floor=256, cap=65536, adaptive=False)
    feed(fixed, peak_at(16384))
    assert fixed.budget == 4096 and fixed.report()["adaptive"] is False


def test_the_budget_stays_between_floor_and_cap():
    tuner = BudgetTuner(budget=100_000, floor=256, cap=8192)
    assert tuner.budget == 8192
    feed(tuner, lambda budget: 1e6 / budget)  # smaller is always faster
    assert tuner.budget == 256
    assert tuner.report()["max_batch_tokens"] == 256


def test_a_worker_batcher_learns_its_budget_from_real_batches(runtime):
    from embedq.broker.client import connect
    from embedq.worker.batcher import Batcher
    from embedq.worker.cache import RedisCache
    from tests.helpers import unique_texts

    encoder = runtime.encoder
    batcher = Batcher(
        encoder, RedisCache(connect(), 60, 10), wait_s=0, max_batch_size=1024, adaptive=True
    )
    try:
        start = batcher.max_batch_tokens
        for _ in range(5):
            batcher.submit(unique_texts(1500, "budget"), normalize=True).result(timeout=300)
    finally:
        batcher.close()
    report = batcher.budget.report()
    print(f"\nlearned budget {report}")
    assert start == encoder.max_batch_tokens
    assert len(report["tokens_per_s"]) >= 2, "it measured more than one budget"
    assert encoder.max_seq_tokens <= batcher.max_batch_tokens <= encoder.max_fit_tokens
