"""The KV payload on the wire: what KVComm and Q-KVComm send from A to B, as bytes.

Frame: b"CMKV" | format version (u16) | header length (u32) | JSON header | body | CRC-32 of all before.
The header names the two models, the receiver layers sent in full (and the sender layer each reads),
the receiver layers that get only A's first token (the attention sink), the shapes, the dtype and the
bits of each sent layer. The body holds, per sent layer, keys then values: raw in `dtype` when the
layer's bits equal the dtype's width, else quantized (asymmetric, uniform; keys grouped per channel
over the tokens, values per token over all heads' channels; float16 scales and zero points), with the
codes bit-packed; then every sink's key and value, raw (in `sink_dtype`, by default `dtype`). `payload_size(header)` is len(encode(...))
without building the bytes (KVComm's tensors never need to leave the GPU to be counted).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

MAGIC = b"CMKV"
VERSION = 1
QUANT_BITS = (2, 3, 4, 8)
SCALE_BYTES = 2  # float16 scales and zero points
_PREAMBLE = struct.Struct("<4sHI")  # magic, version, header length
_CRC = struct.Struct("<I")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class PayloadError(ValueError):
    """A payload that cannot be read here: corrupted, another format, or meant for another receiver."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"KV payload: unsupported dtype {dtype}")


def dtype_bits(name: str) -> int:
    return torch.finfo(DTYPES[name]).bits


@dataclass
class KVPayload:
    """One example's KV message. Tensors are H x n x D (sinks H x 1 x D), on any device."""

    sender: str
    receiver: str
    layers: list[int]  # receiver layers sent in full
    sender_layers: list[int]  # the sender layer each of them reads
    sink_layers: list[int]  # receiver layers that get only the sink
    sink_sender_layers: list[int]
    dtype: str
    bits: list[int]  # per sent layer; the dtype's width means raw
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    sink_keys: list[torch.Tensor] = field(default_factory=list)
    sink_values: list[torch.Tensor] = field(default_factory=list)
    kv_heads: int = 0
    head_dim: int = 0
    tokens: int = 0
    sink_dtype: str | None = None  # how the sinks travel (None: `dtype`); B gets them back in `dtype`

    def header(self) -> dict:
        return {
            "sender": self.sender, "receiver": self.receiver, "layers": self.layers,
            "sender_layers": self.sender_layers, "sink_layers": self.sink_layers,
            "sink_sender_layers": self.sink_sender_layers, "dtype": self.dtype, "bits": self.bits,
            "kv_heads": self.kv_heads, "head_dim": self.head_dim, "tokens": self.tokens,
            "sink_dtype": self.sink_dtype or self.dtype, "key_group": "channel", "value_group": "token", "scale_dtype": "float16",
        }


# --- quantization ----------------------------------------------------------------------------------


