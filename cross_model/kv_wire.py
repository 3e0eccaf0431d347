"""The KV payload on the wire: what KVComm and Q-KVComm send from A to B, as bytes.

Frame: b"CMKV" | format version (u16) | header length (u32) | JSON header | body | CRC-32 of all before.
The header names the two models, the receiver layers sent in full (and the sender layer each reads),
the receiver layers that get only A's first token (the attention sink), the shapes, the dtype and the
bits of each sent layer, and the quantization scheme. The body holds, per sent layer, keys then
values: raw in `dtype` when the layer's bits equal the dtype's width, else quantized as `QuantScheme`
says (asymmetric, uniform, float16 scales and zero points, codes bit-packed): the first `raw_first`
tokens travel raw (in `sink_dtype`: they are A's attention sink, whose outlier keys would stretch every
channel's range); the rest are optionally rotated by a normalised Hadamard matrix over the head
dimension (spreading outliers; B rotates back exactly), keys grouped per channel over runs of
`key_group` tokens, values per token over one head's or all heads' channels; the encoder may clip each
group's range to the one with the least squared error (`clip`, which changes no byte of the format).
Then every sink's key and value: raw (in `sink_dtype`, by default `dtype`), or with `sink_bits` 8
quantized per head (float16 scale and zero point). `payload_size(header)` is
len(encode(...)) without building the bytes (KVComm's tensors never need to leave the GPU to be counted).
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
VERSION = 3  # 3: values may carry their own widths (`value_bits`, in the header only then)
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
SCALE_BYTES = 2  # float16 scales and zero points
_PREAMBLE = struct.Struct("<4sHI")  # magic, version, header length
_CRC = struct.Struct("<I")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class QuantScheme:
    """How quantized layers are laid out. The defaults are the scheme that kept B's answers closest to
    KVComm's per bit on SmolLM2 (docs/METHODS.md, Q-KVComm); `QuantScheme.plain()` is per-channel keys
    and per-token values over all heads, min-max ranges, nothing raw."""

    key_group: int = 0  # tokens per key group (per channel); 0: all of them
    value_group: str = "head"  # "head": per token and head; "token": per token over all heads
    rotate: bool = True  # Hadamard over the head dimension before quantizing
    raw_first: int = 1  # leading tokens sent raw
    clip: bool = True  # encoder-side: least-squares range per group
    sink_bits: int = 16  # 16: sinks raw (in sink_dtype); 8: per-head 8-bit

    @staticmethod
    def plain() -> "QuantScheme":
        return QuantScheme(
            key_group=0, value_group="token", rotate=False, raw_first=0, clip=False, sink_bits=16
        )

    def check(self, head_dim: int) -> None:
        if self.key_group < 0 or self.raw_first < 0:
            raise ValueError(
                f"KV quantization: key_group and raw_first must be >= 0, got {self.key_group}, {self.raw_first}"
            )
        if self.sink_bits not in (8, 16):
            raise ValueError(f"KV quantization: sink_bits is 8 or 16 (raw), got {self.sink_bits}")
        if self.value_group not in ("head", "token"):
            raise ValueError(
                f"KV quantization: value_group is 'head' or 'token', got {self.value_group!r}"
            )
        if self.rotate and head_dim & (head_dim - 1):
            raise ValueError(
                f"KV quantization: a Hadamard rotation needs a power-of-two head dimension, this model's is "
                f"{head_dim}; set rotate: false"
            )


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
    bits: list[
        int
    ]  # per sent layer, the keys' width (and the values' without value_bits); the dtype's width means raw
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    sink_keys: list[torch.Tensor] = field(default_factory=list)
    sink_values: list[torch.Tensor] = field(default_factory=list)
    kv_heads: int = 0
    head_dim: int = 0
    tokens: int = 0
    sink_dtype: str | None = (
        None  # how the sinks travel (None: `dtype`); B gets them back in `dtype`
    )
    scheme: QuantScheme = field(default_factory=QuantScheme)
    value_bits: list[int] | None = None  # per sent layer, the values' width (None: `bits`)

    def header(self) -> dict:
        # `value_bits` only where the values' widths differ from the keys': the usual header is v2's.
        own = (
            {"value_bits": self.value_bits}
            if self.value_bits is not None and self.value_bits != self.bits
            else {}
        )
        return {
            "sender": self.sender,
            "receiver": self.receiver,
            "layers": self.layers,
            "sender_layers": self.sender_layers,
            "sink_layers": self.sink_layers,
            "sink_sender_layers": self.sink_sender_layers,
            "dtype": self.dtype,
            "bits": self.bits,
            **own,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "tokens": self.tokens,
            "sink_dtype": self.sink_dtype or self.dtype,
            "scale_dtype": "float16",
            "scheme": {
                "key_group": self.scheme.key_group,
                "value_group": self.scheme.value_group,
                "rotate": self.scheme.rotate,
                "raw_first": self.scheme.raw_first,
                "clip": self.scheme.clip,
                "sink_bits": self.scheme.sink_bits,
            },
        }


# --- quantization ----------------------------------------------------------------------------------


CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # shrink factors of a group's range tried by `clip`


def _scale_zero(
    lo: torch.Tensor, hi: torch.Tensor, levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    zero = lo.to(torch.float16)
    return ((hi - zero.float()) / levels).clamp(min=1e-7).to(torch.float16), zero


def _codes(xf: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round((xf - zero.float()) / scale.float()).clamp(0, levels).to(torch.uint8)


def quantize(
    x: torch.Tensor,
    bits: int,
    reduce_dims: tuple[int, ...],
    clip: bool = False,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization; one (scale, zero) per group, a group spanning `reduce_dims`.
    Scale and zero are rounded to float16 first, so that B dequantizes with exactly what was used.
    `clip`: per group, the range (min-max shrunk about its centre by one of CLIP_RATIOS) whose
    dequantized values are closest to x in squared error; at 2-3 bits the tails cost less than the
    resolution they take from everything else. `valid` (broadcast to x): only those entries count (a
    batch's padding); a group without one gets a zero range, its codes never sent."""
    if bits not in QUANT_BITS:
        raise ValueError(f"KV quantization: bits must be one of {QUANT_BITS}, got {bits}")
    xf = x.float()
    valid = torch.ones((), dtype=torch.bool, device=x.device) if valid is None else valid
    valid = valid.expand_as(xf)
    lo = torch.where(valid, xf, math.inf).amin(reduce_dims, keepdim=True)
    hi = torch.where(valid, xf, -math.inf).amax(reduce_dims, keepdim=True)
    empty = valid.to(torch.uint8).amax(reduce_dims, keepdim=True) == 0
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    if not (
        torch.isfinite(lo).all()
        and torch.isfinite(hi).all()
        and lo.abs().max() < 65504
        and hi.abs().max() < 65504
    ):
        raise ValueError(
            "KV quantization: values beyond float16's range cannot be given float16 scales"
        )
    levels = 2**bits - 1
    scale, zero = _scale_zero(lo, hi, levels)
    if clip:
        mid, best = (lo + hi) / 2, None
        for r in CLIP_RATIOS:
            s, z = _scale_zero(mid - (mid - lo) * r, mid + (hi - mid) * r, levels)
            diff = dequantize(_codes(xf, s, z, levels), s, z, torch.float32) - xf
            err = torch.where(valid, diff * diff, 0.0).sum(reduce_dims, keepdim=True)
            if best is None:
                best = err
                continue
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return _codes(xf, scale, zero, levels), scale, zero


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
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
    planes = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[
        : n * bits
    ].reshape(n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1).astype(np.uint8)


