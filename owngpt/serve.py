"""A chat model served over HTTP the way OpenAI's chat-completions API serves one, so that the
programs that speak that API (its Python package, curl, Open WebUI and other front-ends) talk
to a model owngpt trained; and, at /, a page where a person types and reads the answer as it
is made. chat.py runs it:

    python chat.py --out_dir=out/chat --serve                   # http://127.0.0.1:8000
    python chat.py --out_dir=out/chat --serve --host=0.0.0.0    # reachable from the network

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="out/chat", messages=[{"role": "user", "content": "What does x do?"}])

Routes, in the API's shapes (platform.openai.com/docs/api-reference/chat; llama.cpp's
llama-server and vLLM serve the same ones): POST /v1/chat/completions, GET /v1/models, GET /.
A request's messages, max_tokens (or max_completion_tokens), temperature, top_p, seed, stop
and stream are read; chat.py's flags give what a request leaves out (its --system, when a
request has no system message), --max_new_tokens is the most a request may ask for, and the
model name a request sends is not checked (there is one). The answer is owngpt.chat.reply's:
the same conversation and settings give chat.py's tokens. A conversation longer than the
model's context loses its oldest exchanges as chat.py's does (owngpt.chat.fit_context); one
whose last message alone does not fit is refused.

One generation at a time: requests are read in threads, and each waits for a lock around the
model, so none is refused and the cores are never split between answers. A client that goes
away, while it waits or while its answer is made, frees the model at the next token.
"""
import json
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

import torch

from owngpt import flags
from owngpt.chat import ROLES, ChatError, fit_context, render_prompt, reply
from owngpt.inference import SAMPLING_CHECKS

MAX_BODY_BYTES = 1 << 20  # a conversation a model reads (its block_size tokens) is far smaller
MAX_STOPS = 4  # as OpenAI's API
PAGE = (Path(__file__).parent / "chat_page.html").read_bytes()
TYPES = {"an integer": lambda value: type(value) is int, "a number": lambda value: type(value) in (int, float),
         "true or false": lambda value: type(value) is bool, "a string": lambda value: type(value) is str}


class RequestError(Exception):
    """A request answered with the API's error shape: the status, what is wrong, the field."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self):
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


class ClientGone(Exception):
    """The client closed its connection: its answer is not wanted any more."""


# ----------------------------------------------------------------------------- reading a request
def shown(value):
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def field(request, name, kind, default, check=None):
    """request[name], checked to be of kind (a key of TYPES) and to pass check; default if absent or null."""
    value = request.get(name)
    if value is None:
        return default
    problem = None if TYPES[kind](value) else kind
    problem = problem or (check(value) if check else None)
    if problem:
        raise RequestError(400, f"{name} is {shown(value)}: expected {problem}", name)
    return value


def conversation_of(messages):
    """The messages reply reads: each {"role": system, user or assistant, "content": a string},
    the last the user's, the one the model answers."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, f"messages is {'missing' if messages is None else shown(messages)}: expected a "
                                'list of {"role": "system" | "user" | "assistant", "content": "..."}', "messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} is {shown(message)}: expected an object with a role and a content", where)
        if message.get("role") not in ROLES:
            raise RequestError(400, f"{where}.role is {shown(message.get('role'))}: expected system, user or "
                                    "assistant", f"{where}.role")
        if not isinstance(message.get("content"), str):
            raise RequestError(400, f"{where}.content is {shown(message.get('content'))}: expected a string",
                               f"{where}.content")
    if messages[-1]["role"] != "user":
        raise RequestError(400, f"the last message is the {messages[-1]['role']}'s: expected the user's, which the "
                                "model answers", "messages")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def stops_of(stop):
    """stop as a list of strings, none empty: a string or a list of up to MAX_STOPS."""
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(text, str) and text
                                                                        for text in stops):
        raise RequestError(400, f"stop is {shown(stop)}: expected a string or a list of up to {MAX_STOPS} non-empty "
                                "strings", "stop")
    return stops


