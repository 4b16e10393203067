"""Megatron-core tensor and pipeline parallelism: the strategy (`strategy`), the HF <-> mcore weight
bridge (`bridge`), LoRA on mcore's parallel layers (`lora`) and the patches that let megatron-core
run on CPU (`cpu_compat`)."""
