"""What each of train.py's keys may be, and the rules between keys: checked before any work starts
(owngpt/flags.py runs them on the defaults, config files and flags together).

    flags.parse(argv, DEFAULTS, HELP, CHECKS, program="train.py", config_files=True, relations=RELATIONS)

Every key is in CHECKS but the booleans (true or false is all they can be) and the free-form
names out_dir, dataset, wandb_project and wandb_run_name (a missing dataset or an unwritable
out_dir is found when opened). A check returns what is valid when the value is not, else None.
"""
from model import BLOCKS
from owngpt import cpu, flags
from owngpt.checkpoint import init_from_problem
from owngpt.optimizers import OPTIMIZERS
from owngpt.parallel import PARALLELISMS
from owngpt.runtime import available_devices
from owngpt.tasks import tasks_problem

positive, non_negative = flags.at_least(1), flags.all_of(flags.finite, flags.at_least(0))
CHECKS = {
    "init_from": init_from_problem,
    **dict.fromkeys(("eval_interval", "eval_iters", "log_interval", "keep_last", "batch_size", "block_size",
                     "gradient_accumulation_steps", "n_layer", "n_head", "n_embd", "max_iters", "max_bad_steps"),
                    positive),
    **dict.fromkeys(("dropout", "beta1", "beta2"), flags.all_of(flags.at_least(0), flags.below(1))),
    **dict.fromkeys(("learning_rate", "muon_lr", "embedding_lr"), flags.all_of(flags.finite, flags.above(0))),
    "max_time": non_negative,
    "cooldown_fraction": flags.between(0, 1),
    "block": flags.one_of(*BLOCKS),
    "optimizer": flags.one_of(*OPTIMIZERS), "parallelism": flags.one_of(*PARALLELISMS),
    "lr_schedule": flags.one_of("cosine", "wsd"),
    **dict.fromkeys(("weight_decay", "grad_clip", "min_lr"), non_negative),
    **dict.fromkeys(("warmup_iters", "lr_decay_iters", "eval_task_items", "patience"), flags.at_least(0)),
    "eval_tasks": tasks_problem,
    "device": lambda device: flags.one_of("auto", *available_devices())(device),  # what this machine has
    "dtype": flags.one_of("auto", "float32", "bfloat16", "float16"),
    "matmul": cpu.matmul_problem,
    "seed": flags.between(0, 2**31 - 1),  # numpy takes 32-bit seeds, and process k adds k
}
RELATIONS = (  # rules between keys: each returns what is wrong, or None
    lambda config: None if config["n_embd"] % config["n_head"] == 0 else
    f"n_embd={config['n_embd']} must be a multiple of n_head={config['n_head']} (each head gets n_embd / n_head)",
    lambda config: None if config["block"] != "modern" or config["n_embd"] // config["n_head"] % 2 == 0 else
    f"block=modern rotates pairs of channels: n_embd / n_head = {config['n_embd'] // config['n_head']} must be even",
    lambda config: None if config["block"] == "modern" or not config["value_embeddings"] else
    "value_embeddings=True is part of the modern block: set block=modern, or value_embeddings=False",
    lambda config: None if config["min_lr"] <= config["learning_rate"] else
    f"min_lr={config['min_lr']} must be at most learning_rate={config['learning_rate']}: the schedule decays "
    "from learning_rate down to min_lr",
    lambda config: None if not (config["eval_only"] and config["init_from"] == "scratch") else
    "eval_only=True evaluates a checkpoint: set init_from=resume or init_from=path/to/ckpt.pt",
)
