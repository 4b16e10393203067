import json

import pytest
import torch

from swiftdist.config import DataConfig
from swiftdist.data import (IGNORE, Conversation, StepSampler, build_datasets, build_samples, collate,
                            load_conversations, pack, split_conversations, tokenize)
from swiftdist.errors import SwiftdistError
from swiftdist.model import load_tokenizer
from tests.helpers import write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_tokenizer(tiny_llama)


def conv(*turns):
    roles = ["user", "assistant"] * len(turns)
    return Conversation([{"role": r, "content": t} for r, t in zip(roles, turns)], "test:1")


def test_labels_keep_exactly_the_assistant_tokens(tok):
    ids, labels = tokenize(tok, conv("hi", "hello"))
    # SmolLM2's chatml: "...<|im_start|>assistant\n" then "hello" (28120) "<|im_end|>" (2) "\n" (198)
    assert ids[-7:] == [1, 520, 9531, 198, 28120, 2, 198]
    assert [t for t in labels if t != IGNORE] == [28120, 2, 198]
    assert labels[-3:] == [28120, 2, 198] and all(t == IGNORE for t in labels[:-3])


def test_multi_turn_labels_every_assistant_turn_and_no_user_turn(tok):
    ids, labels = tokenize(tok, conv("hi", "hello", "bye", "goodbye"))
    learned = tok.decode([t for t in labels if t != IGNORE])
    assert learned == "hello<|im_end|>\ngoodbye<|im_end|>\n"


