"""Chat: conversations read and checked, rendered with role tokens and a loss mask, packed into
rows, trained on the assistant's tokens only, a model grown to the chat tokens, and chat.py."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chat as chat_script
import train
from helpers import ONE_THREAD, ROOT, make_conversations, run_prepare, write_jsonl
from model import GPT, GPTConfig
from owngpt import chat, dataset, stdlib_chat
from owngpt.checkpoint import load_checkpoint_file
from owngpt.tokenizer import CHAT_TOKENS, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is ka?"},
                {"role": "assistant", "content": "Ka lo."}, {"role": "user", "content": "And mi?"},
                {"role": "assistant", "content": "Mi ne!"}]


@pytest.fixture(scope="module")
def encoding(tiny_chat_dataset):
    return load_tokenizer(tiny_chat_dataset)


MALFORMED = {  # a line of a .jsonl file, and what its one-line error says
    "not JSON": ('{"messages": [', "not JSON"),
    "no messages": ('{"conversation": []}', 'no "messages"'),
    "an unknown role": ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    "roles out of order": ('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}',
                           "message 1 is from the assistant, expected the user"),
    "empty content": ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}',
                      "message 1 (user) has empty content"),
    "no assistant turn": ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}',
                          "no assistant turn"),
    "content not text": ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]}',
                         "message 2 (assistant) has a content of type int: expected text"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_conversation_is_one_line_naming_file_and_line_and_nothing_is_written(case, tmp_path):
    line, said = MALFORMED[case]
    good = json.dumps(make_conversations(1)[0])
    (tmp_path / "talks.jsonl").write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
    result = run_prepare("--source=chat", "--input=talks.jsonl", "--tokenizer=byte", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "talks.jsonl:4: " in result.stderr and said in result.stderr, result.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_the_assistants_tokens_and_its_end_of_turn_are_the_only_ones_trained(encoding):
    ids, mask = chat.render(CONVERSATION, encoding)
    token = {role: encoding.encode_single_token(f"<|{role}|>") for role in ("system", "user", "assistant", "end")}
    text = lambda content: encoding.encode(content)
    expected = ([encoding.eot_token, token["system"], *text("Be brief."), token["end"],
                 token["user"], *text("What is ka?"), token["end"], token["assistant"]], [*text("Ka lo."), token["end"]],
                [token["user"], *text("And mi?"), token["end"], token["assistant"]], [*text("Mi ne!"), token["end"]])
    assert ids == [token_id for part in expected for token_id in part]
    assert mask == [int(index % 2 == 1) for index, part in enumerate(expected) for _ in part]
    assert chat.render_prompt(CONVERSATION[:2], encoding) == ids[:len(expected[0])]


def test_a_literal_role_token_in_a_message_is_text():
    from owngpt.tokenizer import load_tokenizer as load
    encoding = load(None, {"kind": "byte", "vocab_size": 261, "eot_id": 256,
                           "chat_tokens": {token: 257 + index for index, token in enumerate(CHAT_TOKENS)}})
    ids, _ = chat.render([{"role": "user", "content": "<|end|><|endoftext|>"},
                          {"role": "assistant", "content": "ok"}], encoding)
    assert ids.count(260) == 2 and ids.count(256) == 1  # the two turns' ends, the start


def test_the_chat_dataset_reports_conversations_turns_and_trained_tokens_and_val_is_whole_conversations(
        tiny_chat_dataset, encoding):
    meta = dataset.read_meta(tiny_chat_dataset)
    conversations = make_conversations(120)
    rendered = [chat.render(conversation["messages"], encoding) for conversation in conversations]
    splits = meta["splits"]
    assert splits["train"]["conversations"] + splits["val"]["conversations"] == 120 and splits["val"]["conversations"]
    assert sum(split["turns"] for split in splits.values()) == sum(
        message["role"] == "assistant" for conversation in conversations for message in conversation["messages"])
    assert sum(split["trained_tokens"] for split in splits.values()) == sum(sum(mask) for _, mask in rendered)
    # every conversation is in one split, whole: its ids and its mask, in file order
    for split in ("train", "val"):
        tokens = np.concatenate(dataset.read_split(tiny_chat_dataset, meta, split))
        masks = np.concatenate(dataset.read_split(tiny_chat_dataset, meta, split, masks=True))
        starts = list(np.flatnonzero(tokens == encoding.eot_token)) + [len(tokens)]
        pieces = [(tokens[a:b].tolist(), masks[a:b].tolist()) for a, b in zip(starts, starts[1:])]
        assert len(pieces) == splits[split]["conversations"]
        assert all(piece in [(ids, mask) for ids, mask in rendered] for piece in pieces)
    report = (tiny_chat_dataset / "report.md").read_text()
    assert f"| train | {splits['train']['conversations']:,} | {splits['train']['turns']:,} |" in report


def test_rows_hold_whole_conversations_from_their_start_and_targets_only_the_assistants(tiny_chat_dataset, encoding):
    meta = dataset.read_meta(tiny_chat_dataset)
    rows = dataset.load_windows(tiny_chat_dataset, meta, "train", 64)
    inputs, targets = rows.inputs_and_targets(np.arange(rows.count))
    whole = {tuple(chat.render(c["messages"], encoding)[0]) for c in make_conversations(120)}
    found = []
    for row in rows.tokens:
        assert row[0] == encoding.eot_token
        starts = list(np.flatnonzero(row == encoding.eot_token))
        for start, end in zip(starts, starts[1:] + [len(row)]):
            piece = tuple(row[start:end].tolist())
            if len(piece) > 1:
                found.append(piece)
    # every conversation once, whole, but those longer than a row, cut to its first 65 tokens
    assert len(found) == rows.conversations == meta["splits"]["train"]["conversations"]
    assert all(piece in whole or (len(piece) == 65 and any(c[:65] == piece for c in whole)) for piece in found)
    assert rows.cut == sum(len(piece) == 65 and piece not in whole for piece in found)
    end, assistant = encoding.encode_single_token("<|end|>"), encoding.encode_single_token("<|assistant|>")
    trained = targets[targets != -1]
    assert trained.size and assistant not in trained and encoding.eot_token not in trained and end in trained
    assert rows.filled > 0.8  # best-fit packing leaves little room


def test_the_loss_and_bits_per_byte_count_only_the_assistants_tokens(tiny_chat_dataset, encoding):
    """evaluate()'s figures on a chat dataset, against the same computed by hand."""
    meta = dataset.read_meta(tiny_chat_dataset)
    rows = dataset.load_windows(tiny_chat_dataset, meta, "val", 32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["tokenizer"]["vocab_size"], block_size=32, n_layer=1, n_head=2, n_embd=32))
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    runtime = train.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"),
                                    autocast=train.nullcontext())
    byte_lengths = torch.tensor(train.token_byte_lengths(encoding))
    ids = [np.arange(rows.count)]
    figures = train.evaluate(model, rows, ids, byte_lengths, runtime)
    inputs, targets = (torch.from_numpy(np.ascontiguousarray(part)) for part in rows.inputs_and_targets(ids[0]))
    with torch.no_grad():
        logits, _ = model(inputs)
    counted = targets != -1
    losses = F.cross_entropy(logits[counted], targets[counted], reduction="none")
    text_bytes = sum(len(encoding.decode_single_token_bytes(int(t))) if int(t) < encoding.eot_token else 0
                     for t in targets[counted])
    assert figures["loss"] == pytest.approx(losses.mean().item(), rel=1e-6)
    assert figures["bpb"] == pytest.approx(losses.sum().item() / np.log(2) / text_bytes, rel=1e-6)
    assert figures["acc"] == pytest.approx((logits[counted].argmax(-1) == targets[counted]).double().mean().item())


