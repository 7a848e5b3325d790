"""chat.py --serve: OpenAI's chat-completions API and a chat page, spoken to by real clients (the
openai package, raw HTTP, headless Chromium) over real sockets, answering as owngpt.chat.reply does."""
import fcntl
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading

import openai  # a test-only dependency, installed as the README says
import pytest
import torch

import chat as chat_script
from helpers import ONE_THREAD, ROOT, cannot_run_here, wait_until
from owngpt import chat
from owngpt.serve import MAX_BODY_BYTES, ChatServer

pytestmark = pytest.mark.usefixtures("one_thread")

CAP = 24  # the server's --max_new_tokens: the most a request may ask for
QUESTION = [{"role": "user", "content": "What is ka?"}]


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    """(server, url): chat.py's Chat and owngpt.serve's server in this process, on a free port."""
    settings = {**chat_script.DEFAULTS, "out_dir": str(tiny_chat_model), "device": "cpu", "max_new_tokens": CAP}
    talk = chat_script.Chat(settings)
    server = ChatServer(("127.0.0.1", 0), "tiny", talk.model, talk.tokenizer, talk.generator, settings)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served[1]}/v1", api_key="unused", max_retries=0)


def expected(server, messages, max_tokens=CAP, temperature=0.0, seed=None):
    """(text, tokens, finish, prompt tokens) of owngpt.chat.reply, as chat.py makes an answer: the
    conversation cut to fit the context, the answer to what is left of it."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    messages, _, max_tokens = chat.fit_context(messages, server.encoding, server.model.config.block_size, max_tokens)
    pieces = list(chat.reply(server.model, server.encoding, messages, max_tokens, temperature,
                             server.settings["top_k"], server.settings["top_p"], generator))
    return ("".join(piece.text for piece in pieces), sum(len(piece.token_ids) for piece in pieces), pieces[-1].finish,
            len(chat.render_prompt(messages, server.encoding)))


def streamed(client, **request):
    """(text, chunks) of a streamed answer."""
    chunks = list(client.chat.completions.create(model="tiny", stream=True, **request))
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks), chunks


CONVERSATION = [{"role": "user", "content": "What is ka?"}, {"role": "assistant", "content": "Ka lo."},
                {"role": "user", "content": "And mi?"}]


@pytest.mark.parametrize("messages", [QUESTION, CONVERSATION], ids=["question", "conversation"])
def test_the_openai_client_gets_the_answer_chat_py_makes_streamed_and_not(served, client, messages):
    server, _ = served
    text, tokens, finish, prompt_tokens = expected(server, messages, max_tokens=6)
    assert prompt_tokens == len(chat.render_prompt(messages, server.encoding))  # the whole conversation fits
    answer = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=6)
    print(f"\nclient.chat.completions.create(model='tiny', messages={messages}, temperature=0, max_tokens=6)\n"
          f"-> {answer.model_dump_json()}")
    assert answer.object == "chat.completion" and answer.model == "tiny"
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == text
    assert answer.choices[0].finish_reason == finish
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        prompt_tokens, tokens, prompt_tokens + tokens)
    streamed_text, chunks = streamed(client, messages=messages, temperature=0, max_tokens=6)
    print("stream=True ->\n" + "\n".join(chunk.model_dump_json() for chunk in chunks))
    assert streamed_text == text
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"} and len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None] * (len(chunks) - 1) + [finish]
    assert chunks[-1].usage.completion_tokens == tokens and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert [model.id for model in client.models.list()] == ["tiny"]


def test_max_tokens_and_max_completion_tokens_end_the_answer_with_finish_length(served, client):
    text, tokens, finish, _ = expected(served[0], QUESTION, max_tokens=3)
    assert (tokens, finish) == (3, "length")
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        answer = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, **limit)
        assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (text, "length")
        assert streamed(client, messages=QUESTION, temperature=0, **limit)[0] == text


def test_an_answer_ends_before_a_stop_string_streamed_and_not(served, client):
    text = expected(served[0], QUESTION)[0]
    words = text.split(" ")
    assert len(words) > 3, text  # a stop string made of two tokens' text, from the middle of the answer
    stop = f"{words[1][-1]} {words[2][:2]}"
    before = text[:text.index(stop)]
    for request in ({"stop": stop}, {"stop": ["never said", stop]}):
        answer = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, **request)
        assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (before, "stop")
        streamed_text, chunks = streamed(client, messages=QUESTION, temperature=0, **request)
        assert (streamed_text, chunks[-1].choices[0].finish_reason) == (before, "stop")
    never = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, stop="never said")
    assert never.choices[0].message.content == text


def test_a_seed_gives_the_answer_reply_draws_with_it(served, client):
    text = expected(served[0], QUESTION, temperature=1.0, seed=7)[0]
    assert text != expected(served[0], QUESTION, temperature=1.0, seed=8)[0]  # the seed matters here
    for _ in range(2):
        answer = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=1.0, seed=7)
        assert answer.choices[0].message.content == text
    assert streamed(client, messages=QUESTION, temperature=1.0, seed=7)[0] == text


def test_a_conversation_longer_than_the_context_loses_its_oldest_exchanges_as_chat_py_does(served, client):
    server, _ = served
    exchange = [{"role": "user", "content": "What is ka lo mi?"}, {"role": "assistant", "content": "Ka lo mi ne ru."}]
    system = {"role": "system", "content": "Be brief."}
    messages = [system, *exchange * 3, {"role": "user", "content": "And mi?"}]
    kept, dropped, room = chat.fit_context(messages, server.encoding, server.model.config.block_size, 8)
    assert dropped and kept[0] == system
    answer = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    assert answer.choices[0].message.content == expected(server, kept, room)[0]
    assert answer.usage.prompt_tokens == len(chat.render_prompt(kept, server.encoding))


# ----------------------------------------------------------------------------- bad requests
def raw(url, data):
    """(status, body as JSON) of bytes sent as they are on a new connection; the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(body, path="/v1/chat/completions", method="POST", headers=None):
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Length": str(len(body)), **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *(f"{key}: {value}" for key, value in headers.items() if value)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


