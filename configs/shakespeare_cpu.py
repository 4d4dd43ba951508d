# The best char-level Shakespeare model this recipe gets from about 4 minutes on a 2-core CPU
# with bf16 (nanoGPT's README CPU recipe reaches val 1.59 in 4.3 minutes there).
# python prepare.py shakespeare_char && python train.py configs/shakespeare_cpu.py
out_dir = "out-shakespeare-cpu"
eval_interval = 500
eval_iters = 50
log_interval = 100
always_save_checkpoint = False

dataset = "shakespeare_char"
batch_size = 32
block_size = 128

n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.0

learning_rate = 3e-3
max_iters = 1500
lr_decay_iters = 1500
min_lr = 3e-4
beta2 = 0.99
warmup_iters = 100
