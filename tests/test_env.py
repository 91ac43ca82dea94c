import os
import subprocess
import sys

import sparselora.env


def test_env_report_lists_backends():
    info = sparselora.env.collect()
    assert info["torch"] and "reference" in info["backends"]
    assert info["backends"]["reference"]["available"] is True
    text = sparselora.env.report()
    assert "reference" in text and "torch" in text
    # memory is part of what a backend is: the report says which ones hold a second weight copy
    assert "reference    [1 weight copy]" in text and "cusparselt   [2 weight copies, auto only with allow_extra_copy]" in text


def test_imports_beside_public_triton_kernels(tmp_path):
    # a public distribution owns the name `triton_kernels`: ours installs as
    # sparselora.triton_kernels, and both must import in one process (run from a neutral cwd).
    code = (
        "import importlib.util, sparselora, sparselora.triton_kernels as ours\n"
        "spec = importlib.util.find_spec('triton_kernels')\n"
        "print(ours.__name__, spec.origin if spec else None)\n"
        "if spec: import triton_kernels; assert triton_kernels.__file__ != ours.__file__\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sparselora.triton_kernels")


def test_python_m_env_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sparselora.env"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "backends" in out.stdout
