"""Conversations: the format people have, rendered with role tokens for training and for chat.

    conversations = read_conversations(path)          # [(where, messages)], every line checked
    ids, mask = render(messages, encoding)            # mask 1: the assistant's tokens, which the loss trains
    prompt = render_prompt(messages, encoding)        # ends with <|assistant|>: the model answers next
    for piece in reply(model, encoding, messages, max_new_tokens=200, temperature=0):
        print(piece.text, end="")                     # as it is made; piece.token_ids, piece.finish

A conversation is OpenAI's and Hugging Face's chat format, one JSON object a line of a .jsonl file:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

An optional system message first, then user and assistant in turn, ending with the assistant.
Rendered (the way of ChatML and nanochat, with a token per role instead of role names in text):

    <|endoftext|><|system|>You are...<|end|><|user|>What does x do?<|end|><|assistant|>It...<|end|>

End-of-text begins it as it begins every document; each message's content is encoded on its own
(a literal "<|end|>" in it is plain text), between its role's token and <|end|>. Only the
assistant's content and its <|end|> count in the loss (nanochat: render_conversation): the model
learns to answer and to stop, not to write the user's questions. To ask, the prompt ends with
<|assistant|>, and the answer ends at the model's <|end|>. The chat template export.py writes
(CHAT_TEMPLATE) gives the same ids through the exported tokenizer, so transformers feeds the model
what chat.py feeds it.
"""
import codecs
import json
from dataclasses import dataclass

from owngpt.dataset import EOT
from owngpt.flags import UserError
from owngpt.tokenizer import CHAT_TOKENS

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END = "<|end|>"
assert CHAT_TOKENS == (*ROLE_TOKENS.values(), END)  # tokenizer.py reserves them in this order
FORMAT = '{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}'

