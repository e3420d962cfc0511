"""Benchmark cases: LM-head shapes, presets, and the deterministic inputs of one case.

A case is one (head, N tokens, zero-weight fraction, dtype). Token weights imitate SFT data: the tokens
come in sequences of ``seq_len``; each sequence opens with a contiguous zero-weight "prompt" of
``round(zero_frac * seq_len)`` tokens, and its "response" is cut into three contiguous regions of
weights 1.0, 0.5 and 2.0 (a multi-region sample). Targets carry ``IGNORE_INDEX`` where the weight is 0
(the HF convention: labels are -100 on weight-0 tokens), so every implementation sees the same inputs.
"""

from __future__ import annotations

import dataclasses

import torch

IGNORE_INDEX = -100
RESPONSE_REGION_WEIGHTS = (1.0, 0.5, 2.0)


@dataclasses.dataclass(frozen=True)
class Head:
    """An LM head: hidden size H, vocabulary V, optional logit softcap."""

    name: str
    hidden: int
    vocab: int
    softcap: float | None = None


HEADS = {
    "llama3-8b": Head("llama3-8b", 4096, 128256),
    "qwen2.5-7b": Head("qwen2.5-7b", 3584, 152064),
    "gemma2-2b": Head("gemma2-2b", 2304, 256000, softcap=30.0),
    # small CPU heads (odd sizes on purpose)
    "tiny": Head("tiny", 128, 4099),
    "tiny-softcap": Head("tiny-softcap", 96, 5003, softcap=30.0),
    "h1024-v32k": Head("h1024-v32k", 1024, 32000),  # a mid-size head a CPU times in seconds
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case. ``dtype`` is the name of the inputs' dtype ("bfloat16", "float32")."""

    head: Head
    tokens: int
    zero_frac: float
    dtype: str
    seq_len: int
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.head.name}-N{self.tokens}-z{self.zero_frac:g}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Case:
        return cls(**{**data, "head": Head(**data["head"])})


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named set of cases and the implementations run on them (None: all of them)."""

    heads: tuple[str, ...]
    tokens: tuple[int, ...]
    zero_fracs: tuple[float, ...]
    dtype: str
    seq_len: int
    impls: tuple[str, ...] | None = None
    description: str = ""

    def cases(self, heads=None, tokens=None, zero_fracs=None) -> list[Case]:
        """Every (head, N, zero fraction) of the preset; a non-None argument replaces the preset's list."""
        return [
            Case(HEADS[head], n, zero_frac, self.dtype, min(self.seq_len, n))
            for head in heads or self.heads
            for n in tokens or self.tokens
            for zero_frac in zero_fracs or self.zero_fracs
        ]


PRESETS = {
    "full": Preset(
        ("llama3-8b", "qwen2.5-7b", "gemma2-2b"),
        (4096, 16384, 32768),
        (0.0, 0.5, 0.9),
        "bfloat16",
        2048,
        description="real LM heads in bf16 (GPU)",
    ),
    "quick": Preset(
        ("tiny", "tiny-softcap"),
        (512, 2048),
        (0.0, 0.5, 0.9),
        "float32",
        256,
        description="small fp32 shapes for a CPU",
    ),
    "cpu": Preset(
        ("h1024-v32k",),
        (4096,),
        (0.0, 0.5, 0.9),
        "float32",
        2048,
        impls=("plain", "torch-chunked", "torch-compile-chunked", "trl", "mrloss-torch"),
        description="mrloss torch backend vs plain PyTorch, F.linear_cross_entropy, torch.compile and TRL's fused "
        "LM head, N=4096 H=1024 V=32000 fp32 (CPU)",
    ),
    **{
        f"cpu-memory{suffix}": Preset(
            ("h1024-v32k",),
            (4096,),
            (0.0, 0.5),
            dtype,
            2048,
            impls=("plain", "mrloss-torch", "mrloss-torch-low"),
            description=f'mrloss torch backend, memory="fast" vs "low", and plain PyTorch, N=4096 H=1024 V=32000 '
            f"{dtype} (CPU)",
        )
        for suffix, dtype in (("", "float32"), ("-bf16", "bfloat16"))
    },
    "gpu-goals": Preset(
        ("llama3-8b", "gemma2-2b"),
        (16384,),
        (0.0, 0.5, 0.9),
        "bfloat16",
        2048,
        impls=("plain", "torch-chunked", "liger", "cce", "trl", "mrloss-triton", "mrloss-triton-low"),
        description="the deciding GPU cases: Llama-3-8B and Gemma-2-2B heads, N=16384 bf16, mrloss-triton vs plain "
        "PyTorch, F.linear_cross_entropy, Liger, CCE and TRL's fused LM head",
    ),
}


def token_weights_for(tokens: int, seq_len: int, zero_frac: float) -> torch.Tensor:
    """[tokens] fp32: per sequence a zero-weight prompt run, then regions weighted 1.0, 0.5, 2.0."""
    weights = torch.empty(tokens, dtype=torch.float32)
    for start in range(0, tokens, seq_len):
        length = min(seq_len, tokens - start)
        prompt = round(zero_frac * length)
        weights[start : start + prompt] = 0.0
        bounds = torch.linspace(start + prompt, start + length, len(RESPONSE_REGION_WEIGHTS) + 1).round().long()
        for region_weight, lo, hi in zip(RESPONSE_REGION_WEIGHTS, bounds[:-1], bounds[1:]):
            weights[lo:hi] = region_weight
    return weights


def make_inputs(case: Case, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Deterministic inputs of a case (same on every process of a device type; drawn on the device, so a
    GPU's numbers differ from a CPU's: a real head's weight is too large to draw on a CPU in every process).

    hidden [N, H] and weight [V, H] in the case dtype (leaves with requires_grad), targets [N] int64
    with IGNORE_INDEX on weight-0 tokens, token_weights [N] fp32. Logits come out with std about 2.
    """
    generator = torch.Generator(device).manual_seed(case.seed)
    head = case.head
    hidden = torch.randn(case.tokens, head.hidden, generator=generator, device=device)
    weight = torch.randn(head.vocab, head.hidden, generator=generator, device=device) * (2.0 / head.hidden**0.5)
    targets = torch.randint(0, head.vocab, (case.tokens,), generator=generator, device=device)
    token_weights = token_weights_for(case.tokens, case.seq_len, case.zero_frac).to(device)
    targets = torch.where(token_weights > 0, targets, IGNORE_INDEX)
    dtype = case.torch_dtype
    return {
        "hidden": hidden.to(dtype).requires_grad_(),
        "weight": weight.to(dtype).requires_grad_(),
        "targets": targets,
        "token_weights": token_weights,
    }


def learned_tokens(case: Case) -> int:
    """Number of tokens with a nonzero weight."""
    return int((token_weights_for(case.tokens, case.seq_len, case.zero_frac) > 0).sum())


def learned_flops(case: Case) -> float:
    """6 * N_learned * H * V: the matmul FLOPs of forward + backward over the learned tokens."""
    return 6.0 * learned_tokens(case) * case.head.hidden * case.head.vocab
