"""The HTTP surface: the official `openai` client against a real `python -m engines serve` on a loopback port, and
the error paths in process (FastAPI's test client) where a server process would only be slower."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from engines import GenerationSettings, SamplingSettings, generate, make_runtime, open_export
from engines.serving import ChoiceSettings, Request, Scheduler
from engines.serving.app import ServerConfig, build_app
from tests.servertools import ServerProcess

MODEL = "tiny"


@pytest.fixture(scope="module")
def artifact(tiny_exports):
    return open_export(tiny_exports("fp32").folder)


@pytest.fixture(scope="module")
def runtime(artifact):
    return make_runtime(artifact, threads=1)


@pytest.fixture(scope="module")
def server(artifact):
    with ServerProcess(artifact.folder, "--served-model-name", MODEL, "--max-batch", "8") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def _greedy(runtime, artifact, prompt_ids, max_tokens, eos=None):
    tokens = generate(runtime, [prompt_ids], GenerationSettings(max_new_tokens=max_tokens, eos_token_id=eos)).tokens[0]
    finished_on_eos = tokens and tokens[-1] == artifact.spec.eos_token_id and eos is None
    return artifact.tokenizer.decode(tokens), ("stop" if finished_on_eos else "length"), len(tokens)


# --- the official client against a real server ------------------------------------------------------------------


def test_models_list_names_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize("prompt", ["Hello there", [15, 16, 17, 30]])
def test_greedy_completion_equals_generate(client, runtime, artifact, prompt):
    ids = artifact.tokenizer.encode(prompt).ids if isinstance(prompt, str) else prompt
    text, reason, count = _greedy(runtime, artifact, ids, 12)
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert response.object == "text_completion" and response.model == MODEL and response.id.startswith("cmpl-")
    assert [(c.index, c.text, c.finish_reason) for c in response.choices] == [(0, text, reason)]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), count)
    assert response.usage.total_tokens == len(ids) + count


def test_list_prompts_n_and_usage(client, runtime, artifact):
    prompts = ["Hi", "A longer prompt here"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]  # prompt p, sample j -> p * n + j
    ids = [artifact.tokenizer.encode(p).ids for p in prompts]
    alone = [_greedy(runtime, artifact, ids[c.index // 2], 6) for c in response.choices]
    assert [c.text for c in response.choices] == [text for text, _, _ in alone]  # greedy: every sample the same
    assert response.usage.prompt_tokens == sum(len(i) for i in ids)  # each prompt once, not once per sample
    assert response.usage.completion_tokens == sum(count for _, _, count in alone)  # summed over the choices


def test_token_id_prompts_batch(client, runtime, artifact):
    prompts = [[20, 21, 22], [40, 41]]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.text for c in response.choices] == [_greedy(runtime, artifact, p, 5)[0] for p in prompts]


def test_seeded_sampling_reproduces_and_equals_the_cli_loop(client, runtime, artifact):
    kwargs = dict(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0.8, top_p=0.9, seed=11,
                  extra_body={"top_k": 30, "ignore_eos": True})
    first, second = (client.completions.create(**kwargs) for _ in range(2))
    assert first.choices[0].text == second.choices[0].text
    sampling = SamplingSettings(do_sample=True, temperature=0.8, top_k=30, top_p=0.9)
    alone = generate(runtime, [artifact.tokenizer.encode("Once upon").ids],
                     GenerationSettings(max_new_tokens=10, sampling=sampling, seed=11, eos_token_id=-1))
    assert first.choices[0].text == artifact.tokenizer.decode(alone.tokens[0])


def test_echo_prepends_the_prompt(client, runtime, artifact):
    response = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=4, temperature=0, echo=True)
    text, _, _ = _greedy(runtime, artifact, artifact.tokenizer.encode("Echo me").ids, 4)
    assert response.choices[0].text == "Echo me" + text


def test_stop_string_cuts_the_text(client, runtime, artifact):
    full, _, _ = _greedy(runtime, artifact, artifact.tokenizer.encode("The quick brown fox").ids, 24, eos=-1)
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    response = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0,
                                         stop=[stop], extra_body={"ignore_eos": True})
    assert response.choices[0].text == full[:full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_stream_joins_to_the_plain_text_and_ends_with_usage(client, server):
    kwargs = dict(model=MODEL, prompt=["Stream this", "and this"], max_tokens=16, temperature=0, n=2)
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, reasons = ["" for _ in range(4)], [[] for _ in range(4)]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index].append(choice.finish_reason)
    assert texts == [c.text for c in plain.choices]
    assert reasons == [[c.finish_reason] for c in plain.choices]  # exactly one finish_reason per choice
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "raw", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])


def test_errors_have_openai_bodies_and_codes(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="other", prompt="x", max_tokens=1)
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens. However, you requested"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=400)
    for extra in ({"logprobs": 2}, {"presence_penalty": 0.5}, {"best_of": 3}, {"logit_bias": {"5": 1}}):
        with pytest.raises(openai.BadRequestError, match="not supported") as error:
            client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body=extra)
        assert error.value.body["param"] == next(iter(extra))
    with pytest.raises(openai.BadRequestError, match="top_p") as error:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, top_p=3)
    assert error.value.body["type"] == "invalid_request_error"


def test_sixteen_concurrent_greedy_requests_each_equal_their_batch_one_run(server, runtime, artifact):
    prompts = [f"request number {k} " + "x" * (k % 5) for k in range(16)]
    expected = [_greedy(runtime, artifact, artifact.tokenizer.encode(p).ids, 20, eos=-1)[0] for p in prompts]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(c.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0,
                                                               extra_body={"ignore_eos": True}) for p in prompts))

    before = server.metrics()
    responses = asyncio.run(run())
    after = server.metrics()
    assert [r.choices[0].text for r in responses] == expected
    steps = after["gptmeg:decode_steps_total"] - before["gptmeg:decode_steps_total"]
    rows = after["gptmeg:decode_rows_total"] - before["gptmeg:decode_rows_total"]
    assert rows / steps > 1.5  # they really ran batched


def test_api_key_is_required_when_set(artifact):
    with ServerProcess(artifact.folder, "--served-model-name", MODEL, env={"GPTMEG_API_KEY": "s3cret"}) as process:
        good = openai.OpenAI(base_url=process.base_url, api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0).choices
        bad = openai.OpenAI(base_url=process.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(f"{process.url}/health").status_code == 200  # probes need no key


# --- error paths in process --------------------------------------------------------------------------------------


class FailingOnce:
    """A runtime whose ``fail``-th step call raises; with ``gate``, every step first waits for it."""

    def __init__(self, runtime, fail: int, gate: threading.Event | None = None):
        self._runtime, self.fail, self.calls, self.gate = runtime, fail, 0, gate
        self.spec, self.name = runtime.spec, runtime.name

    def step(self, *args):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(30)
        if self.calls == self.fail:
            raise RuntimeError("device fell over")
        return self._runtime.step(*args)

    def __getattr__(self, name):
        return getattr(self._runtime, name)


@pytest.fixture
def app_client(artifact, runtime):
    made = []

    def make(run=None, **config):
        scheduler = Scheduler(run or runtime, artifact.tokenizer.decode,
                              max_waiting=config.pop("max_waiting", 64)).start()
        app = build_app(scheduler, artifact.tokenizer, ServerConfig(MODEL, **config))
        made.append(scheduler)
        return TestClient(app), scheduler

    yield make
    for scheduler in made:
        scheduler.stop()


def test_bad_fields_are_400_with_the_field_named(app_client):
    client, _ = app_client()
    cases = [
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "seed": -3}, "seed"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, 99999]}, "prompt"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": 3}, "prompt"),
    ]
    for body, param in cases:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (body, error)
    assert client.post("/v1/completions", content=b"{not json").status_code == 400
    ignored = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "temperature": 0, "whatever": 1})
    assert ignored.status_code == 200  # unknown fields are ignored (and logged)
    assert client.get("/v1/nowhere").json()["error"]["code"] == 404


def test_oversized_body_is_413(app_client):
    client, _ = app_client(max_body_bytes=1000)
    response = client.post("/v1/completions", json={"prompt": "x" * 2000})
    assert response.status_code == 413 and "at most 1000" in response.json()["error"]["message"]


def test_full_queue_is_429(app_client, runtime):
    gate = threading.Event()
    blocking = FailingOnce(runtime, fail=0, gate=gate)
    client, scheduler = app_client(blocking, max_waiting=2)
    assert client.post("/v1/completions", json={"prompt": "x", "n": 3}).status_code == 400  # can never fit
    scheduler.submit(Request([[5]], ChoiceSettings(max_new_tokens=1), lambda event: None))
    while blocking.calls == 0:  # the thread has taken it and waits in its step
        time.sleep(0.01)
    scheduler.submit(Request([[5]], ChoiceSettings(max_new_tokens=1), lambda event: None, n=2))  # 2 waiting: full
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    gate.set()
    assert response.status_code == 429 and response.json()["error"]["type"] == "overloaded_error"
    assert "retry later" in response.json()["error"]["message"]


def test_a_failing_step_is_a_500_then_the_next_request_succeeds(app_client, runtime):
    client, _ = app_client(FailingOnce(runtime, fail=3))
    failed = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, "temperature": 0,
                                                  "ignore_eos": True})
    assert failed.status_code == 500 and "device fell over" in failed.json()["error"]["message"]
    ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_failing_step_mid_stream_is_an_error_chunk(app_client, runtime):
    client, _ = app_client(FailingOnce(runtime, fail=3))
    body = {"prompt": "x", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert "device fell over" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"


def test_health_is_503_when_the_scheduler_thread_is_dead(app_client):
    client, scheduler = app_client()
    assert client.get("/health").status_code == 200
    scheduler.stop()
    response = client.get("/health")
    assert response.status_code == 503 and "not running" in response.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 503
    assert 'gptmeg:scheduler_alive 0.0' in client.get("/metrics").text


def test_the_server_process_never_loads_torch(server, client):
    client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0)  # every code path warmed
    maps = open(f"/proc/{server.process.pid}/maps").read()
    assert "libtorch" not in maps and "torch/_C" not in maps
