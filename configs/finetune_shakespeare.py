# Finetune OpenAI's GPT-2 XL (1.5B) on tiny Shakespeare, as nanoGPT's config/finetune_shakespeare.py.
# Meant for a GPU: weights, gradients and AdamW state of 1.5B parameters take 1.5B x 16 bytes
# ~ 24 GB in float32.
# python prepare.py shakespeare && python train.py configs/finetune_shakespeare.py
# The weights come from transformers' local cache (`hf download openai-community/gpt2-xl` first),
# or pass --init_from=PATH of a downloaded folder. Then: python sample.py --out_dir=out-shakespeare-ft
out_dir = "out-shakespeare-ft"
eval_interval = 5
eval_iters = 40
always_save_checkpoint = False  # only save when val improves: it overfits quickly

dataset = "shakespeare"  # GPT-2 BPE tokens, the model's own tokenizer
init_from = "gpt2-xl"  # shape, block_size 1024 and GELU come from the model

# 1 x 32 x 1024 = 32,768 tokens per iteration; the corpus is ~300k tokens, so 20 iterations
# are ~2 epochs
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# a small constant learning rate: finetuning, not training
learning_rate = 3e-5
decay_lr = False
