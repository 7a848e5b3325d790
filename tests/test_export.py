"""export.py and init_from=hf:: our gpt2-block models in the Hugging Face format and back.

transformers is a test-only dependency (.ci/run installs it): it is the judge of whether an
exported folder loads and computes what our model computes.
"""
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import torch

import export
from helpers import BYTE_TOKENIZER, GPT2_RECIPE, MODERN_RECIPE, ONE_THREAD, ROOT, run_sample, train_in_process
from model import GPT, GPTConfig
from owngpt import chat, hf
from owngpt.checkpoint import load_checkpoint_file
from owngpt.tokenizer import CHAT_TOKENS, load_tokenizer, python_split_regex

transformers = pytest.importorskip("transformers", reason="checking an export needs transformers "
                                   "(pip install transformers safetensors)")

pytestmark = pytest.mark.usefixtures("one_thread")
TRICKY_TEXT = "Hello wörld 🙂👍🏽 日本語のテキスト 中文 ok\n\n  x=1234567 <|endoftext|>def f(0x0010):\r\n\treturn"


# Each block and the transformers architecture that computes what it does; the modern block's
# recipe without value embeddings, which no transformers architecture has
EXPORTED_AS = {"gpt2": "GPT2LMHeadModel", "modern": "NanoChatForCausalLM"}
RECIPE_FLAGS = {"gpt2": GPT2_RECIPE, "modern": [*MODERN_RECIPE, "--value_embeddings=False"]}


@pytest.fixture(scope="module", params=list(EXPORTED_AS))
def exported(tiny_dataset, tmp_path_factory, request):
    """A model of each block (no biases, as train.py's default) trained 20 iterations on the
    tiny dataset, and its export. Returns (out_dir, dest)."""
    folder = tmp_path_factory.mktemp(f"export_{request.param}")
    out_dir, dest = folder / "out", folder / "hf"
    assert train_in_process(f"--dataset={tiny_dataset}", f"--out_dir={out_dir}", "--max_iters=20",
                            "--eval_interval=10", *RECIPE_FLAGS[request.param]) is None
    assert export.main([f"--out_dir={out_dir}", f"--dest={dest}"]) == 0
    return out_dir, dest


def our_model(out_dir):
    checkpoint = load_checkpoint_file(out_dir / "best.pt")
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), load_tokenizer(out_dir, checkpoint["tokenizer"])


def test_exported_model_computes_our_logits_and_greedy_tokens(exported):
    out_dir, dest = exported
    ours, encoder = our_model(out_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dest).eval()
    assert type(theirs).__name__ == EXPORTED_AS[ours.config.block]
    ids = torch.tensor([[encoder.eot_token] + encoder.encode("Kalo mi ne ruka sa ti vo.")])
    with torch.no_grad():
        difference = (ours(ids)[0] - theirs(ids).logits).abs().max().item()
    assert difference < 1e-4
    prompt = ids[:, :8]
    our_tokens = [int(token) for token in ours.generate(prompt, 20, temperature=0)]
    no_stop = transformers.GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=None)
    their_tokens = theirs.generate(prompt, generation_config=no_stop)[0, 8:].tolist()
    assert their_tokens == our_tokens


