# The best char-level Shakespeare model we get from at most 5 minutes on a 2-core CPU: a 4x192
# model, block 64, trained with Muon and the modded-nanogpt model options, evaluated once at
# the end over about the whole val split.
# python prepare.py shakespeare_char && python train.py configs/shakespeare_cpu.py
# Sized for a 2-core AMD EPYC with AVX2 only (float32; no bf16 units). Times and losses:
# docs/speed.md; how each setting was chosen: docs/configs.md. A CPU with native bf16 (AMX)
# runs a step several times faster: raise max_iters and lr_decay_iters together there.
out_dir = "out-shakespeare-cpu"
eval_interval = 400  # evaluate only after the last step (eval_at_start below)
eval_at_start = False  # the start's loss is known (ln 65 = 4.17): its time goes to training
eval_iters = 37  # 37 x 48 x 64 = 113,664 tokens: about the whole val split (111,540)
eval_train = False  # the final evaluation reads the val split only (the train loss is logged as it trains)
log_interval = 20  # the loss curve gets a point every 20 steps (free on a CPU)
always_save_checkpoint = False

dataset = "shakespeare_char"
batch_size = 48  # larger batches beat more steps in the same time: docs/configs.md
block_size = 64  # a longer block at the same tokens per step ended worse: docs/configs.md

n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0  # a 5-minute run does not overfit, and dropout cost loss and time: docs/configs.md

# model options (docs/options.md, what each is worth: measured on the 4x128 quick model,
# not at this size)
bigram = True
rotary = True
activation = "relu2"
norm = "rmsnorm"
qk_norm = True
tie_head = False
zero_init_proj = True

optimizer = "muon"
learning_rate = 1.5e-3  # swept at 400 iterations until it turned: docs/configs.md
max_iters = 400  # what fits in about 5 minutes on the AVX2 EPYC (docs/speed.md)
lr_decay_iters = 400
lr_schedule = "wsd"  # constant, then linear to min_lr over the last half
warmdown_frac = 0.5
min_lr = 1.5e-4  # learning_rate / 10
beta2 = 0.99
warmup_iters = 30
