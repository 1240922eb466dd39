"""`allformers serve`: the real `openai` client against a live server on 127.0.0.1 with tiny
random models (a 2-layer SmolLM2-shaped decoder, a 2-layer MiniLM-shaped encoder)."""
import base64
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from allformers import Config
from allformers.models import build_model
from allformers.serve.app import Served, create_app
from allformers.serve.engine import Engine
from allformers.tokenization import Tokenizer

from .serve_util import LiveServer, free_port, tiny_chat_model

MSG = [{"role": "user", "content": "Hello there, who are you?"}]


def tiny_encoder():
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = build_model(Config.from_name("all-minilm-l6-v2", n_layer=2, n_embd=32, n_head=2, intermediate_size=64,
                                         vocab_size=tok.vocab_size, block_size=128)).eval()
    model.tokenizer = tok
    return model, tok


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The engine's thread shares the cores with uvicorn and the test's client: with two torch
    threads on a busy 2-core machine every op waits for a core (20x slower steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server():
    model, tok = tiny_chat_model()
    enc, enc_tok = tiny_encoder()
    app = create_app([Served("tiny", model, tok, engine=Engine(model, tok, slots=16, max_len=256, max_queue=32)),
                      Served("tiny-embed", enc, enc_tok)])
    with LiveServer(app) as srv:
        srv.model, srv.tok = model, tok
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat(client, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model="tiny", messages=kw.pop("messages", MSG), **kw)


def stream_text(stream):
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# ---------------------------------------------------------------------- endpoints
def test_models_health_and_playground(server, client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "tiny-embed"}
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and {m["id"]: m["kind"] for m in health["models"]} == {"tiny": "chat",
                                                                                          "tiny-embed": "embedding"}
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and 'id="temperature"' in page.text


def test_chat_uses_the_chat_template(server, client):
    """A chat request is the completion of its rendered template, token for token."""
    r = chat(client, max_tokens=16)
    ids = server.tok.encode(server.tok.apply_chat_template(MSG, add_generation_prompt=True))
    c = client.completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == c.choices[0].text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length" and r.object == "chat.completion"


def test_streaming_chat_with_usage(client):
    full = chat(client, max_tokens=20).choices[0].message.content
    text, chunks = stream_text(chat(client, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert text == full
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 10  # really streamed
    _, plain = stream_text(chat(client, max_tokens=5, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices  # no usage chunk unless asked


def test_streaming_completion(client):
    full = client.completions.create(model="tiny", prompt="Once upon", max_tokens=15, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-1].usage.prompt_tokens == len("Once upon")


def test_stop_strings_are_held_back_and_never_streamed(client):
    full = chat(client, max_tokens=40).choices[0].message.content
    # a 3-character stop string (three tokens: one per byte) that first appears at position i >= 6
    i = next(i for i in range(6, len(full) - 3) if full.find(full[i:i + 3]) == i)
    stop = full[i:i + 3]
    r = chat(client, max_tokens=40, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == full[:i] and r.choices[0].finish_reason == "stop"
    text, chunks = stream_text(chat(client, max_tokens=40, stop=stop, stream=True))
    assert text == full[:i]
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert not any(stop in "".join(deltas[:k + 1]) for k in range(len(deltas)))  # never even partly sent
    assert chunks[-1].choices[0].finish_reason == "stop"
    c = client.completions.create(model="tiny", prompt="Hi", max_tokens=30, temperature=0)
    cut = c.choices[0].text[5:7]
    s = client.completions.create(model="tiny", prompt="Hi", max_tokens=30, temperature=0, stop=cut)
    assert s.choices[0].text == c.choices[0].text[:c.choices[0].text.find(cut)]


def test_n_choices_seed_and_sampling_parameters(client):
    r = chat(client, n=3, temperature=1.0, seed=11, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 30
    assert len({c.message.content for c in r.choices}) == 3  # each choice its own draw
    again = chat(client, n=3, temperature=1.0, seed=11, max_tokens=10)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded
    greedy = chat(client, max_tokens=10).choices[0].message.content
    assert {c.message.content for c in chat(client, n=2, max_tokens=10).choices} == {greedy}
    # top_k=1 and a tiny top_p leave only the most likely token: greedy, whatever the temperature
    assert chat(client, temperature=1.5, max_tokens=10, extra_body={"top_k": 1}).choices[0].message.content == greedy
    assert chat(client, temperature=1.5, top_p=1e-6, max_tokens=10).choices[0].message.content == greedy
    hot = {chat(client, temperature=2.0, max_tokens=10, seed=s).choices[0].message.content for s in range(3)}
    assert len(hot) == 3
    streamed = list(chat(client, n=2, temperature=1.0, seed=5, max_tokens=6, stream=True))
    by_choice = {}
    for c in streamed:
        for ch in c.choices:
            by_choice[ch.index] = by_choice.get(ch.index, "") + (ch.delta.content or "")
    assert by_choice == {i: c.message.content for i, c in
                         enumerate(chat(client, n=2, temperature=1.0, seed=5, max_tokens=6).choices)}


def test_presence_and_frequency_penalties_change_what_repeats(client):
    base = chat(client, max_tokens=60).choices[0].message.content
    freq = chat(client, max_tokens=60, frequency_penalty=2.0).choices[0].message.content
    pres = chat(client, max_tokens=60, presence_penalty=2.0).choices[0].message.content
    assert freq != base and pres != base
    most = lambda s: max(s.count(ch) for ch in set(s))  # noqa: E731
    assert most(freq) <= most(base) and len(set(pres)) >= len(set(base))
    anti = chat(client, max_tokens=60, frequency_penalty=-2.0).choices[0].message.content
    assert most(anti) > most(base)  # a negative penalty rewards repeats


def test_max_tokens_max_completion_tokens_logit_bias_and_echo(client):
    assert chat(client, max_tokens=None, max_completion_tokens=7).usage.completion_tokens == 7
    eos = chat(client, logit_bias={"258": 100})  # <|im_end|>: the model stops at once
    assert eos.choices[0].message.content == "" and eos.choices[0].finish_reason == "stop"
    assert chat(client, logit_bias={"65": 100}, max_tokens=5).choices[0].message.content == "AAAAA"
    e = client.completions.create(model="tiny", prompt="Echo me", max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model="tiny", prompt="Echo me", max_tokens=4, temperature=0)
    assert e.choices[0].text == "Echo me" + plain.choices[0].text
    default = client.completions.create(model="tiny", prompt="x", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_completion_prompt_shapes(server, client):
    tok = server.tok
    one = lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0)  # noqa: E731
    texts = [one(p).choices[0].text for p in ("abc", "hello")]
    batch = one(["abc", "hello"])
    assert [c.text for c in batch.choices] == texts and [c.index for c in batch.choices] == [0, 1]
    assert one(tok.encode("abc")).choices[0].text == texts[0]
    assert [c.text for c in one([tok.encode("abc"), tok.encode("hello")]).choices] == texts
    assert batch.usage.prompt_tokens == 8


def test_logprobs_chat_shape(client):
    r = chat(client, max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 8 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the top one
        assert t.top_logprobs[0].logprob == t.logprob <= 0
        assert [x.logprob for x in t.top_logprobs] == sorted([x.logprob for x in t.top_logprobs], reverse=True)
        assert t.bytes == list(t.token.encode())
    assert chat(client, max_tokens=3).choices[0].logprobs is None
    chunks = list(chat(client, max_tokens=8, logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == [t.logprob for t in content]


def test_logprobs_completions_shape(client):
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 6
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(6)]
    assert all(len(d) == 2 and max(d.values()) == v for d, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_embeddings(client):
    r = client.embeddings.create(model="tiny-embed", input=["a cat", "a dog", "a cat"])  # client default: base64
    vecs = torch.tensor([d.embedding for d in r.data])
    assert vecs.shape == (3, 32) and [d.index for d in r.data] == [0, 1, 2]
    assert torch.allclose(vecs.norm(dim=1), torch.ones(3), atol=1e-5)  # MiniLM-style: normalized
    assert torch.equal(vecs[0], vecs[2]) and not torch.equal(vecs[0], vecs[1])
    raw = httpx.post(str(client.base_url) + "embeddings", json={"model": "tiny-embed", "input": "a cat",
                                                                "encoding_format": "float"}).json()
    assert torch.allclose(torch.tensor(raw["data"][0]["embedding"]), vecs[0])
    b64 = httpx.post(str(client.base_url) + "embeddings", json={"model": "tiny-embed", "input": "a cat",
                                                                "encoding_format": "base64"}).json()
    unpacked = torch.frombuffer(bytearray(base64.b64decode(b64["data"][0]["embedding"])), dtype=torch.float32)
    assert torch.equal(unpacked, torch.tensor(raw["data"][0]["embedding"], dtype=torch.float32))
    assert r.usage.prompt_tokens == 5 + 5 + 5
    ids = client.embeddings.create(model="tiny-embed", input=[list(b"a cat")]).data[0].embedding
    assert torch.allclose(torch.tensor(ids), vecs[0], atol=1e-6)


def test_greedy_output_over_http_is_the_same_alone_and_16_at_once(server, client):
    """The guarantee through the whole stack: 16 different requests, one at a time and all at
    once (joining the running batch as they arrive): the same tokens and bit-identical logprobs."""
    prompts = [f"Request number {i}: " + "xyz" * (i % 5) for i in range(16)]

    def ask(p):
        r = client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0, logprobs=1)
        return r.choices[0].text, r.choices[0].logprobs.token_logprobs

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert len({t for t, _ in alone}) > 8


# ---------------------------------------------------------------------- capacity, disconnects, metrics
@pytest.fixture()
def one_slot():
    model, tok = tiny_chat_model()
    engine = Engine(model, tok, slots=1, max_len=256, max_queue=1)
    with LiveServer(create_app([Served("tiny", model, tok, engine=engine)])) as srv:
        srv.engine = engine
        yield srv


def wait_until(cond, timeout=20.0):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def long_request(url, stream=True):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 200, "temperature": 0, "stream": stream}
    return httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60)


def test_a_client_that_disconnects_frees_its_slot(one_slot, monkeypatch):
    url, engine = one_slot.url, one_slot.engine
    step = engine.step
    # >= 4 s a 200-token request: an idle machine would otherwise finish it inside the client's 0.3 s timeout
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])
    with long_request(url) as r:  # streaming: read two events, then hang up
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: ") for line in got) and engine.n_running == 1
    assert wait_until(lambda: engine.n_running == 0)
    assert engine.stats["finished_cancelled"] == 1 and engine.stats["generated_tokens"] < 200
    # non-streaming: the client gives up after a moment; the server notices and cancels
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 200},
                   timeout=httpx.Timeout(60, read=0.3))
    assert wait_until(lambda: engine.stats["finished_cancelled"] == 2 and engine.n_running == 0)
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 3}).json()
    assert r["usage"]["completion_tokens"] == 3  # the slot serves the next request


def test_a_full_queue_answers_429(one_slot, monkeypatch):
    url, engine = one_slot.url, one_slot.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])  # >= 4 s a request: no race
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with long_request(url) as a, long_request(url) as b:  # one runs, one waits: the bound (1 slot + 1 queued)
        lines = a.iter_lines(), b.iter_lines()  # kept: a dropped line iterator closes its connection
        next(lines[0]), next(lines[1])
        assert wait_until(lambda: engine.n_running == 1 and engine.n_waiting == 1)
        with pytest.raises(openai.RateLimitError) as e:
            chat(client)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        assert "at capacity" in e.value.body["message"] and e.value.response.headers["retry-after"] == "1"
    assert wait_until(lambda: engine.n_running == 0 and engine.n_waiting == 0)
    assert chat(client, max_tokens=2).usage.completion_tokens == 2


