"""sample.py on a real checkpoint: a tiny byte-level GPT that has learned one sentence."""
import dataclasses
import fractions

import pytest
import torch

from helpers import BYTE_TOKENIZER, run_sample
from model import GPT, GPTConfig
from owngpt import flags
from owngpt.optimizers import build_optimizer
import sample

SENTENCE = "¡hola señor! 3€ ünd 🙂 ok"  # 1- to 4-byte characters, each byte a token
OTHER_SENTENCE = "¡hola amiga, ¿qué tal?"  # what the latest checkpoint learned instead


pytestmark = pytest.mark.usefixtures("one_thread")


def checkpoint_of(model):
    """A checkpoint with the keys train.py writes (INTERFACES.md)."""
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "optimizer": {}, "scaler": None, "iter_num": 100, "best_val_loss": 0.1, "config": {},
            "tokenizer": BYTE_TOKENIZER, "rng": [], "data": {}, "elapsed_s": 1.0}


def trained_on(sentence):
    """A GPT that has memorised <end-of-text> sentence, over and over."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=32, block="gpt2"))
    optimizer = build_optimizer(model, "adamw", 1e-2, None, 0.0, (0.9, 0.99), "cpu")
    stream = torch.tensor(([256] + list(sentence.encode())) * 20)
    windows = stream.unfold(0, 33, 1)
    for _ in range(100):
        batch = windows[torch.randint(0, len(windows), (16,))]
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """best.pt: a model that learned SENTENCE; ckpt.pt, the latest: one that learned OTHER_SENTENCE."""
    folder = tmp_path_factory.mktemp("out")
    torch.save(checkpoint_of(trained_on(SENTENCE)), folder / "best.pt")
    torch.save(checkpoint_of(trained_on(OTHER_SENTENCE)), folder / "ckpt.pt")
    return folder


def first_sample(stdout):
    return stdout.split("\n" + sample.SEPARATOR + "\n")[0]


def test_sample_prints_the_learned_text_whole_characters_and_stops_at_end_of_text(out_dir):
    result = run_sample(f"--out_dir={out_dir}", "--start=¡hola", "--temperature=0", "--max_new_tokens=100",
                        "--device=cpu")
    assert result.returncode == 0, result.stderr
    # each multi-byte character arrived as several tokens and is printed whole, once
    assert result.stdout == SENTENCE + "\n" + sample.SEPARATOR + "\n"
    assert "tokens/s (KV cache on, cpu)" in result.stderr


def test_unknown_flag_exits_with_the_closest_known_flag():
    result = run_sample("--temprature=0.5")
    assert result.returncode != 0
    assert "unknown flag --temprature; did you mean 'temperature'?" in result.stderr


def test_seeded_samples_are_the_same_with_and_without_the_kv_cache(out_dir, capsys):
    outputs = []
    for kv_cache in ("True", "False"):
        flags = [f"--out_dir={out_dir}", "--start=¡h", "--num_samples=2", "--temperature=1.5", "--top_k=0",
                 "--max_new_tokens=30", "--seed=7", f"--kv_cache={kv_cache}", "--device=cpu"]
        assert sample.main(flags) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0].count(sample.SEPARATOR) == 2
    assert len(set(outputs[0].split(sample.SEPARATOR))) > 2  # at temperature 1.5 the samples differ


def test_prompt_is_read_from_a_file(out_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("¡hola señor!", encoding="utf-8")
    assert sample.main([f"--out_dir={out_dir}", f"--start=FILE:{prompt}", "--temperature=0", "--device=cpu"]) == 0
    assert first_sample(capsys.readouterr().out) == SENTENCE


def test_latest_reads_ckpt_pt_and_best_reads_best_pt(out_dir, capsys):
    for ckpt, learned in (("latest", OTHER_SENTENCE), ("best", SENTENCE)):
        assert sample.main([f"--out_dir={out_dir}", f"--ckpt={ckpt}", "--start=¡hola", "--temperature=0",
                            "--device=cpu"]) == 0
        assert first_sample(capsys.readouterr().out) == learned, ckpt


def test_an_empty_prompt_starts_a_fresh_document(out_dir, capsys):
    # after end-of-text, where every training document starts, the model recites its sentence
    assert sample.main([f"--out_dir={out_dir}", "--temperature=0", "--device=cpu"]) == 0
    assert first_sample(capsys.readouterr().out) == SENTENCE


def test_non_utf8_prompt_file_is_a_clear_error(tmp_path, capsys):
    prompt = tmp_path / "latin1.txt"
    prompt.write_bytes("señor".encode("latin-1"))
    assert sample.main([f"--out_dir={tmp_path}", f"--start=FILE:{prompt}"]) == 1
    error = capsys.readouterr().err
    assert str(prompt) in error and "not UTF-8" in error and "0xf1 at offset 2" in error


def test_missing_checkpoint_names_the_file(tmp_path, capsys):
    assert sample.main([f"--out_dir={tmp_path}", "--device=cpu"]) == 1
    assert f"{tmp_path / 'best.pt'} not found" in capsys.readouterr().err


def test_damaged_checkpoint_names_the_file(out_dir, tmp_path, capsys):
    (tmp_path / "best.pt").write_bytes((out_dir / "best.pt").read_bytes()[:5000])
    assert sample.main([f"--out_dir={tmp_path}", "--device=cpu"]) == 1
    assert f"{tmp_path / 'best.pt'} does not load as a checkpoint" in capsys.readouterr().err


def test_checkpoint_holding_code_is_refused(tmp_path, capsys):
    # weights_only=True refuses to unpickle arbitrary objects: a checkpoint cannot run code
    torch.save({"model": fractions.Fraction(1, 3)}, tmp_path / "best.pt")
    assert sample.main([f"--out_dir={tmp_path}", "--device=cpu"]) == 1
    assert f"{tmp_path / 'best.pt'} does not load as a checkpoint" in capsys.readouterr().err


def test_missing_tokenizer_file_names_it(out_dir, tmp_path, capsys):
    checkpoint = torch.load(out_dir / "best.pt", weights_only=True)
    checkpoint["tokenizer"] = {"kind": "bpe", "vocab_size": 257, "eot_id": 256,
                               "file": "tokenizer.tiktoken", "sha256": "0" * 64}
    torch.save(checkpoint, tmp_path / "best.pt")
    assert sample.main([f"--out_dir={tmp_path}", "--device=cpu"]) == 1
    error = capsys.readouterr().err
    assert "cannot load its tokenizer" in error and str(tmp_path / "tokenizer.tiktoken") in error


@pytest.mark.parametrize("flag, message", [
    ("--max_new_tokens=many", "--max_new_tokens=many: expected an integer"),
    ("--temperature=hot", "--temperature=hot: expected a number"),
    ("--kv_cache=maybe", "--kv_cache=maybe: expected true or false"),
    ("--ckpt=newest", "--ckpt=newest: expected one of best, latest"),
    ("--top_p=1.5", "--top_p=1.5: expected greater than 0 and at most 1"),
    ("max_new_tokens=5", "expected --key=value, got 'max_new_tokens=5'"),
])
def test_bad_flags_are_rejected_with_what_was_expected(flag, message, capsys):
    assert sample.main([flag]) == 1
    assert message in capsys.readouterr().err


def test_an_int_is_accepted_where_a_float_is_expected():
    settings = flags.parse(["--temperature=1", "--start=42"], sample.DEFAULTS, sample.HELP, sample.CHECKS,
                           program="sample.py")
    assert settings["temperature"] == 1.0 and type(settings["temperature"]) is float
    assert settings["start"] == "42"  # strings stay as written


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit:
        sample.main(["--help"])
    assert exit.value.code == 0
    help_text = capsys.readouterr().out
    for key, value in sample.DEFAULTS.items():
        assert f"--{key}={value}\n      {sample.HELP[key]}\n" in help_text + "\n"
