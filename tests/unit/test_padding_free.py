"""Padding-free batches for flash-attention: one row, explicit varlen boundaries, samples kept apart.

flash-attn has no CPU kernels, so the model runs here with a reference attention registered under
its own name: causal sdpa inside each [cu_seq_lens[i], cu_seq_lens[i+1]) span, computed from the
kwargs alone (it refuses to run without them). It receives exactly what flash_attention_2 would,
through the same transformers plumbing (model -> decoder layer -> attention **kwargs).
"""

import pytest
import torch
import torch.nn.functional as F

from swiftdist.config import DataConfig
from swiftdist.data import IGNORE, Conversation, build_samples, collate, pack
from swiftdist.loss import output_head, target_count, token_loss_sum
from swiftdist.model import load_tokenizer

REFERENCE = "varlen_reference"


def varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                               cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    if cu_seq_lens_q is None or max_length_q is None:
        raise AssertionError("the varlen boundaries did not reach the attention function")
    assert torch.equal(cu_seq_lens_q, cu_seq_lens_k) and max_length_q == max_length_k
    assert query.shape[0] == 1, "padding-free batches are one row"
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.empty_like(query)
    bounds = cu_seq_lens_q.tolist()
    assert max(b - a for a, b in zip(bounds, bounds[1:])) == max_length_q
    for a, b in zip(bounds, bounds[1:]):
        out[:, :, a:b] = F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                        is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def reference_model(tiny_llama):
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(REFERENCE, varlen_reference_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE, flash_attention_mask)  # as flash: no mask without padding
    return without_cache(AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=REFERENCE))


def without_cache(model):
    """As load_model leaves it for training: with a KV cache transformers would not detect packed rows."""
    model.config.use_cache = False
    return model.eval()


def conv(question, answer):
    return Conversation([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "test:1")


def samples_of(tok):
    """Two packed samples of two conversations each, then one alone: a micro-batch of three rows."""
    convs = [conv("hi", "hello"), conv("what is two plus two?", "four"),
             conv("name a colour", "blue, like the sky"), conv("and a fruit?", "a pear"), conv("bye", "goodbye")]
    singles = build_samples(tok, convs, DataConfig())
    rows = pack(singles[:2], 1024) + pack(singles[2:4], 1024) + [singles[4]]
    assert [r.sample_ids for r in rows] == [[0, 1], [2, 3], [4]]
    return singles, rows


def test_flattened_batch_carries_the_samples_boundaries(tok):
    singles, rows = samples_of(tok)
    batch = collate(rows, tok.pad_token_id, packed=True, padding_free=True)
    lengths = [len(s.input_ids) for s in singles]
    assert batch["input_ids"].shape == (1, sum(lengths))  # one row, not a single pad token
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert torch.equal(batch["cu_seq_lens_k"], batch["cu_seq_lens_q"]) and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    assert isinstance(batch["max_length_q"], int)  # flash-attn takes a Python int (no device sync)
    assert "attention_mask" not in batch
    # The same positions are trained as in the padded batch: no conversation predicts the next one's first token.
    padded = collate(rows, tok.pad_token_id, packed=True)
    assert target_count(batch) == target_count(padded)
    assert all(batch["labels"][0, start] == IGNORE for start in batch["cu_seq_lens_q"][:-1].tolist())


def test_flattened_batch_gives_each_sample_its_solo_logits(tok, reference_model):
    singles, rows = samples_of(tok)
    batch = collate(rows, tok.pad_token_id, packed=True, padding_free=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        flat = reference_model(**inputs, use_cache=False).logits[0]
        bounds = batch["cu_seq_lens_q"].tolist()
        for sample, a, b in zip(singles, bounds, bounds[1:]):
            alone = reference_model(input_ids=torch.tensor([sample.input_ids]), use_cache=False,
                                    cu_seq_lens_q=torch.tensor([0, b - a], dtype=torch.int32),
                                    cu_seq_lens_k=torch.tensor([0, b - a], dtype=torch.int32),
                                    max_length_q=b - a, max_length_k=b - a).logits[0]
            # fp32 on one CPU: the same math on different shapes, so only summation-order noise remains.
            torch.testing.assert_close(flat[a:b], alone, atol=1e-5, rtol=1e-5)
        # The check has teeth: one span over the whole row lets the samples see each other.
        total = bounds[-1]
        leaky = reference_model(**{**inputs, "cu_seq_lens_q": torch.tensor([0, total], dtype=torch.int32),
                                   "cu_seq_lens_k": torch.tensor([0, total], dtype=torch.int32),
                                   "max_length_q": total, "max_length_k": total}, use_cache=False).logits[0]
        assert not torch.allclose(leaky[bounds[1]:], flat[bounds[1]:], atol=1e-3)


def test_flattened_loss_equals_the_padded_batch_loss(tok, tiny_llama, reference_model):
    from transformers import AutoModelForCausalLM

    _, rows = samples_of(tok)
    sdpa = without_cache(AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa"))
    with torch.no_grad():
        flat = token_loss_sum(reference_model, output_head(reference_model),
                              collate(rows, tok.pad_token_id, packed=True, padding_free=True))
        padded = token_loss_sum(sdpa, output_head(sdpa), collate(rows, tok.pad_token_id, packed=True))
    torch.testing.assert_close(flat, padded, atol=1e-4, rtol=1e-6)  # fp32 sums of ~60 token losses: summation-order noise
