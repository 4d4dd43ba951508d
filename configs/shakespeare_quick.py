# The fastest way to a decent char-level Shakespeare model on a CPU: tuned to reach val loss
# under 1.88 in as few iterations as we could.
# python prepare.py shakespeare_char && python train.py configs/shakespeare_quick.py
# A small model, the Muon optimizer, the modded-nanogpt model options, short context, a linear
# decay, and one evaluation at the end. Sized for a quiet 2-core AMD EPYC with AVX2 only
# (float32); every choice below was measured there, across seeds: docs/configs.md (how the CPU
# recipes were tuned), docs/options.md (what each model option is worth), docs/speed.md (times).
out_dir = "out-shakespeare-quick"
eval_interval = 120  # evaluate only after the last step (eval_at_start below)
eval_at_start = False  # the start's loss is known (ln 65 = 4.17)
eval_iters = 20
eval_train = False  # the final evaluation reads the val split only (the train loss is logged as it trains)
log_interval = 10  # the loss curve gets a point every 10 steps (free on a CPU)
always_save_checkpoint = False

dataset = "shakespeare_char"
batch_size = 32  # batch 16 runs faster steps but reaches no lower loss per second
block_size = 64  # block 128 at the same tokens per step: within noise

n_layer = 4  # 3 layers, or width 96, ended worse
n_head = 2  # head size 64 beat 4 heads of 32
n_embd = 128
dropout = 0.0  # too short a run to overfit

# model options (docs/options.md): together with the wsd schedule they are the largest gain
# here; rotary and qk_norm carry most of it (left out one at a time, docs/options.md)
bigram = True
rotary = True
activation = "relu2"
norm = "rmsnorm"
qk_norm = True
tie_head = False
zero_init_proj = True

optimizer = "muon"
learning_rate = 5e-3  # swept until it turned: docs/configs.md
max_iters = 120
lr_decay_iters = 120
lr_schedule = "wsd"
warmdown_frac = 1.0  # linear decay from the end of warmup to min_lr: beat the last half only
min_lr = 5e-4  # learning_rate / 10
beta2 = 0.95  # beat 0.99
warmup_iters = 5  # beat 20
muon_momentum_warmup = 50  # Muon's momentum 0.85 -> 0.95 over 50 steps: a small gain