def test_exported_tokenizer_encodes_and_decodes_as_ours(exported):
    """The same ids on emoji, CJK, digits and white space. One difference, by design: the
    literal text <|endoftext|> is one special token to Hugging Face's tokenizer, plain text
    to ours (prepare.py encodes documents with disallowed_special=())."""
    out_dir, dest = exported
    _, encoder = our_model(out_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(dest)
    plain = TRICKY_TEXT.replace("<|endoftext|>", "")
    assert theirs(plain).input_ids == encoder.encode(plain, disallowed_special=())
    assert theirs.decode(theirs(plain).input_ids) == plain
    their_ids = theirs(TRICKY_TEXT).input_ids
    assert their_ids == encoder.encode(TRICKY_TEXT, allowed_special="all")
    assert their_ids.count(encoder.eot_token) == 1
    assert encoder.eot_token not in encoder.encode(TRICKY_TEXT, disallowed_special=())
    assert theirs.eos_token_id == theirs.bos_token_id == encoder.eot_token
    assert hf.read_tokenizer_json(dest).encode(TRICKY_TEXT, disallowed_special=()) == \
        encoder.encode(TRICKY_TEXT, disallowed_special=())


def test_exported_tokenizer_cuts_text_into_our_chunks(exported):
    """Whatever the vocabulary, the chunks BPE works within are ours: digits in threes, as
    tiktoken reads the possessive \\p{N}{1,3}+ (which Oniguruma would read as any run)."""
    theirs = transformers.AutoTokenizer.from_pretrained(exported[1]).backend_tokenizer.pre_tokenizer
    unspell = {char: byte for byte, char in hf.byte_to_char().items()}
    text = TRICKY_TEXT.replace("<|endoftext|>", "") + " 3.14159265 0x0010 \x1c\u00a0\u3000 x\u0301 e\u0301t\u00e9"
    their_chunks = [bytes(unspell[char] for char in piece).decode() for piece, _ in theirs.pre_tokenize_str(text)]
    assert their_chunks == python_split_regex().findall(text)
    assert "141" in their_chunks and "001" in their_chunks


def test_export_writes_the_folder_and_a_model_card(exported, tiny_dataset):
    out_dir, dest = exported
    assert sorted(path.name for path in dest.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((dest / "config.json").read_text())
    stored = hf.read_safetensors(dest / "model.safetensors")
    card = (dest / "README.md").read_text()
    assert f"It is a {config['architectures'][0]}" in card
    if config["model_type"] == "gpt2":
        assert (config["activation_function"], config["vocab_size"], config["n_positions"]) == ("gelu", 516, 32)
        assert "lm_head.weight" not in stored  # tied: stored once
        assert stored["transformer.wte.weight"].shape == (516, 32)  # the padding rows are not exported
        assert not stored["transformer.h.0.attn.c_attn.bias"].any()  # bias=False: zero biases
    else:
        assert (config["vocab_size"], config["max_position_embeddings"], config["intermediate_size"]) == (516, 32, 128)
        assert config["final_logit_softcapping"] is None and config["rms_norm_eps"] == torch.finfo(torch.float32).eps
        assert stored["model.embed_tokens.weight"].shape == stored["lm_head.weight"].shape == (516, 32)  # untied
    assert "tokens seen: 5,120" in card and "val loss" in card and "bits per byte" in card
    assert f"dataset: {tiny_dataset}" in card and "documents kept: 24" in card
    # a model that continues text: no chat template, generation ends at end-of-text, chat.py refuses it
    assert "chat_template" not in json.loads((dest / "tokenizer_config.json").read_text())
    assert json.loads((dest / "generation_config.json").read_text())["eos_token_id"] == 511
    assert json.loads((dest / "tokenizer.json").read_text())["normalizer"] is None
    assert hf.read_hf_folder(dest)["chat"] is False


def test_latest_exports_ckpt_pt_and_its_card_counts_the_tokens_it_saw(tmp_path):
    # two models: best.pt at iteration 10, ckpt.pt at 20, each of 4 sequences of 16 tokens in 2
    # micro-steps; no metrics.jsonl, so the card counts the tokens from the checkpoint's config
    config = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16, block="gpt2")
    for name, iteration in (("best.pt", 10), ("ckpt.pt", 20)):
        torch.manual_seed(iteration)
        torch.save({"model": GPT(config).state_dict(), "model_config": dataclasses.asdict(config),
                    "iter_num": iteration, "tokenizer": BYTE_TOKENIZER,
                    "config": {"batch_size": 4, "block_size": 16, "gradient_accumulation_steps": 2}}, tmp_path / name)
    assert export.main([f"--out_dir={tmp_path}", "--ckpt=latest", f"--dest={tmp_path / 'hf'}"]) == 0
    exported, latest = hf.read_hf_folder(tmp_path / "hf"), torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(exported["model"][name], tensor) for name, tensor in latest["model"].items())
    assert "- iterations: 20; tokens seen: 2,560" in (tmp_path / "hf" / "README.md").read_text()


def test_safetensors_written_here_read_by_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).bfloat16()}
    hf.write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    for read in (load_file(tmp_path / "x.safetensors"), hf.read_safetensors(tmp_path / "x.safetensors")):
        assert all(torch.equal(read[name], tensor) for name, tensor in tensors.items())


