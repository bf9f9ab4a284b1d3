"""Micro-batching: concurrent requests share forward passes, keep their order and their version."""

import asyncio
import threading

import pytest

from kftune.serving.batching import MicroBatcher, Overloaded


class Recorder:
    """A stand-in model version: records every forward batch it is given, answers with the text's length."""

    def __init__(self, version):
        self.version, self.batches = version, []
        self.lock = threading.Lock()

    def predict(self, texts, batch_size):
        with self.lock:
            self.batches.append(list(texts))
        return [{"n": len(t), "version": self.version} for t in texts]


def test_a_request_that_breaks_its_batch_fails_alone():
    class Fragile(Recorder):
        def predict(self, texts, batch_size):
            if "bad" in texts:
                raise ValueError("the tokenizer refused a text")
            return super().predict(texts, batch_size)

    async def main():
        batcher = MicroBatcher(max_batch=8, max_wait_ms=50)
        batcher.start()
        v1 = Fragile("1")
        results = await asyncio.gather(batcher.predict(v1, ["good", "ok"]), batcher.predict(v1, ["bad"]),
                                       batcher.predict(v1, ["fine"]), return_exceptions=True)
        waiting = batcher.waiting
        await batcher.close()
        return results, waiting

    (good, bad, fine), waiting = asyncio.run(main())
    assert [a["n"] for a in good] == [4, 2] and [a["n"] for a in fine] == [4]
    assert isinstance(bad, ValueError) and waiting == 0


def test_concurrent_requests_are_gathered_up_to_max_batch():
    async def main():
        batcher = MicroBatcher(max_batch=8, max_wait_ms=50)
        batcher.start()
        v1 = Recorder("1")
        results = await asyncio.gather(*[batcher.predict(v1, ["x" * i, "y" * (i + 1)]) for i in range(10)])
        await batcher.close()
        return v1, results

    v1, results = asyncio.run(main())
    assert [[a["n"] for a in r] for r in results] == [[i, i + 1] for i in range(10)], "answers in request order"
    assert len(v1.batches) < 10, "requests shared forward passes"
    assert sum(len(b) for b in v1.batches) == 20 and max(len(b) for b in v1.batches) <= 8 + 1


def test_requests_stay_on_the_version_they_arrived_on_and_close_drains():
    async def main():
        batcher = MicroBatcher(max_batch=64, max_wait_ms=30)
        batcher.start()
        old, new = Recorder("1"), Recorder("2")
        pending = [asyncio.ensure_future(batcher.predict(old if i % 2 else new, [f"t{i}"])) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.close()  # queued requests still finish
        return old, new, [p.result() for p in pending]

    old, new, results = asyncio.run(main())
    assert [r[0]["version"] for r in results] == ["2", "1", "2", "1", "2", "1"]
    assert all(t in ("t1", "t3", "t5") for b in old.batches for t in b)
    assert all(t in ("t0", "t2", "t4") for b in new.batches for t in b)


def test_a_burst_that_keeps_arriving_is_one_batch_and_a_lull_ends_it():
    async def main():
        batcher = MicroBatcher(max_batch=64, max_wait_ms=1000)  # wide: a loaded machine's stalls stay inside
        batcher.start()
        v1 = Recorder("1")

        async def arrive(i, at):
            await asyncio.sleep(at)
            return await batcher.predict(v1, [f"t{i}"])

        # 6 requests 300 ms apart (1.5 s in all, > max_wait: a fixed window would split them), then a lull
        burst = [arrive(i, 0.3 * i) for i in range(6)]
        await asyncio.gather(*burst, arrive(6, 5.0))
        await batcher.close()
        return v1

    v1 = asyncio.run(main())
    assert v1.batches == [[f"t{i}" for i in range(6)], ["t6"]]


def test_past_max_queue_a_request_is_refused_at_once_and_the_count_returns_to_zero():
    async def main():
        batcher = MicroBatcher(max_batch=64, max_wait_ms=100, max_queue=3)
        batcher.start()
        v1 = Recorder("1")
        first = asyncio.ensure_future(batcher.predict(v1, ["a", "b"]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="2 texts already waiting; the limit is serve.max_queue=3"):
            await batcher.predict(v1, ["c", "d"])
        fits = await batcher.predict(v1, ["e"])  # 2 + 1 <= 3: queued, and gathered with the first
        await first
        idle = batcher.waiting
        alone = await batcher.predict(v1, list("fghijk"))  # more than max_queue, but nothing waits: served
        await batcher.close()
        return v1, fits, idle, alone, batcher.waiting

    v1, fits, idle, alone, after = asyncio.run(main())
    assert v1.batches == [["a", "b", "e"], list("fghijk")] and fits == [{"n": 1, "version": "1"}]
    assert idle == 0 and after == 0 and len(alone) == 6
