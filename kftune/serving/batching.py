"""Micro-batching: concurrent requests share forward passes.

A request is queued with the model version it arrived on. One worker takes the first waiting
request, gathers more until `max_batch` texts or until none came for `max_wait_ms`, and runs each version's texts on
that version (sorted by length and padded per batch, in `ServedModel.predict`). A request that
started on the old version during a hot swap therefore finishes on it, and forward passes never run
concurrently with each other (torch already uses every core for one).

Load shedding: past `max_queue` texts waiting or in the forward pass, a request is refused at once
(`Overloaded`, a 503 with Retry-After) instead of queueing for longer than any client waits.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_WAITS = 8  # a batch waits at most this many serve.max_wait_ms for a burst to finish arriving


@dataclass
class _Job:
    served: object
    texts: list[str]
    future: asyncio.Future


class Overloaded(Exception):
    def __init__(self, waiting: int, limit: int):
        super().__init__(f"{waiting} texts already waiting; the limit is serve.max_queue={limit}")
        self.waiting, self.limit = waiting, limit


class MicroBatcher:
    def __init__(self, max_batch: int, max_wait_ms: float, on_batch=None, max_queue: int = 0):
        """on_batch(n_texts) is called after each forward batch group (for metrics); max_queue=0: no limit."""
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.waiting = 0  # texts queued or in the forward pass
        self.on_batch = on_batch or (lambda n: None)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kftune-predict")
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="kftune-batcher")

    async def predict(self, served, texts: list[str]) -> list[dict]:
        """The answers for `texts` from `served`, computed in a batch shared with concurrent requests."""
        if self._worker is None or self._worker.done():
            raise RuntimeError("the batcher is not running")
        if self.max_queue and self.waiting and self.waiting + len(texts) > self.max_queue:
            raise Overloaded(self.waiting, self.max_queue)
        self.waiting += len(texts)
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(served, texts, future))
        return await future

    async def close(self) -> None:
        """Finish every queued request, then stop."""
        if self._worker is not None and not self._worker.done():
            await self._queue.put(None)
            await self._worker
        self._executor.shutdown(wait=True)

    async def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """Jobs until max_batch texts, or until none arrived for max_wait (at most MAX_WAITS max_waits in all).

        The wait restarts at each arrival: answering a full batch sends its clients' next requests back
        as a burst that the event loop parses one by one, and a fixed window from the first arrival
        would cut that burst into a small batch and a large one.
        """
        jobs, n = [first], len(first.texts)
        loop = asyncio.get_running_loop()
        last_call = loop.time() + MAX_WAITS * self.max_wait
        while n < self.max_batch:
            if not self._queue.empty():
                job = self._queue.get_nowait()
            else:
                wait = min(self.max_wait, last_call - loop.time())
                if wait <= 0:
                    break
                try:  # asyncio.timeout, not wait_for: no task per arrival
                    async with asyncio.timeout(wait):
                        job = await self._queue.get()
                except TimeoutError:
                    break
            if job is None:
                return jobs, True
            jobs.append(job)
            n += len(job.texts)
        return jobs, False

    async def _run_alone(self, loop, job: _Job) -> None:
        """After a failed batch that `job` shared: its own texts again, then its answer or its error."""
        try:
            answers = await loop.run_in_executor(self._executor, job.served.predict, job.texts, self.max_batch)
        except Exception as exc:  # noqa: BLE001 - this request fails, the server keeps serving
            log.exception("prediction failed for a request of %d texts", len(job.texts))
            if not job.future.done():
                job.future.set_exception(exc)
            return
        self.on_batch(len(job.texts))
        if not job.future.done():
            job.future.set_result(answers)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            jobs, stop = await self._gather(first)
            by_model: dict[int, list[_Job]] = {}
            for job in jobs:
                by_model.setdefault(id(job.served), []).append(job)
            for group in by_model.values():
                texts = [t for job in group for t in job.texts]
                try:
                    answers = await loop.run_in_executor(self._executor, group[0].served.predict, texts, self.max_batch)
                except Exception as exc:  # noqa: BLE001 - only the request that fails gets the error
                    log.exception("prediction failed for a batch of %d texts from %d requests", len(texts), len(group))
                    for job in group:
                        if job.future.done():  # a client that went away gets no second pass
                            continue
                        if len(group) == 1:
                            job.future.set_exception(exc)
                        else:
                            await self._run_alone(loop, job)
                    self.waiting -= len(texts)
                    continue
                self.waiting -= len(texts)
                self.on_batch(len(texts))
                at = 0
                for job in group:
                    if not job.future.done():  # a client that went away cancelled its future
                        job.future.set_result(answers[at : at + len(job.texts)])
                    at += len(job.texts)
