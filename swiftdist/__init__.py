"""swiftdist: fine-tune Hugging Face causal LMs with DDP, FSDP2, DeepSpeed ZeRO or Megatron."""

__version__ = "0.1.0"
