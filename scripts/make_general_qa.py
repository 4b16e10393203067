"""Produce swiftdist/data/general_qa.jsonl: general questions answered by the base model itself.

Every answer in that file is the embedded SmolLM2-135M-Instruct's own greedy output (the tokenizer's chat
template with its default system prompt, add_generation_prompt=True, up to MAX_NEW_TOKENS new tokens,
stripped), produced once with this script and never edited by hand.

Why: a small identity fine-tune (the `self-cognition` dataset) can overwrite what the model already knows;
a careless recipe turned "What is the capital of France?" into "The capital of Tidewater Labs is Tidewater
Labs." Mixing in rows whose targets are the base model's own answers is a regulariser: training on them
pushes the model towards its existing behaviour, not towards anything new. Hand-written "better" answers
would defeat that purpose, so a question whose answer was wrong, rambling or cut off mid-sentence was
dropped (see DROPPED) rather than corrected.

    PYTHONPATH=. python scripts/make_general_qa.py          # writes the kept rows
    PYTHONPATH=. python scripts/make_general_qa.py --all    # every candidate, to review the answers
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swiftdist.model import resolve_model_path  # noqa: E402

MAX_NEW_TOKENS = 80
OUT = ROOT / "swiftdist" / "data" / "general_qa.jsonl"

CANDIDATES = [
    "What is the capital of France?",
    "What is the capital of Germany?",
    "What is the capital of Japan?",
    "What is the capital of Italy?",
    "What is the capital of Spain?",
    "What is the capital of the United Kingdom?",
    "What is the capital of Canada?",
    "What is the capital of Australia?",
    "What is the capital of China?",
    "What is the capital of Russia?",
    "What is 2 + 2?",
    "What is 7 times 8?",
    "What is 10 minus 3?",
    "What is 100 divided by 4?",
    "What is the square root of 81?",
    "How many days are in a week?",
    "How many months are in a year?",
    "How many legs does a spider have?",
    "How many continents are there?",
    "What is the largest planet in our solar system?",
    "What planet is known as the Red Planet?",
    "What is the closest star to Earth?",
    "What is the chemical symbol for water?",
    "What is the chemical symbol for gold?",
    "What gas do plants absorb from the air?",
    "What is the boiling point of water in Celsius?",
    "What is the freezing point of water in Celsius?",
    "What is photosynthesis?",
    "What is gravity?",
    "What is a noun?",
    "What is an atom?",
    "What is the largest ocean on Earth?",
    "What is the tallest mountain in the world?",
    "What is the longest river in the world?",
    "What color is the sky on a clear day?",
    "What do bees make?",
    "What is the opposite of hot?",
    "Who wrote Romeo and Juliet?",
    "Who painted the Mona Lisa?",
    "What language is spoken in Brazil?",
    "What is the main ingredient of bread?",
    "What is a mammal?",
    "Name three primary colors.",
    "Translate 'hello' into French.",
    "What is the past tense of 'go'?",
    "Give me a synonym for 'happy'.",
    "What is the speed of light?",
    "What organ pumps blood through the body?",
    "法国的首都是哪里？",
    "中国的首都是哪里？",
    "一年有多少个月？",
    "二加三等于多少？",
    "水的化学式是什么？",
    "太阳系中最大的行星是哪个？",
]

# Reviewed once against the --all output. Dropped, not corrected: wrong, rambling, or cut off.
DROPPED: dict[str, str] = {}


def generate(questions: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    path = resolve_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    answers = []
    for q in questions:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
            )
        new = out[0, ids["input_ids"].shape[1]:]
        answers.append(tok.decode(new, skip_special_tokens=True).strip())
        print(json.dumps({"q": q, "a": answers[-1], "n_tokens": len(new)}, ensure_ascii=False), flush=True)
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="answer every candidate, including DROPPED")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    questions = CANDIDATES if args.all else [q for q in CANDIDATES if q not in DROPPED]
    answers = generate(questions)
    with open(args.out, "w", encoding="utf-8") as f:
        for q, a in zip(questions, answers):
            row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(questions)} rows to {args.out}")


if __name__ == "__main__":
    main()
