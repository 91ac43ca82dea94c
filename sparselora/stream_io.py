"""Read safetensors files one tensor at a time, without mmap, with per-tensor checksums.

Why not ``safe_open``: a memory map keeps every page it touched resident (and counted in the
process RSS) until the map closes, so reading a checkpoint through it costs up to twice its size
on the host. Here each tensor is read with ``readinto`` straight into the tensor that keeps it
(or through a fixed-size buffer when only hashing), so the peak is the tensors kept plus one
chunk.

The checksum of a tensor is sha256 over ``"<dtype>|<shape>|"`` and its raw bytes as stored
(little-endian, row-major): :func:`tensor_sha256` computes the same value from a tensor in memory.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

__all__ = ["CheckpointError", "TensorInfo", "read_header", "tensor_sha256", "hash_file_tensors", "iter_bytes", "read_tensor", "release_freed_heap", "ST_DTYPES"]

# safetensors dtype names -> torch dtypes (the ones a model checkpoint holds)
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CHUNK = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, of an unknown format, or does not fit the model."""


class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    __slots__ = ("name", "dtype", "shape", "start", "end")

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int):
        self.name, self.dtype, self.shape, self.start, self.end = name, dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def meta_tensor(self) -> torch.Tensor:
        """A meta-device stand-in with the stored shape and dtype (for checks that read no data)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def release_freed_heap() -> None:
    """Give the malloc heap's free pages back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    Why: a load interleaves tensors it keeps with temporaries of similar sizes (validation sums,
    index checks, backend preparation, some on torch's worker threads), and glibc keeps the freed
    ones resident as fragments between kept blocks: on a 1B-parameter load that was +0.4x to +1x
    the checkpoint of RSS, all of it returned by one ``malloc_trim(0)``. Loaders call this after each
    packed layer."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def read_header(file) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """(metadata, {name: TensorInfo}) from a safetensors header; byte offsets are absolute.
    Raises ``ValueError`` naming the file on a header that is truncated or inconsistent."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{file}: header length {n} runs past the end of the file ({size} bytes): truncated")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = {}
    for name, d in header.items():
        dtype = ST_DTYPES.get(d.get("dtype"))
        if dtype is None:
            raise ValueError(f"{file}: tensor '{name}' has dtype {d.get('dtype')!r}, which this reader does not know")
        start, end = (base + int(x) for x in d["data_offsets"])
        shape = tuple(int(s) for s in d["shape"])
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * torch.empty((), dtype=dtype).element_size() or end > size:
            raise ValueError(f"{file}: tensor '{name}' ({d['dtype']} {list(shape)}) has a byte range [{start}, {end}) that does not fit "
                             f"its shape or the file ({size} bytes): truncated or corrupt")
        tensors[name] = TensorInfo(name, dtype, shape, start, end)
    return meta, tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _prefix(dtype: torch.dtype, shape) -> bytes:
    return f"{_dtype_name(dtype)}|{list(shape)}|".encode()


def tensor_sha256(t: torch.Tensor) -> str:
    """Checksum of a tensor in memory (equal to the one :func:`hash_file_tensors` computes from a file)."""
    h = hashlib.sha256(_prefix(t.dtype, t.shape))
    t = t.detach()
    if t.numel():
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def iter_bytes(file, info: TensorInfo, buf: Optional[memoryview] = None) -> Iterator[memoryview]:
    """The stored bytes of one tensor, 16 MiB at a time (each chunk valid until the next), read
    into ``buf`` when given (reuse one across tensors: allocating it is a memset)."""
    if buf is None:
        buf = memoryview(bytearray(min(_CHUNK, max(info.nbytes, 1))))
    with open(file, "rb", buffering=0) as f:
        f.seek(info.start)
        left = info.nbytes
        while left:
            got = f.readinto(buf[: min(left, len(buf))])
            if not got:
                raise ValueError(f"tensor '{info.name}' ends early: the file is truncated")
            yield buf[:got]
            left -= got


def hash_file_tensors(file, infos: Iterable[TensorInfo]) -> Iterator[tuple[str, str]]:
    """(name, sha256) of each tensor, read in chunks of 16 MiB (nothing kept)."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(file, "rb", buffering=0) as f:
        for info in sorted(infos, key=lambda i: i.start):
            h = hashlib.sha256(_prefix(info.dtype, info.shape))
            f.seek(info.start)
            left = info.nbytes
            while left:
                got = f.readinto(view[: min(left, _CHUNK)])
                if not got:
                    raise ValueError(f"{file}: tensor '{info.name}' ends early: truncated")
                h.update(view[:got])
                left -= got
            yield info.name, h.hexdigest()


def read_tensor(f, info: TensorInfo, device: Optional[torch.device] = None, want_sha256: bool = False) -> tuple[torch.Tensor, Optional[str]]:
    """Read one tensor from an open binary file into fresh host memory (then ``device``), hashing
    it on the way when asked. Host memory: the tensor itself, nothing more."""
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes:
        raw = out.reshape(-1).view(torch.uint8).numpy()
        f.seek(info.start)
        view = memoryview(raw)
        done = 0
        while done < info.nbytes:
            got = f.readinto(view[done: min(info.nbytes, done + _CHUNK)])
            if not got:
                raise ValueError(f"tensor '{info.name}' ends early: the file is truncated")
            done += got
    digest = None
    if want_sha256:
        h = hashlib.sha256(_prefix(info.dtype, info.shape))
        if info.nbytes:
            h.update(out.reshape(-1).view(torch.uint8).numpy())
        digest = h.hexdigest()
    if device is not None and torch.device(device) != out.device:
        out = out.to(device)
    return out, digest
