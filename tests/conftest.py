import pytest

from tests.helpers import arithmetic_rows, write_jsonl


@pytest.fixture(scope="session")
def tiny_llama():
    """A random 2-layer Llama (hidden 64) with SmolLM2's tokenizer, cached under ~/.cache/swiftdist."""
    from swiftdist.model import resolve_model_path

    return resolve_model_path("tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    from swiftdist.model import resolve_model_path

    return resolve_model_path("tiny-qwen2")


@pytest.fixture(scope="session")
def smollm2():
    from swiftdist.model import resolve_model_path

    return resolve_model_path("smollm2")


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", arithmetic_rows(32))


@pytest.fixture
def process_group():
    """A one-process gloo group for in-process training, torn down after the test."""
    from swiftdist.distributed import destroy

    yield
    destroy()
