"""workers.py: a long stage of prepare.py run on all cores, with a status line on stderr.

    with Workers(num_workers, set_up, (settings,)) as workers:   # set_up runs in each process
        for batch, result in workers.map(work, batches_of(documents, text_of=len)):
            ...                                                 # results come in input order
    progress = Progress("filter", "MB", total=120)
    progress.update(done_mb); progress.finish(done_mb)

Results come back in the order the batches went in, whatever the number of workers, so
a stage's output is the same for one process or sixteen.
"""
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor

BATCH_CHARS = 1 << 20  # a task for a worker process: about 1M characters
BATCH_DOCUMENTS = 128  # or this many documents, so that many small ones still spread out


def batches_of(items, text_of):
    """Lists of items of about BATCH_CHARS characters of text or BATCH_DOCUMENTS items."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(text_of(item))
        if chars >= BATCH_CHARS or len(batch) == BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class Workers:
    """num_workers processes, each set up by initializer(*initargs), that run a function
    on batches; with one worker it runs in this process."""

    def __init__(self, num_workers, initializer, initargs):
        self.num_workers = num_workers
        if num_workers == 1:
            initializer(*initargs)
            self.pool = None
        else:
            self.pool = ProcessPoolExecutor(num_workers, initializer=initializer, initargs=initargs)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def map(self, function, batches, task_of=lambda batch: batch):
        """(batch, function(task_of(batch))) for each batch, in input order. At most two
        batches per worker are in flight, so memory stays bounded."""
        if self.pool is None:
            for batch in batches:
                yield batch, function(task_of(batch))
            return
        in_flight = deque()
        try:
            for batch in batches:
                in_flight.append((batch, self.pool.submit(function, task_of(batch))))
                if len(in_flight) > 2 * self.num_workers:
                    batch, future = in_flight.popleft()
                    yield batch, future.result()
            while in_flight:
                batch, future = in_flight.popleft()
                yield batch, future.result()
        finally:  # a consumer that stops early (--max_docs) leaves no work running
            for _, future in in_flight:
                future.cancel()


class Progress:
    """A status line on stderr for a long stage: redrawn in place on a terminal, a new line
    every 10 s otherwise (logs), and a last line when the stage ends."""

    def __init__(self, stage, unit, total=None):
        self.stage, self.unit, self.total = stage, unit, total
        self.start = self.shown = time.monotonic()
        self.terminal = sys.stderr.isatty()

    def update(self, done, details="", final=False):
        now = time.monotonic()
        if not final and now - self.shown < (0.5 if self.terminal else 10):
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-6)
        line = f"{self.stage}: {amount(done)}" + (f"/{amount(self.total)}" if self.total else "")
        line += f" {self.unit} in {now - self.start:,.1f} s ({amount(rate)} {self.unit}/s"
        if self.total and not final and rate > 0:
            line += f", ETA {max(self.total - done, 0) / rate:,.0f} s"
        line += ")" + (f" {details}" if details else "")
        print(("\r\033[K" if self.terminal else "") + line, end="\n" if final or not self.terminal else "",
              file=sys.stderr, flush=True)

    def finish(self, done, details=""):
        self.update(done, details, final=True)


def amount(number):
    return f"{number:,.0f}" if number >= 100 or float(number).is_integer() else f"{number:,.2f}"