def test_formats_are_detected_and_agree(tmp_path, tok):
    rows = {
        "messages": {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        "alpaca": {"instruction": "Q", "input": "", "output": "A"},
    }
    cfg = DataConfig()
    tokenized = []
    for name, row in rows.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        (c,) = load_conversations(str(path), cfg, seed=0)
        tokenized.append(tokenize(tok, c))
    assert tokenized[0] == tokenized[1] == tokenized[2]


def test_csv_json_and_parquet_files(tmp_path):
    import datasets

    cfg = DataConfig()
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.json", "d.csv", "d.parquet"):
        convs = load_conversations(str(tmp_path / name), cfg, seed=0)
        assert [c.messages[-1]["content"] for c in convs] == ["a0", "a1", "a2"]


@pytest.mark.parametrize("line, expected", [
    ("{not json", ":2: not valid JSON"),
    ('{"prompt": "x"}', ":2: cannot tell the format from keys ['prompt']"),
    ('{"messages": [{"role": "user", "content": "x"}]}', ":2: no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', ":2: messages[0] has unknown role 'robot'"),
    ('{"messages": [{"role": "user"}]}', ":2: messages[0] needs 'role' and 'content'"),
    ('{"conversations": []}', ":2: 'conversations' must be a non-empty list"),
])
def test_bad_row_names_file_and_line(tmp_path, line, expected):
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(SwiftdistError) as e:
        load_conversations(str(path), DataConfig(), seed=0)
    assert f"{path}{expected}" in str(e.value)


def test_sampling_and_builtin_placeholders():
    cfg = DataConfig(model_name="Zed", model_author="Acme")
    convs = load_conversations("self-cognition#10", cfg, seed=1)
    assert len(convs) == 10
    text = " ".join(m["content"] for c in convs for m in c.messages)
    assert "{name}" not in text and "{author}" not in text
    assert "Zed" in text
    assert len(load_conversations("self-cognition#10", cfg, seed=1)) == 10
    with pytest.raises(SwiftdistError, match="no such file"):
        load_conversations("nope.jsonl", cfg, seed=0)


def test_truncate_or_drop(tok):
    long = conv("hi " * 50, "answer " * 50)
    short = conv("hi", "hello")
    truncated = build_samples(tok, [long, short], DataConfig(max_length=120, truncation="truncate"))
    assert [len(s.input_ids) for s in truncated][0] == 120
    assert truncated[0].labels[-1] != IGNORE  # the kept part still has assistant tokens to learn
    dropped = build_samples(tok, [long, short], DataConfig(max_length=120, truncation="drop"))
    assert [s.sample_ids for s in dropped] == [[1]]


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])  # the two that `--attn-impl auto` picks on CPU
def test_packing_keeps_attention_within_samples(tok, tiny_llama, attn_impl):
    """A packed row must give each sample the same logits as running it alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn_impl).eval()
    samples = build_samples(tok, [conv("hi", "hello"), conv("what is two plus two?", "four")], DataConfig())
    (packed,) = pack(samples, max_length=1024)
    assert packed.sample_ids == [0, 1]
    assert packed.position_ids[len(samples[0].input_ids)] == 0
    batch = collate([packed], tok.pad_token_id, packed=True)
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False as in training: transformers detects packing only without a KV cache.
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        n0 = len(samples[0].input_ids)
        alone = model(input_ids=torch.tensor([samples[1].input_ids]), use_cache=False).logits[0]
    # fp32 on one CPU: the same math on different shapes, so only summation-order noise remains.
    torch.testing.assert_close(packed_logits[n0:], alone, atol=1e-5, rtol=1e-5)


def test_collate_pads_with_ignored_labels(tok):
    samples = build_samples(tok, [conv("hi", "hello"), conv("a longer question here", "ok")], DataConfig())
    batch = collate(samples, tok.pad_token_id, packed=False)
    n0 = len(samples[0].input_ids)
    assert batch["attention_mask"][0].sum() == n0
    assert (batch["labels"][0, n0:] == IGNORE).all()


def test_val_split_is_disjoint_and_deterministic(tmp_path, tok):
    from tests.helpers import arithmetic_rows

    path = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(20))
    cfg = DataConfig(dataset=[str(path)], val_split=0.2)
    a, b = build_datasets(tok, cfg, seed=3), build_datasets(tok, cfg, seed=3)
    assert len(a.val) == 4 and len(a.train) == 16
    assert [s.input_ids for s in a.val] == [s.input_ids for s in b.val]
    assert {tuple(s.input_ids) for s in a.train}.isdisjoint({tuple(s.input_ids) for s in a.val})


@pytest.mark.parametrize("world_before, world_after", [(2, 1), (2, 3), (1, 2)])
def test_sampler_resume_on_another_world_size_covers_each_sample_once(world_before, world_after):
    n, seed = 23, 7

    def run(world, epoch, consumed, steps):
        seen = []
        for _ in range(steps):
            sampler = [StepSampler(n, seed, 2, 2, r, world) for r in range(world)]
            step = [i for s in sampler for _, mb in s.step_indices(epoch, consumed, n - consumed) for i in mb]
            seen += step
            consumed += len(step)
        return seen, consumed

    first, consumed = run(world_before, epoch=0, consumed=0, steps=2)
    rest, consumed = run(world_after, epoch=0, consumed=consumed,
                         steps=StepSampler(n, seed, 2, 2, 0, world_after).steps_left(consumed, consumed, n))
    assert consumed == n
    assert sorted(first + rest) == list(range(n))
    assert first + rest == StepSampler(n, seed, 1, 1, 0, 1).permutation(0)


# ---- what a bad dataset file is told -------------------------------------------------------------


def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _error(spec, cfg=None) -> str:
    with pytest.raises(SwiftdistError) as e:
        load_conversations(str(spec), cfg or DataConfig(), seed=0)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("name, text", [
    ("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", ""), ("list.json", "[]"),
    ("empty.csv", ""), ("header.csv", "instruction,input,output\n"),
])
def test_a_file_without_rows_is_named(tmp_path, name, text):
    path = _write(tmp_path / name, text)
    assert _error(path) == f"--dataset {path}: {path} has no rows"


def test_a_parquet_file_without_rows_is_named(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "empty.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"instruction": pyarrow.array([], pyarrow.string())}), path)
    assert _error(path) == f"--dataset {path}: {path} has no rows"


@pytest.mark.parametrize("name, content, expected", [
    ("d.txt", "q\ta", ": unsupported file type '.txt' (use .jsonl, .json, .csv or .parquet)"),
    ("d.json", '{"instruction": "q", "output": "a"}',
     ": expected a JSON list of rows, got {'instruction': 'q', 'output': 'a'} (dict)"),
    ("d.json", '[\n{"instruction": "q",\n', ":3: not valid JSON (Expecting property name enclosed in double quotes)"),
    ("d.jsonl", b'{"instruction": "q", "output": "a"}\n{"instruction": "\xff"}\n', ":2: not UTF-8 text"),
    ("d.csv", b"instruction,output\nq,\xff\n", ": not UTF-8 text; save it as UTF-8"),
    ("d.csv", "instruction,output\nq,a\nq,a,b,c\n", ":3: 2 more cell(s) than the header's 2 columns"),
    ("d.csv", "instruction,output\nq\n", ":2: alpaca 'output' must be a string, got no value"),
    ("d.parquet", "not parquet", ": not a readable Parquet file ("),
    ("d.jsonl", "[1, 2]\n", ":1: expected an object (a row of keys), got [1, 2] (list)"),
    ("d.jsonl", '{"instruction": "q", "output": 42}\n', ":1: alpaca 'output' must be a string, got 42 (int)"),
    ("d.jsonl", '{"instruction": "q", "output": "a", "input": ["x"]}\n',
     ":1: alpaca 'input' must be a string, got ['x'] (list)"),
    ("d.jsonl", '{"messages": []}\n', ":1: 'messages' must be a non-empty list of turns, got an empty list"),
    ("d.jsonl", '{"messages": "hi"}\n', ":1: 'messages' must be a non-empty list of turns, got 'hi' (str)"),
    ("d.jsonl", '{"messages": [{"role": "user", "content": 7}]}\n',
     ":1: messages[0].content must be a string, got 7 (int)"),
    ("d.jsonl", '{"conversations": [{"from": ["gpt"], "value": "a"}]}\n',
     ":1: conversations[0] has unknown role ['gpt']"),
])
def test_bad_file_content_names_the_file_and_line(tmp_path, name, content, expected):
    path = _write(tmp_path / name, content)
    assert f"{path}{expected}" in _error(path)


def test_explicit_format_on_a_row_that_is_not_an_object(tmp_path):
    path = _write(tmp_path / "d.jsonl", '"just text"\n')
    expected = f"{path}:1: expected an object (a row of keys), got 'just text' (str)"
    assert expected in _error(path, DataConfig(format="messages"))


def test_csv_cells_stay_text_and_lines_count_quoted_newlines(tmp_path):
    # A byte-order mark, a cell over two lines, a column of numbers, an empty answer.
    path = _write(tmp_path / "d.csv", '\ufeffinstruction,output\n"two\nlines",42\nq,\n')
    first, second = load_conversations(str(path), DataConfig(), seed=0)
    assert first.messages[-1]["content"] == "42" and first.where == f"{path}:3"
    assert second.messages[-1]["content"] == "" and second.where == f"{path}:4"


@pytest.mark.parametrize("suffix", ["#0", "#-1", "#x", "#"])
def test_bad_row_count_is_refused_before_reading(suffix):
    assert _error(f"missing.jsonl{suffix}") == (f"--dataset missing.jsonl{suffix}: '#N' needs a positive row count, "
                                                f"got '{suffix[1:]}'")


def test_a_directory_is_not_a_dataset(tmp_path):
    assert _error(tmp_path) == f"--dataset {tmp_path}: a directory; give the data file(s) in it"


def test_no_usable_samples_says_which_files_and_why(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 200, "output": "ok"}])
    convs = load_conversations(str(path), DataConfig(), seed=0)
    with pytest.raises(SwiftdistError) as e:
        build_samples(tok, convs, DataConfig(max_length=64, truncation="drop"))
    assert str(e.value) == (f"no usable samples in {path}: all 1 dropped: 1 longer than --max-length 64 "
                            "(--truncation drop); raise --max-length")
    with pytest.raises(SwiftdistError) as e:
        build_samples(tok, convs, DataConfig(max_length=64, truncation="truncate"))
    assert str(e.value) == (f"no usable samples in {path}: all 1 dropped: 1 whose prompt alone fills --max-length 64, "
                            "leaving no answer to learn; raise --max-length")


def test_a_validation_split_that_takes_everything_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(SwiftdistError, match=r"--val-split 0.5 holds out all 1 conversation\(s\) of --dataset "
                                             r".*one.jsonl, leaving none to train on"):
        split_conversations(DataConfig(dataset=[str(path)], val_split=0.5), seed=0)
