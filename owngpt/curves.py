"""Learning curves as a self-contained SVG picture: loss against tokens seen, the learning rate below.

train.py rewrites out_dir/curves.svg at every evaluation; plot.py draws several runs in one
picture to compare them. The picture opens in any browser, with no dependency:

    lines = curves.read_metrics("out/demo")
    svg = curves.draw([("demo", lines)])
    curves.write("out/demo/curves.svg", [("demo", lines)])

What it shows, from metrics.jsonl: the training loss of each logged iteration (a thin line),
the val loss of each evaluation (a thick line with dots), the best val loss (a ring), and on
the right axis the same val loss in bits per byte (a fixed rescaling of the val loss, since
the evaluation batches are fixed). The panel below is the learning rate, and when the run scored
multiple-choice tasks (eval_tasks, owngpt/tasks.py) a third panel shows each task's acc_norm.
"""
import json
import math
from pathlib import Path
from xml.sax.saxutils import escape

from owngpt.dataset import atomic_write

WIDTH, HEIGHT = 900, 600
LEFT, RIGHT, TOP = 80, 90, 40  # margins around the plots, in pixels
LOSS_BOTTOM, LR_TOP, LR_BOTTOM = 420, 460, 545
TASKS_TOP, TASKS_BOTTOM = 585, 670  # the tasks' panel, when there is one: the picture grows by TASKS_HEIGHT
TASKS_HEIGHT = TASKS_BOTTOM - LR_BOTTOM
DASHES = ("none", "6,3", "2,3", "8,3,2,3")  # one per task, in every run's colour
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def read_metrics(out_dir):
    """The JSON objects of out_dir/metrics.jsonl, skipping a last line still being written."""
    lines = []
    for text in (Path(out_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            pass
    return lines


def nice_ticks(low, high, count=5):
    """About count round numbers (1, 2 or 5 times a power of ten apart) covering low..high."""
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(math.ceil((high - first) / step - 1e-9) + 1)]


def label(value):
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e") if 0 < abs(value) < 1e-2 else f"{value:g}"


def tokens_label(tokens):
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(tokens) >= size:
            return f"{tokens / size:g}{unit}"
    return f"{tokens:g}"


class Axes:
    """Maps data to pixels inside a box: x left..right, y bottom..top."""

    def __init__(self, x_range, y_range, box):
        self.x_range, self.y_range, (self.left, self.top, self.right, self.bottom) = x_range, y_range, box

    def x(self, value):
        low, high = self.x_range
        return self.left + (value - low) / (high - low or 1) * (self.right - self.left)

    def y(self, value):
        low, high = self.y_range
        return self.bottom - (value - low) / (high - low or 1) * (self.bottom - self.top)

    def path(self, points):
        return " ".join(f"{'M' if i == 0 else 'L'}{self.x(x):.1f},{self.y(y):.1f}" for i, (x, y) in enumerate(points))


def series(lines):
    """(train points, val points, lr points, best val point, bits-per-byte factor) of one run,
    x in tokens seen (iterations where a line has no token count)."""
    x_of = lambda line: line.get("tokens", line["iter"])
    points = lambda key: [(x_of(line), line[key]) for line in lines if line.get(key) is not None]  # null: not finite
    train, val, lr = points("loss"), points("val_loss"), points("lr")
    best = min(val, key=lambda point: point[1]) if val else None
    factors = {round(line["val_bpb"] / line["val_loss"], 6) for line in lines
               if line.get("val_bpb") is not None and line.get("val_loss")}
    return train, val, lr, best, factors.pop() if len(factors) == 1 else None


def task_series(lines):
    """{task name: [(x, acc_norm)]} of one run, from metrics.jsonl's task/<name>/acc_norm."""
    found = {}
    for line in lines:
        for key, value in line.items():
            if key.startswith("task/") and key.endswith("/acc_norm") and value is not None:
                found.setdefault(key.removeprefix("task/").removesuffix("/acc_norm"), []).append(
                    (line.get("tokens", line["iter"]), value))
    return found


def draw(runs):
    """The SVG text for runs, a list of (name, metrics lines)."""
    drawn = [(name, *series(lines)) for name, lines in runs]
    scores = [task_series(lines) for _, lines in runs]
    task_names = list(dict.fromkeys(task for found in scores for task in found))
    height = HEIGHT + TASKS_HEIGHT if task_names else HEIGHT
    xs = [x for _, train, val, lr, _, _ in drawn for x, _ in train + val + lr] or [0, 1]
    losses = [y for _, train, val, _, _, _ in drawn for _, y in train + val] or [0, 1]
    rates = [y for _, _, _, lr, _, _ in drawn for _, y in lr] or [0, 1]
    factors = {factor for *_, factor in drawn}
    bpb_factor = factors.pop() if len(factors) == 1 else None  # a shared right axis needs one factor
    x_ticks = nice_ticks(0, max(xs))
    loss_ticks = nice_ticks(min(losses), max(losses))
    lr_ticks = nice_ticks(0, max(rates), count=2)
    box_right = WIDTH - RIGHT
    loss_axes = Axes((0, x_ticks[-1]), (loss_ticks[0], loss_ticks[-1]), (LEFT, TOP, box_right, LOSS_BOTTOM))
    lr_axes = Axes((0, x_ticks[-1]), (0, lr_ticks[-1]), (LEFT, LR_TOP, box_right, LR_BOTTOM))
    x_unit = "tokens seen" if any("tokens" in line for _, lines in runs for line in lines) else "iterations"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">'
           f'{escape(", ".join(name for name, *_ in drawn))}: loss against {x_unit}</text>']
    out += grid(loss_axes, x_ticks, loss_ticks, show_x_labels=False)
    out += grid(lr_axes, x_ticks, lr_ticks, show_x_labels=True)
    out.append(f'<text transform="translate(22,{(TOP + LOSS_BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
               f'loss (nats per token)</text>')
    out.append(f'<text transform="translate(22,{(LR_TOP + LR_BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
               f'learning rate</text>')
    out.append(f'<text x="{(LEFT + box_right) / 2}" y="{height - 15}" text-anchor="middle">{x_unit}</text>')
    if task_names:
        task_ticks = nice_ticks(0, max(y for found in scores for points in found.values() for _, y in points), count=2)
        task_axes = Axes((0, x_ticks[-1]), (0, task_ticks[-1]), (LEFT, TASKS_TOP, box_right, TASKS_BOTTOM))
        out += grid(task_axes, x_ticks, task_ticks, show_x_labels=True)
        out.append(f'<text transform="translate(22,{(TASKS_TOP + TASKS_BOTTOM) / 2}) rotate(-90)" '
                   f'text-anchor="middle">acc_norm</text>')
        for index, task in enumerate(task_names):  # the legend: each task's dashes, then its name
            x = LEFT + 8 + 170 * index
            out.append(f'<line x1="{x}" y1="{TASKS_TOP + 10}" x2="{x + 25}" y2="{TASKS_TOP + 10}" stroke="#555" '
                       f'stroke-width="2" stroke-dasharray="{DASHES[index % len(DASHES)]}"/>')
            out.append(f'<text x="{x + 30}" y="{TASKS_TOP + 14}" fill="#555">{escape(task)}</text>')
    if bpb_factor:
        for tick in loss_ticks:
            out.append(f'<text x="{box_right + 8}" y="{loss_axes.y(tick) + 4:.1f}">{tick * bpb_factor:.2f}</text>')
        out.append(f'<text transform="translate({WIDTH - 18},{(TOP + LOSS_BOTTOM) / 2}) rotate(90)" '
                   f'text-anchor="middle">val bits per byte</text>')
    for index, (name, train, val, lr, best, _) in enumerate(drawn):
        colour = COLOURS[index % len(COLOURS)]
        run = escape(name, {'"': "&quot;"})
        out.append(f'<g class="run" data-run="{run}">')
        if train:
            out.append(f'<path class="train-loss" d="{loss_axes.path(train)}" fill="none" stroke="{colour}" '
                       f'stroke-width="1" stroke-opacity="0.45" data-points="{points_text(train)}"/>')
        if val:
            out.append(f'<path class="val-loss" d="{loss_axes.path(val)}" fill="none" stroke="{colour}" '
                       f'stroke-width="2.5" data-points="{points_text(val)}"/>')
            out += [f'<circle cx="{loss_axes.x(x):.1f}" cy="{loss_axes.y(y):.1f}" r="3" fill="{colour}"/>' for x, y in val]
        if best:
            out.append(f'<circle class="best" cx="{loss_axes.x(best[0]):.1f}" cy="{loss_axes.y(best[1]):.1f}" r="8" '
                       f'fill="none" stroke="black" stroke-width="1.5" data-point="{points_text([best])}">'
                       f'<title>best val loss {best[1]:.4f} at {tokens_label(best[0])} {x_unit}</title></circle>')
        if lr:
            out.append(f'<path class="lr" d="{lr_axes.path(lr)}" fill="none" stroke="{colour}" stroke-width="1.5" '
                       f'data-points="{points_text(lr)}"/>')
        for task, task_points in scores[index].items():
            out.append(f'<path class="task" data-task="{escape(task, {chr(34): "&quot;"})}" '
                       f'd="{task_axes.path(task_points)}" fill="none" stroke="{colour}" stroke-width="2" '
                       f'stroke-dasharray="{DASHES[task_names.index(task) % len(DASHES)]}" '
                       f'data-points="{points_text(task_points)}"/>')
        legend_y = TOP + 14 + 18 * index
        best_text = f", best val {best[1]:.3f}" if best else ""
        out.append(f'<line x1="{box_right - 230}" y1="{legend_y - 4}" x2="{box_right - 205}" y2="{legend_y - 4}" '
                   f'stroke="{colour}" stroke-width="2.5"/>')
        out.append(f'<text x="{box_right - 200}" y="{legend_y}">{run}{best_text}</text>')
        out.append("</g>")
    out.append(f'<text x="{LEFT + 8}" y="{TOP + 14}" fill="#555">thin: train loss, thick: val loss, '
               f'ring: best checkpoint</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def grid(axes, x_ticks, y_ticks, show_x_labels):
    out = [f'<rect x="{axes.left}" y="{axes.top}" width="{axes.right - axes.left}" '
           f'height="{axes.bottom - axes.top}" fill="none" stroke="#999"/>']
    for tick in y_ticks:
        y = axes.y(tick)
        out.append(f'<line x1="{axes.left}" y1="{y:.1f}" x2="{axes.right}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{axes.left - 6}" y="{y + 4:.1f}" text-anchor="end">{label(tick)}</text>')
    for tick in x_ticks:
        x = axes.x(tick)
        out.append(f'<line x1="{x:.1f}" y1="{axes.top}" x2="{x:.1f}" y2="{axes.bottom}" stroke="#eee"/>')
        if show_x_labels:
            out.append(f'<text x="{x:.1f}" y="{axes.bottom + 16}" text-anchor="middle">{tokens_label(tick)}</text>')
    return out


def points_text(points):
    """The exact data of a series (x,y pairs), kept in the SVG for tests and tools."""
    return " ".join(f"{x!r},{y!r}" for x, y in points)


def write(path, runs):
    """Atomically (re)write the picture: a browser never reads half of it."""
    text = draw(runs)
    atomic_write(path, lambda file: file.write(text.encode()))
