import os
import signal

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU. It must be set before
# any @triton.jit function is first called (importing torch does not call any).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A shell starts a background job (`cmd &` without job control, as CI wrappers and `nohup` do) with
# SIGINT ignored, and Python then installs no Ctrl-C handler, for itself or the CLIs it spawns. The
# Ctrl-C tests (test_staging, test_cli_safety) need what a terminal gives: an interruptible process.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    # fresh random inputs per run, reproducible from the printed seed on failure:
    # SPARSELORA_TEST_SEED=<seed> python -m pytest ... replays it
    fixed = os.environ.get("SPARSELORA_TEST_SEED")
    s = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


@pytest.fixture(scope="module")
def one_torch_thread():
    # tiny matmuls: two OpenMP threads on a shared 2-core machine spin against each other
    # (measured 10x+ slower); restored afterwards for other test modules
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
