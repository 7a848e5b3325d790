"""Draw the learning curves of one or several runs in one picture, to compare them.

    python plot.py --runs=out/demo                          # -> out/demo/curves.svg, as train.py draws it
    python plot.py --runs=out/gpt2,out/modern --out=cmp.svg  # several runs, labelled by folder name

Each run is an out folder that train.py wrote (its metrics.jsonl). The picture is an SVG
(owngpt/curves.py draws it, no dependency) that any browser opens: loss against tokens seen, the
val loss thick with its best point ringed, the learning rate below.
"""
import sys
from pathlib import Path

from owngpt import curves, flags
from owngpt.runlog import METRICS_FILE

DEFAULTS = {"runs": ("out",), "out": ""}
HELP = {"runs": "comma-separated out folders written by train.py (each holds metrics.jsonl)",
        "out": "the SVG file to write (default: curves.svg in the first run's folder)"}


def run_folder(folder):
    return None if (Path(folder) / METRICS_FILE).is_file() else f"out folders holding {METRICS_FILE} ({folder} has none)"


CHECKS = {"runs": lambda runs: next(filter(None, map(run_folder, runs)), None),
          "out": lambda out: None if not out or out.endswith(".svg") else "a file name ending in .svg"}


def main(argv):
    settings = flags.parse(argv, DEFAULTS, HELP, CHECKS, program="plot.py")
    runs = [(Path(folder).resolve().name, curves.read_metrics(folder)) for folder in settings["runs"]]
    out = Path(settings["out"] or Path(settings["runs"][0]) / "curves.svg")
    curves.write(out, runs)
    print(f"wrote {out}: {', '.join(name for name, _ in runs)}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (flags.UserError, OSError) as error:
        sys.exit(f"plot.py: error: {error}")
