"""curves.svg: train.py redraws it at every evaluation and plot.py overlays runs. The SVG is
parsed as XML and its series must hold exactly the points metrics.jsonl logged."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

from helpers import ROOT, read_metrics, run_train
from owngpt import curves

SVG = "{http://www.w3.org/2000/svg}"


def parse(path):
    return ElementTree.parse(path).getroot()


def points(element, attribute="data-points"):
    return [tuple(float(value) for value in pair.split(",")) for pair in element.get(attribute).split()]


def run_groups(root):
    return {group.get("data-run"): group for group in root.iter(f"{SVG}g") if group.get("class") == "run"}


@pytest.fixture(scope="module")
def two_runs(tiny_dataset, tmp_path_factory):
    """Two short runs of the tiny model, one with a higher learning rate."""
    folder = tmp_path_factory.mktemp("curves")
    for name, rate in (("slow", "1e-3"), ("fast", "3e-3")):
        result = run_train(f"--dataset={tiny_dataset}", f"--out_dir={name}", "--max_iters=6", "--eval_interval=2",
                           f"--learning_rate={rate}", "--min_lr=1e-4", cwd=folder)
        assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.slow
def test_train_py_draws_every_logged_point_against_tokens_seen(two_runs):
    out_dir = two_runs / "slow"
    metrics = read_metrics(out_dir)
    root = parse(out_dir / "curves.svg")
    (group,) = run_groups(root).values()
    by_class = {element.get("class"): element for element in group}
    assert points(by_class["val-loss"]) == [(line["tokens"], line["val_loss"]) for line in metrics if "val_loss" in line]
    assert points(by_class["train-loss"]) == [(line["tokens"], line["loss"]) for line in metrics if "loss" in line]
    assert points(by_class["lr"]) == [(line["tokens"], line["lr"]) for line in metrics if "lr" in line]
    best = min((line["val_loss"], line["tokens"]) for line in metrics if "val_loss" in line)
    assert points(by_class["best"], "data-point") == [(best[1], best[0])]
    texts = " ".join(text.text or "" for text in root.iter(f"{SVG}text"))
    assert "tokens seen" in texts and "loss (nats per token)" in texts and "val bits per byte" in texts
    assert "learning rate" in texts


@pytest.mark.slow
def test_plot_py_overlays_runs_labelled_by_name(two_runs):
    result = subprocess.run([sys.executable, str(ROOT / "plot.py"), "--runs=slow,fast", "--out=cmp.svg"],
                            cwd=two_runs, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    groups = run_groups(parse(two_runs / "cmp.svg"))
    assert list(groups) == ["slow", "fast"]
    for name, group in groups.items():
        val = next(element for element in group if element.get("class") == "val-loss")
        assert points(val) == [(line["tokens"], line["val_loss"]) for line in read_metrics(two_runs / name)
                               if "val_loss" in line]


def test_plot_py_names_a_folder_without_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "plot.py"), "--runs=empty"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--runs=empty: expected out folders holding metrics.jsonl (empty has none)" in result.stderr


def test_steps_that_were_not_finite_are_left_out(tmp_path):
    lines = [{"iter": 0, "tokens": 0, "val_loss": 5.0, "val_bpb": 2.0},
             {"iter": 1, "tokens": 64, "loss": 4.0, "lr": 1e-3},
             {"iter": 2, "tokens": 128, "loss": None, "lr": 1e-3, "skipped": True},
             {"iter": 2, "tokens": 128, "val_loss": 4.5, "val_bpb": 1.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves.write(tmp_path / "curves.svg", [("run", curves.read_metrics(tmp_path))])
    (group,) = run_groups(parse(tmp_path / "curves.svg")).values()
    by_class = {element.get("class"): element for element in group}
    assert points(by_class["train-loss"]) == [(64, 4.0)]
    assert points(by_class["val-loss"]) == [(0, 5.0), (128, 4.5)]


def drawn(element, attribute="d"):
    """The pixel coordinates of a path's points (d="M x,y L x,y ..."), y growing downwards as in SVG."""
    return [tuple(float(value) for value in point[1:].split(",")) for point in element.get(attribute).split()]


def test_each_series_is_drawn_where_its_values_lie_a_rising_loss_rising(tmp_path):
    # losses from 1 to 3 span the loss panel (y 420 at its bottom up to 40 at its top), tokens
    # from 0 to 200 its width (x 80 to 810); the rate, 0 to 1e-3, spans its own panel (y 545 to 460)
    lines = [{"iter": 0, "tokens": 0, "val_loss": 3.0, "val_bpb": 1.5},
             {"iter": 1, "tokens": 100, "loss": 1.0, "lr": 1e-3},
             {"iter": 1, "tokens": 100, "val_loss": 1.0, "val_bpb": 0.5},
             {"iter": 2, "tokens": 200, "loss": 3.0, "lr": 5e-4},
             {"iter": 2, "tokens": 200, "val_loss": 2.0, "val_bpb": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves.write(tmp_path / "curves.svg", [("run", curves.read_metrics(tmp_path))])
    (group,) = run_groups(parse(tmp_path / "curves.svg")).values()
    by_class = {element.get("class"): element for element in group}
    train_loss = drawn(by_class["train-loss"])
    assert train_loss == [(445.0, 420.0), (810.0, 40.0)]
    assert train_loss[1][1] < train_loss[0][1]  # the loss rose: its line goes up the picture
    assert drawn(by_class["val-loss"]) == [(80.0, 40.0), (445.0, 420.0), (810.0, 230.0)]
    dots = [(float(dot.get("cx")), float(dot.get("cy"))) for dot in group if dot.tag == f"{SVG}circle" and dot.get("r") == "3"]
    assert dots == drawn(by_class["val-loss"])
    assert (float(by_class["best"].get("cx")), float(by_class["best"].get("cy"))) == (445.0, 420.0)  # val loss 1.0
    assert drawn(by_class["lr"]) == [(445.0, 460.0), (810.0, 502.5)]
