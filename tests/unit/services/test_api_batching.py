"""Micro-batching of invoke requests: the batcher alone, then LocalModels on a real model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.api.batching import MicroBatcher
from services.api.inference import LocalModels
from services.api.shapes import InvokeRequest, ask_of, respond
from shared.settings import Settings
from shared.store import LocalStore
from tests.factories import make_jobs


def _slow_echo(calls: list[list[str]], gate: threading.Event | None = None):
    def run(requests: list[str]) -> list[str]:
        if gate is not None:
            gate.wait(5)
        calls.append(list(requests))
        return [r.upper() for r in requests]

    return run


def test_requests_arriving_while_a_batch_runs_form_the_next_batch():
    calls: list[list[str]] = []
    gate = threading.Event()
    batcher = MicroBatcher(_slow_echo(calls, gate), key=lambda r: 0, max_batch=8)
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(batcher.submit, "a")
        time.sleep(0.2)  # "a" is running alone, held by the gate
        rest = [pool.submit(batcher.submit, x) for x in "bcdef"]
        time.sleep(0.2)
        gate.set()
        assert first.result(5) == "A"
        assert [f.result(5) for f in rest] == list("BCDEF")
    batcher.close()
    assert calls[0] == ["a"]
    assert sorted(calls[1]) == list("bcdef")  # one batch of the five that waited
    assert batcher.batch_sizes == [1, 5]


def test_batches_never_exceed_max_batch_and_keys_are_not_mixed():
    calls: list[list[str]] = []
    gate = threading.Event()
    batcher = MicroBatcher(_slow_echo(calls, gate), key=lambda r: r[0], max_batch=3)
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(batcher.submit, f"{k}{n}") for k in "xy" for n in range(4)]
        time.sleep(0.3)
        gate.set()
        answers = [f.result(5) for f in futures]
    batcher.close()
    assert answers == [f"{k}{n}".upper() for k in "xy" for n in range(4)]
    assert all(len(c) <= 3 for c in calls)
    assert all(len({r[0] for r in c}) == 1 for c in calls)
    assert sorted(r for c in calls for r in c) == sorted(f"{k}{n}" for k in "xy" for n in range(4))


def test_a_failing_batch_fails_each_of_its_requests_and_the_batcher_goes_on():
    def run(requests: list[str]) -> list[str]:
        if "bad" in requests:
            raise ValueError("model exploded")
        return requests

    batcher = MicroBatcher(run, key=lambda r: 0, max_batch=4)
    with pytest.raises(ValueError, match="model exploded"):
        batcher.submit("bad")
    assert batcher.submit("good") == "good"
    batcher.close()


def test_a_lone_request_waits_only_when_asked_to():
    batcher = MicroBatcher(lambda rs: rs, key=lambda r: 0, max_batch=8)
    start = time.perf_counter()
    batcher.submit("x")
    assert time.perf_counter() - start < 0.1
    batcher.close()
    waiting = MicroBatcher(lambda rs: rs, key=lambda r: 0, max_batch=8, wait_s=0.3)
    start = time.perf_counter()
    waiting.submit("x")
    assert time.perf_counter() - start >= 0.3
    waiting.close()


@pytest.fixture
def local_models(published, tmp_path):
    ctx, _, event = published
    store = LocalStore(tmp_path / "store")
    store.upload_dir(ctx.store.path(ctx.store.key_of(event.location)), "models-data/tuned")
    jobs = make_jobs(Settings(var_dir=tmp_path), store)
    location = store.uri("models-data/tuned")
    jobs.register_model("tuned", {"name": "tuned", "target": "local", "location": location})

    def make(max_batch: int, max_seconds: float = 60.0) -> LocalModels:
        settings = Settings(var_dir=tmp_path)
        return LocalModels(jobs, settings, max_batch=max_batch, max_seconds=max_seconds)

    return make


PROMPTS = ["What is Asthma", "What is Gout", "What is Acromegaly of the pituitary", "What is X"]


def test_batched_greedy_answers_equal_one_at_a_time(local_models):
    requests = [
        InvokeRequest(prompt=p, max_gen_len=n, temperature=0.0)
        for p, n in zip(PROMPTS * 2, [4, 12, 8, 20, 1, 16, 6, 10], strict=True)
    ]
    single = local_models(1)
    alone = [single.invoke("tuned", r) for r in requests]
    batched_models = local_models(8)
    answers = batched_models.answer("tuned", [ask_of(r) for r in requests])  # rows padded
    together = [respond(r, a, "tuned") for r, a in zip(requests, answers, strict=True)]
    assert [a.model_dump() for a in together] == [a.model_dump() for a in alone]
    for answer, request in zip(together, requests, strict=True):
        assert answer.generation_token_count <= request.max_gen_len
        if answer.stop_reason == "length":
            assert answer.generation_token_count == request.max_gen_len
    # Through the batcher from many threads: same answers, fewer generate calls.
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda r: batched_models.invoke("tuned", r), requests * 3))
    assert [a.model_dump() for a in concurrent] == [a.model_dump() for a in alone * 3]
    sizes = batched_models._batchers["tuned"].batch_sizes
    assert sum(sizes) == len(requests) * 3 and max(sizes) > 1
    batched_models.forget("tuned")
    assert "tuned" not in batched_models._batchers


def test_a_long_invoke_is_cut_at_the_time_limit(local_models):
    """Issue 19: one invoke of 4,096 tokens ran 431 s inside the API with no limit."""
    models = local_models(1, max_seconds=0.5)
    models.invoke("tuned", InvokeRequest(prompt="What is Asthma", max_gen_len=1))  # loaded
    started = time.monotonic()
    answer = models.invoke("tuned", InvokeRequest(prompt="What is Asthma", max_gen_len=4096))
    assert time.monotonic() - started < 5
    assert answer.stop_reason == "length" and 0 < answer.generation_token_count < 4096
