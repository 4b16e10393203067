import pytest
import torch

from swiftdist.config import DataConfig
from swiftdist.data import IGNORE, Conversation, build_samples, collate, pack
from swiftdist.errors import SwiftdistError
from swiftdist.loss import output_head, token_loss_sum
from swiftdist.model import load_tokenizer


def conv(question, answer):
    return Conversation([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "t:1")


@pytest.fixture(scope="module")
def model_and_samples(tiny_llama):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_llama)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    model.config.use_cache = False
    samples = build_samples(tok, [conv("hi", "hello there"), conv("what is two plus two?", "four"),
                                  conv("name a colour", "blue, or perhaps a deep green")], DataConfig())
    return model, tok, samples


@pytest.mark.parametrize("packed", [False, True])
def test_label_only_logits_give_transformers_loss_and_gradients(model_and_samples, packed):
    model, tok, samples = model_and_samples
    rows = pack(samples, 1024) if packed else samples
    batch = collate(rows, tok.pad_token_id, packed)
    n_labels = (batch["labels"][:, 1:] != IGNORE).sum()

    reference = model(**batch).loss * n_labels  # transformers' token-mean loss, back to a sum
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = token_loss_sum(model, model.lm_head, batch)
    ours.backward()
    # fp32: the same math on a subset of rows of the LM head's input, so only summation order differs.
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    model.zero_grad()


@pytest.mark.parametrize("packed", [False, True])
def test_logits_are_computed_for_labelled_positions_only(model_and_samples, packed):
    model, tok, samples = model_and_samples
    batch = collate(pack(samples, 1024) if packed else samples, tok.pad_token_id, packed)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    token_loss_sum(model, model.lm_head, batch)
    hook.remove()
    # Position t predicts label t+1: one logit row per label token (a row's first label is never one).
    assert seen == [int((batch["labels"][:, 1:] != IGNORE).sum())]
    assert seen[0] < batch["input_ids"].numel() / 2


def test_a_row_without_labels_gives_zero_loss_and_still_runs_backward(model_and_samples):
    model, tok, _ = model_and_samples
    batch = collate(build_samples(tok, [conv("hi", "x")], DataConfig())[:1], tok.pad_token_id, False)
    batch["labels"][:] = IGNORE  # the padding-row fallback of a rank without samples
    loss = token_loss_sum(model, model.lm_head, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    model.zero_grad()


def test_a_model_without_an_lm_head_is_refused_in_one_line(tiny_llama):
    from transformers import AutoModel

    with pytest.raises(SwiftdistError, match="LlamaModel has no output embeddings"):
        output_head(AutoModel.from_pretrained(tiny_llama))