def read_request(body, settings):
    """(messages, options) of a request's body; chat.py's settings fill what it leaves out."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"the body is not JSON: {error}") from None
    if not isinstance(request, dict):
        raise RequestError(400, f"the body is {shown(request)}: expected a JSON object with messages")
    messages = conversation_of(request.get("messages"))
    if settings["system"] and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": settings["system"]})
    field(request, "model", "a string", None)
    field(request, "n", "an integer", 1, lambda n: None if n == 1 else "1: one answer a request")
    cap = settings["max_new_tokens"]
    most = lambda tokens: None if 1 <= tokens <= cap else f"from 1 to {cap}, this server's most (chat.py --max_new_tokens)"
    options = {
        "max_tokens": field(request, "max_completion_tokens", "an integer", None, most) or field(
            request, "max_tokens", "an integer", cap, most),
        "temperature": field(request, "temperature", "a number", settings["temperature"],
                             SAMPLING_CHECKS["temperature"]),
        "top_p": field(request, "top_p", "a number", settings["top_p"], SAMPLING_CHECKS["top_p"]),
        "seed": field(request, "seed", "an integer", None, flags.between(0, 2**64 - 1)),
        "stream": field(request, "stream", "true or false", False),
        "stops": stops_of(request["stop"]) if request.get("stop") is not None else [],
    }
    return messages, options


# ----------------------------------------------------------------------------- answering
def cut_at_stop(pieces, stops):
    """(text, tokens, finish) for each of reply's pieces: text that may be the start of a stop
    string waits until the next piece shows it is not; the answer ends before the first stop
    string, finish "stop". tokens: how many the piece's step made."""
    held = ""
    for piece in pieces:
        held += piece.text
        found = [held.index(stop) for stop in stops if stop in held]
        if found:
            yield held[:min(found)], len(piece.token_ids), "stop"
            return
        if piece.finish:
            yield held, len(piece.token_ids), piece.finish
            return
        waiting = max((size for stop in stops for size in range(1, len(stop)) if held.endswith(stop[:size])), default=0)
        yield held[:len(held) - waiting], len(piece.token_ids), None
        held = held[len(held) - waiting:]


def completion(name, text, finish, usage):
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "finish_reason": finish}], "usage": usage}


