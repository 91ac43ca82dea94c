"""``auto``'s speed policy (sparselora.backends.speed, mma_sp_policy) on a simulated GPU, on the CPU.

The device is simulated by replacing ``speed.device_profile`` (name and compute capability), the
real ``mma-sp`` backend is allowed on the CPU (its GPU layout and the op's CPU kernel run
anywhere), and measured tables are written to a temporary table folder.
"""
import json
import logging

import pytest
import torch
import torch.nn as nn

from sparselora import SparseLinear
from sparselora.backends import Backend, register_backend
from sparselora.backends import base as backend_base
from sparselora.backends import mma_sp_policy, speed
from sparselora.backends.base import DeviceProfile, SpeedVerdict
from sparselora.backends.mma_sp_backend import DTYPES, MmaSpBackend
from sparselora.gpu_layout import to_gpu_layout
from sparselora.format import pack_24
from sparselora.memory import resident_bytes
from sparselora.patch import sparsify

from helpers import assert_linear, pruned_mlp

H200 = "NVIDIA H200"
BIG, SMALL = (128, 256), (64, 128)  # N x K; the prior's size bound is lowered to 2^14 between them


def _profile(name=H200, kind="cuda"):
    return DeviceProfile(torch.device("cpu"), kind, name if kind == "cuda" else "", (9, 0) if kind == "cuda" else (0, 0))


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A simulated H200: mma-sp runs (on CPU tensors), no table unless the test writes one."""
    monkeypatch.setattr(speed, "device_profile", lambda device: _profile())
    monkeypatch.setattr(MmaSpBackend, "unavailable_reason", lambda self: None)
    monkeypatch.setattr(MmaSpBackend, "unsupported_reason",
                        lambda self, d, dt, n, k: None if dt in DTYPES and k % 8 == 0 else "16-bit, K % 8 == 0 only")
    monkeypatch.setattr(mma_sp_policy, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(mma_sp_policy, "PRIOR_MIN_WEIGHT", 1 << 14)
    monkeypatch.setattr(speed, "_LOGGED", set())
    return tmp_path


def _write_table(folder, shapes, device=H200):
    path = mma_sp_policy.table_path(device, folder)
    path.write_text(json.dumps({"device": device, "dtype": "bfloat16", "backend": "mma-sp", "shapes": shapes}))
    return path


def _model(seed_dtype=torch.bfloat16):
    return pruned_mlp(nn.Linear(BIG[1], BIG[0], dtype=seed_dtype), nn.Linear(SMALL[1], SMALL[0], dtype=seed_dtype))


# -- the verdict alone -------------------------------------------------------------------------

def test_prior_without_a_table_is_decode_only_and_large_shapes_only(tmp_path):
    v = lambda n, k, t: mma_sp_policy.mma_sp_verdict(_profile(), n, k, t, tmp_path)  # noqa: E731
    for tokens in ([1], [1, 8, 16, 32], None):
        got = v(4096, 4096, tokens)
        assert (got.dense_faster, got.source) == (False, "prior") and "no table mma_sp_nvidia_h200.json" in got.detail
    for tokens in ([64], [1, 4096], [16384]):
        got = v(4096, 4096, tokens)
        assert (got.dense_faster, got.source) == (True, "prior") and "> 32" in got.detail, tokens
    for tokens in ([1], None):  # CLIP 1024x1024: launch-bound, ~1.0x predicted: no clear win
        got = v(1024, 1024, tokens)
        assert got.dense_faster and "launch-bound" in got.detail
    assert v(3584, 3584, [1]).dense_faster is False and v(4096, 1024, [1]).dense_faster is True  # 2^23 bound
    assert mma_sp_policy.mma_sp_verdict(_profile(kind="cpu"), 4096, 4096, [1], tmp_path) is None


def test_a_measured_table_decides_when_present(tmp_path):
    _write_table(tmp_path, {"4096x4096": {"measured_m": [1, 16, 4096], "slower_than_dense_m": [1]},
                            "1024x1024": {"measured_m": [1, 16], "slower_than_dense_m": [1, 16]}})
    v = lambda n, k, t: mma_sp_policy.mma_sp_verdict(_profile(), n, k, t, tmp_path)  # noqa: E731
    got = v(4096, 4096, [4096])  # the prior would say dense: the measurement wins
    assert (got.dense_faster, got.source) == (False, "measured") and "mma_sp_nvidia_h200.json" in got.detail
    assert v(4096, 4096, [2]).dense_faster and v(4096, 4096, [2]).source == "measured"  # nearest measured M: 1
    assert v(4096, 4096, [16]).dense_faster is False
    assert v(4096, 4096, None).dense_faster is False  # won at some measured M
    assert v(1024, 1024, None).dense_faster is True  # lost at every measured M
    got = v(3584, 3584, [1])  # not in the table: the prior, saying so
    assert (got.dense_faster, got.source) == (False, "prior") and "3584x3584 not measured" in got.detail
    # another device has no table: the prior
    assert mma_sp_policy.mma_sp_verdict(_profile("NVIDIA H100 80GB HBM3"), 4096, 4096, [4096], tmp_path).source == "prior"


# -- sparsify on the simulated GPU ---------------------------------------------------------------

def test_auto_on_a_gpu_without_tables_uses_the_prior_and_keeps_one_copy(gpu, caplog, seed):
    model = _model()
    small_dense = resident_bytes(model[2])
    small_mask = model[2].sparse_mask.numel()  # bool: 1 byte per weight element
    x = torch.randn(5, BIG[1], dtype=torch.float64).to(torch.bfloat16)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    with caplog.at_level(logging.INFO, logger="sparselora.backends.speed"):
        report = sparsify(model, tokens=[1, 16])
    assert report["0"].action == "sparse" and report["0"].backend == "mma-sp"
    assert "prior" in report["0"].reason and "no table" in report["0"].reason
    # the small layer: every backend said dense (mma-sp's prior, the reference on a GPU)
    assert report["2"].action == "dense" and "mma-sp dense F.linear faster (prior" in report["2"].reason
    assert "reference dense F.linear faster" in report["2"].reason
    # left dense: it holds its dense parameters and no longer the bool mask (patch.sparsify docs)
    assert type(model[2]) is nn.Linear and resident_bytes(model[2]) == small_dense - small_mask == report["2"].resident_bytes
    assert report["2"].resident_bytes == report["2"].dense_bytes
    # the sparse layer holds the GPU layout only (no canonical copy, no dense weight)
    layer = model[0]
    assert isinstance(layer, SparseLinear) and layer.requested_backend == "auto"
    gpu_bytes = to_gpu_layout(pack_24(w0)).nbytes()
    assert layer.resident_bytes() == report["0"].resident_bytes == gpu_bytes + b0.numel() * b0.element_size()
    assert sorted(n for n, _ in layer.named_buffers()) == ["backend_mma_sp_meta", "backend_mma_sp_values"]
    with torch.no_grad():
        assert_linear(layer(x), x, w0, b0, "auto-chosen mma-sp layer")
    # which source decided is logged once per layer shape
    msgs = [r.getMessage() for r in caplog.records if r.name == "sparselora.backends.speed"]
    assert len(msgs) == 2 and any("128x256" in m and "prior" in m for m in msgs), msgs
    with caplog.at_level(logging.INFO, logger="sparselora.backends.speed"):
        sparsify(_model(), tokens=[1, 16])
    assert len([r for r in caplog.records if r.name == "sparselora.backends.speed"]) == 2


def test_auto_on_a_gpu_leaves_prefill_dense_and_that_is_not_an_error(gpu):
    model = _model()
    report = sparsify(model, tokens=[4096], on_unsupported="raise")
    assert report.sparse == [] and report.dense == ["0", "2"]
    assert "M=[4096] > 32" in report["0"].reason and all(type(model[i]) is nn.Linear for i in (0, 2))
    for i in (0, 2):  # a dense-left layer holds its dense parameters only: no bool mask, nothing sparse
        lin = model[i]
        held = sum(t.numel() * t.element_size() for t in (lin.weight, lin.bias))
        assert resident_bytes(lin) == held == report[str(i)].resident_bytes and getattr(lin, "sparse_mask", None) is None
    # tokens not given: the large layer wins at decode, so it is packed; the small one never wins
    model = _model()
    assert sparsify(model).sparse == ["0"]
    # an explicit backend is honoured whatever the policy says
    assert sparsify(_model(), backend="mma-sp", tokens=[4096]).sparse == ["0", "2"]


def test_auto_on_a_gpu_follows_the_measured_table(gpu):
    _write_table(gpu, {f"{BIG[0]}x{BIG[1]}": {"measured_m": [1, 16, 4096], "slower_than_dense_m": [1, 16]},
                       f"{SMALL[0]}x{SMALL[1]}": {"measured_m": [1, 4096], "slower_than_dense_m": []}})
    report = sparsify(_model(), tokens=[1])
    assert report["0"].action == "dense" and "measured: mma_sp_nvidia_h200.json: dense won at M=[1]" in report["0"].reason
    assert report["2"].action == "sparse" and "measured" in report["2"].reason  # the prior would have said dense
    report = sparsify(_model(), tokens=[4096])
    assert report.sparse == ["0", "2"] and all("measured" in report[n].reason for n in ("0", "2"))


class _MeasuredFast(Backend):
    """A plugged-in backend below mma-sp with a measured win: auto must reach it past mma-sp's
    'dense faster' without any caller change."""

    name = "test-measured-fast"
    priority = 1

    def speed_verdict(self, profile, dtype, out_features, in_features, tokens=None):
        return SpeedVerdict(False, "measured", "test table") if profile.kind == "cuda" else None

    def linear(self, x, packed, extra, bias):
        from sparselora.ops import reference_sparse24_linear

        return reference_sparse24_linear(x, packed.values, packed.meta, bias)


def test_a_new_backend_plugs_into_the_policy(gpu):
    register_backend(_MeasuredFast())
    try:
        model = _model()
        report = sparsify(model, tokens=[4096])
        assert report.sparse == ["0", "2"] and {report[n].backend for n in ("0", "2")} == {"test-measured-fast"}
        assert "mma-sp dense F.linear faster (prior" in report["0"].reason
        assert model[0].requested_backend == "test-measured-fast"  # not auto's own pick (mma-sp): named
        # decode: mma-sp (higher priority) predicted to win on the large layer, so it takes it
        assert sparsify(_model(), tokens=[1])["0"].backend == "mma-sp"
    finally:
        backend_base._REGISTRY.pop("test-measured-fast", None)


def test_cpu_keeps_packing_without_a_verdict():
    # no GPU: nothing is measured or predicted, the reference backend packs every layer as before
    report = sparsify(_model(), tokens=[4096])
    assert report.sparse == ["0", "2"] and "no table or prior" in report["0"].reason


def test_a_layer_arriving_packed_stays_sparse_and_says_dense_would_be_faster(gpu, caplog):
    # e.g. load_sparse / from_pretrained / a CPU-sparsified model moved to the GPU: no dense weight
    # to keep, so auto keeps the priority pick; the verdict is in backend_reason and logged
    w = _model()[2].weight.detach()  # SMALL: the prior says dense at every M
    with caplog.at_level(logging.INFO, logger="sparselora.backends.speed"):
        layer = SparseLinear(pack_24(w))
        big = SparseLinear(pack_24(_model()[0].weight.detach()))
    assert layer.backend.name == "mma-sp" and "arrived packed" in layer.backend_reason
    assert "mma-sp dense F.linear faster (prior" in layer.backend_reason
    assert big.backend.name == "mma-sp" and "arrived packed" not in big.backend_reason
    assert sum("arrived packed" in r.getMessage() for r in caplog.records) == 1
