"""Fine-tune a trained GPT on your own text: start from a checkpoint's weights, train
briefly at a low learning rate. Put it after the config the checkpoint was trained with
(the architecture must match; config files run in order):

    python prepare.py --source=files --input=my_notes/ --tokenizer=gpt2 --name=my_notes
    python train.py config/train_gpt2_124m.py config/finetune_files.py

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
learning_rate = 3e-5  # a twentieth of pretraining's: adjust the model, do not overwrite it
min_lr = 3e-5  # constant
warmup_iters = 20
dropout = 0.1  # small data repeats: some regularisation helps
eval_interval = 25
eval_iters = 20
