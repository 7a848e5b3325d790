"""The run's clock and its time budget (train.py's max_time).

    budget = TimeBudget(max_time=270.0, max_iters=5000)   # the clock starts now
    budget.resumed(elapsed_before=120.5)       # a resumed run counts the time already spent
    budget.start_loop(iter_num)                # just before the first iteration
    fitted = budget.fit(iter_num, step_seconds, cfg, runtime)   # after each iteration: a max_iters, or None

max_time is met by fitting max_iters to the speed of the iterations: iterations 6..30 are timed
first (the first ones grow the heap and warm caches up, and 25 average out a machine that is
busy for a second: RESULTS.md, max_time's timed iterations), and the iterations that fit in
the time left, with the evaluations they bring, become max_iters. Under wsd the rate holds
still until the cooldown, so max_iters is fitted again every REFIT_EVERY iterations until the
cooldown starts, from the latest iterations and the latest evaluation: a machine that was busy
at first, or a first evaluation that was slow while caches were cold, is not held against the
rest of the run. Under cosine every iteration's rate depends on max_iters, so it is fitted
once. The fitted value is kept in the run's config, so checkpoints carry it, and a run
resumed in the cooldown ends where it would have.
"""
import time

import torch
import torch.distributed as dist

from owngpt.costs import evaluations, run_seconds
from owngpt.optimizers import cooldown_start

TIMED_ITERATIONS = (5, 30)  # the iterations after the 5th up to the 30th are timed first
REFIT_EVERY = 25  # then, under wsd, max_iters is fitted again every this many iterations


class TimeBudget:
    def __init__(self, max_time, max_iters):
        self.max_time = max_time  # seconds; 0 = no budget
        self.max_iters = max_iters  # the config's: a fit never goes past it
        self.started = time.time()
        self.elapsed_before = 0.0  # seconds spent by the runs this one resumes
        self.eval_seconds = 0.0  # the last evaluation's duration, sample included: for the ETA and the fit
        self.seconds_per_iter = None  # measured over the iterations of the last fit
        self.window_from, self.window_seconds = TIMED_ITERATIONS[0], 0.0  # the iterations being timed

    def resumed(self, elapsed_before):
        self.elapsed_before = elapsed_before

    def elapsed(self):
        """Seconds of this run so far, the runs it resumes included."""
        return self.elapsed_before + time.time() - self.started

    def start_loop(self, iter_num):
        """A run resumed among the timed iterations times the ones it has left."""
        self.window_from, self.window_seconds = max(TIMED_ITERATIONS[0], iter_num), 0.0

    def fit(self, iter_num, step_seconds, cfg, runtime):
        """After iteration iter_num, which took step_seconds: when a fit is due, the iterations
        that fit in max_time, rank 0's figure on every process (a collective then); else, or
        when a refit changes nothing, None."""
        if not self.max_time or iter_num <= self.window_from:
            return None
        self.window_seconds += step_seconds
        stable = cfg.lr_schedule == "wsd" and iter_num < cooldown_start(cfg)
        if not (iter_num == TIMED_ITERATIONS[1] or (
                stable and iter_num > TIMED_ITERATIONS[1] and iter_num - self.window_from >= REFIT_EVERY)):
            return None
        self.seconds_per_iter = self.window_seconds / (iter_num - self.window_from)
        self.window_from, self.window_seconds = iter_num, 0.0
        per_iter = self.seconds_per_iter + self.eval_seconds / cfg.eval_interval
        fitted = torch.tensor(min(self.max_iters, iter_num + max(1, int((self.max_time - self.elapsed()) / per_iter))))
        if runtime.world_size > 1:
            dist.broadcast(fitted, src=0)
        return int(fitted) if iter_num == TIMED_ITERATIONS[1] or int(fitted) != cfg.max_iters else None

    def eta(self, iter_num, max_iters, eval_interval, ms_per_iter):
        """Seconds the rest of the run will take at this speed: plan.py's arithmetic (owngpt/costs.py)
        with the measured step and evaluation times."""
        return run_seconds(max_iters - iter_num, ms_per_iter / 1000, evaluations(max_iters, eval_interval, iter_num),
                           self.eval_seconds)