def quantize(x: torch.Tensor, bits: int, reduce_dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization; one (scale, zero) per group, a group spanning `reduce_dims`.
    Scale and zero are rounded to float16 first, so that B dequantizes with exactly what was used."""
    if bits not in QUANT_BITS:
        raise ValueError(f"KV quantization: bits must be one of {QUANT_BITS}, got {bits}")
    xf = x.float()
    lo, hi = xf.amin(reduce_dims, keepdim=True), xf.amax(reduce_dims, keepdim=True)
    levels = 2**bits - 1
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / levels).clamp(min=1e-7).to(torch.float16)
    if not (torch.isfinite(zero).all() and torch.isfinite(scale).all()):
        raise ValueError("KV quantization: values beyond float16's range cannot be given float16 scales")
    codes = torch.round((xf - zero.float()) / scale.float()).clamp(0, levels).to(torch.uint8)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Codes < 2**bits as a little-endian bit stream of ceil(n * bits / 8) bytes."""
    codes = codes.astype(np.uint8).reshape(-1)
    if bits == 8:
        return codes.tobytes()
    planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return np.frombuffer(buf, dtype=np.uint8, count=n).copy()
    planes = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[: n * bits].reshape(n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1).astype(np.uint8)


# --- sizes -----------------------------------------------------------------------------------------


def _layer_sizes(h: dict, bits: int) -> tuple[int, int]:
    """Bytes of one sent layer's keys and values in the body."""
    H, n, D = h["kv_heads"], h["tokens"], h["head_dim"]
    if bits == dtype_bits(h["dtype"]):
        raw = H * n * D * bits // 8
        return raw, raw
    codes = math.ceil(H * n * D * bits / 8)
    return codes + 2 * SCALE_BYTES * H * D, codes + 2 * SCALE_BYTES * n


def _header_bytes(h: dict) -> bytes:
    return json.dumps(h, sort_keys=True, separators=(",", ":")).encode("utf-8")


def payload_size(header: dict) -> int:
    """len(encode(payload)) for a payload with this header."""
    body = sum(sum(_layer_sizes(header, b)) for b in header["bits"])
    sink = 2 * len(header["sink_layers"]) * header["kv_heads"] * header["head_dim"] * dtype_bits(header["sink_dtype"]) // 8
    return _PREAMBLE.size + len(_header_bytes(header)) + body + sink + _CRC.size


# --- encode / decode -------------------------------------------------------------------------------


def _raw(x: torch.Tensor, dtype: torch.dtype) -> bytes:
    return x.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()


def _from_raw(buf: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def encode(p: KVPayload) -> bytes:
    h = p.header()
    dtype = DTYPES[p.dtype]
    if len(p.bits) != len(p.layers) or len(p.keys) != len(p.layers) or len(p.sink_keys) != len(p.sink_layers):
        raise ValueError("KV payload: one bit width and one key/value pair per sent layer, one sink per sink layer")
    body = []
    for bits, k, v in zip(p.bits, p.keys, p.values):
        if tuple(k.shape) != (p.kv_heads, p.tokens, p.head_dim) or k.shape != v.shape:
            raise ValueError(f"KV payload: layer tensors must be {p.kv_heads} x {p.tokens} x {p.head_dim}, got {tuple(k.shape)}")
        if bits == dtype_bits(p.dtype):
            body += [_raw(k, dtype), _raw(v, dtype)]
            continue
        kc, ks, kz = quantize(k, bits, (1,))  # per channel: one group per (head, channel) over the tokens
        vc, vs, vz = quantize(v, bits, (0, 2))  # per token: one group per token over every head's channels
        for codes, scale, zero in ((kc, ks, kz), (vc, vs, vz)):
            body += [pack_bits(codes.cpu().numpy(), bits), _raw(scale, torch.float16), _raw(zero, torch.float16)]
    sink_dtype = DTYPES[h["sink_dtype"]]
    for k, v in zip(p.sink_keys, p.sink_values):
        body += [_raw(k, sink_dtype), _raw(v, sink_dtype)]
    head = _header_bytes(h)
    blob = _PREAMBLE.pack(MAGIC, VERSION, len(head)) + head + b"".join(body)
    return blob + _CRC.pack(zlib.crc32(blob))


def decode(blob: bytes, receiver: str, kv_heads: int, head_dim: int, device: torch.device | str = "cpu") -> KVPayload:
    """The payload's tensors, dequantized, for `receiver` (whose KV shape is kv_heads x head_dim).
    A corrupted payload, another format or version, or one meant for another receiver is refused."""
    if len(blob) < _PREAMBLE.size + _CRC.size:
        raise PayloadError(f"KV payload: {len(blob)} bytes is too short to be one")
    (crc,) = _CRC.unpack(blob[-_CRC.size :])
    if zlib.crc32(blob[: -_CRC.size]) != crc:
        raise PayloadError("KV payload: checksum mismatch, the bytes were changed in transit or truncated")
    magic, version, n_head = _PREAMBLE.unpack(blob[: _PREAMBLE.size])
    if magic != MAGIC or version != VERSION:
        raise PayloadError(f"KV payload: format {magic!r} v{version}, this reader handles {MAGIC!r} v{VERSION}")
    h = json.loads(blob[_PREAMBLE.size : _PREAMBLE.size + n_head])
    if h["receiver"] != receiver or (h["kv_heads"], h["head_dim"]) != (kv_heads, head_dim):
        raise PayloadError(
            f"KV payload: made for receiver {h['receiver']!r} ({h['kv_heads']} KV heads x {h['head_dim']}), "
            f"not for {receiver!r} ({kv_heads} x {head_dim})"
        )
    if payload_size(h) != len(blob):
        raise PayloadError(f"KV payload: {len(blob)} bytes where its header describes {payload_size(h)}")
    dtype = DTYPES[h["dtype"]]
    H, n, D = h["kv_heads"], h["tokens"], h["head_dim"]
    pos = _PREAMBLE.size + n_head

    def take(size: int) -> bytes:
        nonlocal pos
        pos += size
        return blob[pos - size : pos]

    p = KVPayload(h["sender"], h["receiver"], h["layers"], h["sender_layers"], h["sink_layers"],
                  h["sink_sender_layers"], h["dtype"], h["bits"], kv_heads=H, head_dim=D, tokens=n,
                  sink_dtype=h["sink_dtype"])
    sink_dtype, sink_elem = DTYPES[h["sink_dtype"]], dtype_bits(h["sink_dtype"]) // 8
    elem = torch.finfo(dtype).bits // 8
    for bits in h["bits"]:
        if bits == dtype_bits(h["dtype"]):
            k = _from_raw(take(H * n * D * elem), dtype, (H, n, D))
            v = _from_raw(take(H * n * D * elem), dtype, (H, n, D))
        else:
            n_codes = math.ceil(H * n * D * bits / 8)
            kc = torch.from_numpy(unpack_bits(take(n_codes), bits, H * n * D)).reshape(H, n, D)
            ks = _from_raw(take(SCALE_BYTES * H * D), torch.float16, (H, 1, D))
            kz = _from_raw(take(SCALE_BYTES * H * D), torch.float16, (H, 1, D))
            vc = torch.from_numpy(unpack_bits(take(n_codes), bits, H * n * D)).reshape(H, n, D)
            vs = _from_raw(take(SCALE_BYTES * n), torch.float16, (1, n, 1))
            vz = _from_raw(take(SCALE_BYTES * n), torch.float16, (1, n, 1))
            k, v = dequantize(kc, ks, kz, dtype), dequantize(vc, vs, vz, dtype)
        p.keys.append(k.to(device))
        p.values.append(v.to(device))
    for _ in h["sink_layers"]:
        p.sink_keys.append(_from_raw(take(H * D * sink_elem), sink_dtype, (H, 1, D)).to(device, dtype))
        p.sink_values.append(_from_raw(take(H * D * sink_elem), sink_dtype, (H, 1, D)).to(device, dtype))
    return p
