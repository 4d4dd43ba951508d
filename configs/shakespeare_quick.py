# The fastest way to a decent char-level Shakespeare model on a CPU: val loss below 1.88 in
# about 20 s of training on 2 cores with bf16 (nanoGPT's README CPU recipe needs 80 s there).
# A small, wide-enough model at a high learning rate, short context, and one evaluation at
# the end. python prepare.py shakespeare_char && python train.py configs/shakespeare_quick.py
out_dir = "out-shakespeare-quick"
eval_interval = 600  # evaluate only at the start and the end
eval_iters = 20
log_interval = 100
always_save_checkpoint = False

dataset = "shakespeare_char"
batch_size = 32
block_size = 64

n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0  # too short a run to overfit

learning_rate = 4e-3
max_iters = 600
lr_decay_iters = 600
min_lr = 4e-4
beta2 = 0.99
warmup_iters = 30
