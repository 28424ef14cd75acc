import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MECHLIB_PROFILE", "quick")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The default real model, loaded once per test session."""
    from mechlib.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_attn():
    from mechlib.models import load_model

    return load_model("tiny-attn-2l", seed=0)


@pytest.fixture(scope="session")
def tiny_llama():
    from mechlib.models import load_model

    return load_model("tiny-llama-2l", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt():
    from mechlib.models import load_model

    return load_model("tiny-2l", seed=0)
