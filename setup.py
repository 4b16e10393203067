from glob import glob

from setuptools import setup

setup(
    name="swiftdist",
    version="0.1.0",
    description="Fine-tune Hugging Face causal LMs (full, LoRA, QLoRA) on one or many devices",
    python_requires=">=3.10",
    packages=["swiftdist", "swiftdist.strategies", "swiftdist.strategies.megatron", "swiftdist.launchers"],
    package_dir={"swiftdist.strategies": "strategies", "swiftdist.launchers": "launchers"},
    package_data={"swiftdist": ["data/*.jsonl"]},
    # The SLURM templates stay a top-level folder (users read and adapt them); a non-editable
    # install carries a copy under <prefix>/share/swiftdist/slurm.
    data_files=[("share/swiftdist/slurm", glob("slurm/*"))],
    # torch is deliberately not listed: the install scripts put it in first (TORCH_SPEC), so
    # pip never swaps a local CPU wheel for a multi-GB CUDA build.
    install_requires=[
        "transformers>=4.56",
        "peft>=0.17",
        "bitsandbytes>=0.45",
        "deepspeed>=0.17",
        "megatron-core>=0.13",
        "datasets>=3.0",
        "wandb>=0.19",
        "omegaconf>=2.3",
        "safetensors",
        "accelerate",
        "gguf",
        "matplotlib",
        "tqdm",
        "rouge-score",  # swiftdist eval's ROUGE-L
        "fastapi",  # swiftdist serve
        "uvicorn",
    ],
    extras_require={"test": ["pytest", "openai"], "megatron": ["mbridge", "einops"]},
    entry_points={"console_scripts": ["swiftdist=swiftdist.cli:main"]},
)