def chunk(answer_id, name, delta, finish=None, usage=None):
    """One server-sent event's data; the last, with finish_reason, carries the usage (as llama-server's)."""
    return {"id": answer_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": usage}


class Handler(BaseHTTPRequestHandler):
    server_version = "owngpt"

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def route(self, method):
        routes = {("GET", "/"): self.page, ("GET", "/v1/models"): self.models,
                  ("POST", "/v1/chat/completions"): self.chat_completion}
        path = urlsplit(self.path).path
        try:
            if (method, path) not in routes:
                raise RequestError(404, f"no {method} {path}: this server answers "
                                        f"{', '.join(' '.join(route) for route in routes)}", code="unknown_url")
            routes[method, path]()
        except RequestError as error:
            self.send(error.status, "application/json", json.dumps(error.body()).encode())
        except (ClientGone, ConnectionError):
            pass  # nobody left to answer

    def send(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def page(self):
        self.send(200, "text/html; charset=utf-8", PAGE)

    def models(self):
        listed = {"object": "list", "data": [{"id": self.server.name, "object": "model", "created": self.server.created,
                                              "owned_by": "owngpt"}]}
        self.send(200, "application/json", json.dumps(listed).encode())

    def body(self):
        """The request's body; 411 without a length, 413 past MAX_BODY_BYTES (left unread)."""
        try:
            length = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            raise RequestError(411, "no Content-Length header: send the body with its length") from None
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"the body is {length:,} bytes, more than this server's {MAX_BODY_BYTES:,}")
        return self.rfile.read(length)

    def client_gone(self):
        """Whether the client closed its connection: it sends nothing after its request (HTTP/1.0,
        one request a connection), so a socket with something to read has reached its end."""
        if not select.select([self.connection], [], [], 0)[0]:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except ConnectionError:
            return True

    def chat_completion(self):
        server = self.server
        messages, options = read_request(self.body(), server.settings)
        try:
            messages, dropped, max_tokens = fit_context(messages, server.encoding, server.model.config.block_size,
                                                        options["max_tokens"])
        except ChatError as error:
            raise RequestError(400, str(error), "messages", "context_length_exceeded") from None
        prompt_tokens = len(render_prompt(messages, server.encoding))
        asked = time.perf_counter()
        with server.lock:  # one generation at a time
            if self.client_gone():
                server.log("the client went away while it waited: not answered")
                raise ClientGone
            started = time.perf_counter()
            made, text, finish = self.answer(messages, max_tokens, options)
        server.log(f"answered: {prompt_tokens} tokens read, {made} made in {time.perf_counter() - started:.2f} s "
                   f"after {started - asked:.2f} s in line, finish {finish}"
                   + (f"; the oldest {dropped} messages dropped to fit the context" if dropped else ""))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": made, "total_tokens": prompt_tokens + made}
        if options["stream"]:
            self.send_event(chunk(self.answer_id, server.name, {}, finish, usage))
            self.wfile.write(b"data: [DONE]\n\n")
        else:
            self.send(200, "application/json", json.dumps(completion(server.name, text, finish, usage)).encode())

    def answer(self, messages, max_tokens, options):
        """(tokens made, text, finish) of reply, each piece streamed as it is made if asked; the
        generation stops at the first piece made after the client went away."""
        server = self.server
        generator = server.generator if options["seed"] is None else torch.Generator(
            server.generator.device).manual_seed(options["seed"])
        pieces = reply(server.model, server.encoding, messages, max_tokens, options["temperature"],
                       server.settings["top_k"] or None, options["top_p"], generator)
        if options["stream"]:
            self.start_stream()
        made, texts = 0, []
        try:
            for text, tokens, finish in cut_at_stop(pieces, options["stops"]):
                made += tokens
                if self.client_gone():
                    raise ClientGone
                if options["stream"] and text:
                    self.send_event(chunk(self.answer_id, server.name, {"content": text}))
                texts.append(text)
        except (ClientGone, ConnectionError):
            server.log(f"the client went away after {made} tokens: generation stopped")
            raise ClientGone from None
        return made, "".join(texts), finish

    def start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.answer_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.send_event(chunk(self.answer_id, self.server.name, {"role": "assistant", "content": ""}))

    def send_event(self, data):
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())


class ChatServer(ThreadingHTTPServer):
    """An HTTP server holding one chat model: a thread for each request, one generation at a time."""
    daemon_threads = True  # a client that never finishes its request does not keep the process alive
    # connections the kernel holds until they are accepted: a room's clients connect at once, and
    # socketserver's 5 has the rest reset (RESULTS.md: Serving a chat model)
    request_queue_size = 128

    def __init__(self, address, name, model, encoding, generator, settings):
        super().__init__(address, Handler)
        self.name, self.model, self.encoding, self.generator, self.settings = name, model, encoding, generator, settings
        self.lock = threading.Lock()
        self.created = int(time.time())

    def log(self, line):
        print(line, file=sys.stderr, flush=True)


def serve_model(name, model, encoding, generator, settings):
    """Answer on settings' host and port until Ctrl-C, after a line that says where."""
    try:
        server = ChatServer((settings["host"], settings["port"]), name, model, encoding, generator, settings)
    except OSError as error:
        raise flags.UserError(f"cannot listen on {settings['host']}:{settings['port']}: {error}") from None
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}"
    print(f"serving {name} at {url} (a chat page; OpenAI's API at {url}/v1), Ctrl-C stops it", flush=True)
    if not ip_address(host).is_loopback:
        print(f"--host={settings['host']}: reachable from the network, as you chose; anyone who can reach this "
              "machine can use the model", flush=True)
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
