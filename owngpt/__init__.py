"""owngpt's library: what the scripts at the root (prepare.py, train.py, sample.py, chat.py, export.py,
plot.py, plan.py, bench.py) are built from, one job per module. model.py, the GPT, stays at the root
beside them: it is the one file every reader opens.

    flags        the --key=value and config-file parser, value checks, --help
    train_checks what each of train.py's keys may be, and the rules between them
    sources      prepare.py's input files (stdlib, local files, URLs, WET files) read into documents
    dataset      the dataset folder: llm.c token shards, meta.json, report.md, atomic writes
    tokenizer    the byte-level BPE trainer, the tokenizer.tiktoken file, the tokenizer loader
    filtered     what the filters kept, one part per WET file (any task may make it), and the merge
    workers      a stage of prepare.py on all cores, results in input order
    web/         web text: downloads and Common Crawl's WET files (crawl), the filters (filters)
    runtime      devices, dtype, the process group, stop signals, the GPU FLOPs table
    cpu          what makes a step faster on the CPU that runs it: the matmul library per product, measured
    parallel     how processes share the model: DDP copies it, FSDP shards it; one checkpoint format
    budget       the run's clock and max_time
    epochs       how many times a run reads its data, and the dropout that follows
    costs        what a run costs before it starts: memory per GPU, time, dollars (plan.py)
    checkpoint   the out folder: save, rotate, verify, load; which checkpoint a run starts from,
                 what it must agree on with the config, older checkpoints brought up to date
    optimizers   AdamW, or Muon with AdamW; the learning-rate schedule
    runlog       what a run records: log lines, metrics.jsonl, samples, curves.svg
    tasks        multiple-choice evaluation: HellaSwag and your own .jsonl questions, acc and acc_norm
    curves       learning curves as a self-contained SVG
    hf           the Hugging Face format: safetensors, GPT-2's and NanoChat's names, tokenizer.json
    chat         conversations: the format, checked; rendered with role tokens and a loss mask; answered
    chat_dataset prepare.py's chat sources: conversations into token and mask shards, meta.json, report.md
    stdlib_chat  conversations about the standard library, from its own docstrings (the offline demo)
    inference    a trained model and its tokenizer loaded for sample.py and chat.py; the sampling flags' checks
    serve        a chat model behind OpenAI's chat-completions API, and a chat page (chat.py --serve)
"""
