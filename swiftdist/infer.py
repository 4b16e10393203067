"""`swiftdist infer`: chat with a model (optionally + a LoRA adapter), one prompt or interactively."""

from __future__ import annotations

import argparse

import torch

from swiftdist.model import load_tokenizer, resolve_attn_impl, resolve_model_path


def load_for_inference(model: str, adapter: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    tokenizer = load_tokenizer(path, trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=resolve_attn_impl("auto"),
                                              trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return lm.to(device).eval(), tokenizer


@torch.no_grad()
def answer(lm, tokenizer, prompt: str, max_new_tokens: int = 96, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt").to(lm.device)
    out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="swiftdist infer", description=__doc__)
    parser.add_argument("--model", default="smollm2", help="HF model dir or alias (smollm2)")
    parser.add_argument("--adapter", help="a LoRA adapter dir (e.g. output/final)")
    parser.add_argument("--prompt", action="append", help="ask this (repeatable); without it: interactive")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    from swiftdist.distributed import setup_logging

    setup_logging(0)  # answers without library progress bars and deprecation notices between them
    lm, tokenizer = load_for_inference(args.model, args.adapter, args.trust_remote_code)
    if args.prompt:
        for prompt in args.prompt:
            print(f"Q: {prompt}\nA: {answer(lm, tokenizer, prompt, args.max_new_tokens, args.system)}")
        return 0
    print("interactive chat; an empty line or Ctrl-D quits")
    while True:
        try:
            prompt = input("> ").strip()
        except EOFError:
            return 0
        if not prompt:
            return 0
        print(answer(lm, tokenizer, prompt, args.max_new_tokens, args.system))