# --- sizes -----------------------------------------------------------------------------------------


def _scheme(h: dict) -> QuantScheme:
    return QuantScheme(**h["scheme"])


def kv_bits(h: dict) -> list[tuple[int, int]]:
    """Per sent layer, (the keys' width, the values' width)."""
    return list(zip(h["bits"], h.get("value_bits") or h["bits"]))


def _layer_sizes(h: dict, bits: int) -> tuple[int, int]:
    """Bytes of one sent layer's keys and values in the body."""
    H, n, D = h["kv_heads"], h["tokens"], h["head_dim"]
    if bits == dtype_bits(h["dtype"]):
        raw = H * n * D * bits // 8
        return raw, raw
    sc = _scheme(h)
    r = min(sc.raw_first, n)
    m = n - r
    head = H * r * D * dtype_bits(h["sink_dtype"]) // 8 + math.ceil(H * m * D * bits / 8)
    key_groups = (math.ceil(m / sc.key_group) if sc.key_group else 1) if m else 0
    value_groups = m * (H if sc.value_group == "head" else 1)
    return head + 2 * SCALE_BYTES * H * D * key_groups, head + 2 * SCALE_BYTES * value_groups


def _header_bytes(h: dict) -> bytes:
    return json.dumps(h, sort_keys=True, separators=(",", ":")).encode("utf-8")


