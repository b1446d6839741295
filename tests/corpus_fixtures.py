"""The small stdlib corpus and the SentencePiece tokenizer trained on it, shared by the data tests
(pytest finds fixtures a test module imports)."""
import pytest

from llada2_jax.data import corpora
from llada2_jax.data.tokenizers import SentencePieceTokenizer


@pytest.fixture(scope="module")
def docs():
    # Small documents plus a few longer than a row, so splitting is exercised.
    return corpora.load_corpus("stdlib", max_documents=40, max_bytes=120_000)


@pytest.fixture(scope="module")
def tok(docs):
    return SentencePieceTokenizer.train(corpora.texts(docs), vocab_size=600)
