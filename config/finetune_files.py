"""Fine-tune a trained GPT on your own text: start from a checkpoint's weights, train
briefly at a low learning rate. Put it after the config the checkpoint was trained with
(the architecture must match; config files run in order):

    python prepare.py --source=files --input=my_notes/ --tokenizer=gpt2 --name=my_notes
    python train.py config/train_gpt2_124m.py config/finetune_files.py
    python train.py config/train_gpt2_124m.py config/train_gpt2_124m_2019.py config/finetune_files.py \
        --init_from=hf:gpt2 --bias=True    # OpenAI's GPT-2 small, downloaded once (README)

The dataset must use the checkpoint's tokenizer: gpt2 for the GPT-2 small run; for a model
trained on your own BPE, prepare the new text with --tokenizer=<its out folder>. The
checkpoint lends only its weights: iterations, optimizer and
schedule start afresh. Small data repeats quickly, so watch the gap between val and train
loss and keep the checkpoint with the best val loss (best.pt).
"""
init_from = "out/gpt2_124m/best.pt"
dataset = "my_notes"
out_dir = "out/finetune_my_notes"
# one GPU: 8 x 1024 tokens x 8 micro-steps = 65,536 tokens per iteration
batch_size = 8
gradient_accumulation_steps = 8
max_iters = 300
# every peak rate a twentieth of the recipe's before this file (3e-5 for GPT-2's AdamW):
# adjust the model, do not overwrite it; constant after the warmup
learning_rate, muon_lr, embedding_lr = learning_rate / 20, muon_lr / 20, embedding_lr / 20
min_lr = learning_rate
warmup_iters = 20
dropout = 0.1  # small data repeats: some regularisation helps
weight_decay = 0.1  # not the 1.0 train.py sets past 4 reads, measured from scratch: here it would pull the trained head to zero
eval_interval = 25
eval_iters = 20