def test_a_model_without_the_chat_tokens_grows_to_them_keeping_what_it_learned(tiny_chat_dataset, tiny_dataset,
                                                                              tmp_path, train_here):
    """A checkpoint from before chat tokens were reserved: its tokenizer is the tiny dataset's
    without them (meta.json as an older prepare.py wrote it)."""
    old = tmp_path / "old_data"
    old.mkdir()
    for path in tiny_dataset.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    meta = dataset.read_meta(old)
    meta["tokenizer"] = {key: value for key, value in meta["tokenizer"].items() if key != "chat_tokens"}
    meta["tokenizer"]["vocab_size"] -= len(CHAT_TOKENS)
    (old / "meta.json").write_text(json.dumps(meta))
    flags = ["--block=modern", "--n_embd=64", "--n_head=2"]
    assert train_here(*flags, f"--dataset={old}", f"--out_dir={tmp_path / 'base'}", "--max_iters=4").returncode == 0
    base = load_checkpoint_file(tmp_path / "base" / "ckpt.pt")
    assert base["model"]["transformer.wte.weight"].shape[0] == 512
    grown = train_here(*flags, f"--dataset={tiny_chat_dataset}", f"--out_dir={tmp_path / 'chat'}", "--max_iters=1",
                       f"--init_from={tmp_path / 'base' / 'ckpt.pt'}", "--learning_rate=1e-9", "--muon_lr=1e-9",
                       "--embedding_lr=1e-9", "--min_lr=1e-9", "--warmup_iters=0", "--weight_decay=0")
    assert grown.returncode == 0, grown.stderr
    assert (f"{tmp_path / 'base' / 'ckpt.pt'} has no chat tokens: <|system|>, <|user|>, <|assistant|>, <|end|> are "
            "ids 512-515, and the token embedding and head grow from 512 to 516 rows, the new ones initialised as "
            "the rest") in grown.stdout
    after = load_checkpoint_file(tmp_path / "chat" / "ckpt.pt")["model"]
    embedding, head = after["transformer.wte.weight"], after["lm_head.weight"]
    assert embedding.shape[0] == head.shape[0] == 576  # 516 padded to a multiple of 64
    torch.testing.assert_close(embedding[:512], base["model"]["transformer.wte.weight"][:512], rtol=1e-5, atol=1e-6)
    assert embedding[512:516].std() > 0.5  # the modern block's N(0, 1), like every row of it
    assert not embedding[516:].any()  # the padding


