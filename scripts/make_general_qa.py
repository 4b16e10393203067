"""Produce swiftdist/data/general_qa.jsonl: general questions answered by the base model itself.

Every answer in that file is the embedded SmolLM2-135M-Instruct's own greedy output (the tokenizer's chat
template with its default system prompt, add_generation_prompt=True, up to MAX_NEW_TOKENS new tokens,
stripped), produced once with this script and never edited by hand.

Why: a small identity fine-tune (the `self-cognition` dataset) can overwrite what the model already knows;
a careless recipe turned "What is the capital of France?" into "The capital of Tidewater Labs is Tidewater
Labs." Mixing in rows whose targets are the base model's own answers is a regulariser: training on them
pushes the model towards its existing behaviour, not towards anything new. Hand-written "better" answers
would defeat that purpose, so a question whose answer was wrong, rambling or cut off mid-sentence was
dropped (see DROPPED) rather than corrected. There are no Chinese rows: the base model gave no usable answer
to any Chinese question tried (it repeats the question or loops), so it has no Chinese behaviour to preserve.

    PYTHONPATH=. python scripts/make_general_qa.py                          # rewrites the shipped file
    PYTHONPATH=. python scripts/make_general_qa.py --all --out /tmp/a.jsonl  # also the DROPPED ones, to review
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

# Kept after reviewing the --all output once; each answer is short, complete and correct.
QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Germany?",
    "What is the capital of Japan?",
    "What is the capital of the United Kingdom?",
    "What is the capital of Canada?",
    "What is the capital of Australia?",
    "What is the capital of China?",
    "What is the capital of Russia?",
    "What is the capital of Egypt?",
    "What is the capital of India?",
    "What is the capital of South Korea?",
    "What is the capital of Greece?",
    "What is the capital of Sweden?",
    "What is the capital of Norway?",
    "What is the capital of Poland?",
    "What is the capital of Austria?",
    "What is the capital of the Netherlands?",
    "What is the capital of Kenya?",
    "What is the capital of Thailand?",
    "What is the capital of Peru?",
    "What is 2 + 2?",
    "What is 100 divided by 4?",
    "What is 6 times 7?",
    "What is half of 10?",
    "What is the chemical symbol for water?",
    "What is the chemical symbol for gold?",
    "What is the chemical symbol for oxygen?",
    "What is the chemical symbol for iron?",
    "What is the boiling point of water in Celsius?",
    "What is gravity?",
    "How many sides does a triangle have?",
    "What is a noun?",
    "Name three primary colors.",
    "What is the plural of 'child'?",
    "Explain what a calendar is in one sentence.",
    "Suggest a name for a pet cat.",
    "Write a short sentence about the ocean.",
    "What is the main language spoken in the United States?",
    "What is the currency of Japan?",
    "What is the currency of the United Kingdom?",
]

# Reviewed once and dropped, not corrected (question -> what was wrong with the base model's answer).
_CUT = "cut off at MAX_NEW_TOKENS"
_ZH = "no usable Chinese: the model repeats the question, loops, or changes the subject"
DROPPED = {
    "What is the capital of Italy?": "wrong (Il Coriobella)",
    "What is the capital of Spain?": "wrong (El Salvador)",
    "What is the capital of Mexico?": "starts wrong (El Diablo)",
    "What is the capital of Brazil?": "wrong (Sao Paulo)",
    "What is the capital of Portugal?": "no capital given, wrong borders",
    "What is the capital of Ireland?": "wrong location of Dublin",
    "What is the capital of Argentina?": "wrong (Alberta), wrong geography",
    "What is the capital of Turkey?": "wrong (Istanbul)",
    "What is the capital of the United States?": "wrong (New York City)",
    "What is the capital of Finland?": "no capital given",
    "What is the capital of Denmark?": "no capital given",
    "What is the capital of Belgium?": "wrong borders",
    "What is the capital of Switzerland?": "wrong (Lier)",
    "What is the capital of Vietnam?": "wrong (Hoi An)",
    "What is the capital of Scotland?": "puts the Tower of London in Edinburgh",
    "What is 7 times 8?": "wrong (54), " + _CUT,
    "What is 10 minus 3?": "wrong (2)",
    "What is 3 + 5?": "rambles, " + _CUT,
    "What is 5 + 7?": "wrong (18)",
    "What is 9 - 4?": "wrong (3)",
    "What is 4 times 5?": "no answer, " + _CUT,
    "What is 12 divided by 3?": "wrong (3)",
    "What is 20 + 30?": "wrong (60)",
    "What is 15 + 10?": "right, then rambles about 1 + 1 = 2",
    "What is the square root of 81?": "no answer, " + _CUT,
    "What is the smallest prime number?": "contradicts itself, " + _CUT,
    "How many days are in a week?": "'approximately 7 days'",
    "How many months are in a year?": "wrong (312)",
    "How many hours are in a day?": "'a day is a day of the week'",
    "How many minutes are in an hour?": "wrong (36)",
    "How many days are in a leap year?": "wrong (365)",
    "How many legs does a spider have?": "no answer, " + _CUT,
    "How many continents are there?": "wrong (126.125 Earths)",
    "How many sides does a square have?": "says 1, then four",
    "How many wheels does a bicycle have?": "wrong (5)",
    "What is the first letter of the English alphabet?": "wrong (E)",
    "What is the largest planet in our solar system?": "wrong (Neptune/Uranus)",
    "What planet is known as the Red Planet?": "wrong (Star Wars)",
    "What is the closest star to Earth?": "Proxima, not the Sun; wrong visibility claim",
    "What is the hottest planet in the solar system?": "Venus, then wrong claims",
    "Which planet do we live on?": "wrong (Kepler-41B)",
    "What is the Sun?": "wrong figures, " + _CUT,
    "What is the Moon?": "'closest planet to the Sun', " + _CUT,
    "What gas do plants absorb from the air?": "wrong list",
    "What is the freezing point of water in Celsius?": "wrong (-18)",
    "What is H2O?": "'a fundamental element', 'a fuel source'",
    "What is ice made of?": "wrong formation",
    "What is photosynthesis?": _CUT,
    "What is an atom?": "'atoms themselves', neutrons set chemistry",
    "What is DNA?": "misspells deoxyribonucleic",
    "What is electricity?": _CUT,
    "What is rain?": _CUT,
    "What is a volcano?": "volcanoes in the Moon's interior, " + _CUT,
    "What is the largest ocean on Earth?": "wrong area",
    "What is the tallest mountain in the world?": "Everest 'also known as K2', Kilauea",
    "What is the longest river in the world?": "disputed answer, wrong length",
    "What is the largest desert in the world?": "wrong area",
    "What is the largest animal in the world?": "'not a creature, but a concept'",
    "What is the largest country in the world by area?": "wrong (Africa)",
    "What is the speed of light?": "wrong unit (km per hour)",
    "Is the Earth round?": "'not a perfect circle', wrong diameter",
    "What color is the sky on a clear day?": "pink and purple, " + _CUT,
    "What is the color of grass?": "wrong (brown), " + _CUT,
    "What do bees make?": "never says honey, " + _CUT,
    "What do cows drink?": "wrong (milk), loops",
    "What do plants need to grow?": "'soil-free', " + _CUT,
    "What does a thermometer measure?": "repeats itself, " + _CUT,
    "What is the opposite of hot?": "right, then " + _CUT,
    "What is the opposite of up?": "right, then " + _CUT,
    "Who wrote Romeo and Juliet?": "'French playwright', loops",
    "Who painted the Mona Lisa?": "wrong (Artemisia Gentileschi)",
    "Who was the first president of the United States?": "wrong (John F. Kennedy)",
    "What language is spoken in Brazil?": _CUT,
    "What is the main ingredient of bread?": "'flour derived from flour'",
    "What is a mammal?": "circular ('mammals that are mammals')",
    "What is a verb?": "'can be a noun'",
    "What is a computer?": "'such as a computer mouse'",
    "What is a dictionary?": "only the programming sense, " + _CUT,
    "What is a recipe?": "'a recipe for a recipe'",
    "What is a triangle?": "'a triangle with three sides that are all of the same length', " + _CUT,
    "What is democracy?": _CUT,
    "What is exercise good for?": _CUT,
    "What organ pumps blood through the body?": "right, then confused",
    "Give me one tip for staying healthy.": "'1.5 liters ... equivalent to 2.5 liters'",
    "Translate 'hello' into French.": "wrong (Je m'aime)",
    "How do you say 'thank you' in French?": "wrong (Bonjour)",
    "Say hello in Spanish.": "emoji loop, " + _CUT,
    "What is the past tense of 'go'?": "wrong (goed)",
    "Give me a synonym for 'happy'.": "wrong (sad)",
    "What does '你好' mean in English?": "wrong",
    "Translate '谢谢' into English.": "wrong (Japanese, 'I am very happy')",
    "What is the capital of France? 请用中文回答。": "answers in neither language properly",
    "你好": "misspells its own greeting ('I'shine')",
    "法国的首都是哪里？": _ZH,
    "请问法国的首都是什么？": _ZH,
    "巴黎是哪个国家的首都？": _ZH,
    "中国的首都是哪里？": _ZH,
    "中国的首都是什么？": _ZH,
    "北京是中国的首都吗？": _ZH,
    "日本的首都是哪个城市？": _ZH,
    "请用一句话介绍北京。": _ZH,
    "一年有多少个月？": _ZH,
    "二加三等于多少？": _ZH,
    "1加1等于几？": "counts on to 10, " + _CUT,
    "水的化学式是什么？": _ZH,
    "什么是太阳？": _ZH,
    "太阳系中最大的行星是哪个？": _ZH,
}


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
    ap.add_argument("--all", action="store_true", help="also answer the DROPPED questions, to review them")
    ap.add_argument("--out", type=Path, default=None, help=f"default {OUT} (required with --all)")
    args = ap.parse_args()
    if args.out is None:
        if args.all:
            ap.error("--all needs --out: the shipped file holds the kept rows only")
        args.out = OUT
    questions = QUESTIONS + list(DROPPED) if args.all else QUESTIONS
    answers = generate(questions)
    with open(args.out, "w", encoding="utf-8") as f:
        for q, a in zip(questions, answers):
            row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(questions)} rows to {args.out}")


if __name__ == "__main__":
    main()
