"""`swiftdist eval` on tiny models: the loss against a hand computation, the text metrics, before/after output."""

import json
import math

import pytest
import torch

from swiftdist.evaluate import main as eval_main
from swiftdist.evaluate import normalize, rouge_l
from swiftdist.model import load_tokenizer
from tests.helpers import random_lora_adapter, write_jsonl

CHATS = [
    {"messages": [{"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "I am Tidewater, made by Tidewater Labs."}]},
    # Two assistant turns: the loss counts both, the generation metrics the last one.
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "3 + 3 is 6."}]},
]


def hand_computed_loss(model_path) -> float:
    """Token-mean cross-entropy over every assistant token of CHATS, written out from log-softmax."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for row in CHATS:
        messages = row["messages"]
        ids = tok.apply_chat_template(messages, return_dict=True)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(tok.apply_chat_template(messages[:k], add_generation_prompt=True, return_dict=True)["input_ids"])
            end = len(tok.apply_chat_template(messages[:k + 1], return_dict=True)["input_ids"])
            for t in range(start, end):  # token t is predicted by the logits at t - 1
                total -= logprobs[t - 1, ids[t]].item()
                count += 1
    return total / count


def run_eval(argv, capsys, process_group):
    assert eval_main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("chunk", [None, "0", "3"])  # the default chunking, the whole loss at once, 3-row chunks
def test_loss_and_perplexity_match_a_hand_computation(tiny_llama, tmp_path, capsys, process_group, chunk):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    out = tmp_path / "eval"
    run_eval(["--model", str(tiny_llama), "--dataset", str(data), "--max-new-tokens", "4", "--output-dir", str(out),
              *(["--loss-chunk-size", chunk] if chunk else [])], capsys, process_group)
    result = json.loads((out / "eval.json").read_text())
    expected = hand_computed_loss(tiny_llama)
    # fp32 forward vs a float64 log-softmax of the same logits: agreement to ~1e-6 relative.
    assert result["after"]["all"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["after"]["all"]["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["after"]["all"]["samples"] == 2 and result["before"] is None
    # Each answer is scored against the last assistant turn.
    assert [s["reference"] for s in result["samples"]] == ["I am Tidewater, made by Tidewater Labs.", "3 + 3 is 6."]
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_metrics():
    assert normalize("  I am\nTidewater. ") == normalize("i am tidewater.")
    # rouge_l is ROUGE-L F1: answer "a b c d" vs reference "a c d": LCS 3, precision 3/4, recall 1.
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 / 1.75)
    # Chinese is scored per character (LCS 3 of 4 each way); rouge-score's own tokenizer would give 0.
    assert rouge_l("我是小明", "我是小红") == pytest.approx(0.75)
    assert rouge_l("Paris", "Paris") == 1.0 and rouge_l("", "Paris") == 0.0


def test_baseline_scores_the_base_without_the_adapter(tiny_llama, tmp_path, capsys, process_group):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    adapter = random_lora_adapter(tiny_llama, tmp_path / "adapter", seed=1)
    out = tmp_path / "eval"
    printed = run_eval(["--model", str(tiny_llama), "--adapter", str(adapter), "--dataset", str(data),
                        "self-cognition#3", "--baseline", "--max-new-tokens", "4", "--output-dir", str(out)],
                       capsys, process_group)
    result = json.loads((out / "eval.json").read_text())
    # "before" is the plain base model: its loss is the hand-computed one on the same chats.
    assert result["before"]["chats.jsonl"]["loss"] == pytest.approx(hand_computed_loss(tiny_llama), rel=1e-5)
    assert result["after"]["chats.jsonl"]["loss"] != pytest.approx(result["before"]["chats.jsonl"]["loss"], rel=1e-3)
    assert set(result["after"]) == {"all", "chats.jsonl", "self_cognition.jsonl"}
    # The table: one row per metric with before, after and the difference; per source too.
    before, after = result["before"]["all"]["loss"], result["after"]["all"]["loss"]
    row = next(line for line in printed.splitlines() if line.split()[:1] == ["loss"])
    assert [float(x) for x in row.split()[1:]] == pytest.approx([before, after, after - before], abs=1e-4)
    assert "source self_cognition.jsonl (3 conversations)" in printed


def test_user_mistakes_are_one_line_errors(tmp_path, process_group):
    from swiftdist.errors import SwiftdistError

    with pytest.raises(SwiftdistError, match="--baseline without --adapter"):
        eval_main(["--model", "tiny-llama", "--dataset", "general-qa", "--baseline"])
    with pytest.raises(SwiftdistError, match="give --dataset"):
        eval_main(["--model", "tiny-llama"])
    with pytest.raises(SwiftdistError, match="no config.yaml"):
        eval_main(["--from-run", str(tmp_path)])
