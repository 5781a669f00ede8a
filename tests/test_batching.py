"""Micro-batching in the HTTP service (`llmkd.serving.batching`): concurrent single requests are answered by
merged `recommend_batch` calls with exactly the results they would get alone, and a bad request fails alone."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="module")
def rec(served_run, tmp_path_factory):
    from llmkd.serving import Recommender
    from llmkd.serving.bundle import export_bundle

    return Recommender.from_pretrained(export_bundle(served_run[0], "student_text", tmp_path_factory.mktemp("mb") / "b"))


def requests(rec, n: int) -> list[tuple]:
    """n single requests over the catalog with assorted histories, k and options."""
    ids = rec.item_ids
    return [([ids[(7 * i + j) % len(ids)] for j in range(i % 6)], 3 + i % 4, [ids[i % len(ids)]] if i % 5 == 0 else None,
             i % 7 != 0, "error") for i in range(n)]


def same(got: list[dict], want: list[dict]) -> None:
    """Same items in the same order; scores equal up to float rounding (a batch's matrix products round
    differently from one row's)."""
    assert [g["items"] for g in got] == [w["items"] for w in want]
    for g, w in zip(got, want):
        assert g["scores"] == pytest.approx(w["scores"], rel=1e-5, abs=1e-6)


def test_concurrent_requests_are_merged_and_answered_as_alone(rec):
    from llmkd.serving.batching import MicroBatcher

    reqs = requests(rec, 40)
    batcher = MicroBatcher(rec, max_batch=16)

    async def main():
        return await asyncio.gather(*(batcher.recommend(*r) for r in reqs))

    got = asyncio.run(main())
    same(got, [rec.recommend(*r) for r in reqs])
    assert sum(batcher.batches) == len(reqs) and max(batcher.batches) > 1  # merged, all answered
    assert max(batcher.batches) <= 16


def test_a_bad_request_fails_alone(rec):
    from llmkd.serving.batching import MicroBatcher
    from llmkd.serving.recommender import BadRequest, UnknownItems

    reqs = requests(rec, 12)
    batcher = MicroBatcher(rec)

    async def main():
        bad = [batcher.recommend(["no-such-item"], 5), batcher.recommend(reqs[0][0], 0)]
        return await asyncio.gather(*bad, *(batcher.recommend(*r) for r in reqs), return_exceptions=True)

    unknown, bad_k, *good = asyncio.run(main())
    assert isinstance(unknown, UnknownItems) and unknown.ids == ["no-such-item"]
    assert isinstance(bad_k, BadRequest) and bad_k.field == "k"
    same(good, [rec.recommend(*r) for r in reqs])


def test_a_merged_call_that_fails_is_answered_one_by_one(rec, monkeypatch):
    """Should a merged call raise (a bug, or a request the early check let through), each request still
    gets its own answer: the good ones their results, the bad one its error."""
    from llmkd.serving.batching import MicroBatcher

    reqs = requests(rec, 6)
    batcher = MicroBatcher(rec)
    monkeypatch.setattr(rec, "check_request", lambda *a, **kw: None)  # let a bad request join the batch
    merged = rec.recommend_batch
    monkeypatch.setattr(rec, "recommend_batch", lambda hs, *a, **kw: 1 / 0 if len(hs) > 1 else merged(hs, *a, **kw))

    async def main():
        return await asyncio.gather(batcher.recommend(["no-such-item"], 3), *(batcher.recommend(*r) for r in reqs),
                                    return_exceptions=True)

    bad, *good = asyncio.run(main())
    assert isinstance(bad, Exception) and "no-such-item" in str(bad)
    assert max(batcher.batches) > 1  # the merged call was tried (and failed)
    monkeypatch.undo()
    same(good, [rec.recommend(*r) for r in reqs])


def test_past_max_queue_a_call_is_refused_at_once_and_the_accepted_ones_are_answered(rec):
    """With 4 calls held, a fifth raises `Overloaded` before any work; the 4 still get their answers, and
    once they are answered the queue takes calls again; `close` waits for what was accepted."""
    from llmkd.serving.batching import MicroBatcher, Overloaded

    batcher = MicroBatcher(rec, max_queue=4)
    reqs = requests(rec, 5)

    async def main():
        held = [asyncio.ensure_future(batcher.recommend(*r)) for r in reqs[:4]]
        await asyncio.sleep(0)  # each has taken its place in the queue
        assert batcher.pending == 4 and batcher.full
        with pytest.raises(Overloaded):
            await batcher.recommend(*reqs[4])
        got = await asyncio.gather(*held)
        assert batcher.pending == 0 and not batcher.full
        after = await batcher.recommend(*reqs[4])
        late = asyncio.ensure_future(batcher.recommend(*reqs[0]))
        await asyncio.sleep(0)
        await batcher.close()
        assert late.done() and late.result()["items"] == got[0]["items"]
        return got, after

    got, after = asyncio.run(main())
    same(got + [after], [rec.recommend(*r) for r in reqs])
