"""The run's clock and its time budget (train.py's max_time).

    budget = TimeBudget(max_time=270.0)        # the clock starts now
    budget.resumed(elapsed_before=120.5)       # a resumed run counts the time already spent
    budget.start_loop(iter_num)                # just before the first iteration
    fitted = budget.fit(iter_num, eval_interval, runtime)   # after each iteration: a max_iters, or None

max_time is met by fitting max_iters to the speed of the first iterations: iterations 6..30 are
timed (the first ones grow the heap and warm caches up, and 25 average out a machine that is
busy for a second: RESULTS.md, max_time), then the iterations that fit in the time left, with
the evaluations they bring, become max_iters. The fitted value is kept in the run's config,
so checkpoints carry it and a resumed run ends where this one would have.
"""
import time

import torch
import torch.distributed as dist

from owngpt.costs import evaluations, run_seconds

TIMED_ITERATIONS = (5, 30)  # the iterations after the 5th up to the 30th are timed


class TimeBudget:
    def __init__(self, max_time):
        self.max_time = max_time  # seconds; 0 = no budget
        self.started = time.time()
        self.elapsed_before = 0.0  # seconds spent by the runs this one resumes
        self.eval_seconds = 0.0  # the last evaluation's duration, sample included: for the ETA and the fit
        self.timed_from, self.timing_started = TIMED_ITERATIONS[0], None
        self.seconds_per_iter = None  # measured over the timed iterations

    def resumed(self, elapsed_before):
        self.elapsed_before = elapsed_before

    def elapsed(self):
        """Seconds of this run so far, the runs it resumes included."""
        return self.elapsed_before + time.time() - self.started

    def start_loop(self, iter_num):
        """A run resumed among the timed iterations times the ones it has left."""
        self.timed_from, self.timing_started = max(TIMED_ITERATIONS[0], iter_num), time.perf_counter()

    def fit(self, iter_num, eval_interval, runtime):
        """After iteration iter_num: at the end of the timed iterations, the iterations that fit
        in max_time, rank 0's figure on every process (a collective then); else None."""
        if not self.max_time:
            return None
        if iter_num == self.timed_from:
            self.timing_started = time.perf_counter()
        if iter_num != TIMED_ITERATIONS[1]:
            return None
        self.seconds_per_iter = (time.perf_counter() - self.timing_started) / (TIMED_ITERATIONS[1] - self.timed_from)
        per_iter = self.seconds_per_iter + self.eval_seconds / eval_interval
        fitted = torch.tensor(iter_num + max(1, int((self.max_time - self.elapsed()) / per_iter)))
        if runtime.world_size > 1:
            dist.broadcast(fitted, src=0)
        return int(fitted)

    def eta(self, iter_num, max_iters, eval_interval, ms_per_iter):
        """Seconds the rest of the run will take at this speed: plan.py's arithmetic (owngpt/costs.py)
        with the measured step and evaluation times."""
        return run_seconds(max_iters - iter_num, ms_per_iter / 1000, evaluations(max_iters, eval_interval, iter_num),
                           self.eval_seconds)