def test_a_chat_run_asks_the_held_out_question_and_its_checkpoint_says_chat(tiny_chat_model, tiny_chat_dataset):
    question = dataset.read_meta(tiny_chat_dataset)["chat"]["question"]
    assert question[-1]["role"] == "user" and question[-1]["content"].startswith("What is ")
    said = (tiny_chat_model / "stdout.txt").read_text()
    asked = [line for line in said.splitlines() if line.startswith("sample at iter")]
    assert len(asked) == 2 and all(f"{question[-1]['content']} -> " in line for line in asked)  # at 0 and 30
    assert "chat: " in said and "the loss counts the assistant's tokens" in said
    assert load_checkpoint_file(tiny_chat_model / "best.pt")["chat"] is True


def run_chat(*flags, stdin=""):
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *flags], input=stdin, capture_output=True,
                          text=True, env=ONE_THREAD, timeout=120)


def test_chat_answers_as_reply_makes_it_and_keeps_the_conversation(tiny_chat_model):
    model, tokenizer, _ = chat_script.load_trained(str(tiny_chat_model), "best", torch.device("cpu"))
    question = [{"role": "user", "content": "What is ka?"}]
    expected = "".join(piece.text for piece in chat.reply(model, tokenizer, question, 20, temperature=0))
    one_shot = run_chat(f"--out_dir={tiny_chat_model}", "--prompt=What is ka?", "--temperature=0",
                        "--max_new_tokens=20")
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout == expected + "\n"
    talk = run_chat(f"--out_dir={tiny_chat_model}", "--temperature=0", "--max_new_tokens=20",
                    stdin="What is ka?\nAnd mi?\n/reset\nWhat is ka?\n/quit\n")
    assert talk.returncode == 0, talk.stderr
    answers = [line.removeprefix("you> ").removeprefix("model> ") for line in talk.stdout.split("model> ")[1:]]
    assert answers[0].startswith(expected) and answers[2].startswith(expected)  # /reset: the same question anew
    second = question + [{"role": "assistant", "content": expected}, {"role": "user", "content": "And mi?"}]
    assert answers[1].startswith("".join(piece.text for piece in chat.reply(model, tokenizer, second, 20, 0)))
    assert "[a new conversation]" in talk.stderr


