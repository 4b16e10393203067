"""Chat data: files -> conversations -> token ids with assistant-only labels -> (packed) samples -> batches.

Formats (auto-detected per file from the first row's keys):
    messages   {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
    sharegpt   {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
    alpaca     {"instruction": ..., "input": ..., "output": ..., "system"?: ...}
Every user mistake in a file is reported as `file:line: what is wrong`.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import reprlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from swiftdist.config import DataConfig
from swiftdist.errors import SwiftdistError

log = logging.getLogger("swiftdist")

BUILTIN_DIR = Path(__file__).parent / "data"
BUILTINS = {"self-cognition": "self_cognition.jsonl", "general-qa": "general_qa.jsonl"}
IGNORE = -100
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Conversation:
    messages: list[dict]
    where: str  # "file:line", for error messages
    spec: str = ""  # the --dataset value it came from


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    sample_ids: list[int]  # the conversations it holds (several when packed)


# ---- reading files ---------------------------------------------------------------------------


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs. JSONL is parsed line by line so that errors can name the line."""
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise SwiftdistError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")
    try:
        return readers[suffix](path)
    except UnicodeDecodeError:
        raise SwiftdistError(f"{path}: not UTF-8 text; save it as UTF-8") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 can be named
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark is not JSON
            except UnicodeDecodeError:
                raise SwiftdistError(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise SwiftdistError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def _read_json(path: Path) -> list[tuple[int, dict]]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SwiftdistError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise SwiftdistError(f"{path}: expected a JSON list of rows, got {_kind(data)}")
    return [(i + 1, row) for i, row in enumerate(data)]  # row number: JSON arrays have no per-row line


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """Every cell stays text (a column of numbers is still a column of answers); a cell missing from a
    short row is None. The line is where the row ends (a quoted cell may span lines)."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: drops a byte-order mark before the header
        reader = csv.DictReader(f)
        try:
            for row in reader:
                if None in row:  # DictReader files cells beyond the header under the key None
                    raise SwiftdistError(f"{path}:{reader.line_num}: {len(row[None])} more cell(s) than the header's "
                                         f"{len(reader.fieldnames)} columns (quote cells that contain commas)")
                rows.append((reader.line_num, row))
        except csv.Error as e:
            raise SwiftdistError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.ArrowException as e:
        raise SwiftdistError(f"{path}: not a readable Parquet file ({e})") from None
    return [(i + 1, row) for i, row in enumerate(table.to_pylist())]  # row number, from 1


def detect_format(row: dict, where: str) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise SwiftdistError(
        f"{where}: cannot tell the format from keys {sorted(row)}; expected 'messages' (OpenAI), "
        "'conversations' (sharegpt) or 'instruction'+'output' (alpaca)"
    )


def _kind(value) -> str:
    """What a user's value is, briefly: `42 (int)`."""
    return "no value" if value is None else f"{reprlib.repr(value)} ({type(value).__name__})"


def to_messages(row: dict, fmt: str, where: str) -> list[dict]:
    if fmt == "alpaca":
        for key in ("instruction", "output", "input", "system"):
            optional = key in ("input", "system")
            if not isinstance(row.get(key), str) and not (optional and row.get(key) is None):
                raise SwiftdistError(f"{where}: alpaca '{key}' must be a string, got {_kind(row.get(key))}")
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
        return messages
    key, role_key, text_key = ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if turns == [] else _kind(turns)
        raise SwiftdistError(f"{where}: '{key}' must be a non-empty list of turns, got {got}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise SwiftdistError(f"{where}: {key}[{i}] needs '{role_key}' and '{text_key}'")
        role = turn[role_key]
        if fmt == "sharegpt" and isinstance(role, str):
            role = SHAREGPT_ROLES.get(role)
        if role not in ("system", "user", "assistant"):
            raise SwiftdistError(f"{where}: {key}[{i}] has unknown role {turn[role_key]!r}")
        if not isinstance(turn[text_key], str):
            raise SwiftdistError(f"{where}: {key}[{i}].{text_key} must be a string, got {_kind(turn[text_key])}")
        messages.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise SwiftdistError(f"{where}: no assistant turn, so nothing to learn from")
    return messages


def dataset_path(spec: str) -> Path:
    """The file a dataset spec (`path`, `builtin`, `path#N`) reads."""
    name = spec.partition("#")[0]
    return BUILTIN_DIR / BUILTINS[name] if name in BUILTINS else Path(name).expanduser()


def load_conversations(spec: str, cfg: DataConfig, seed: int) -> list[Conversation]:
    """One dataset spec (`path`, `builtin`, with optional `#N` to sample N rows) -> conversations."""
    name, sharp, count = spec.partition("#")
    if sharp and (not count.isdigit() or int(count) < 1):
        raise SwiftdistError(f"--dataset {spec}: '#N' needs a positive row count, got '{count}'")
    path = dataset_path(spec)
    if not path.exists():
        raise SwiftdistError(f"--dataset {name}: no such file (built-ins: {', '.join(BUILTINS)})")
    if path.is_dir():
        raise SwiftdistError(f"--dataset {name}: a directory; give the data file(s) in it")
    fmt = cfg.format
    conversations = []
    rows = _read_rows(path)
    if not rows:
        raise SwiftdistError(f"--dataset {name}: {path} has no rows")
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise SwiftdistError(f"{where}: expected an object (a row of keys), got {_kind(row)}")
        row_fmt = detect_format(row, where) if fmt == "auto" else fmt
        messages = to_messages(row, row_fmt, where)
        if name == "self-cognition":
            for m in messages:
                m["content"] = m["content"].replace("{name}", cfg.model_name).replace("{author}", cfg.model_author)
        if cfg.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": cfg.system})
        conversations.append(Conversation(messages, where, spec))
    if count:
        n = int(count)
        # Sampling with replacement only when asked for more rows than exist (upsampling a small set).
        rng = random.Random(seed)
        conversations = rng.sample(conversations, n) if n <= len(conversations) else rng.choices(conversations, k=n)
    return conversations


# ---- tokenizing --------------------------------------------------------------------------------


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
    )["input_ids"]


def tokenize(tokenizer, conv: Conversation) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat, and labels that keep only the assistant turns' tokens.

    Each assistant turn spans from the end of the prompt-with-generation-header up to the end of
    the chat including that turn, so the turn's end-of-turn token is learned too.
    """
    ids = _template_ids(tokenizer, conv.messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for k, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        start = len(_template_ids(tokenizer, conv.messages[:k], generation_prompt=True))
        upto = _template_ids(tokenizer, conv.messages[: k + 1], generation_prompt=False)
        if ids[: len(upto)] != upto:
            raise SwiftdistError(f"{conv.where}: the chat template renders turns inconsistently; cannot mask labels")
        labels[start : len(upto)] = ids[start : len(upto)]
    return ids, labels


def build_samples(tokenizer, conversations: list[Conversation], cfg: DataConfig) -> list[Sample]:
    samples, too_long, cut_off = [], 0, 0
    for sample_id, conv in enumerate(conversations):
        ids, labels = tokenize(tokenizer, conv)
        if len(ids) > cfg.max_length:
            if cfg.truncation == "drop":
                too_long += 1
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        if all(label == IGNORE for label in labels):
            cut_off += 1  # truncation removed every assistant token: the prompt alone fills max_length
            continue
        samples.append(Sample(ids, labels, list(range(len(ids))), [sample_id]))
    reasons = []
    if too_long:
        reasons.append(f"{too_long} longer than --max-length {cfg.max_length} (--truncation drop)")
    if cut_off:
        reasons.append(f"{cut_off} whose prompt alone fills --max-length {cfg.max_length}, leaving no answer to learn")
    why = "; ".join(reasons)
    if not samples:
        files = sorted({c.where.rpartition(":")[0] for c in conversations})
        raise SwiftdistError(f"no usable samples in {', '.join(files) or 'the dataset'}: all {len(conversations)} "
                             f"dropped: {why}; raise --max-length")
    if why:
        log.warning("dropped %d of %d samples: %s", too_long + cut_off, len(conversations), why)
    return pack(samples, cfg.max_length) if cfg.packing else samples


def pack(samples: list[Sample], max_length: int) -> list[Sample]:
    """Greedy first-fit in order. position_ids restart per sample, which tells transformers to keep
    attention inside each sample (varlen flash-attn on GPU, a block-causal mask with sdpa)."""
    packed, current = [], None
    for s in samples:
        if current is not None and len(current.input_ids) + len(s.input_ids) <= max_length:
            current.input_ids += s.input_ids
            current.labels += s.labels
            current.position_ids += s.position_ids
            current.sample_ids += s.sample_ids
        else:
            current = Sample(list(s.input_ids), list(s.labels), list(s.position_ids), list(s.sample_ids))
            packed.append(current)
    return packed


@dataclass
class SplitData:
    train: list[Sample]
    val: list[Sample]
    sources: list[tuple[str, Path, int]]  # (spec, file, rows taken) per --dataset: recognises the data on resume


def split_conversations(cfg: DataConfig, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) conversations: a seeded split, so `swiftdist eval --from-run` rebuilds the
    same validation set from a run's config.yaml."""
    conversations = [c for spec in cfg.dataset for c in load_conversations(spec, cfg, seed)]
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = int(len(conversations) * cfg.val_split)
    if cfg.val_split and n_val == 0:
        n_val = 1
    if n_val >= len(conversations):
        raise SwiftdistError(f"--val-split {cfg.val_split} holds out all {len(conversations)} conversation(s) of "
                             f"--dataset {' '.join(cfg.dataset)}, leaving none to train on")
    val = [conversations[i] for i in sorted(order[:n_val])]
    train = [conversations[i] for i in sorted(order[n_val:])]
    return train, val


def build_datasets(tokenizer, cfg: DataConfig, seed: int) -> SplitData:
    train, val = split_conversations(cfg, seed)
    rows = Counter(c.spec for c in train + val)
    return SplitData(build_samples(tokenizer, train, cfg), build_samples(tokenizer, val, cfg) if val else [],
                     [(spec, dataset_path(spec), rows[spec]) for spec in cfg.dataset])


# ---- batching ----------------------------------------------------------------------------------


def collate(samples: list[Sample], pad_id: int, packed: bool, padding_free: bool = False) -> dict[str, torch.Tensor | int]:
    """Right-pad to the longest sample. Padding carries label -100, so it never counts in the loss.

    `padding_free` (for flash_attention_2): every sample back to back in one row instead, see flatten().
    """
    if padding_free:
        return flatten(samples)
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(samples), width), dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        positions[row, :n] = torch.tensor(s.position_ids)
        positions[row, n:] = torch.arange(width - n)  # padding forms its own "sample"
        mask[row, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if not packed:
        # Packed rows must not carry an attention mask: transformers detects packing from
        # position_ids only when the mask is absent.
        batch["attention_mask"] = mask
    return batch


def flatten(samples: list[Sample]) -> dict[str, torch.Tensor | int]:
    """One row of all the samples' tokens, no padding, with flash-attention's varlen boundaries.

    transformers infers sample boundaries from position_ids only for a single row (and with a device
    sync in every layer); given `cu_seq_lens_q/k` (where each conversation starts, then the total)
    and `max_length_q/k` (the longest, a Python int as flash-attn wants it), as transformers'
    DataCollatorWithFlattening passes them, attention stays inside each conversation at any batch
    size and no token is padding. A conversation starts wherever position_ids restart at 0, so the
    conversations inside a packed sample are kept apart too.
    """
    ids = [t for s in samples for t in s.input_ids]
    positions = [p for s in samples for p in s.position_ids]
    labels = [label for s in samples for label in s.labels]
    starts = [i for i, p in enumerate(positions) if p == 0]
    for i in starts:
        # In one row the previous conversation's last token would be trained to predict this one.
        labels[i] = IGNORE
    bounds = torch.tensor([*starts, len(ids)], dtype=torch.int32)
    longest = int(bounds.diff().max())
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions]),
            "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds.clone(), "max_length_q": longest, "max_length_k": longest}


