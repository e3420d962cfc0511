"""Multi-region data: token weights (``encode``), datasets, collators, example data, ``mrloss prepare``."""

from mrloss.data.collator import MultiRegionCollator
from mrloss.data.dataset import MultiRegionDataset
from mrloss.data.encode import TRUNCATION_MODES, encode, encode_batch
from mrloss.data.examples import write_examples
from mrloss.data.tokenizer import train_bpe_tokenizer

__all__ = [
    "encode",
    "encode_batch",
    "TRUNCATION_MODES",
    "MultiRegionDataset",
    "MultiRegionCollator",
    "train_bpe_tokenizer",
    "write_examples",
]
