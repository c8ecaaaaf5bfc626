"""Decode-state snapshots: a DecodeState as bytes that read back into the same state, or are refused.

A conversation's decode state has a fixed size whatever its length (docs/DESIGN.md, "Bounded state"), so
the service can store it beside the conversation and resume from it instead of re-reading every token.
The bytes must survive a restart, a deploy and another replica, so the format is explicit and versioned,
never pickle (unpickling runs code, and a pickle does not say which model it belongs to):

    offset 0   8 bytes   MAGIC
    offset 8   uint32    FORMAT_VERSION (little-endian)
    offset 12  uint32    header length H
    offset 16  H bytes   header, UTF-8 JSON: identity, tokens, payload_bytes, crc32, tensors
    16 + H     payload   every tensor's raw bytes, little-endian, in the header's order

`tensors` lists `[name, dtype, shape]` per tensor: `length`, then `layers.<i>.<kind>.<field>` for each
layer's state fields in dataclass order. `identity` is the checkpoint's (`checkpoint_identity`: weights,
config and dtypes), so a state is only ever resumed by the model that computed it; `crc32` covers the
payload, so a flipped byte is refused rather than decoded into a silently different state.

Reading refuses, with a SnapshotError that names the reason, anything that is not exactly what this code
writes for this model: another format version, another checkpoint, a short or long buffer, a checksum
mismatch, or a layout (layer kinds, shapes, dtypes) other than the model's own init_state().
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from model.reformer import ReformerLM
from model.state import DecodeState, FullLayerState, LayerState, LocalLayerState, LSHLayerState

MAGIC = b"RFCSTATE"
# Bumped whenever the layout above or a state field's meaning changes; readers refuse other versions.
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sII")  # magic, version, header length

_KINDS: dict[str, type[LayerState]] = {"lsh": LSHLayerState, "local": LocalLayerState, "full": FullLayerState}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32)
}

Reason = Literal["version", "foreign", "truncated", "corrupt"]


class SnapshotError(ValueError):
    """The bytes are not a snapshot this model can resume from; `reason` says why, for metrics."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SnapshotHeader:
    identity: str  # the checkpoint that computed the state (checkpoint_identity)
    tokens: int  # tokens the state has seen: it covers the conversation's first `tokens` ids
    payload_bytes: int
    crc32: int
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape), in payload order


def checkpoint_identity(model: ReformerLM) -> str:
    """A hex digest of what decides a decode state's contents: the config, every parameter and buffer
    (name, dtype, shape, bytes) and the dtypes of the model's own decode state.

    Weights in another precision hash differently (their dtype and bytes differ), and so does a state
    held in another dtype, so a snapshot taken under fp32 is never resumed under bf16 or vice versa.
    Hashes every weight once (tens of milliseconds for the shipped model): call it once at load.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(_raw(tensor).numpy().data)
    template = model.init_state(1)
    layout = [[str(t.dtype) for t in layer.tensors()] for layer in template.layers]
    digest.update(json.dumps(layout).encode())
    return digest.hexdigest()


def _raw(tensor: Tensor) -> Tensor:
    """The tensor's bytes as a flat CPU uint8 tensor (bf16 has no numpy dtype, bytes always do)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def _named_tensors(state: DecodeState) -> list[tuple[str, Tensor]]:
    named = [("length", state.length)]
    for i, layer in enumerate(state.layers):
        kind = _KIND_OF[type(layer)]
        for field in dataclasses.fields(layer):
            named.append((f"layers.{i}.{kind}.{field.name}", getattr(layer, field.name)))
    return named


# ---- write ----------------------------------------------------------------------------------------------
def state_to_bytes(state: DecodeState, identity: str) -> bytes:
    """Serialise a batch-size-1 state; `identity` is checkpoint_identity() of the model that ran it."""
    tokens = state.seen_tokens()  # refuses a batch of several rows
    if sys.byteorder != "little":
        raise RuntimeError("snapshots are written little-endian; this machine is big-endian")
    parts = [(name, tensor, _raw(tensor).numpy().data) for name, tensor in _named_tensors(state)]
    crc = 0
    for _, _, raw in parts:
        crc = zlib.crc32(raw, crc)
    header = {
        "identity": identity,
        "tokens": tokens,
        "payload_bytes": sum(raw.nbytes for _, _, raw in parts),
        "crc32": crc,
        "tensors": [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t, _ in parts],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(head)), head, *(raw for _, _, raw in parts)])