def payload_size(header: dict) -> int:
    """len(encode(payload)) for a payload with this header."""
    body = sum(
        _layer_sizes(header, kb)[0] + _layer_sizes(header, vb)[1] for kb, vb in kv_bits(header)
    )
    H, D = header["kv_heads"], header["head_dim"]
    per_sink = (
        H * D + 2 * SCALE_BYTES * H
        if _scheme(header).sink_bits == 8
        else H * D * dtype_bits(header["sink_dtype"]) // 8
    )
    sink = 2 * len(header["sink_layers"]) * per_sink
    return _PREAMBLE.size + len(_header_bytes(header)) + body + sink + _CRC.size


# --- encode / decode -------------------------------------------------------------------------------


def _raw(x: torch.Tensor, dtype: torch.dtype) -> bytes:
    return x.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()


def _from_raw(buf: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).reshape(shape).clone()


_HADAMARD: dict[tuple[int, str], torch.Tensor] = {}


def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix: symmetric and orthogonal, so it is its own inverse."""
    key = (n, str(device))
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = (h / math.sqrt(n)).to(device, torch.float32)
    return _HADAMARD[key]


def _quantized_layer(
    x: torch.Tensor, bits: int, sc: QuantScheme, is_key: bool, raw_dtype: torch.dtype
) -> list[bytes]:
    """One layer's keys or values (H x n x D) as the body lays them out: raw leading tokens, codes,
    scales, zero points."""
    r = min(sc.raw_first, x.shape[1])
    rest = x[:, r:].float()
    if sc.rotate:
        rest = rest @ hadamard(x.shape[-1], x.device)
    if not rest.shape[1]:
        return [_raw(x[:, :r], raw_dtype)]
    if is_key:  # per channel, over runs of key_group tokens
        g = sc.key_group or rest.shape[1]
        parts = [
            quantize(rest[:, i : i + g], bits, (1,), sc.clip) for i in range(0, rest.shape[1], g)
        ]
        codes, scale, zero = (torch.cat(t, 1) for t in zip(*parts))
    else:
        codes, scale, zero = quantize(
            rest, bits, (2,) if sc.value_group == "head" else (0, 2), sc.clip
        )
    return [
        _raw(x[:, :r], raw_dtype),
        pack_bits(codes.cpu().numpy(), bits),
        _raw(scale, torch.float16),
        _raw(zero, torch.float16),
    ]


def _dequantized_layer(take, h: dict, bits: int, is_key: bool) -> torch.Tensor:
    H, n, D = h["kv_heads"], h["tokens"], h["head_dim"]
    sc, dtype, raw_dtype = _scheme(h), DTYPES[h["dtype"]], DTYPES[h["sink_dtype"]]
    r = min(sc.raw_first, n)
    m = n - r
    first = _from_raw(take(H * r * D * dtype_bits(h["sink_dtype"]) // 8), raw_dtype, (H, r, D)).to(
        dtype
    )
    if not m:
        return first
    codes = torch.from_numpy(
        unpack_bits(take(math.ceil(H * m * D * bits / 8)), bits, H * m * D)
    ).reshape(H, m, D)
    if is_key:
        g = sc.key_group or m
        groups = math.ceil(m / g)
        scale = _from_raw(
            take(SCALE_BYTES * H * groups * D), torch.float16, (H, groups, D)
        ).repeat_interleave(g, 1)[:, :m]
        zero = _from_raw(
            take(SCALE_BYTES * H * groups * D), torch.float16, (H, groups, D)
        ).repeat_interleave(g, 1)[:, :m]
    else:
        shape = (H, m, 1) if sc.value_group == "head" else (1, m, 1)
        scale = _from_raw(take(SCALE_BYTES * shape[0] * m), torch.float16, shape)
        zero = _from_raw(take(SCALE_BYTES * shape[0] * m), torch.float16, shape)
    rest = dequantize(codes, scale, zero, torch.float32)
    if sc.rotate:
        rest = rest @ hadamard(D)
    return torch.cat([first, rest.to(dtype)], 1)


def check_widths(p: KVPayload) -> None:
    """One key width and one value width per sent layer, each the dtype's (raw) or a quantized one."""
    values = p.value_bits if p.value_bits is not None else p.bits
    if len(p.bits) != len(p.layers) or len(values) != len(p.layers):
        raise ValueError(
            "KV payload: one bit width and one key/value pair per sent layer, one sink per sink layer"
        )
    raw = dtype_bits(p.dtype)
    bad = [b for b in [*p.bits, *values] if b != raw and b not in QUANT_BITS]
    if bad:
        raise ValueError(
            f"KV payload: widths are {raw} ({p.dtype}, raw) or one of {QUANT_BITS}, got {bad[0]}"
        )
    if any(b != raw for b in [*p.bits, *values]):
        p.scheme.check(p.head_dim)