class StepSampler:
    """Which samples each rank trains on at each optimizer step — a pure function of the position —
    and how many steps a run of a given length takes.

    An epoch is a seeded permutation of all samples; a step takes the next `global_batch` of them
    and gives rank r a contiguous share. The position is the number of samples already consumed
    in the epoch, so a run resumed on a different number of ranks (a different global batch)
    continues exactly where the old one stopped: no sample is skipped or seen twice. The last step
    of an epoch may be short; ranks left without samples get padding-only rows (zero loss).
    """

    def __init__(self, n_samples: int, seed: int, batch_size: int, grad_accum: int, rank: int, world_size: int):
        self.n, self.seed = n_samples, seed
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * grad_accum * world_size

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def step_size(self, consumed: int, left: int) -> int:
        """Samples the next step takes: a global batch, cut short by the epoch's end or the run's."""
        return min(self.global_batch, self.n - consumed, left)

    def step_indices(self, epoch: int, consumed: int, left: int) -> list[tuple[int, list[int]]]:
        """This rank's micro-batches for the next step: (position of its first sample in the step, sample
        indices, possibly none). The position seeds dropout, so a sample draws the same masks whichever
        rank holds it, as long as the micro-batch size stays the same."""
        chosen = self.permutation(epoch)[consumed : consumed + self.step_size(consumed, left)]
        per_rank = -(-len(chosen) // self.world_size)
        start = self.rank * per_rank
        mine = chosen[start : start + per_rank]
        return [(start + i * self.batch_size, mine[i * self.batch_size : (i + 1) * self.batch_size])
                for i in range(self.grad_accum)]

    def run_length(self, max_steps: int, epochs: int) -> int:
        """Samples a run trains on: `max_steps` steps from the start (exactly that many, the short last
        step of an epoch included), else `epochs` epochs."""
        if max_steps <= 0:
            return epochs * self.n
        total, consumed = 0, 0
        for _ in range(max_steps):
            take = self.step_size(consumed, self.n)
            total, consumed = total + take, (consumed + take) % self.n
        return total

    def steps_left(self, consumed: int, done: int, total: int) -> int:
        """Steps from `consumed` samples into an epoch (`done` in the run) until the run's `total`."""
        steps = 0
        while done < total:
            take = self.step_size(consumed, total - done)
            steps, done, consumed = steps + 1, done + take, (consumed + take) % self.n
        return steps