# The Jinja template transformers' apply_chat_template runs (tokenizer_config.json's chat_template),
# so that it gives the ids render_prompt gives (with add_generation_prompt, the <|assistant|> it ends
# with). apply_chat_template renders the conversation to one string and tokenizes it, reading every
# "<|end|>" in it as the special token, where render encodes each content as plain text. So the
# template writes each "<|" of a content as "<" ESCAPE "|", which no special token matches (and each
# ESCAPE of a content doubled, so that none is ambiguous), and the tokenizer export.py writes undoes
# it before encoding the content (owngpt/hf.py: tokenizer_json). ESCAPE is a Unicode noncharacter,
# reserved for a program's own use, never in text people exchange.
ESCAPE = "\ufdd0"
CHAT_TEMPLATE = (
    EOT + "{% for message in messages %}"
    "{% if message['role'] not in " + repr(list(ROLES)) + " %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{{ message['content'] | replace('" + ESCAPE + "', '" + 2 * ESCAPE + "') | replace('<|', '<" + ESCAPE + "|') }}"
    "{{ '" + END + "' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "' }}{% endif %}")


class ChatError(UserError):
    """A conversation that does not follow the format: one line naming where and what."""


# ----------------------------------------------------------------------------- the tokens
def chat_token_ids(encoding):
    """{role or "end": id} of an encoding that has the chat tokens; ChatError otherwise."""
    missing = [token for token in CHAT_TOKENS if token not in encoding.special_tokens_set]
    if missing:
        raise ChatError(f"the tokenizer has no {', '.join(missing)}: it was made before chat tokens were reserved")
    return {**{role: encoding.encode_single_token(token) for role, token in ROLE_TOKENS.items()},
            "end": encoding.encode_single_token(END)}


# ----------------------------------------------------------------------------- reading
def message_problem(messages):
    """What is wrong with a conversation's messages, or None."""
    if not isinstance(messages, list) or not messages:
        return f"no messages: expected {FORMAT}"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {index + 1} is not an object with a role and a content: expected {FORMAT}"
        if message["role"] not in ROLES:
            return f"message {index + 1} has the unknown role {message['role']!r}: expected system, user or assistant"
        if not isinstance(message["content"], str):
            return (f"message {index + 1} ({message['role']}) has a content of type "
                    f"{type(message['content']).__name__}: expected text")
        if not message["content"].strip():
            return f"message {index + 1} ({message['role']}) has empty content"
    roles = [message["role"] for message in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    for index, (role, wanted) in enumerate(zip(turns, expected)):
        if role != wanted:
            number = index + 1 + (roles[0] == "system")
            return (f"message {number} is from the {role}, expected the {wanted}: an optional system message, "
                    "then user and assistant in turn")
    if "assistant" not in turns:
        return "no assistant turn: there is nothing to learn to answer"
    if turns[-1] != "assistant":
        return "it ends with the user's message: a conversation ends with the assistant's answer"
    return None


def read_conversations(path):
    """[(f"{path}:{line}", messages)] of a .jsonl file of conversations, every line checked: the
    first bad one is a ChatError naming the file and line."""
    conversations = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ChatError(f"{where}: not JSON ({error.msg} at column {error.colno}): expected {FORMAT}") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise ChatError(f"{where}: no \"messages\": expected {FORMAT}")
            problem = message_problem(record["messages"])
            if problem:
                raise ChatError(f"{where}: {problem}")
            conversations.append((where, [{"role": m["role"], "content": m["content"]} for m in record["messages"]]))
    return conversations


# ----------------------------------------------------------------------------- rendering
def render(messages, encoding):
    """(ids, mask) of a conversation: mask[i] is 1 where token i is the assistant's (its
    content and <|end|>), the targets the loss counts."""
    tokens = chat_token_ids(encoding)
    ids, mask = [encoding.eot_token], [0]
    for message in messages:
        content = encoding.encode(message["content"], disallowed_special=())
        trained = int(message["role"] == "assistant")
        ids += [tokens[message["role"]], *content, tokens["end"]]
        mask += [0] + [trained] * (len(content) + 1)
    return ids, mask


def render_prompt(messages, encoding):
    """The ids the model reads before it answers: the conversation so far (ending with the
    user's message), then <|assistant|>."""
    return render(messages, encoding)[0] + [chat_token_ids(encoding)["assistant"]]


def fit_context(messages, encoding, block_size, max_new_tokens):
    """(messages, dropped, answer_tokens): the conversation cut so that the model, which reads
    block_size tokens, has room for an answer of max_new_tokens, or at least of half its context:
    the oldest user/assistant exchanges go first (a system message stays; dropped counts the
    messages that went), and the answer may take what is left, up to max_new_tokens. The last
    user message must fit with the system message, else ChatError."""
    room = block_size - min(max_new_tokens, block_size // 2)
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    for start in range(0, len(turns), 2):
        kept = system + turns[start:]
        length = len(render_prompt(kept, encoding))
        if length <= room:
            return kept, start, min(max_new_tokens, block_size - length)
    raise ChatError(f"the last message is {len(render_prompt(system + turns[-1:], encoding))} tokens with the system "
                    f"message and the role tokens, more than the {room} the model can read before it answers "
                    f"(block_size {block_size}): shorten it")


# ----------------------------------------------------------------------------- answering
@dataclass
class Piece:
    token_ids: list  # the tokens made since the last piece
    text: str  # their text, whole characters only (a character split across tokens waits for the rest)
    finish: str | None = None  # on the last piece: "stop" (the model ended its answer) or "length"


def reply(model, encoding, messages, max_new_tokens, temperature=0.0, top_k=None, top_p=None, generator=None):
    """The assistant's answer to messages (ending with the user's), made token by token through
    the KV cache: yields a Piece per token, the last with finish set. The conversation must fit
    the context with max_new_tokens to spare (fit_context cuts it); the <|end|> that stops
    the answer is not in its text."""
    import torch  # here: prepare.py reads and renders conversations without torch
    end = chat_token_ids(encoding)["end"]
    device = next(model.parameters()).device
    prompt = torch.tensor([render_prompt(messages, encoding)], device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    made = 0
    for token in model.generate(prompt, max_new_tokens, temperature, top_k, top_p, generator, stop_token=end):
        token = int(token)
        made += 1
        if token == end:
            yield Piece([], decoder.decode(b"", final=True), "stop")
            return
        last = made == max_new_tokens
        text = decoder.decode(encoding.decode_single_token_bytes(token), final=last)
        yield Piece([token], text, "length" if last else None)
        if made == max_new_tokens:
            return