def encode(p: KVPayload) -> bytes:
    h = p.header()
    dtype = DTYPES[p.dtype]
    check_widths(p)
    if len(p.keys) != len(p.layers) or len(p.sink_keys) != len(p.sink_layers):
        raise ValueError(
            "KV payload: one bit width and one key/value pair per sent layer, one sink per sink layer"
        )
    sink_dtype = DTYPES[h["sink_dtype"]]
    body = []
    for (kb, vb), k, v in zip(kv_bits(h), p.keys, p.values):
        if tuple(k.shape) != (p.kv_heads, p.tokens, p.head_dim) or k.shape != v.shape:
            raise ValueError(
                f"KV payload: layer tensors must be {p.kv_heads} x {p.tokens} x {p.head_dim}, got {tuple(k.shape)}"
            )
        for x, bits, is_key in ((k, kb, True), (v, vb, False)):
            body += (
                [_raw(x, dtype)]
                if bits == dtype_bits(p.dtype)
                else _quantized_layer(x, bits, p.scheme, is_key, sink_dtype)
            )
    for k, v in zip(p.sink_keys, p.sink_values):
        for x in (k, v):
            if p.scheme.sink_bits == 8:  # one (scale, zero) per head
                codes, scale, zero = quantize(x, 8, (1, 2))
                body += [
                    codes.cpu().numpy().tobytes(),
                    _raw(scale, torch.float16),
                    _raw(zero, torch.float16),
                ]
            else:
                body.append(_raw(x, sink_dtype))
    return frame(MAGIC, VERSION, _header_bytes(h), b"".join(body))


def read_header(blob: bytes, receiver: str, kv_heads: int, head_dim: int) -> tuple[dict, int]:
    """A checked payload's header and where its body starts. A corrupted payload, another format or
    version, or one meant for another receiver (whose KV shape is kv_heads x head_dim) is refused."""
    h, start = read_frame(blob, MAGIC, VERSION, "KV payload")
    if h["receiver"] != receiver or (h["kv_heads"], h["head_dim"]) != (kv_heads, head_dim):
        raise PayloadError(
            f"KV payload: made for receiver {h['receiver']!r} ({h['kv_heads']} KV heads x {h['head_dim']}), "
            f"not for {receiver!r} ({kv_heads} x {head_dim})"
        )
    if payload_size(h) != len(blob):
        raise PayloadError(
            f"KV payload: {len(blob)} bytes where its header describes {payload_size(h)}"
        )
    return h, start


