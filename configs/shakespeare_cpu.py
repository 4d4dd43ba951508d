# The best char-level Shakespeare model we get from at most 5 minutes on a 2-core CPU: a 4x192
# model, block 64, trained with Muon and the modded-nanogpt model options, evaluated once at
# the end over about the whole val split.
# python prepare.py shakespeare_char && python train.py configs/shakespeare_cpu.py
# Sized for a 2-core AMD EPYC with AVX2 only (float32; no bf16 units), see the README's speed
# section for the measured figures and the levers; on a CPU with AMX (bf16) a step is ~3x
# faster, so more iterations fit in the same time there.
out_dir = "out-shakespeare-cpu"
eval_interval = 400  # evaluate only after the last step (eval_at_start below)
eval_at_start = False  # the start's loss is known (ln 65 = 4.17): ~20 s saved for training
eval_iters = 37  # 37 x 48 x 64 = 113,664 tokens: about the whole val split (111,540)
eval_train = False  # the final evaluation reads the val split only (the train loss is logged as it trains)
log_interval = 20  # the loss curve gets a point every 20 steps (free on a CPU)
always_save_checkpoint = False

dataset = "shakespeare_char"
batch_size = 48  # measured with AdamW: batch 32 x 2000 iterations ended at 1.606, 48 x 1600 at 1.591
block_size = 64  # measured with AdamW: 128 (batch 16) ended worse, 1.612

n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0  # measured with AdamW: 0.1 ended at val 1.674 in 290 s, 0.0 at 1.606 in 250 s

# model options (README "Model options"): with wsd they took the 4x128 quick model from val
# 2.120 at 120 iterations to 1.925 (same batches, same seed); not measured at this size
bigram = True
rotary = True
activation = "relu2"
norm = "rmsnorm"
qk_norm = True
tie_head = False
zero_init_proj = True

optimizer = "muon"
learning_rate = 1.5e-3  # swept at 400 iterations (val): 1e-3 1.590, 1.5e-3 1.586, 2.5e-3 1.590, 4e-3 1.595, 6e-3 1.601, 1.2e-2 1.633
max_iters = 400  # 338-367 s on the 2-core AVX2 EPYC (~0.87 s a step), 332 s with --compile and a warm cache; 800: 1.526
lr_decay_iters = 400
lr_schedule = "wsd"  # constant, then linear to min_lr over the last half
warmdown_frac = 0.5
min_lr = 1.5e-4  # learning_rate / 10
beta2 = 0.99
warmup_iters = 30
