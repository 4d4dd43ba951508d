"""Synthetic boxing combos, one per line: a small documents dataset to try documents mode.

    python data/make_combos.py --n 12000 --out data/combos.txt
    python prepare.py --input data/combos.txt --name combos --tokenizer char --documents line
    python train.py configs/combos.py
    python sample.py --out_dir=out-combos --prompt="" --num_samples=60 > samples.txt
    python data/make_combos.py --score samples.txt --out data/combos.txt   # % valid, % new

A combo is 2 to 6 moves joined by " - ", e.g. "Jab - Cross to the Body - Lead Hook - Slip".
Punches may go to the body; a defensive move (slip, roll, ...) is never repeated twice in a
row, and a combo starts with a punch. is_valid() tells whether a line is a combo of known
moves: what the measurements in docs/documents.md ("Measured on the combos") count.
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules, run as a script too
from errors import UserError, run_main  # noqa: E402

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


def score(samples: list[str], training: set[str]) -> tuple[float, float]:
    """% of samples that are valid combos, and % that are valid and not in training."""
    valid = [s for s in samples if is_valid(s)]
    new = [s for s in valid if s not in training]
    return 100 * len(valid) / len(samples), 100 * len(new) / len(samples)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def read_samples(path: str) -> list[str]:
    """The samples in sample.py's output: one, or several, each followed by a line of dashes."""
    pieces = read_text(path).split("\n---------------\n")
    if pieces[-1].strip():  # one sample: no line of dashes after it
        pieces[-1] = pieces[-1].removesuffix("\n")
    else:
        pieces.pop()
    return pieces


def main(argv=None):
    p = argparse.ArgumentParser(description="Write synthetic boxing combos, one per line, or score samples.")
    p.add_argument("--n", type=int, default=12000, help="number of combos")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="data/combos.txt", help="output file (with --score: the training file)")
    p.add_argument("--score", metavar="SAMPLES", help="sample.py's output (one sample, or several each followed "
                                                      "by a line of dashes): print the %% of valid combos and of new "
                                                      "ones")
    args = p.parse_args(argv)
    if args.score:
        samples, training = read_samples(args.score), set(read_text(args.out).splitlines())
        if not samples:
            raise UserError(f"{args.score} holds no sample: write one with `python sample.py --out_dir=out-combos "
                            f"--prompt=\"\" --num_samples=60 > {args.score}`")
        valid, new = score(samples, training)
        print(f"{len(samples)} samples: {valid:.1f}% valid combos (known moves, one line), "
              f"{new:.1f}% valid and not in {args.out}")
        return
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(make_combos(args.n, args.seed)) + "\n")
    print(f"wrote {args.n:,} combos to {args.out}")


if __name__ == "__main__":
    run_main(main)