def read_frame(blob: bytes, magic: bytes, version: int, what: str) -> tuple[dict, int]:
    """A frame's checked JSON header and where its body starts: magic | version (u16) | header length
    (u32) | header | body | CRC-32 of all before. A changed byte, another format or version is refused."""
    if len(blob) < _PREAMBLE.size + _CRC.size:
        raise PayloadError(f"{what}: {len(blob)} bytes is too short to be one")
    (crc,) = _CRC.unpack(blob[-_CRC.size :])
    if zlib.crc32(blob[: -_CRC.size]) != crc:
        raise PayloadError(
            f"{what}: checksum mismatch, the bytes were changed in transit or truncated"
        )
    got_magic, got_version, n_head = _PREAMBLE.unpack(blob[: _PREAMBLE.size])
    if got_magic != magic or got_version != version:
        raise PayloadError(
            f"{what}: format {got_magic!r} v{got_version}, this reader handles {magic!r} v{version}"
        )
    return json.loads(blob[_PREAMBLE.size : _PREAMBLE.size + n_head]), _PREAMBLE.size + n_head


def frame(magic: bytes, version: int, header: bytes, body: bytes) -> bytes:
    blob = _PREAMBLE.pack(magic, version, len(header)) + header + body
    return blob + _CRC.pack(zlib.crc32(blob))


def decode(
    blob: bytes, receiver: str, kv_heads: int, head_dim: int, device: torch.device | str = "cpu"
) -> KVPayload:
    """The payload's tensors, dequantized, for `receiver` (whose KV shape is kv_heads x head_dim).
    A corrupted payload, another format or version, or one meant for another receiver is refused."""
    h, pos = read_header(blob, receiver, kv_heads, head_dim)
    dtype = DTYPES[h["dtype"]]
    H, n, D = h["kv_heads"], h["tokens"], h["head_dim"]

    def take(size: int) -> bytes:
        nonlocal pos
        pos += size
        return blob[pos - size : pos]

    p = KVPayload(
        h["sender"],
        h["receiver"],
        h["layers"],
        h["sender_layers"],
        h["sink_layers"],
        h["sink_sender_layers"],
        h["dtype"],
        h["bits"],
        kv_heads=H,
        head_dim=D,
        tokens=n,
        sink_dtype=h["sink_dtype"],
        scheme=_scheme(h),
    )
    sink_dtype, sink_elem = DTYPES[h["sink_dtype"]], dtype_bits(h["sink_dtype"]) // 8
    elem = torch.finfo(dtype).bits // 8
    p.value_bits = h.get("value_bits")
    for kb, vb in kv_bits(h):
        k, v = (
            _from_raw(take(H * n * D * elem), dtype, (H, n, D))
            if bits == dtype_bits(h["dtype"])
            else _dequantized_layer(take, h, bits, is_key)
            for bits, is_key in ((kb, True), (vb, False))
        )
        p.keys.append(k.to(device))
        p.values.append(v.to(device))
    for _ in h["sink_layers"]:
        kv = []
        for _ in range(2):
            if p.scheme.sink_bits == 8:
                codes = torch.frombuffer(bytearray(take(H * D)), dtype=torch.uint8).reshape(H, 1, D)
                scale = _from_raw(take(SCALE_BYTES * H), torch.float16, (H, 1, 1))
                zero = _from_raw(take(SCALE_BYTES * H), torch.float16, (H, 1, 1))
                kv.append(dequantize(codes, scale, zero, dtype).to(device))
            else:
                kv.append(
                    _from_raw(take(H * D * sink_elem), sink_dtype, (H, 1, D)).to(device, dtype)
                )
        p.sink_keys.append(kv[0])
        p.sink_values.append(kv[1])
    return p
