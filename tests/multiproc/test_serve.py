"""`swiftdist serve` as a real process on a free local port, called through the official `openai` client."""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests import helpers
from tests.helpers import free_port, random_lora_adapter

pytestmark = pytest.mark.slow

KEY = "sk-test-key"
ASK = [{"role": "user", "content": "Who are you?"}]


class Server:
    def __init__(self, args: list[str], log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "swiftdist.cli", "serve", "--port", str(self.port), *args],
                                     env=helpers.test_env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        raise AssertionError("server did not come up:\n" + self.output())

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.log.close()

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def raw(self, body: bytes, key=KEY) -> tuple[int, dict]:
        """POST /v1/chat/completions with a body the openai client would never send."""
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    first = random_lora_adapter(tiny_llama, tmp / "first", seed=1)
    second = random_lora_adapter(tiny_llama, tmp / "second", seed=2)
    srv = Server(["--model", "tiny-llama", "--adapter", str(first), "--adapter", f"other={second}",
                  "--api-key", KEY, "--max-model-len", "256"], tmp / "serve.log")
    yield srv
    srv.stop()


def chat(client, model, **kw):
    return client.chat.completions.create(model=model, messages=ASK, max_tokens=8, temperature=0, **kw)


def test_models_and_chat(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["tiny-llama", "first", "other"]
    reply = chat(client, "first")
    assert reply.object == "chat.completion" and reply.model == "first"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    # A random model never emits end-of-turn within 8 tokens here: the answer is cut by max_tokens.
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 5
    assert chat(client, "first").choices[0].message.content == reply.choices[0].message.content  # greedy


def test_streaming_matches_the_plain_answer(server):
    client = server.client()
    plain = chat(client, "other").choices[0].message.content
    chunks = list(chat(client, "other", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it did stream
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_each_adapter_answers_differently(server):
    client = server.client()
    answers = {model: chat(client, model).choices[0].message.content for model in ("tiny-llama", "first", "other")}
    assert len(set(answers.values())) == 3, answers
    # Switching adapters back and forth leaves each one's answer unchanged.
    assert chat(client, "first").choices[0].message.content == answers["first"]
    assert chat(client, "tiny-llama").choices[0].message.content == answers["tiny-llama"]


def test_eight_concurrent_requests_are_all_answered(server):
    client = server.client()
    expected = {model: chat(client, model).choices[0].message.content for model in ("first", "other")}
    models = ["first", "other"] * 4
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda m: chat(client, m), models))
    # Each got its own adapter's answer, although the requests interleaved on one shared model.
    assert [r.choices[0].message.content for r in replies] == [expected[m] for m in models]


def test_a_client_that_goes_away_stops_its_generation(server):
    client = server.client()
    with client.chat.completions.with_streaming_response.create(
            model="first", messages=ASK, max_tokens=200, temperature=0, stream=True) as response:
        next(response.iter_lines())  # the answer has started; then the connection closes
    assert chat(client, "other").choices[0].message.content  # the model is free for the next request
    deadline = time.time() + 30
    while "the client went away" not in server.output() and time.time() < deadline:
        time.sleep(0.2)
    stopped = [line for line in server.output().splitlines() if "the client went away" in line]
    assert stopped, server.output()
    assert int(stopped[-1].split("stopped after ")[1].split()[0]) < 200


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": ASK}, 404, "model"),
    ({"model": "first", "messages": "Who are you?"}, 400, "messages"),
    ({"model": "first", "messages": []}, 400, "messages"),
    ({"model": "first", "messages": ASK, "temperature": 3}, 400, "temperature"),
    ({"model": "first", "messages": ASK, "temperature": "hot"}, 400, "temperature"),
    ({"model": "first", "messages": [{"role": "user", "content": "hi " * 400}]}, 400, "messages"),  # > 256 tokens
    ({"model": "first", "messages": ASK, "max_tokens": 1000}, 400, "messages"),  # prompt + 1000 > 256
    ({"model": "first", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "first", "messages": ASK, "n": 2}, 400, "n"),
    ({"messages": ASK}, 400, "model"),
])
def test_bad_requests_get_openai_style_json_errors(server, body, status, param):
    code, reply = server.raw(json.dumps(body).encode())
    assert code == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["param"] == param
    assert "Traceback" not in reply["error"]["message"]


def test_malformed_json_is_a_400(server):
    code, reply = server.raw(b"{not json")
    assert code == 400 and reply["error"]["type"] == "invalid_request_error"


def test_the_api_key_is_enforced(server):
    with pytest.raises(openai.AuthenticationError) as e:
        chat(server.client(key="wrong"), "first")
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert urllib.request.urlopen(server.url + "/health").status == 200  # health needs no key
    # The openai client maps our errors to its exception types.
    with pytest.raises(openai.NotFoundError):
        chat(server.client(), "nope")
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="first", messages=ASK, temperature=2.5)


def test_sigterm_stops_it_cleanly_during_a_request(tmp_path):
    srv = Server(["--model", "tiny-llama"], tmp_path / "serve.log")
    client = srv.client(key="unused")  # no --api-key: any key (or none) is accepted
    first_chunk, pieces = threading.Event(), []

    def read():
        stream = client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=400, temperature=0,
                                                stream=True)
        for chunk in stream:
            first_chunk.set()
            pieces.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    assert first_chunk.wait(30), srv.output()
    # SIGTERM with an answer in flight: the server lets it finish (within --shutdown-timeout), then exits 0.
    started = time.time()
    assert srv.stop() == 0, srv.output()
    reader.join(timeout=30)
    assert time.time() - started < 20
    assert pieces[-1].choices[0].finish_reason == "length", srv.output()  # the whole answer arrived
    assert "stopped" in srv.output() and "Traceback" not in srv.output()