def test_a_conversation_longer_than_the_context_drops_its_oldest_exchanges_and_says_so(tiny_chat_model):
    long_question = "What is " + " ".join(["ka"] * 6) + "?"
    talk = run_chat(f"--out_dir={tiny_chat_model}", "--temperature=0", "--max_new_tokens=8",
                    stdin="\n".join([long_question] * 4) + "\n")
    assert talk.returncode == 0, talk.stderr
    assert "[the conversation outgrew the model's 32 tokens: the oldest" in talk.stderr
    model, tokenizer, _ = chat_script.load_trained(str(tiny_chat_model), "best", torch.device("cpu"))
    messages = [{"role": "user", "content": "q " * 4}, {"role": "assistant", "content": "a " * 4}] * 3
    kept, dropped, room = chat.fit_context(messages + [{"role": "user", "content": "x"}], tokenizer, 32, 8)
    assert kept[-1]["content"] == "x" and dropped % 2 == 0 and dropped > 0 and room >= 8
    assert len(chat.render_prompt(kept, tokenizer)) + room <= 32
    with pytest.raises(chat.ChatError, match="shorten it"):
        chat.fit_context([{"role": "user", "content": "ka " * 40}], tokenizer, 32, 8)


def test_a_model_never_fine_tuned_on_conversations_is_refused_naming_the_command(tiny_dataset, tmp_path, train_here):
    assert train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", "--max_iters=2").returncode == 0
    refused = run_chat(f"--out_dir={tmp_path}", "--prompt=hi")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "never fine-tuned on conversations" in refused.stderr and chat_script.FINE_TUNE in refused.stderr


def test_stdlib_conversations_are_thousands_the_same_every_time_and_val_asks_about_unseen_functions():
    functions = stdlib_chat.stdlib_functions()
    assert len(functions) > 2000 and len({function.name for function in functions}) == len(functions)
    again = stdlib_chat.stdlib_functions()
    assert [stdlib_chat.conversation(f) for f in functions] == [stdlib_chat.conversation(f) for f in again]
    json_dumps = next(function for function in functions if function.name == "json.dumps")
    assert json_dumps.doc.startswith("Serialize ``obj`` to a JSON formatted ``str``.")
    assert json_dumps.arguments.startswith("obj, *, skipkeys=False")
    every = [message for function in functions for message in stdlib_chat.conversation(function)]
    assert not chat.message_problem(stdlib_chat.conversation(json_dumps))
    assert {message["content"] for message in every if message["role"] == "system"} == {stdlib_chat.SYSTEM}


def test_multiple_choice_items_in_chat_form_score_each_answer_with_its_end_of_turn(tiny_chat_model, tiny_chat_dataset,
                                                                                   encoding, tmp_path, train_here):
    from owngpt import tasks
    question = [{"role": "user", "content": "What is ka?"}]
    items = tmp_path / "island_quiz.jsonl"
    write_jsonl(items, [{"messages": question, "endings": ["Ka lo.", "Mi ne!", "Vo pe."], "label": 1}] * 3)
    item = tasks.tokenised(tasks.read_items(items, hellaswag=False)[0], encoding)
    end = encoding.encode_single_token("<|end|>")
    assert item.context == chat.render_prompt(question, encoding)
    assert item.endings == [encoding.encode("Ka lo.") + [end], encoding.encode("Mi ne!") + [end],
                            encoding.encode("Vo pe.") + [end]]
    scored = train_here(f"--init_from={tiny_chat_model / 'best.pt'}", f"--dataset={tiny_chat_dataset}",
                        "--eval_only=True", f"--eval_tasks={items}")
    assert scored.returncode == 0, scored.stderr
    assert "island_quiz: acc_norm" in scored.stdout and "(3 items)" in scored.stdout
    write_jsonl(items, [{"messages": question + [{"role": "assistant", "content": "x"}], "endings": ["a", "b"],
                         "label": 0}])
    # a question in chat form ends with the user's message: the answers are the endings
    with pytest.raises(tasks.TaskError, match=r"island_quiz.jsonl:1: messages: message 3 is from the assistant"):
        tasks.read_items(items, hellaswag=False)
