"""Write ``data/tasks/stories_names.jsonl``: repeat the name a TinyStories character was given.

    python run_scripts/make_stories_task.py            # writes the file, then checks it on the model
    python run_scripts/make_stories_task.py --check    # regenerates in memory, compares, writes nothing

Each line is a short story in which a character is named early and someone then addresses them,
so the next token is the name:

    clean:     Once upon a time, there was a girl named Lily. Lily had a kite. Her mom said,
               "Come here,<predict> Lily</predict>
    corrupted: the same text with every "Lily" replaced by another name, e.g. "Tim"

Only the name changes (not "girl" or "her"), so clean and corrupted differ in the name tokens alone
and the task isolates copying the name. The stories260K vocabulary (512 tokens) has only three
names that are one token after a space: Lily, Tim and Timmy; the script filters a longer candidate
list down to them, so the corrupted name is always one of the other two.

Templates are the ones on which stories260K predicts the name (argmax at the loss position) on
every gender-matched story; measured while writing this script (10 actions x 10 objects x 3 names
per template): "Come here," 0.93, the others 1.00. Templates such as "... One day,<predict> Lily"
were dropped: the model says " she" there (Lily 0.00, Tim 0.00, Timmy 1.00). The script prints the
accuracy of the file it writes, clean and corrupted, per split and per template.

Spans (for ``model.positions: spans``, configs/stories_names_spans.yaml): NAME, the name where the
character is introduced, and END, the last prompt token; the markup is stripped before
tokenization, so shared-mask runs read exactly the plain stories.

Lines: 200 train, 50 validation, 50 test (in that order in the file); each split holds every
(template, name) pair and no clean story repeats. Extra fields: ``template`` (index into
TEMPLATES), ``name``, ``corrupted_name``. Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeprune.tasks import SPLITS, batches, pad_token_id_for, read_jsonl_task

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "data" / "tasks" / "stories_names.jsonl"
MODEL = SHARED / "models" / "stories260K"
COUNTS = {"train": 200, "validation": 50, "test": 50}
MAX_TOKENS = 64  # tests and configs load this task with max_length 64

# (name, kind, Pronoun, possessive): the clean story keeps a name with its usual gender.
CANDIDATES = [("Lily", "girl", "She", "her"), ("Tim", "boy", "He", "his"),
              ("Timmy", "boy", "He", "his"), ("Ben", "boy", "He", "his"),
              ("Sam", "boy", "He", "his"), ("Tom", "boy", "He", "his"),
              ("Anna", "girl", "She", "her"), ("Sue", "girl", "She", "her"),
              ("Mia", "girl", "She", "her"), ("Max", "boy", "He", "his")]
ACTIONS = ["play", "run", "jump", "sing", "dance", "read", "draw", "paint", "swim", "walk"]
OBJECTS = ["ball", "dog", "cat", "toy", "kite", "car", "doll", "box", "hat", "book"]
TEMPLATES = [
    'Once upon a time, there was a {kind} named {N}. {N} had a {obj}. {N} liked to {act}. '
    '{Pos} mom said, "Come here,',
    'Once upon a time, there was a {kind} named {N}. {N} liked to {act} with {pos} {obj}. '
    '{Pos} mom said, "Good job,',
    'Once upon a time, there was a {kind} named {N}. {N} liked to {act}. {N} had a {obj}. '
    '{Pos} mom smiled and said, "I love you,',
    'Once upon a time, there was a {kind} named {N}. {N} wanted to {act} with the {obj}. '
    'Mom said, "Be careful,',
    'Once upon a time, there was a little {kind} named {N}. {Pro} loved to {act}. {Pro} had a {obj}. '
    'One day, {pos} mom said, "Let\'s go,',
    'Once upon a time, there was a {kind} named {N}. {N} liked to {act}. {N} had a {obj}. '
    'The {obj} said, "Thank you,',
]


def single_token_names(tokenizer) -> list[tuple[str, str, str, str]]:
    """The candidates whose " Name" is one token (as it is after a space in running text)."""
    kept = [c for c in CANDIDATES if len(tokenizer(" " + c[0], add_special_tokens=False)["input_ids"]) == 1]
    dropped = sorted(set(c[0] for c in CANDIDATES) - set(c[0] for c in kept))
    print(f"single-token names: {[c[0] for c in kept]}; dropped (several tokens): {dropped}")
    if len(kept) < 2:
        sys.exit("need at least two single-token names for clean/corrupted pairs")
    return kept


def mark_spans(template: str) -> str:
    """The template with its spans marked (docs/positions.md): NAME, the name where the character is
    introduced (" Lily" of "named Lily"), and END, the last prompt token (the "," before the name is
    predicted). The markup is stripped before tokenization: shared-mask runs see the plain text."""
    template = template.replace("named {N}", "named<span name=NAME> {N}</span>", 1)
    return f"{template[:-1]}<span name=END>{template[-1]}</span>"


def make_lines(names: list[tuple[str, str, str, str]], seed: int) -> list[dict]:
    """COUNTS lines in split order. Within a split the (template, name) pairs take turns, so every
    split holds every pair; the (action, object) fillers of a pair are never reused, so no clean
    story appears twice, in one split or across splits."""
    rng = random.Random(seed)
    pairs = list(itertools.product(range(len(TEMPLATES)), names))
    fillers = {pair: rng.sample(list(itertools.product(ACTIONS, OBJECTS)), len(ACTIONS) * len(OBJECTS))
               for pair in pairs}
    lines = []
    for split in SPLITS:
        turns = rng.sample(pairs, len(pairs))
        picked = [(turns[i % len(turns)], fillers[turns[i % len(turns)]].pop())
                  for i in range(COUNTS[split])]
        rng.shuffle(picked)
        for (t, (name, kind, pro, pos)), (act, obj) in picked:
            other = rng.choice([n[0] for n in names if n[0] != name])
            story = mark_spans(TEMPLATES[t]).format(kind=kind, Pro=pro, pos=pos, Pos=pos.capitalize(),
                                                    act=act, obj=obj, N="{N}")
            lines.append({
                "clean": story.format(N=name) + f"<predict> {name}</predict>",
                "corrupted": story.format(N=other) + f"<predict> {other}</predict>",
                "split": split, "template": t, "name": name, "corrupted_name": other,
            })
    return lines


def render(lines: list[dict]) -> str:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


def verify(path: Path, tokenizer) -> list:
    """Load through the task reader (it rejects unequal prefix lengths) and check single-token names."""
    examples = read_jsonl_task(path, tokenizer, max_length=MAX_TOKENS)
    for ex in examples:
        name_ids = [tokenizer(" " + ex.extra[k], add_special_tokens=False)["input_ids"]
                    for k in ("name", "corrupted_name")]
        assert [ex.target_ids, ex.corrupted_target_ids] == name_ids, (path, ex.line)
        assert ex.input_ids[:-1] != ex.corrupted_input_ids[:-1], (path, ex.line)
    print(f"{path}: {len(examples)} lines load; longest {max(len(e.input_ids) for e in examples)} tokens")
    return examples


@torch.no_grad()
def report_accuracy(examples, tokenizer, model_path: Path) -> None:
    """Argmax accuracy at the loss position: clean vs the clean name, corrupted vs the corrupted name."""
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    hits = []  # (split, template, clean correct, corrupted correct)
    for start, batch in zip(range(0, len(examples), 64),
                            batches(examples, 64, pad_token_id_for(tokenizer))):
        rows = torch.arange(batch.input_ids.shape[0])
        first = batch.first_loss_position
        clean = model(batch.input_ids, attention_mask=batch.attention_mask).logits[rows, first]
        corrupted = model(batch.corrupted_input_ids,
                          attention_mask=batch.corrupted_attention_mask).logits[rows, first]
        ok_clean = clean.argmax(-1) == batch.target_ids[rows, first]
        ok_corr = corrupted.argmax(-1) == batch.corrupted_target_ids
        for ex, a, b in zip(examples[start:start + 64], ok_clean.tolist(), ok_corr.tolist()):
            hits.append((ex.split, ex.extra["template"], a, b))

    def line(label, sel):
        n = len(sel)
        print(f"  {label:<14} n={n:<4} clean {sum(h[2] for h in sel) / n:.2f}  "
              f"corrupted {sum(h[3] for h in sel) / n:.2f}")

    print(f"stories260K argmax accuracy on the name ({model_path}):")
    line("all", hits)
    for split in SPLITS:
        line(split, [h for h in hits if h[0] == split])
    for t in range(len(TEMPLATES)):
        line(f"template {t}", [h for h in hits if h[1] == t])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--model", type=Path, default=MODEL, help="stories260K (tokenizer and model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="compare with --out; write nothing")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    text = render(make_lines(single_token_names(tokenizer), args.seed))
    if args.check:
        if not args.out.is_file() or args.out.read_text(encoding="utf-8") != text:
            sys.exit(f"{args.out} differs from what seed {args.seed} generates; rerun without --check")
        print(f"{args.out} matches seed {args.seed}")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    examples = verify(args.out, tokenizer)
    report_accuracy(examples, tokenizer, args.model)


if __name__ == "__main__":
    main()