# ---- read -----------------------------------------------------------------------------------------------
def read_header(data: bytes | bytearray | memoryview) -> SnapshotHeader:
    """The header alone (cheap: no payload is touched); SnapshotError when it is not a snapshot of this
    format version, or is cut short."""
    if len(data) < _PREAMBLE.size:
        raise SnapshotError("truncated", f"snapshot has {len(data)} bytes, shorter than its preamble")
    magic, version, head_len = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError("corrupt", f"not a decode-state snapshot (magic {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            "version",
            f"snapshot format version {version}, this code reads version {FORMAT_VERSION}: "
            "it was written by another release; the conversation is rebuilt from its token ids instead",
        )
    end = _PREAMBLE.size + head_len
    if len(data) < end:
        raise SnapshotError("truncated", f"snapshot has {len(data)} bytes, its header ends at {end}")
    try:
        raw = json.loads(bytes(data[_PREAMBLE.size : end]))
        header = SnapshotHeader(
            identity=str(raw["identity"]),
            tokens=int(raw["tokens"]),
            payload_bytes=int(raw["payload_bytes"]),
            crc32=int(raw["crc32"]),
            tensors=tuple((str(n), str(d), tuple(int(s) for s in shape)) for n, d, shape in raw["tensors"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError("corrupt", f"snapshot header is not valid ({exc})") from exc
    if len(data) != end + header.payload_bytes:
        reason: Reason = "truncated" if len(data) < end + header.payload_bytes else "corrupt"
        raise SnapshotError(
            reason, f"snapshot has {len(data)} bytes, its header says {end + header.payload_bytes}"
        )
    return header


def state_from_bytes(
    data: bytes | bytearray | memoryview, identity: str, like: DecodeState, device: torch.device | str = "cpu"
) -> DecodeState:
    """Read a snapshot back into a DecodeState on `device`.

    `identity` must equal the snapshot's (else reason "foreign"), and the tensors must have exactly the
    layer kinds, dtypes and shapes of `like` (the model's `init_state(1)`; a "full" layer's length may
    differ, its state grows). SnapshotError otherwise; nothing of a refused snapshot is ever returned.
    """
    header = read_header(data)
    if header.identity != identity:
        raise SnapshotError(
            "foreign",
            f"snapshot was taken by checkpoint {header.identity[:12]}, this model is {identity[:12]}",
        )
    start = len(data) - header.payload_bytes
    payload = bytearray(memoryview(data)[start:])  # one copy, writable: decode() advances it in place
    if zlib.crc32(payload) != header.crc32:
        raise SnapshotError("corrupt", "snapshot payload does not match its checksum")
    expected = _named_tensors(like)
    names = [name for name, _ in expected]
    if [name for name, _, _ in header.tensors] != names:
        raise SnapshotError("corrupt", "snapshot's tensors are not this model's layer layout")
    tensors: list[Tensor] = []
    offset = 0
    for (name, dtype_name, shape), (_, want) in zip(header.tensors, expected, strict=True):
        dtype = _DTYPES.get(dtype_name)
        grows = name.endswith((".full.keys", ".full.values"))
        if dtype != want.dtype or not _shape_fits(shape, tuple(want.shape), grows):
            raise SnapshotError(
                "corrupt",
                f"snapshot tensor {name} is {dtype_name}{list(shape)}, "
                f"this model's is {str(want.dtype).removeprefix('torch.')}{list(want.shape)}",
            )
        count = 1
        for size in shape:
            count *= size
        flat = torch.frombuffer(payload, dtype=dtype, count=count, offset=offset) if count else None
        tensor = flat.view(shape) if flat is not None else torch.empty(shape, dtype=dtype)
        tensors.append(tensor.to(device))
        offset += count * want.element_size()
    length, rest = tensors[0], iter(tensors[1:])
    if int(length[0]) != header.tokens:
        raise SnapshotError(
            "corrupt", f"snapshot header says {header.tokens} tokens, its state {int(length[0])}"
        )
    layers = [type(layer)(*[next(rest) for _ in layer.tensors()]) for layer in like.layers]
    return DecodeState(layers, length)


def _shape_fits(shape: tuple[int, ...], want: tuple[int, ...], grows: bool) -> bool:
    """Equal shapes, except that a growing ("full") state's dimension 2, its length, may differ."""
    if len(shape) != len(want):
        return False
    return all(a == b or (grows and i == 2) for i, (a, b) in enumerate(zip(shape, want, strict=True)))
