import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def byte_tokenizer():
    """Every byte one token, ChatML template, EOS = <|im_end|> (see dtm_fast.train.tiny)."""
    from dtm_fast.train.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def bare_tokenizer():
    """The same tokenizer without any chat template, as a base model's would be."""
    from dtm_fast.train.tiny import build_tokenizer

    return build_tokenizer(chat_template=None)
