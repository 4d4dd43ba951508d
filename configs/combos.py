# Documents mode on synthetic boxing combos (one per line): a small model that learns to write
# new, valid combos. Sized for a 2-core AMD EPYC with AVX2 only (float32); times, val losses and
# sample scores: docs/documents.md ("Measured on the combos") and docs/configs.md.
# python data/make_combos.py --n 12000 --out data/combos.txt
# python prepare.py --input data/combos.txt --name combos --tokenizer char --documents line --block_size 128
# python train.py configs/combos.py
# python sample.py --out_dir=out-combos --prompt="" --num_samples=60 > samples.txt
# python data/make_combos.py --score samples.txt --out data/combos.txt
# A trained vocabulary instead of characters: prepare with --tokenizer bpe:400 --block_size 32
# --name combos_bpe, then train with --dataset=combos_bpe --block_size=32.
out_dir = "out-combos"
eval_interval = 300  # evaluate at the start and after the last step only
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = "combos"
batch_size = 16
block_size = 128  # about the longest combo, so a row packs a few whole ones (lengths: docs/configs.md)

n_layer = 3
n_head = 4
n_embd = 96
dropout = 0.0

optimizer = "muon"  # more valid samples than AdamW at 3e-3 in the same steps: docs/configs.md
learning_rate = 3e-2  # Muon wants a high rate (as configs/shakespeare_quick.py); 3e-3 was for AdamW
max_iters = 300
lr_decay_iters = 300
min_lr = 3e-3  # a tenth of learning_rate, as before
beta2 = 0.99
warmup_iters = 30