ASK = {"messages": QUESTION}
TOO_LONG = [{"role": "user", "content": "ka " * 40}]
BAD = {  # the request, and the status, param and a part of the message of its answer
    "malformed JSON": (post(b'{"messages": [}'), 400, None, "the body is not JSON: Expecting value"),
    "not an object": (post([1, 2]), 400, None, "the body is [1, 2]: expected a JSON object"),
    "no messages": (post({"model": "tiny"}), 400, "messages", "messages is missing"),
    "messages not a list": (post({"messages": "hi"}), 400, "messages", 'messages is "hi": expected a list'),
    "an unknown role": (post({"messages": [{"role": "robot", "content": "hi"}]}), 400, "messages[0].role",
                        'messages[0].role is "robot": expected system, user or assistant'),
    "content not a string": (post({"messages": [{"role": "user", "content": 3}]}), 400, "messages[0].content",
                             "messages[0].content is 3: expected a string"),
    "ends with the assistant": (post({"messages": QUESTION + [{"role": "assistant", "content": "Ka."}]}), 400,
                                "messages", "the last message is the assistant's: expected the user's"),
    "max_tokens a string": (post({**ASK, "max_tokens": "10"}), 400, "max_tokens",
                            'max_tokens is "10": expected an integer'),
    "max_tokens above the cap": (post({**ASK, "max_tokens": 5000}), 400, "max_tokens",
                                 f"max_tokens is 5000: expected from 1 to {CAP}, this server's most"),
    "max_completion_tokens 0": (post({**ASK, "max_completion_tokens": 0}), 400, "max_completion_tokens",
                                f"max_completion_tokens is 0: expected from 1 to {CAP}"),
    "a negative temperature": (post({**ASK, "temperature": -1}), 400, "temperature",
                               "temperature is -1: expected at least 0"),
    "top_p 0": (post({**ASK, "top_p": 0}), 400, "top_p", "top_p is 0: expected greater than 0 and at most 1"),
    "stream a string": (post({**ASK, "stream": "yes"}), 400, "stream", 'stream is "yes": expected true or false'),
    "stop a number": (post({**ASK, "stop": 5}), 400, "stop", "stop is 5: expected a string or a list"),
    "a negative seed": (post({**ASK, "seed": -1}), 400, "seed", "seed is -1: expected between 0 and"),
    "two answers": (post({**ASK, "n": 2}), 400, "n", "n is 2: expected 1: one answer a request"),
    "longer than the context": (post({"messages": TOO_LONG}), 400, "messages",
                                "more than the 16 the model can read before it answers"),
    "an unknown path": (post(ASK, path="/v1/completions"), 404, None,
                        "no POST /v1/completions: this server answers GET /, GET /v1/models, POST /v1/chat/completions"),
    "GET on the POST route": (post(b"", method="GET"), 404, None, "no GET /v1/chat/completions"),
    "a body over the limit": (post(b"", headers={"Content-Length": MAX_BODY_BYTES + 1}), 413, None,
                              f"the body is {MAX_BODY_BYTES + 1:,} bytes, more than this server's {MAX_BODY_BYTES:,}"),
    "no length": (post(b"", headers={"Content-Length": None}), 411, None, "no Content-Length header"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_gets_the_apis_error_shape_naming_the_field_and_the_server_goes_on(served, client, case):
    request, status, param, message = BAD[case]
    answer = raw(served[1], request)
    print(f"\n{case}: {answer[0]} {json.dumps(answer[1])}")
    assert answer[0] == status
    assert set(answer[1]) == {"error"} and set(answer[1]["error"]) == {"message", "type", "param", "code"}
    assert answer[1]["error"]["param"] == param and message in answer[1]["error"]["message"]
    assert answer[1]["error"]["type"] == "invalid_request_error"
    assert answer[1]["error"]["code"] == {"longer than the context": "context_length_exceeded",
                                          "an unknown path": "unknown_url",
                                          "GET on the POST route": "unknown_url"}.get(case)
    assert client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0).choices[0].message.content


# ----------------------------------------------------------------------------- clients that go away
def server_end_closed(port, client_port):
    """Whether the server's end of the connection from client_port has heard that the client
    closed: in /proc/net/tcp it has received the client's FIN (state 08, CLOSE_WAIT) or, where the
    client left data unread, its reset (then it is gone)."""
    ends = f"0100007F:{port:04X} 0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as table:
        states = {line.split()[3] for line in table if " ".join(line.split()[1:3]) == ends}
    return states <= {"08"}


def test_a_client_that_goes_away_mid_stream_stops_its_generation(served, client, capsys):
    """The client closes its connection once it has the first token; the model is held at the
    second until the server's end has seen the close: the generation makes that token, no other."""
    server = served[0]
    tokens = expected(server, QUESTION)[1]
    assert tokens > 2, "an answer long enough to cut"
    steps, connection, closed = [], socket.create_connection(("127.0.0.1", server.server_address[1])), threading.Event()
    client_port = connection.getsockname()[1]

    def hold_the_second_token(module, inputs):
        steps.append(None)
        if len(steps) == 2:
            assert closed.wait(60)
            wait_until(lambda: server_end_closed(server.server_address[1], client_port))

    hook = server.model.transformer.wte.register_forward_pre_hook(hold_the_second_token)
    try:
        connection.sendall(post({**ASK, "stream": True, "temperature": 0}))
        received = b""
        while b'"content": "' not in received.replace(b'"content": ""', b""):  # the first token's chunk
            received += connection.recv(65536)
        connection.close()
        closed.set()
        # the lock lets this answer start only once the first generation has ended
        assert client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=1)
    finally:
        hook.remove()
    assert "the client went away after 2 tokens: generation stopped" in capsys.readouterr().err
    assert len(steps) == 2 + 1  # the first generation's two steps, the second's one


