"""The latent on the wire: M x d_z numbers, raw or quantized with kv_wire's quantizer.

Frame: b"CMLZ" | version (u16) | header length (u32) | JSON header {m, d_z, bits, dtype} | body |
CRC-32 of all before. Body: the latent raw in `dtype` when `bits` is the dtype's width; else codes of
`bits` bits, bit-packed, with one float16 (scale, zero) per latent vector (asymmetric, min-max over its
d_z numbers: kv_wire.quantize). `payload_size` is len(encode(...)) from the header alone.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import torch

from cross_model.kv_wire import (
    DTYPES,
    QUANT_BITS,
    SCALE_BYTES,
    PayloadError,
    dequantize,
    dtype_bits,
    frame,
    pack_bits,
    quantize,
    read_frame,
    unpack_bits,
)

MAGIC = b"CMLZ"
VERSION = 1
_PREAMBLE = struct.Struct("<4sHI")
_CRC = struct.Struct("<I")


def check_bits(bits: int, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"latent wire: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if bits != dtype_bits(dtype) and bits not in QUANT_BITS:
        raise ValueError(
            f"latent wire: bits must be {dtype_bits(dtype)} ({dtype}, raw) or one of {QUANT_BITS}, got {bits}"
        )


def _header(m: int, d_z: int, bits: int, dtype: str) -> bytes:
    return json.dumps(
        {"m": m, "d_z": d_z, "bits": bits, "dtype": dtype}, sort_keys=True, separators=(",", ":")
    ).encode()


def payload_size(m: int, d_z: int, bits: int, dtype: str = "float16") -> int:
    """Bytes of one encoded latent: preamble + header + body + CRC."""
    check_bits(bits, dtype)
    if bits == dtype_bits(dtype):
        body = m * d_z * bits // 8
    else:
        body = math.ceil(m * d_z * bits / 8) + 2 * SCALE_BYTES * m
    return _PREAMBLE.size + len(_header(m, d_z, bits, dtype)) + body + _CRC.size


def quantize_dequantize(z_MD: torch.Tensor, bits: int, dtype: str = "float16") -> torch.Tensor:
    """What the receiver gets back, computed without the bytes (float32)."""
    check_bits(bits, dtype)
    if bits == dtype_bits(dtype):
        return z_MD.detach().to(DTYPES[dtype]).float()
    codes, scale, zero = quantize(z_MD.detach().float(), bits, (1,))
    return dequantize(codes, scale, zero, torch.float32)


def encode(z_MD: torch.Tensor, bits: int, dtype: str = "float16") -> bytes:
    check_bits(bits, dtype)
    if z_MD.dim() != 2:
        raise ValueError(f"latent wire: one latent is M x d_z, got shape {tuple(z_MD.shape)}")
    m, d_z = z_MD.shape
    z = z_MD.detach().cpu()
    if bits == dtype_bits(dtype):
        body = z.to(DTYPES[dtype]).contiguous().view(torch.uint8).numpy().tobytes()
    else:
        codes, scale, zero = quantize(z.float(), bits, (1,))
        body = (
            pack_bits(codes.numpy(), bits)
            + scale.contiguous().view(torch.uint8).numpy().tobytes()
            + zero.contiguous().view(torch.uint8).numpy().tobytes()
        )
    return frame(MAGIC, VERSION, _header(m, d_z, bits, dtype), body)


def decode(blob: bytes) -> torch.Tensor:
    """The latent (float32, M x d_z); a corrupted or foreign payload is refused."""
    h, start = read_frame(blob, MAGIC, VERSION, "latent payload")
    m, d_z, bits, dtype = h["m"], h["d_z"], h["bits"], h["dtype"]
    if payload_size(m, d_z, bits, dtype) != len(blob):
        raise PayloadError(
            f"latent payload: {len(blob)} bytes where its header describes {payload_size(m, d_z, bits, dtype)}"
        )
    body = blob[start : -_CRC.size]
    if bits == dtype_bits(dtype):
        return (
            torch.frombuffer(bytearray(body), dtype=torch.uint8)
            .view(DTYPES[dtype])
            .reshape(m, d_z)
            .float()
        )
    n_codes = math.ceil(m * d_z * bits / 8)
    codes = torch.from_numpy(unpack_bits(body[:n_codes], bits, m * d_z).astype(np.uint8)).reshape(
        m, d_z
    )
    scales = (
        torch.frombuffer(bytearray(body[n_codes:]), dtype=torch.uint8)
        .view(torch.float16)
        .reshape(2, m, 1)
    )
    return dequantize(codes, scales[0], scales[1], torch.float32)
