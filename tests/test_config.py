"""train.py's, sample.py's and chat.py's settings: every key with a value that can be wrong is checked
before any work starts, and a wrong one stops the script with one line naming the key; a
broken config file is named by file and line; a device the machine lacks says which it has."""
import dataclasses
import math
import re
import subprocess
import sys

import pytest

from helpers import ROOT, train_in_process
from owngpt import flags
from owngpt.runtime import available_devices
import chat
import sample
import train

SCRIPTS = {"train.py": train, "sample.py": sample, "chat.py": chat}

# The keys no check can fault, and why. A new key must be checked (CHECKS) or listed here.
BOOLEAN = "a boolean: true or false is all it can be"
UNCHECKED = {
    "train.py": {
        "out_dir": "any folder: prepare_out_dir says when it is a file or not writable",
        "dataset": "a name or a path: open_folder names a missing or empty folder",
        "wandb_project": "any name wandb accepts", "wandb_run_name": "any name wandb accepts",
        **dict.fromkeys(("eval_only", "wandb_log", "sample_every_eval", "bias", "gradient_checkpointing", "compile",
                          "value_embeddings", "sharded_checkpoint"), BOOLEAN),
    },
    "sample.py": {
        "out_dir": "any folder: a missing checkpoint in it is named when it is read",
        "start": "any text, or FILE:path, whose problems are named when it is read",
        "kv_cache": BOOLEAN,
    },
    "chat.py": {
        "out_dir": "any folder: a missing checkpoint in it is named when it is read",
        "prompt": "any text: the user's message", "system": "any text: the system message",
        "host": "any address: one it cannot listen on is named when the server starts", "serve": BOOLEAN,
    },
}


def run_main(script, *argv):
    """The script's main in this process: (exit status, the error line it printed)."""
    if script == "train.py":
        message = train_in_process(*argv)  # sys.exit("error: ...")
        return (1 if message else 0), message
    return SCRIPTS[script].main(list(argv)), None


def error_of(script, capsys, *argv):
    status, message = run_main(script, *argv)
    assert status == 1
    message = message or capsys.readouterr().err.rstrip("\n")
    assert "\n" not in message, message
    assert message.startswith("error: ")
    return message


def refused_values(check, default):
    """The values of the default's type that the check refuses (out of range, or not a choice)."""
    candidates = {int: [-1, 0, 2**40], float: [-1.0, 0.0, 1.5, math.inf, math.nan], str: ["no-such-choice"],
                  tuple: [("no-such-choice",)]}
    refused = [value for value in candidates[type(default)] if check(value)]
    assert refused, f"no candidate value is refused by the check of a {type(default).__name__} key"
    return refused


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_key_is_checked_or_listed_with_a_reason(script):
    module = SCRIPTS[script]
    assert set(module.CHECKS) | set(UNCHECKED[script]) == set(module.DEFAULTS)
    assert not set(module.CHECKS) & set(UNCHECKED[script])


@pytest.mark.parametrize("script, key", [(script, key) for script, module in SCRIPTS.items() for key in module.CHECKS])
def test_a_bad_value_for_any_checked_key_stops_with_one_line_naming_it(script, key, capsys):
    module = SCRIPTS[script]
    for value in refused_values(module.CHECKS[key], module.DEFAULTS[key]):
        value = ",".join(value) if isinstance(value, tuple) else value  # as a flag writes a tuple
        message = error_of(script, capsys, f"--{key}={value}")
        assert message.startswith(f"error: --{key}={value}: expected "), message


@pytest.mark.parametrize("flags, message", [
    (["--n_embd=100", "--n_head=3"], "n_embd=100 must be a multiple of n_head=3"),
    (["--learning_rate=1e-4", "--min_lr=1e-3"], "min_lr=0.001 must be at most learning_rate=0.0001"),
    (["--eval_only=true"], "eval_only=True evaluates a checkpoint: set init_from=resume or init_from=path/to/ckpt.pt"),
])
def test_keys_that_disagree_stop_train_py_naming_both(flags, message, capsys):
    assert error_of("train.py", capsys, *flags).startswith(f"error: {message}")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
def test_a_device_this_machine_lacks_stops_before_any_work_naming_those_it_has(script, device, capsys):
    if device in available_devices():
        pytest.skip(f"this machine has {device}")
    message = error_of(script, capsys, f"--device={device}")
    assert message == f"error: --device={device}: expected one of auto, {', '.join(available_devices())}"


@pytest.mark.parametrize("text, message", [
    ("max_iters = 10\nbatch_size = (\n", r"{path}:2: syntax error: '\(' was never closed"),
    ("max_iters = 10\nbatch_size = 1 / 0\n", r"{path}:2: ZeroDivisionError: division by zero"),
    (None, r"config file '{path}' not found \(flags are written --key=value\)"),
], ids=["syntax error", "raises", "missing"])
@pytest.mark.slow  # a train.py process each
def test_a_broken_config_file_is_named_with_its_line_and_no_traceback(text, message, tmp_path):
    path = tmp_path / "broken.py"
    if text is not None:
        path.write_text(text)
    finished = subprocess.run([sys.executable, str(ROOT / "train.py"), str(path)], capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 1
    assert "Traceback" not in finished.stderr
    assert re.fullmatch("error: " + message.format(path=re.escape(str(path))) + "\n", finished.stderr), finished.stderr


def test_every_model_setting_is_a_train_py_key_with_the_same_default():
    from model import GPTConfig
    fields = {field.name: field.default for field in dataclasses.fields(GPTConfig) if field.name != "vocab_size"}
    assert {key: train.DEFAULTS[key] for key in fields} == fields


def test_a_bare_boolean_flag_means_true_and_any_other_bare_flag_asks_for_its_value():
    settings = flags.parse(["--kv_cache=false", "--kv_cache"], sample.DEFAULTS, sample.HELP, sample.CHECKS,
                           program="sample.py")
    assert settings["kv_cache"] is True
    with pytest.raises(flags.UserError, match=r"^--max_new_tokens: flags are written --key=value \(see --help\)$"):
        flags.parse(["--max_new_tokens"], sample.DEFAULTS, sample.HELP, sample.CHECKS, program="sample.py")
    with pytest.raises(flags.UserError, match=r"^unknown flag --kv_cach; did you mean 'kv_cache'\?"):
        flags.parse(["--kv_cach"], sample.DEFAULTS, sample.HELP, sample.CHECKS, program="sample.py")