def test_a_client_that_goes_away_while_it_waits_is_not_answered(served, client, capsys):
    server, said, steps = served[0], [], []
    hook = server.model.transformer.wte.register_forward_pre_hook(lambda module, inputs: steps.append(None))
    try:
        with server.lock:  # another generation holds the model
            connection = socket.create_connection(("127.0.0.1", server.server_address[1]))
            client_port = connection.getsockname()[1]
            connection.sendall(post({**ASK, "stream": True}))
            connection.close()
            wait_until(lambda: server_end_closed(server.server_address[1], client_port))
        assert client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=1)
        # the first request may reach the lock after the second: its thread says when it has
        wait_until(lambda: said.append(capsys.readouterr().err) or "went away while it waited" in "".join(said))
    finally:
        hook.remove()
    assert "the client went away while it waited: not answered" in "".join(said)
    assert len(steps) == 1  # only the second request's


def test_sixteen_clients_at_once_all_get_their_whole_answers(served):
    """Each draws its answer with a seed of its own: any answer crossed with another's shows."""
    questions = [[{"role": "user", "content": f"What is {word}?"}] for word in
                 "ka lo mi ne ru sa ti vo pe da gu hi ba zo fe wi".split()]
    answers, start = {}, threading.Barrier(len(questions))

    def ask(index):
        client = openai.OpenAI(base_url=f"{served[1]}/v1", api_key="unused", max_retries=0)
        start.wait()
        answers[index] = streamed(client, messages=questions[index], temperature=1.0, seed=index)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == list(range(len(questions)))
    for index, (text, chunks) in answers.items():
        assert text == expected(served[0], questions[index], temperature=1.0, seed=index)[0]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- chat.py --serve