def test_value_embeddings_are_refused_naming_the_key(tmp_path, capsys):
    config = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16, block="modern",
                       value_embeddings=True)
    checkpoint = {"model": GPT(config).state_dict(), "model_config": vars(config),
                  "tokenizer": BYTE_TOKENIZER}
    torch.save(checkpoint, tmp_path / "best.pt")
    assert export.main([f"--out_dir={tmp_path}", f"--dest={tmp_path / 'hf'}"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "value_embeddings=True" in error and "value_embeddings=False" in error
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- init_from=hf:
def hf_gpt2(folder, vocab_size=512, activation="gelu", as_bin=False):
    """A random GPT2LMHeadModel saved by transformers in folder; returns the model."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     activation_function=activation, bos_token_id=vocab_size - 1,
                                     eos_token_id=vocab_size - 1)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # biases and norms too, so each one is checked
            parameter.normal_(0, 0.1)
    if as_bin:
        config.save_pretrained(folder)
        torch.save(model.state_dict(), Path(folder) / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("as_bin", [False, True], ids=["safetensors", "pytorch_model.bin"])
def test_hugging_face_gpt2_imports_with_the_same_logits(tmp_path, as_bin):
    theirs = hf_gpt2(tmp_path, as_bin=as_bin)
    assert (tmp_path / ("pytorch_model.bin" if as_bin else "model.safetensors")).is_file()
    checkpoint = hf.read_hf_folder(tmp_path)
    ours = GPT(GPTConfig(**checkpoint["model_config"])).eval()
    ours.load_state_dict(checkpoint["model"])
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert (ours(ids)[0] - theirs(ids).logits).abs().max() < 1e-4
    assert checkpoint["tokenizer"] == {"vocab_size": 512, "eot_id": 511}


def test_gpt2s_tanh_gelu_imports_with_a_note(tmp_path, capsys):
    theirs = hf_gpt2(tmp_path, activation="gelu_new")
    checkpoint = hf.read_hf_folder(tmp_path)
    assert "gelu_new" in capsys.readouterr().err
    ours = GPT(GPTConfig(**checkpoint["model_config"])).eval()
    ours.load_state_dict(checkpoint["model"])
    ids = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        assert 0 < (ours(ids)[0] - theirs(ids).logits).abs().max() < 1e-2


def test_init_from_hf_evaluates_and_fine_tunes(tiny_dataset, tiny_chat_dataset, tmp_path):
    """A GPT-2 folder with the tiny dataset's tokenizer but for its chat tokens (as exported before
    they were reserved) evaluates on its text, which never holds them, as it is; not on
    conversations, which do."""
    hf_gpt2(tmp_path / "gpt2")
    gpt2_shape = [*GPT2_RECIPE, f"--dataset={tiny_dataset}", f"--init_from=hf:{tmp_path / 'gpt2'}", "--bias=True"]
    assert train_in_process(*gpt2_shape, "--eval_only=True") is None
    error = train_in_process(*GPT2_RECIPE, "--bias=True", f"--dataset={tiny_chat_dataset}",
                             f"--init_from=hf:{tmp_path / 'gpt2'}", "--eval_only=True")
    assert "vocab_size is 512 there and 516 here" in error
    assert train_in_process(*gpt2_shape, f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--eval_interval=2") is None
    assert (tmp_path / "out" / "best.pt").is_file()
    error = train_in_process(*gpt2_shape[:-1], f"--out_dir={tmp_path / 'out2'}", "--max_iters=2")
    assert "bias=True" in error  # the config must have GPT-2's shape, biases included


def test_init_from_hf_refuses_a_dataset_with_another_tokenizer(tiny_dataset, tmp_path):
    hf_gpt2(tmp_path, vocab_size=600)
    error = train_in_process(*GPT2_RECIPE, "--bias=True", f"--dataset={tiny_dataset}", f"--init_from=hf:{tmp_path}",
                             "--eval_only=True")
    assert "vocab_size is 600 there and 516 here" in error and str(tmp_path) in error


def test_foreign_architecture_and_damaged_folders_are_clear_errors(tmp_path):
    hf_gpt2(tmp_path / "good")
    cases = {"llama": ("config.json", json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})),
             "truncated": ("model.safetensors", (tmp_path / "good" / "model.safetensors").read_bytes()[:1000]),
             "garbage": ("model.safetensors", "not a safetensors file at all"),
             "bad config": ("config.json", "{not json")}
    messages = {}
    for name, (file, content) in cases.items():
        shutil.copytree(tmp_path / "good", tmp_path / name)
        (tmp_path / name / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(hf.HFError) as error:
            hf.read_hf_folder(tmp_path / name)
        messages[name] = str(error.value)
    assert "holds a llama model (LlamaForCausalLM)" in messages["llama"] and "GPT-2" in messages["llama"]
    assert "not a readable safetensors file" in messages["truncated"]
    assert "not a readable safetensors file" in messages["garbage"]
    assert "config.json is not a GPT-2 config" in messages["bad config"]
    with pytest.raises(hf.HFError, match="no config.json"):
        hf.read_hf_folder(tmp_path)


@pytest.mark.slow
def test_sample_reads_an_exported_folder_as_it_reads_the_out_folder(exported):
    out_dir, dest = exported
    outputs = [run_sample(f"--out_dir={source}", "--temperature=0", "--max_new_tokens=30", "--start=Kalo",
                          "--device=cpu") for source in (out_dir, f"hf:{dest}")]
    assert [result.returncode for result in outputs] == [0, 0], outputs[1].stderr
    assert outputs[0].stdout == outputs[1].stdout and len(outputs[0].stdout) > len("Kalo\n")


def test_a_nanochat_folder_imports_with_the_same_logits_and_a_variant_we_do_not_compute_is_refused(tmp_path):
    config = transformers.NanoChatConfig(
        vocab_size=300, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=torch.finfo(torch.float32).eps,
        final_logit_softcapping=None, bos_token_id=299, eos_token_id=299, pad_token_id=299)
    torch.manual_seed(0)
    theirs = transformers.NanoChatForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "nanochat")
    checkpoint = hf.read_hf_folder(tmp_path / "nanochat")
    ours = GPT(GPTConfig(**checkpoint["model_config"])).eval()
    ours.load_state_dict(checkpoint["model"])
    ids = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        assert (ours(ids)[0] - theirs(ids).logits).abs().max() < 1e-4
    config.final_logit_softcapping = 15.0  # nanochat's own default: logits capped at 15
    config.save_pretrained(tmp_path / "nanochat")
    with pytest.raises(hf.HFError, match=r"not our modern block: final_logit_softcapping=15.0 \(ours: None\)"):
        hf.read_hf_folder(tmp_path / "nanochat")


# ----------------------------------------------------------------------------- a chat model
ESCAPE = chat.ESCAPE
CONVERSATIONS = [  # (messages so far, the assistant's answer)
    ([{"role": "user", "content": "What is ka?"}], "Ka lo."),
    ([{"role": "system", "content": "Hi.\n"}, {"role": "user", "content": " ka?"},
      {"role": "assistant", "content": "Lo 🙂"}, {"role": "user", "content": "mi?\n"}], "Mi ne!"),
    # the text of special tokens, and of the template's escape, is plain text in a message
    ([{"role": "user", "content": "a <|end|><|assistant|> b<|endoftext|>"}], "<|user|>x<|end|"),
    ([{"role": "system", "content": ESCAPE}, {"role": "user", "content": f"<{ESCAPE}|end|>"}],
     f"<|{ESCAPE}{ESCAPE}<{ESCAPE}{ESCAPE}|<"),
]


@pytest.fixture(scope="module")
def exported_chat(tiny_chat_model, tmp_path_factory):
    """The tiny chat model (train.py's default block, modern: NanoChatForCausalLM), taught to end
    its answers, and its export. Returns (out_dir, dest). Thirty iterations teach it to repeat a
    token, never to stop: its head's <|end|> row becomes the repeated token's, scaled so that
    <|end|> loses to the answer's first token and wins wherever the repeated token would."""
    out_dir, dest = tmp_path_factory.mktemp("export_chat") / "out", tmp_path_factory.mktemp("export_chat") / "hf"
    shutil.copytree(tiny_chat_model, out_dir)
    checkpoint = load_checkpoint_file(out_dir / "best.pt")
    model, encoder = our_model(out_dir)
    answer = [token for piece in chat.reply(model, encoder, CONVERSATIONS[0][0], 16) for token in piece.token_ids]
    first, repeated = answer[0], answer[-1]
    with torch.no_grad():
        logits = model(torch.tensor([chat.render_prompt(CONVERSATIONS[0][0], encoder)]))[0][0, -1]
    assert first != repeated and 0 < logits[repeated] < logits[first], "the tiny chat model answers otherwise"
    head = checkpoint["model"]["lm_head.weight"]
    head[encoder.encode_single_token(chat.END)] = head[repeated] * (1 + logits[first] / logits[repeated]) / 2
    torch.save(checkpoint, out_dir / "best.pt")
    assert export.main([f"--out_dir={out_dir}", f"--dest={dest}"]) == 0
    return out_dir, dest


def test_the_chat_template_gives_the_ids_chat_py_feeds_the_model(exported_chat, tmp_path):
    """apply_chat_template renders one string and tokenizes it, reading the text of a special token
    anywhere in it as that token, where chat.render encodes a message's text as plain text: so the
    template escapes "<|" in a message, and the exported tokenizer's normalizer undoes the escape.
    Outside the template, the tokenizer reads "<|end|>" as the token (as it reads <|endoftext|>),
    and the escape's noncharacter, doubled or between "<" and "|", as the normalizer reads it."""
    out_dir, dest = exported_chat
    _, encoder = our_model(out_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(dest)
    assert [theirs.convert_tokens_to_ids(token) for token in CHAT_TOKENS] == [512, 513, 514, 515]
    for messages, answer in CONVERSATIONS:
        asked = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert asked == chat.render_prompt(messages, encoder)
        whole = messages + [{"role": "assistant", "content": answer}]
        assert theirs.apply_chat_template(whole, return_dict=True)["input_ids"] == chat.render(whole, encoder)[0]
    with pytest.raises(jinja2.TemplateError, match="unknown role tool: expected system, user or assistant"):
        theirs.apply_chat_template([{"role": "tool", "content": "{}"}])  # render's ChatError, in Jinja
    assert theirs("a<|end|>").input_ids == encoder.encode("a<|end|>", allowed_special="all") == [97, 515]
    assert theirs(f"x{ESCAPE}{ESCAPE}").input_ids == encoder.encode(f"x{ESCAPE}") != encoder.encode(f"x{ESCAPE * 2}")
    assert hf.read_hf_folder(dest)["chat"] is True
    theirs.save_pretrained(tmp_path)  # transformers moves the template to chat_template.jinja
    assert hf.has_our_chat_template(tmp_path) and (tmp_path / "chat_template.jinja").is_file()
    card = (dest / "README.md").read_text()
    assert "apply_chat_template" in card and "conversations: train" in card


def test_generate_answers_as_chat_py_does(exported_chat):
    """Greedy, transformers' generate makes chat.reply's tokens and stops where it stops, at
    <|end|> (generation_config.json's eos_token_id)."""
    out_dir, dest = exported_chat
    ours, encoder = our_model(out_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dest).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(dest)
    finishes, answers = [], []
    for messages, _ in CONVERSATIONS[:2]:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
        room = ours.config.block_size - prompt.shape[1]
        pieces = list(chat.reply(ours, encoder, messages, room, temperature=0))
        finishes.append(pieces[-1].finish)
        our_tokens = [token for piece in pieces for token in piece.token_ids]
        answers.append(our_tokens)
        with torch.no_grad():
            their_tokens = theirs.generate(prompt, max_new_tokens=room, do_sample=False)[0, prompt.shape[1]:].tolist()
        assert their_tokens == our_tokens + ([encoder.encode_single_token(chat.END)] if finishes[-1] == "stop" else [])
        assert tokenizer.decode(their_tokens, skip_special_tokens=True) == "".join(piece.text for piece in pieces)
    assert finishes == ["stop", "stop"] and all(answers)  # each a token or more, then <|end|>


@pytest.mark.slow
def test_chat_reads_an_exported_chat_model_as_it_reads_the_out_folder(exported_chat):
    out_dir, dest = exported_chat
    talks = [subprocess.run([sys.executable, str(ROOT / "chat.py"), f"--out_dir={source}", "--temperature=0",
                             "--max_new_tokens=8", "--system=Hi.", "--device=cpu"],
                            input="What is ka?\n<|end|> mi?\n", capture_output=True, text=True, encoding="utf-8",
                            cwd=ROOT, timeout=120, env=ONE_THREAD)
             for source in (out_dir, f"hf:{dest}")]
    assert [talk.returncode for talk in talks] == [0, 0], talks[1].stderr
    assert talks[0].stdout == talks[1].stdout and talks[0].stdout.count("model> ") == 2
