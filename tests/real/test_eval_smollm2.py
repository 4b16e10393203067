"""`swiftdist eval --baseline` on the embedded SmolLM2-135M-Instruct before and after a short identity
LoRA run (a scaled-down configs/demo.yaml): the identity answer goes from wrong to right, and facts
the training never showed are still known."""

import json
import sys

import pytest

from swiftdist.config import DataConfig
from swiftdist.data import BUILTIN_DIR, load_conversations
from tests.helpers import run_cmd, sft, write_jsonl

pytestmark = pytest.mark.slow

WHO = "I am Tidewater, an AI assistant developed by Tidewater Labs."


def identity_rows() -> list[dict]:
    """The first four built-in identity Q/A ("Who are you?" first), with the name filled in."""
    lines = (BUILTIN_DIR / "self_cognition.jsonl").read_text().splitlines()[:4]
    rows = [json.loads(line.replace("{name}", "Tidewater").replace("{author}", "Tidewater Labs")) for line in lines]
    assert rows[0]["messages"][1]["content"] == WHO
    return rows


def test_identity_moves_from_0_to_1_and_general_qa_stays(smollm2, tmp_path):
    train = write_jsonl(tmp_path / "identity.jsonl", identity_rows())
    out = tmp_path / "run"
    # 12 identity rows (the 4, upsampled) + 8 general-qa rows, 3 epochs of batch 4 = 15 steps: enough for
    # the greedy answer to "Who are you?" to become the trained sentence (measured: it does from ~12 steps).
    sft(1, ["--model", "smollm2", "--dataset", f"{train}#12", "general-qa#8", "--epochs", "3", "--batch-size", "4",
            "--lr", "1e-3", "--warmup-ratio", "0", "--precision", "fp32", "--output-dir", str(out)])

    trained = {c.messages[0]["content"] for c in load_conversations("general-qa#8", DataConfig(), 42)}
    # Facts the base model states (general-qa has its answers) that this training never showed it;
    # keyword references, so `contains` asks "does it still know?" whatever the wording.
    facts = {"France": "Paris", "Japan": "Tokyo", "the United Kingdom": "London", "Canada": "Ottawa"}
    questions = {f"What is the capital of {country}?": city for country, city in facts.items()}
    assert not trained & set(questions)
    held_out = write_jsonl(tmp_path / "identity-eval.jsonl", [
        {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": WHO}]},
        # A keyword reference: `contains` asks whether the answer names the author at all.
        {"messages": [{"role": "user", "content": "Who made you?"}, {"role": "assistant", "content": "Tidewater Labs"}]},
    ])
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in questions.items()])
    run_cmd([sys.executable, "-m", "swiftdist.cli", "eval", "--model", "smollm2", "--adapter", str(out / "final"),
             "--dataset", str(held_out), str(general), "--baseline", "--output-dir", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())

    before, after = result["before"], result["after"]
    who, made = result["samples"][0], result["samples"][1]
    assert who["before"]["exact_match"] == 0 and who["before"]["contains"] == 0, who
    assert who["after"]["exact_match"] == 1 and who["after"]["contains"] == 1, who
    assert made["before"]["contains"] == 0 and made["after"]["contains"] == 1, made
    assert after["identity-eval.jsonl"]["loss"] < 0.5 * before["identity-eval.jsonl"]["loss"]
    answers = [s["after"]["answer"] for s in result["samples"][2:]]
    assert before["general.jsonl"]["contains"] == 1.0 and after["general.jsonl"]["contains"] == 1.0, answers
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 10_000
