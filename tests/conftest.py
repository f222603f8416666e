import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    # Every test that asks for `device` runs on each available device; CUDA
    # cases are reported as skipped, not silently absent, on CPU-only machines.
    if "device" in metafunc.fixturenames:
        params = [
            pytest.param("cpu"),
            pytest.param(
                "cuda",
                marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
            ),
        ]
        metafunc.parametrize("device", params)


@pytest.fixture
def one_thread():
    # Tiny models: OpenMP's thread hand-off costs more than the arithmetic, and the machine is shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=[torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def dtype(request):
    return request.param