@pytest.mark.slow  # a chat.py process: Python, torch and the model loaded anew
def test_chat_py_serve_says_where_it_listens_and_that_the_network_reaches_it_and_stops_on_ctrl_c(tiny_chat_model):
    server = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), f"--out_dir={tiny_chat_model}", "--serve",
                               "--host=0.0.0.0", "--port=0", "--temperature=0", "--max_new_tokens=8",
                               "--system=Be brief."],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    try:
        start, network = server.stdout.readline(), server.stdout.readline()
        assert start.startswith(f"serving {tiny_chat_model} at http://0.0.0.0:"), start
        assert network.startswith("--host=0.0.0.0: reachable from the network, as you chose"), network
        port = int(start.split("http://0.0.0.0:")[1].split(" ")[0])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model=str(tiny_chat_model), messages=QUESTION)  # the flags' defaults
        model, tokenizer, _ = chat_script.load_trained(str(tiny_chat_model), "best", torch.device("cpu"))
        with_system = [{"role": "system", "content": "Be brief."}, *QUESTION]
        assert answer.choices[0].message.content == "".join(piece.text for piece in chat.reply(
            model, tokenizer, with_system, 8, temperature=0))
        assert answer.usage.prompt_tokens == len(chat.render_prompt(with_system, tokenizer))
    finally:
        server.send_signal(signal.SIGINT)
        status = server.wait()
    assert status == 0 and "stopped" in server.stderr.read()


# ----------------------------------------------------------------------------- the page, in a browser
class Browser:
    """Headless Chromium driven over the DevTools protocol through a pipe (--remote-debugging-pipe:
    JSON messages ending in a NUL byte, commands read from fd 3, answers written to fd 4)."""

    def __init__(self, profile):
        commands_read, self.commands = os.pipe()
        self.answers, answers_write = os.pipe()
        # Chromium's ends, numbered apart from 3 and 4, which bash makes copies of them
        ends = [fcntl.fcntl(end, fcntl.F_DUPFD, 10) for end in (commands_read, answers_write)]
        chromium = ("exec chromium --headless --no-sandbox --disable-gpu --no-first-run --window-size=900,700 "
                    f"--user-data-dir={shlex.quote(str(profile))} --remote-debugging-pipe about:blank "
                    f"3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-")
        self.process = subprocess.Popen(["bash", "-c", chromium], pass_fds=ends, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        for end in (commands_read, answers_write, *ends):
            os.close(end)
        self.last_id, self.buffer = 0, b""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method, session=None, **params):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:  # events and other answers pass by
            while b"\0" not in self.buffer:
                assert select.select([self.answers], [], [], 60)[0], f"Chromium did not answer {method}"
                read = os.read(self.answers, 1 << 20)
                assert read, "Chromium closed its pipe"
                self.buffer += read
            message, _, self.buffer = self.buffer.partition(b"\0")
            answer = json.loads(message)
            if answer.get("id") == self.last_id:
                assert "error" not in answer, answer
                return answer["result"]

    def page(self, method, **params):
        return self.send(method, session=self.session, **params)

    def evaluate(self, expression):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self):
        self.process.kill()
        self.process.wait()
        os.close(self.commands)
        os.close(self.answers)


@pytest.mark.slow  # Chromium starts in seconds
def test_the_page_shows_the_answer_a_person_asked_for_in_a_browser(served, tmp_path):
    if not shutil.which("chromium"):
        cannot_run_here("no chromium: apt-get install -y chromium")
    server, url = served
    browser = Browser(tmp_path / "profile")
    try:
        browser.page("Page.navigate", url=url)
        wait_until(lambda: browser.evaluate("document.getElementById('model').textContent") == "tiny")
        browser.evaluate("document.getElementById('temperature').value = '0'; document.getElementById('question').focus()")
        browser.page("Input.insertText", text="What is ka?")
        for kind in ("keyDown", "keyUp"):
            browser.page("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
        wait_until(lambda: browser.evaluate("document.querySelectorAll('.note').length") == 1)
        shown = browser.evaluate("[...document.querySelectorAll('.message')].map(e => [e.className, e.textContent])")
        text, tokens, _, _ = expected(server, QUESTION)
        assert shown == [["message user", "What is ka?"], ["message assistant", text]]
        assert browser.evaluate("document.querySelector('.note').textContent").startswith(f"{tokens} tokens in ")
        assert browser.evaluate("document.body.dataset.state") == "ready"
    finally:
        browser.close()
