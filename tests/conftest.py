import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    # a test that changes the default dtype must not leak it into the next one
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