def test_metrics_are_prometheus_text(server, client):
    list(chat(client, max_tokens=4, stream=True))
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = lambda fam, **labels: next(s.value for s in families[fam].samples  # noqa: E731
                                       if all(s.labels.get(k) == v for k, v in labels.items()))
    assert value("allformers_generation_tokens", model="tiny") > 0
    assert value("allformers_prompt_tokens", model="tiny") > 0
    assert value("allformers_slots", model="tiny") == 16
    assert value("allformers_running_sequences", model="tiny") == 0
    assert families["allformers_time_to_first_token_seconds"].type == "histogram"
    assert any(s.name.endswith("_count") and s.value > 0 for s in families["allformers_inter_token_latency_seconds"].samples)
    assert value("allformers_http_responses", path="/v1/chat/completions", status="200") > 0


def test_api_key():
    model, tok = tiny_chat_model()
    app = create_app([Served("tiny", model, tok, engine=Engine(model, tok, slots=2, max_len=64))], api_key="s3cret")
    with LiveServer(app) as srv:
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        assert chat(good, max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError) as e:
            chat(bad)
        assert e.value.body["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/").status_code == 200


# ---------------------------------------------------------------------- bad requests
CHAT, COMP, EMB = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
OK_CHAT = {"model": "tiny", "messages": MSG}
BAD = {  # name: (path, body (dict, or raw bytes), expected status)
    "invalid JSON": (CHAT, b'{"model": "tiny", "messages": [}', 400),
    "body is a list": (CHAT, b"[1, 2]", 400),
    "empty body": (CHAT, b"", 400),
    "missing model": (CHAT, {"messages": MSG}, 400),
    "missing messages": (CHAT, {"model": "tiny"}, 400),
    "unknown model": (CHAT, {**OK_CHAT, "model": "gpt-17"}, 404),
    "model is a number": (CHAT, {**OK_CHAT, "model": 3}, 400),
    "no messages": (CHAT, {**OK_CHAT, "messages": []}, 400),
    "unknown role": (CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    "content is a number": (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": 42}]}, 400),
    "image content": (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    "message without role": (CHAT, {**OK_CHAT, "messages": [{"content": "hi"}]}, 400),
    "temperature too high": (CHAT, {**OK_CHAT, "temperature": 2.5}, 400),
    "temperature negative": (CHAT, {**OK_CHAT, "temperature": -0.1}, 400),
    "temperature a string": (CHAT, {**OK_CHAT, "temperature": "hot"}, 400),
    "top_p zero": (CHAT, {**OK_CHAT, "top_p": 0}, 400),
    "top_p above one": (CHAT, {**OK_CHAT, "top_p": 1.5}, 400),
    "top_k negative": (CHAT, {**OK_CHAT, "top_k": -5}, 400),
    "n zero": (CHAT, {**OK_CHAT, "n": 0}, 400),
    "n too large": (CHAT, {**OK_CHAT, "n": 100}, 400),
    "n a float": (CHAT, {**OK_CHAT, "n": 1.5}, 400),
    "max_tokens zero": (CHAT, {**OK_CHAT, "max_tokens": 0}, 400),
    "max_tokens a string": (CHAT, {**OK_CHAT, "max_tokens": "ten"}, 400),
    "max_tokens past the context": (CHAT, {**OK_CHAT, "max_tokens": 100000}, 400),
    "messages past the context": (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "x" * 400}]}, 400),
    "presence_penalty too high": (CHAT, {**OK_CHAT, "presence_penalty": 3}, 400),
    "frequency_penalty too low": (CHAT, {**OK_CHAT, "frequency_penalty": -3}, 400),
    "five stop strings": (CHAT, {**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400),
    "stop a number": (CHAT, {**OK_CHAT, "stop": 7}, 400),
    "top_logprobs too many": (CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 30}, 400),
    "top_logprobs without logprobs": (CHAT, {**OK_CHAT, "top_logprobs": 2}, 400),
    "logprobs an int in chat": (CHAT, {**OK_CHAT, "logprobs": 3}, 400),
    "unknown field": (CHAT, {**OK_CHAT, "frobnicate": True}, 400),
    "stream a string": (CHAT, {**OK_CHAT, "stream": "yes"}, 400),
    "stream_options wrong type": (CHAT, {**OK_CHAT, "stream": True, "stream_options": {"include_usage": "y"}}, 400),
    "logit_bias key not a token id": (CHAT, {**OK_CHAT, "logit_bias": {"abc": 1}}, 400),
    "logit_bias value too large": (CHAT, {**OK_CHAT, "logit_bias": {"65": 200}}, 400),
    "logit_bias token past the vocabulary": (CHAT, {**OK_CHAT, "logit_bias": {"99999": 1}}, 400),
    "seed a float": (CHAT, {**OK_CHAT, "seed": 1.5}, 400),
    "chat on an embedding model": (CHAT, {**OK_CHAT, "model": "tiny-embed"}, 400),
    "completion without prompt": (COMP, {"model": "tiny"}, 400),
    "prompt an object": (COMP, {"model": "tiny", "prompt": {"text": "hi"}}, 400),
    "prompt an empty list": (COMP, {"model": "tiny", "prompt": []}, 400),
    "prompt token past the vocabulary": (COMP, {"model": "tiny", "prompt": [1, 2, 100000]}, 400),
    "completion logprobs too many": (COMP, {"model": "tiny", "prompt": "hi", "logprobs": 10}, 400),
    "suffix": (COMP, {"model": "tiny", "prompt": "hi", "suffix": "bye"}, 400),
    "best_of other than n": (COMP, {"model": "tiny", "prompt": "hi", "best_of": 3}, 400),
    "echo with logprobs": (COMP, {"model": "tiny", "prompt": "hi", "echo": True, "logprobs": 1}, 400),
    "embeddings from a chat model": (EMB, {"model": "tiny", "input": "hi"}, 400),
    "embedding input empty list": (EMB, {"model": "tiny-embed", "input": []}, 400),
    "embedding input empty string": (EMB, {"model": "tiny-embed", "input": ""}, 400),
    "embedding encoding_format": (EMB, {"model": "tiny-embed", "input": "hi", "encoding_format": "hex"}, 400),
    "embedding dimensions": (EMB, {"model": "tiny-embed", "input": "hi", "dimensions": 7}, 400),
    "embedding input too long": (EMB, {"model": "tiny-embed", "input": "y" * 200}, 400),
    "GET on a POST endpoint": ("GET " + CHAT, None, 405),
    "unknown URL": ("/v1/nothing-here", {}, 404),
}


