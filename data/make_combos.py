"""Synthetic boxing combos, one per line: a small documents dataset to try documents mode.

    python data/make_combos.py --n 12000 --out data/combos.txt
    python prepare.py --input data/combos.txt --name combos --tokenizer char --documents line
    python train.py configs/combos.py
    python sample.py --out_dir=out-combos --prompt="" --num_samples=20

A combo is 2 to 6 moves joined by " - ", e.g. "Jab - Cross to the Body - Lead Hook - Slip".
Punches may go to the body; a defensive move (slip, roll, ...) is never repeated twice in a
row, and a combo starts with a punch. is_valid() tells whether a line is a combo of known
moves: what the benchmark in the README counts.
"""
import argparse
import random

PUNCHES = ["Jab", "Cross", "Lead Hook", "Rear Hook", "Lead Uppercut", "Rear Uppercut", "Overhand",
           "Double Jab"]
DEFENSES = ["Slip", "Roll", "Pull Back", "Step Back", "Pivot", "Parry", "Block"]
BODY = " to the Body"
SEPARATOR = " - "
MOVES = frozenset(PUNCHES + [p + BODY for p in PUNCHES if p != "Double Jab"] + DEFENSES)  # every valid move


def make_combo(rng: random.Random) -> str:
    moves = [rng.choice(PUNCHES)]
    for _ in range(rng.randint(1, 5)):
        if moves[-1] in DEFENSES or rng.random() < 0.7:
            move = rng.choice(PUNCHES)
            if move != "Double Jab" and rng.random() < 0.2:
                move += BODY
        else:
            move = rng.choice(DEFENSES)
        moves.append(move)
    return SEPARATOR.join(moves)


def make_combos(n: int, seed: int = 0) -> list[str]:
    """n combos (repeats possible, as in real lists), reproducible from seed."""
    rng = random.Random(seed)
    return [make_combo(rng) for _ in range(n)]


def is_valid(line: str) -> bool:
    """A single line of known moves joined by " - "."""
    return "\n" not in line and bool(line) and all(m in MOVES for m in line.split(SEPARATOR))


def main(argv=None):
    p = argparse.ArgumentParser(description="Write synthetic boxing combos, one per line.")
    p.add_argument("--n", type=int, default=12000, help="number of combos")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="data/combos.txt", help="output file")
    args = p.parse_args(argv)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(make_combos(args.n, args.seed)) + "\n")
    print(f"wrote {args.n:,} combos to {args.out}")


if __name__ == "__main__":
    main()
