"""A toy instruction set, one JSON record per line: small tasks with one right answer each, as
prompt/response pairs and as short chats, to try instruction finetuning end to end.

    python data/make_instructions.py --n 6000 --out data/instructions.jsonl
    python prepare.py --input data/instructions.jsonl --name instruct --tokenizer char --block_size 256
    python train.py configs/instruct.py
    python sample.py --out_dir=out-instruct --prompt="Reverse the word: planet"
    python sample.py --out_dir=out-instruct --interactive       # a chat: the model was shown chats too
    python data/make_instructions.py --score out-instruct --n 200  # % of new prompts answered right

The tasks: reverse a word, write it in capitals, count its letters, add two numbers. Words are
made-up strings of letters, so the model must learn the task, not recall a word list.
--chat_fraction of the records are chats ({"messages": [...]}) of two or three such tasks
after a system line. --score runs a trained model (ckpt.pt in the folder named) greedily on
fresh prompts and prints the share of exact answers per task.
"""
import argparse
import json
import random
import sys
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYSTEM = "You answer in one word or number."


def make_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))


def make_task(rng: random.Random) -> tuple[str, str]:
    """(prompt, the one right answer) of a random task."""
    kind = rng.randrange(4)
    if kind == 3:
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return f"What is {a} + {b}?", str(a + b)
    word = make_word(rng)
    if kind == 0:
        return f"Reverse the word: {word}", word[::-1]
    if kind == 1:
        return f"Write in capitals: {word}", word.upper()
    return f"How many letters are in {word}?", str(len(word))


def make_record(rng: random.Random, chat_fraction: float) -> dict:
    if rng.random() >= chat_fraction:
        prompt, response = make_task(rng)
        return {"prompt": prompt, "response": response}
    messages = [{"role": "system", "content": SYSTEM}]
    for _ in range(rng.randint(2, 3)):
        prompt, response = make_task(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"messages": messages}


def make_records(n: int, chat_fraction: float = 0.25, seed: int = 0) -> list[dict]:
    """n records, reproducible from seed."""
    rng = random.Random(seed)
    return [make_record(rng, chat_fraction) for _ in range(n)]


TASKS = {"Reverse": "reverse", "Write": "capitals", "How": "count letters", "What": "add"}  # first word -> task


def task_name(prompt: str) -> str:
    return TASKS[prompt.split(" ")[0]]


def score(out_dir: str, n: int, seed: int) -> dict[str, float]:
    """% of n fresh prompts (seed) that the model in out_dir answers exactly, per task."""
    import torch

    import loading
    import template
    from errors import UserError
    from stopping import StopCondition

    try:
        model, tokenizer, ckpt = loading.load_model(out_dir, "cpu", flag="--score")
    except UserError as e:  # checkpoint.load's words name sample.py's flag: this script's is --score
        raise UserError(str(e).replace("point --out_dir at", "point --score at")) from None
    if not ckpt.get("instruct"):
        raise UserError(f"{out_dir} holds a model trained on plain text, not on instruction records: score one "
                        f"trained as this file's docstring says (configs/instruct.py)")
    if tokenizer.chars is not None and (missing := sorted(set(LETTERS + LETTERS.upper() + "0123456789?:+") -
                                                          set(tokenizer.chars))):
        raise UserError(f"the model in {out_dir} never saw {', '.join(map(repr, missing[:8]))}, which these tasks "
                        f"use: score a model trained on records this script wrote")
    tmpl = ckpt["instruct"]["template"]
    rng = random.Random(seed)
    right: dict[str, list[bool]] = {}
    for _ in range(n):
        prompt, answer = make_task(rng)
        ids = torch.tensor([template.prompt_ids(tokenizer, tmpl, prompt)])
        stop = StopCondition.for_model(tokenizer, 1, template.stop_strings(tmpl))
        for next_id in model.generate_stream(ids, 16, temperature=0):
            if stop.update(next_id.tolist()):
                break
        stop.finish()
        right.setdefault(task_name(prompt), []).append(stop.text(0).strip() == answer)
    return {task: 100 * sum(r) / len(r) for task, r in sorted(right.items())}


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a toy instruction set (JSONL), or score a model on it.")
    p.add_argument("--n", type=int, default=6000, help="number of records (with --score: of prompts)")
    p.add_argument("--chat_fraction", type=float, default=0.25, help="share of records that are chats")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="data/instructions.jsonl", help="output file")
    p.add_argument("--score", metavar="OUT_DIR", help="score the model in OUT_DIR on --n fresh prompts instead")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    if not 0 <= args.chat_fraction <= 1:
        p.error(f"--chat_fraction must be in [0, 1], got {args.chat_fraction}")
    if args.score:
        for task, pct in score(args.score, args.n, args.seed + 1).items():  # seed + 1: not the training prompts
            print(f"{task:>16}: {pct:5.1f}% right")
        return
    records = make_records(args.n, args.chat_fraction, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(records):,} records to {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules (for --score)
    from errors import run_main
    run_main(main)
