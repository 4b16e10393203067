import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from swiftdist.config import DataConfig
from swiftdist.data import IGNORE, Conversation, build_samples, collate, pack
from swiftdist.errors import SwiftdistError
from swiftdist.loss import DEFAULT_CHUNK, output_head, token_loss_sum
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


def reference_loss_and_grads(model, batch):
    """transformers' own token-mean loss over every position's logits, back to a sum, and its gradients."""
    n_labels = (batch["labels"][:, 1:] != IGNORE).sum()
    loss = model(**batch).loss * n_labels
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("chunk_size", [0, 1, 5, DEFAULT_CHUNK])
@pytest.mark.parametrize("packed", [False, True])
def test_label_only_logits_give_transformers_loss_and_gradients(model_and_samples, packed, chunk_size):
    """Whole (0), chunked, one row per chunk (1) and the default: every parameter's gradient, the
    tied embedding / LM head included, as transformers computes them from all logits at once."""
    model, tok, samples = model_and_samples
    rows = pack(samples, 1024) if packed else samples
    batch = collate(rows, tok.pad_token_id, packed)
    reference, ref_grads = reference_loss_and_grads(model, batch)

    ours = token_loss_sum(model, model.lm_head, batch, chunk_size)
    ours.backward()
    # fp32: the same math on a subset of rows of the LM head's input; only the order of the sums
    # differs. The loss: ~1e-7 relative. A gradient summed over n labelled rows in another order
    # (the head's weight gradient chunk by chunk, and what flows back from it) moves by up to
    # ~n x 6e-8 of its largest entry: measured 4e-6 with 98 one-row chunks. So each gradient is
    # held to 1e-5 of its own scale; a real error (a chunk dropped or counted twice, an unscaled
    # gradient) is >= 1e-2 of it.
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-6)
    for name, p in model.named_parameters():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5 * scale, rtol=1e-5, msg=name)
    model.zero_grad()


def test_chunked_loss_gives_lora_gradients_through_a_frozen_head(tiny_llama):
    """LoRA: the head is frozen, so only the hidden states' gradient comes out of the chunks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_llama)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.0,
                                            init_lora_weights=False))
    batch = collate(build_samples(tok, [conv("hi", "hello there"), conv("2+2?", "four")], DataConfig()),
                    tok.pad_token_id, False)
    reference, ref_grads = reference_loss_and_grads(model, batch)
    ours = token_loss_sum(model, output_head(model), batch, chunk_size=2)
    ours.backward()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-6)  # as above
    assert ref_grads and {n for n, p in model.named_parameters() if p.grad is not None} == set(ref_grads)
    for name, p in model.named_parameters():
        if p.grad is not None:
            scale = ref_grads[name].abs().max().item()
            torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5 * scale, rtol=1e-5, msg=name)


class LargestTensor(TorchDispatchMode):
    """Tensor accounting at the dispatcher: the largest tensor any op allocates (an output on an
    input's storage, such as the transposed head weight, allocates nothing), forward and backward: a
    CUDA-free stand-in for torch.cuda.max_memory_allocated that sees every allocation."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("packed", [False, True])
def test_logits_never_exceed_one_chunk(model_and_samples, packed):
    model, tok, samples = model_and_samples
    batch = collate(pack(samples, 1024) if packed else samples, tok.pad_token_id, packed)
    n_labels = int((batch["labels"][:, 1:] != IGNORE).sum())
    vocab = model.config.vocab_size
    largest = {}
    # A frozen head (as with LoRA): its weight gradient, vocab x hidden whichever loss computes it,
    # would otherwise be the largest tensor and hide the logits'.
    model.lm_head.weight.requires_grad_(False)
    try:
        for chunk_size in (0, 4):
            with LargestTensor() as seen:
                token_loss_sum(model, model.lm_head, batch, chunk_size).backward()
            largest[chunk_size] = seen.largest
            model.zero_grad()
    finally:
        model.lm_head.weight.requires_grad_(True)
    # Whole: the [labels x vocab] logits (never all positions': the head sees labelled ones only).
    assert largest[0] == n_labels * vocab < batch["input_ids"].numel() * vocab
    # Chunked: nothing larger than one chunk of logits (4 rows), far below all labels' logits.
    assert largest[4] == 4 * vocab < n_labels * vocab


def test_evaluation_without_grad_mode_computes_no_gradients(model_and_samples):
    model, tok, samples = model_and_samples
    batch = collate(samples, tok.pad_token_id, False)
    expected = token_loss_sum(model, model.lm_head, batch, 4).detach()
    with torch.no_grad(), LargestTensor() as seen:
        loss = token_loss_sum(model, model.lm_head, batch, 4)
    assert torch.equal(loss, expected)
    # The trainable head's weight gradient (vocab x hidden) would be the largest tensor; none is made.
    assert seen.largest == 4 * model.config.vocab_size


def test_a_model_that_changes_its_logits_after_the_head_needs_the_whole_loss(model_and_samples):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model, tok, samples = model_and_samples
    batch = collate(samples, tok.pad_token_id, False)
    whole = token_loss_sum(model, model.lm_head, batch, 0)
    # As Gemma 2 does: the model softcaps what its head returned, which a chunked loss never sees.
    softcap = model.register_forward_hook(lambda m, a, out: CausalLMOutputWithPast(logits=3 * torch.tanh(out.logits / 3)))
    try:
        with pytest.raises(SwiftdistError, match="changes its logits after the LM head.*use --loss-chunk-size 0"):
            token_loss_sum(model, model.lm_head, batch, 4)
        assert token_loss_sum(model, model.lm_head, batch, 0) != whole  # the whole loss goes through the softcap
    finally:
        softcap.remove()


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
