"""Benchmark ``mrloss.data.encode_batch`` against the tokenizer call it wraps: ``python -m bench.encode``.

Qwen's real vocabulary (``mrloss.data.tokenizer.qwen_tokenizer``) on seeded mixed Chinese / English samples
with weighted regions (default 3,000 samples, about 1.07M tokens). Times, best of ``--repeats``, alternating:
``tokenizer(texts, return_offsets_mapping=True)`` alone, and ``encode_batch`` (that call + token weights).
Prints both and their ratio (encode / tokenizer; the goal is <= 1.3).
"""

from __future__ import annotations

import argparse
import platform
import random
import time

CHINESE = (
    "梯度下降法通过迭代更新参数模型训练数据损失函数学习率优化器网络层权重偏置激活输出输入序列注意力机制语言生成任务"
)
ENGLISH = (
    "gradient descent updates the parameters of a model by following the negative gradient of the loss "
    "with a learning rate that controls the step size while attention layers mix tokens"
).split()


def make_region_texts(samples: int, seed: int = 0) -> list:
    """``samples`` RegionTexts of ~1,000 characters: sentences alternating Chinese / English, some of them
    inside weighted regions (weights 0.5 / 1 / 2, three types), the rest at default weight 0 or 0.1."""
    from mrloss.formats import Region, RegionText

    rng = random.Random(seed)
    region_texts = []
    for _ in range(samples):
        pieces, regions, length = [], [], 0
        while length < 980:
            if rng.random() < 0.5:
                sentence = "".join(rng.choice(CHINESE) for _ in range(rng.randint(8, 40))) + "。"
            else:
                sentence = " ".join(rng.choice(ENGLISH) for _ in range(rng.randint(5, 25))) + ". "
            if rng.random() < 0.4:
                weight = rng.choice((0.5, 1.0, 2.0))
                regions.append(Region(length, length + len(sentence), weight, rng.choice(("answer", "concept", "x"))))
            pieces.append(sentence)
            length += len(sentence)
        region_texts.append(RegionText("".join(pieces), regions, rng.choice((0.0, 0.1))))
    return region_texts


def measure(region_texts: list, tokenizer, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of the bare tokenizer call and of ``encode_batch``, and the token count."""
    from mrloss.data import encode_batch

    texts = [region_text.text for region_text in region_texts]
    tokenizer_seconds, encode_seconds = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        encodings = tokenizer(texts, return_offsets_mapping=True)
        tokenizer_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        encode_batch(region_texts, tokenizer)
        encode_seconds.append(time.perf_counter() - started)
    return {
        "tokens": sum(len(ids) for ids in encodings["input_ids"]),
        "tokenizer_s": min(tokenizer_seconds),
        "encode_s": min(encode_seconds),
        "ratio": min(encode_seconds) / min(tokenizer_seconds),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.encode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from mrloss.data.tokenizer import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    result = measure(make_region_texts(args.samples, args.seed), tokenizer, args.repeats)
    print(
        f"{platform.processor() or platform.machine()}: {args.samples} samples, {result['tokens']:,} tokens "
        "(Qwen BPE); "
        f"tokenizer call with offsets {result['tokenizer_s']:.3f} s, encode_batch {result['encode_s']:.3f} s, "
        f"ratio encode/tokenizer {result['ratio']:.2f} (best of {args.repeats})"
    )
    return result


if __name__ == "__main__":
    main()