def test_bad_requests_get_openai_errors_and_the_server_still_serves(server, client):
    assert len(BAD) >= 30
    wrong = []
    for name, (path, body, status) in BAD.items():
        if path.startswith("GET "):
            r = httpx.get(server.url + path[4:])
        elif isinstance(body, bytes):
            r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = httpx.post(server.url + path, json=body)
        err = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
        shaped = (isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
                  and isinstance(err["message"], str) and len(err["message"]) > 10 and isinstance(err["type"], str))
        if r.status_code != status or not shaped:
            wrong.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not wrong, "\n".join(wrong)
    assert chat(client, max_tokens=3).usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as e:  # and the client sees OpenAI's fields
        chat(client, temperature=9)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSG)
    assert e.value.body["code"] == "model_not_found" and "tiny" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=100000)
    assert e.value.body["code"] == "context_length_exceeded" and "256 tokens" in e.value.body["message"]


# ---------------------------------------------------------------------- the command line
def test_allformers_serve_command(tmp_path):
    """`allformers serve ZOO-NAME` in its own process: random weights, bound to 127.0.0.1."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "allformers.cli.main", "serve", "gpt2", "--override", "n_layer=1",
                             "--override", "n_embd=32", "--override", "n_head=2", "--port", str(port), "--slots", "2",
                             "--max-len", "64", "--threads", "1", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        ok = wait_until(lambda: _up(url), timeout=120)
        assert ok, proc.stderr.read() if proc.poll() is not None else "the server did not come up"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["gpt2"]
        r = client.completions.create(model="gpt2", prompt="hello", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("length", "stop")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[1]
    assert f"serving gpt2 on http://127.0.0.1:{port}" in out


def _up(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_smollm2_behind_the_server():
    """The real SmolLM2-135M-Instruct (bundled GGUF) and all-MiniLM-L6-v2 behind one server."""
    import allformers
    from allformers.zoo.assets import minilm_path, smollm2_gguf_path

    model = allformers.load(smollm2_gguf_path())
    minilm = allformers.load(minilm_path())
    engine = Engine(model, model.tokenizer, slots=8, max_len=512)
    app = create_app([Served("smollm2", model, model.tokenizer, engine=engine),
                      Served("minilm", minilm, minilm.tokenizer)])
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)
        q = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smollm2", messages=q, max_tokens=40, temperature=0)
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
        text, _ = stream_text(client.chat.completions.create(model="smollm2", messages=q, max_tokens=40,
                                                             temperature=0, stream=True))
        assert text == r.choices[0].message.content
        questions = ["What is 2 + 2?", "Name a primary color.", "What is the opposite of hot?",
                     "Which animal says moo?"]
        ask = lambda m: client.chat.completions.create(  # noqa: E731
            model="smollm2", messages=[{"role": "user", "content": m}], max_tokens=24, temperature=0,
            logprobs=True).choices[0]
        alone = [(c.message.content, [t.logprob for t in c.logprobs.content]) for c in map(ask, questions)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            together = [(c.message.content, [t.logprob for t in c.logprobs.content]) for c in pool.map(ask, questions)]
        # Texts are exact; a batch of four sums its matmuls in another order than one
        # request alone, so log-probabilities agree to float32 rounding, not bit for bit.
        assert [t for t, _ in together] == [t for t, _ in alone]
        for (_, lp_t), (_, lp_a) in zip(together, alone):
            assert len(lp_t) == len(lp_a)
            assert max(abs(x - y) for x, y in zip(lp_t, lp_a)) < 1e-4
        e = client.embeddings.create(model="minilm", input=["A man is eating food.", "A man is eating a piece of bread."])
        a, b = (torch.tensor(d.embedding) for d in e.data)
        assert abs(float(a @ b) - 0.755) < 0.01


def test_serve_command_errors_are_one_line(capsys):
    from allformers.cli.main import main

    assert main(["serve", "/no/such/model"]) == 2
    assert main(["serve", "gpt2", "--override", "n_layer"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "write KEY=VALUE" in err and "Traceback" not in err
