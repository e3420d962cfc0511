"""The summary `mrloss prepare` prints: counts of the valid samples, accumulated chunk by chunk."""

from __future__ import annotations

from collections import Counter

from mrloss.formats.regions import OUTSIDE


class PrepareSummary:
    """Counts of the valid samples, accumulated chunk by chunk (memory: one entry per region type and distinct
    token weight): samples, tokens, learned tokens, samples whose learned regions truncation cut, and per region
    type: regions, tokens, learned tokens, token weight -> count (every token, a sample's first one at weight 0, so
    the histogram's counts add up to the tokens)."""

    def __init__(self):
        self.samples = self.tokens = self.learned = self.truncated = 0
        self.types: dict[str, list] = {}  # name -> [regions, tokens, learned, Counter]

    def add(self, region_texts, encodings) -> None:
        import numpy as np

        if not encodings:
            return
        names = sorted({region.type for rt in region_texts for region in rt.regions}) + [OUTSIDE]
        index = {name: i for i, name in enumerate(names)}
        region_counts = np.zeros(len(names), dtype=np.int64)
        weights, types = [], []
        for rt, encoding in zip(region_texts, encodings):
            region_types = np.array([index[r.type] for r in rt.regions] + [index[OUTSIDE]], dtype=np.int64)
            np.add.at(region_counts, region_types[:-1], 1)
            weights.append(np.asarray(encoding["token_weights"], dtype=np.float64))
            types.append(region_types[np.asarray(encoding["region_ids"], dtype=np.int64)])  # id -1 -> OUTSIDE
        weights, types = np.concatenate(weights), np.concatenate(types)
        learned = weights > 0
        self.samples += len(encodings)
        self.tokens += len(weights)
        self.learned += int(learned.sum())
        self.truncated += sum(bool(e["truncated_regions"]) for e in encodings)
        for i, name in enumerate(names):
            in_type = types == i
            values, counts = np.unique(weights[in_type], return_counts=True)
            entry = self.types.setdefault(name, [0, 0, 0, Counter()])
            entry[0] += int(region_counts[i])
            entry[1] += int(in_type.sum())
            entry[2] += int((in_type & learned).sum())
            entry[3].update(dict(zip(values.tolist(), counts.tolist())))

    def merge(self, other: PrepareSummary) -> None:
        self.samples += other.samples
        self.tokens += other.tokens
        self.learned += other.learned
        self.truncated += other.truncated
        for name, (regions, tokens, learned, weights) in other.types.items():
            entry = self.types.setdefault(name, [0, 0, 0, Counter()])
            entry[0] += regions
            entry[1] += tokens
            entry[2] += learned
            entry[3].update(weights)

    def format(self, bad: int, tokenizer_note: str, seconds: float) -> str:
        lines = [
            f"samples: {self.samples} valid, {bad} bad",
            f"tokens: {self.tokens} ({self.learned} learned, {self.learned / max(self.tokens, 1):.1%})",
            f"tokenizer: {tokenizer_note}",
        ]
        if self.truncated:
            lines.append(f"truncation cut learned regions of {self.truncated} sample(s)")
        lines.append(f"{'region type':<20} {'regions':>8} {'tokens':>8} {'learned':>8}  token weight histogram")
        for name in sorted(set(self.types) - {OUTSIDE}) + [OUTSIDE]:
            regions, tokens, learned, weights = self.types.get(name, [0, 0, 0, Counter()])
            if tokens or regions:
                lines.append(f"{name:<20} {regions:>8} {tokens:>8} {learned:>8}  {_histogram(dict(weights))}")
        rate = self.samples / seconds if seconds > 0 else float("inf")
        lines.append(
            f"throughput: {self.samples} samples in {seconds:.3f} s ({rate:.0f} samples/s, tokenizer set-up excluded)"
        )
        return "\n".join(lines)


def _histogram(counts: dict[float, int], bins: int = 8) -> str:
    """``weight×count`` for up to ``bins`` distinct weights, else counts in ``bins`` equal-width bins."""
    if len(counts) <= bins:
        return " ".join(f"{weight:g}×{count}" for weight, count in sorted(counts.items()))
    low, high = min(counts), max(counts)
    width = (high - low) / bins
    binned = Counter()
    for weight, count in counts.items():
        binned[min(int((weight - low) / width), bins - 1)] += count
    return " ".join(f"[{low + b * width:.3g},{low + (b + 1) * width:.3g})×{binned[b]}" for b in sorted(binned))
