"""A person's own text, end to end with default flags: one book served over HTTP (a real
http.server on 127.0.0.1), prepared, trained for a few iterations and sampled; and a model
trained on one corpus fine-tuned on another that reuses its tokenizer."""
import pytest

from helpers import make_text, run_prepare, run_sample, run_train
from owngpt import dataset


def sampled(*flags, cwd):
    """What sample.py prints for a few tokens of the model in cwd/out_dir."""
    result = run_sample("--device=cpu", "--max_new_tokens=20", *flags, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_a_book_from_a_url_prepares_trains_and_samples_with_default_flags(book_server, tmp_path):
    url, book = book_server
    run_prepare("--source=url", f"--url={url}", "--name=book", cwd=tmp_path)
    meta = dataset.read_meta(tmp_path / "data" / "book")
    assert meta["split_rule"]["rule"] == "tails" and meta["splits"]["val"]["documents"] == 1
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(book)
    result = run_train("--dataset=book", "--out_dir=out", "--max_iters=3", "--eval_interval=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "val loss" in result.stdout
    assert sampled("--out_dir=out", "--start=Ka", cwd=tmp_path).strip()


@pytest.mark.slow
def test_a_model_is_fine_tuned_on_new_text_prepared_with_its_tokenizer(tmp_path):
    for name, seeds in (("a", range(0, 12)), ("b", range(100, 104))):
        folder = tmp_path / f"text_{name}"
        folder.mkdir()
        for seed in seeds:
            (folder / f"{seed}.txt").write_text(make_text(seed, sentences=80), encoding="utf-8")
    run_prepare("--source=files", "--input=text_a", "--vocab_size=400", "--name=a", cwd=tmp_path)
    assert run_train("--dataset=a", "--out_dir=out_a", "--max_iters=2", "--eval_interval=2", cwd=tmp_path).returncode == 0
    # corpus B encoded with the tokenizer of A's out folder (it keeps a copy of the tokenizer file)
    run_prepare("--source=files", "--input=text_b", "--tokenizer=out_a", "--name=b", cwd=tmp_path)
    tokenizer_a = dataset.read_meta(tmp_path / "data" / "a")["tokenizer"]
    tokenizer_b = dataset.read_meta(tmp_path / "data" / "b")["tokenizer"]
    assert {key: tokenizer_b[key] for key in ("kind", "vocab_size", "eot_id", "sha256")} == \
        {key: tokenizer_a[key] for key in ("kind", "vocab_size", "eot_id", "sha256")}
    assert (tmp_path / "data" / "b" / "tokenizer.tiktoken").read_bytes() == \
        (tmp_path / "data" / "a" / "tokenizer.tiktoken").read_bytes()
    result = run_train("--dataset=b", "--out_dir=out_b", "--init_from=out_a/ckpt.pt", "--max_iters=2",
                       "--eval_interval=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sampled("--out_dir=out_b", "--start=Ka", cwd=tmp_path).strip()
    # a dataset folder works as the source of the tokenizer too
    run_prepare("--source=files", "--input=text_b", "--tokenizer=data/a", "--out_dir=b2", cwd=tmp_path)
    assert dataset.read_meta(tmp_path / "b2")["tokenizer"]["sha256"] == tokenizer_a["sha256"]


@pytest.mark.slow
def test_another_tokenizer_is_refused_naming_the_field(tmp_path):
    (tmp_path / "in").mkdir()
    for seed in range(8):
        (tmp_path / "in" / f"{seed}.txt").write_text(make_text(seed, sentences=80), encoding="utf-8")
    run_prepare("--source=files", "--input=in", "--vocab_size=400", "--name=a", cwd=tmp_path)
    run_prepare("--source=files", "--input=in", "--tokenizer=byte", "--name=bytes", cwd=tmp_path)
    assert run_train("--dataset=a", "--out_dir=out_a", "--max_iters=1", "--eval_interval=1", cwd=tmp_path).returncode == 0
    result = run_train("--dataset=bytes", "--out_dir=out_b", "--init_from=out_a/ckpt.pt", "--max_iters=1", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "was trained with a different tokenizer than data/bytes uses: kind is 'bpe' there and 'byte' here" in result.stderr


def test_a_tokenizer_path_that_holds_no_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "book.txt").write_text(make_text(0), encoding="utf-8")
    (tmp_path / "empty").mkdir()
    result = run_prepare("--source=files", "--input=book.txt", "--tokenizer=empty", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--tokenizer=empty: expected bpe, byte, gpt2, a dataset folder" in result.stderr
