"""`kv_wire`'s encode and decode for a whole batch: the same bytes per example, computed in one pass
per layer on the device instead of example by example on the host.

Q-KVComm frames one payload per example (each example's own token count, its own header and CRC), so
the bytes stay real. What is batched is the arithmetic: each layer's rows are compacted to their real
tokens (left-aligned, zero-padded), the rotation, ranges, clipping search and codes are computed for
all rows at once with masks, and each row's codes are bit-packed there too; a layer's results cross
to the host once, where each row's bytes are framed. Decoding checks each row's frame on the host,
moves a layer's bytes to the device in one transfer, and unpacks, dequantizes and rotates back all rows
of the layer there. Legend: B rows, H KV heads, T tokens as A's
cache holds them (padding included), N the longest row's real tokens, D head dim.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from cross_model.kv_wire import (
    _CRC,
    _PREAMBLE,
    DTYPES,
    MAGIC,
    SCALE_BYTES,
    VERSION,
    KVPayload,
    PayloadError,
    QuantScheme,
    _header_bytes,
    _scheme,
    check_widths,
    dequantize,
    dtype_bits,
    hadamard,
    kv_bits,
    quantize,
    read_header,
)

_SHIFTS: dict = {}


def _shifts(n: int, device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(n, dtype=torch.uint8, device=device)
    return _SHIFTS[key]


def pack_bits_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`kv_wire.pack_bits` on the device: codes < 2**bits as a little-endian bit stream, ceil(n*bits/8) bytes."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    planes = (flat[:, None] >> _shifts(bits, flat.device)) & 1  # n x bits, least significant first
    stream = planes.reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.reshape(-1, 8) << _shifts(8, flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits_torch(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """`kv_wire.unpack_bits` on the device: the first n codes of a packed stream."""
    if bits == 8:
        return packed[:n]
    stream = ((packed[:, None] >> _shifts(8, packed.device)) & 1).reshape(-1)[: n * bits]
    return (stream.reshape(n, bits) << _shifts(bits, packed.device)).sum(-1, dtype=torch.uint8)


def compact(x_BHTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Each row's real tokens, in order, moved to the left: B x H x N x D (zeros after row i's n_i)."""
    order = torch.argsort((~mask_BT.bool()).to(torch.int8), dim=1, stable=True)
    n = int(mask_BT.sum(1).max()) if mask_BT.numel() else 0
    b, h, _, d = x_BHTD.shape
    return x_BHTD.gather(2, order[:, None, :n, None].expand(b, h, n, d))


def _host(x: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """One transfer: the tensor in `dtype`, as bytes on the host (B x ... x itemsize)."""
    t = x.detach().to(dtype).contiguous()
    return t.view(torch.uint8).cpu().numpy().reshape(*t.shape, t.element_size())


def _quantized_layer_rows(
    xc: torch.Tensor, n: list[int], bits: int, sc: QuantScheme, is_key: bool, raw_dtype: torch.dtype
) -> list[list[bytes]]:
    """Each row's body parts for one layer's keys or values (as `kv_wire._quantized_layer` lays them)."""
    b, h, big_n, d = xc.shape
    r = sc.raw_first
    raw = _host(xc[:, :, :r], raw_dtype)
    rest = xc[:, :, r:].float()
    m = [max(0, k - r) for k in n]
    big_m = rest.shape[2]
    out = [[raw[i, :, : min(r, n[i])].tobytes()] for i in range(b)]
    if not big_m or not any(m):
        return out
    if sc.rotate:
        rest = rest @ hadamard(d, rest.device)
    valid_BM = (
        torch.arange(big_m, device=xc.device)[None, :] < torch.tensor(m, device=xc.device)[:, None]
    )
    if is_key:  # per channel, over runs of key_group tokens (all of a row's tokens when 0)
        g = sc.key_group or big_m
        groups = math.ceil(big_m / g)
        pad = groups * g - big_m
        x5 = torch.nn.functional.pad(rest, (0, 0, 0, pad)).reshape(b, h, groups, g, d)
        v5 = torch.nn.functional.pad(valid_BM, (0, pad)).reshape(b, 1, groups, g, 1)
        codes, scale, zero = quantize(x5, bits, (3,), sc.clip, valid=v5)
        codes = codes.reshape(b, h, groups * g, d)
        scale, zero = scale.squeeze(3), zero.squeeze(3)  # B x H x G x D
    else:
        dims = (3,) if sc.value_group == "head" else (1, 3)
        codes, scale, zero = quantize(rest, bits, dims, sc.clip, valid=valid_BM[:, None, :, None])
    # Each row's bit stream packed on the device; all rows cross to the host in one transfer.
    packed = [pack_bits_torch(codes[i, :, : m[i]], bits) for i in range(b) if m[i]]
    stream = torch.cat(packed).cpu().numpy().tobytes() if packed else b""
    scale_np, zero_np = _host(scale, torch.float16), _host(zero, torch.float16)
    at = 0
    for i in range(b):
        if not m[i]:
            continue
        if is_key:
            g_i = math.ceil(m[i] / (sc.key_group or m[i]))
            s, z = scale_np[i, :, :g_i], zero_np[i, :, :g_i]
        else:
            s, z = scale_np[i, :, : m[i]], zero_np[i, :, : m[i]]
        size = math.ceil(h * m[i] * d * bits / 8)
        out[i] += [stream[at : at + size], s.tobytes(), z.tobytes()]
        at += size
    return out


def encode_batch(
    template: KVPayload,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    sink_keys: list[torch.Tensor],
    sink_values: list[torch.Tensor],
    mask_BT: torch.Tensor,
) -> list[bytes]:
    """One `kv_wire.encode` frame per row: `keys[j]` / `values[j]` are sent layer j's B x H x T x D
    tensors as A's cache holds them, `sink_*[j]` sink layer j's B x H x 1 x D, `mask_BT` each row's real
    tokens. `template` gives everything in the header but the token count."""
    p = template
    check_widths(p)
    if len(keys) != len(p.layers) or len(sink_keys) != len(p.sink_layers):
        raise ValueError(
            "KV payload: one bit width and one key/value pair per sent layer, one sink per sink layer"
        )
    n = [int(x) for x in mask_BT.sum(1).tolist()]
    rows = len(n)
    dtype, raw_dtype = DTYPES[p.dtype], DTYPES[p.sink_dtype or p.dtype]
    body: list[list[bytes]] = [[] for _ in range(rows)]
    for (kb, vb), k, v in zip(kv_bits(p.header()), keys, values):
        if k.shape[1:] != (p.kv_heads, mask_BT.shape[1], p.head_dim) or k.shape != v.shape:
            raise ValueError(
                f"KV payload: layer tensors must be B x {p.kv_heads} x T x {p.head_dim}, got {tuple(k.shape)}"
            )
        for x, bits, is_key in ((compact(k, mask_BT), kb, True), (compact(v, mask_BT), vb, False)):
            if bits == dtype_bits(p.dtype):
                raw = _host(x, dtype)
                parts = [[raw[i, :, : n[i]].tobytes()] for i in range(rows)]
            else:
                parts = _quantized_layer_rows(x, n, bits, p.scheme, is_key, raw_dtype)
            for i in range(rows):
                body[i] += parts[i]
    for k, v in zip(sink_keys, sink_values):
        for x in (k, v):
            if p.scheme.sink_bits == 8:  # one (scale, zero) per head
                codes, scale, zero = quantize(x, 8, (2, 3))
                c, s, z = (
                    codes.cpu().numpy(),
                    _host(scale, torch.float16),
                    _host(zero, torch.float16),
                )
                for i in range(rows):
                    body[i] += [c[i].tobytes(), s[i].tobytes(), z[i].tobytes()]
            else:
                raw = _host(x, raw_dtype)
                for i in range(rows):
                    body[i].append(raw[i].tobytes())
    blobs = []
    for i in range(rows):
        p.tokens = n[i]
        head = _header_bytes(p.header())
        blob = _PREAMBLE.pack(MAGIC, VERSION, len(head)) + head + b"".join(body[i])
        blobs.append(blob + _CRC.pack(zlib.crc32(blob)))
    return blobs


class _Reader:
    def __init__(self, blob: bytes, start: int):
        self.blob, self.pos = blob, start

    def take(self, size: int) -> bytes:
        self.pos += size
        return self.blob[self.pos - size : self.pos]


def _padded(rows: list[np.ndarray], shape_tail_axis: int) -> np.ndarray:
    """Stack per-row arrays that differ in one axis, zero-padded to the longest."""
    longest = max(r.shape[shape_tail_axis] for r in rows)
    out = []
    for r in rows:
        pad = [(0, 0)] * r.ndim
        pad[shape_tail_axis] = (0, longest - r.shape[shape_tail_axis])
        out.append(np.pad(r, pad))
    return np.stack(out)


def _fp16(buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return (
        np.frombuffer(buf, dtype=np.float16).reshape(shape) if buf else np.zeros(shape, np.float16)
    )


def _raw_rows(buf: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes kept as bytes (H x n x D x itemsize): numpy has no bfloat16."""
    item = torch.finfo(dtype).bits // 8
    return (
        np.frombuffer(buf, dtype=np.uint8).reshape(*shape, item)
        if buf
        else np.zeros((*shape, item), np.uint8)
    )


def _to_tensor(raw: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    if raw.size == 0:
        return torch.empty(raw.shape[:-1], dtype=dtype, device=device)
    t = torch.from_numpy(np.ascontiguousarray(raw)).to(device)
    return t.view(dtype).squeeze(-1)


def decode_batch(
    blobs: list[bytes],
    receiver: str,
    kv_heads: int,
    head_dim: int,
    device: torch.device | str = "cpu",
) -> tuple[
    list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[int], dict
]:
    """Every row's payload, checked as `kv_wire.decode` checks it, as batch tensors on `device`: per sent
    layer keys and values B x H x N x D (row i's real tokens first, then padding), per sink layer
    B x H x 1 x D, each row's token count, and the header (the same for every row but its tokens)."""
    headers = [read_header(blob, receiver, kv_heads, head_dim) for blob in blobs]
    first = {k: v for k, v in headers[0][0].items() if k != "tokens"}
    for h, _ in headers[1:]:
        if {k: v for k, v in h.items() if k != "tokens"} != first:
            raise PayloadError(
                "KV payload: a batch's payloads must share everything but their token counts"
            )
    h0 = headers[0][0]
    sc, dtype, raw_dtype = _scheme(h0), DTYPES[h0["dtype"]], DTYPES[h0["sink_dtype"]]
    H, D = h0["kv_heads"], h0["head_dim"]
    n = [h["tokens"] for h, _ in headers]
    readers = [_Reader(blob, start) for blob, (_, start) in zip(blobs, headers)]
    raw_item = dtype_bits(h0["sink_dtype"]) // 8
    keys, values = [], []
    for kb, vb in kv_bits(h0):
        for out, bits, is_key in ((keys, kb, True), (values, vb, False)):
            if bits == dtype_bits(h0["dtype"]):
                item = dtype_bits(h0["dtype"]) // 8
                rows = [
                    _raw_rows(rd.take(H * k * D * item), dtype, (H, k, D))
                    for rd, k in zip(readers, n)
                ]
                out.append(_to_tensor(_padded(rows, 1), dtype, device))
                continue
            out.append(
                _dequantized_rows(
                    readers, n, bits, sc, is_key, H, D, dtype, raw_dtype, raw_item, device
                )
            )
    sink_keys, sink_values = [], []
    for _ in h0["sink_layers"]:
        for out in (sink_keys, sink_values):
            if sc.sink_bits == 8:
                parts = [
                    (rd.take(H * D), rd.take(SCALE_BYTES * H), rd.take(SCALE_BYTES * H))
                    for rd in readers
                ]
                codes = torch.from_numpy(
                    np.stack([np.frombuffer(c, np.uint8).reshape(H, 1, D) for c, _, _ in parts])
                ).to(device)
                scale = torch.from_numpy(np.stack([_fp16(s, (H, 1, 1)) for _, s, _ in parts])).to(
                    device
                )
                zero = torch.from_numpy(np.stack([_fp16(z, (H, 1, 1)) for _, _, z in parts])).to(
                    device
                )
                out.append(dequantize(codes, scale, zero, dtype))
            else:
                rows = [
                    _raw_rows(rd.take(H * D * raw_item), raw_dtype, (H, 1, D)) for rd in readers
                ]
                out.append(_to_tensor(np.stack(rows), raw_dtype, device).to(dtype))
    return keys, values, sink_keys, sink_values, n, h0


def _dequantized_rows(
    readers: list[_Reader],
    n: list[int],
    bits: int,
    sc: QuantScheme,
    is_key: bool,
    H: int,
    D: int,
    dtype: torch.dtype,
    raw_dtype: torch.dtype,
    raw_item: int,
    device,
) -> torch.Tensor:
    r = sc.raw_first
    firsts, streams, scales, zeros = [], [], [], []
    for rd, k in zip(readers, n):
        r_i, m = min(r, k), k - min(r, k)
        firsts.append(_raw_rows(rd.take(H * r_i * D * raw_item), raw_dtype, (H, r_i, D)))
        if not m:
            streams.append(b"")
            scales.append(
                np.zeros(
                    (H if is_key or sc.value_group == "head" else 1, 0, D if is_key else 1),
                    np.float16,
                )
            )
            zeros.append(scales[-1])
            continue
        streams.append(rd.take(math.ceil(H * m * D * bits / 8)))
        if is_key:
            groups = math.ceil(m / (sc.key_group or m))
            shape = (H, groups, D)
        else:
            shape = (H, m, 1) if sc.value_group == "head" else (1, m, 1)
        scales.append(_fp16(rd.take(SCALE_BYTES * math.prod(shape)), shape))
        zeros.append(_fp16(rd.take(SCALE_BYTES * math.prod(shape)), shape))
    first = _to_tensor(_padded(firsts, 1), raw_dtype, device).to(dtype)
    m_rows = [k - min(r, k) for k in n]
    big_m = max(m_rows)
    if not big_m:
        return first
    # Every row's packed codes cross in one transfer and are unpacked on the device.
    packed = torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8).to(device)
    c = torch.zeros((len(n), H, big_m, D), dtype=torch.uint8, device=device)
    at = 0
    for i, (m, stream) in enumerate(zip(m_rows, streams)):
        if m:
            c[i, :, :m] = unpack_bits_torch(packed[at : at + len(stream)], bits, H * m * D).reshape(
                H, m, D
            )
            at += len(stream)
    s = torch.from_numpy(_padded(scales, 1)).to(device)
    z = torch.from_numpy(_padded(zeros, 1)).to(device)
    if is_key:
        # Row i's group j covers its tokens j*g .. j*g+g-1; when key_group is 0 a row is one group.
        idx = torch.stack(
            [
                torch.arange(big_m, device=device) // (sc.key_group or max(k - min(r, k), 1))
                for k in n
            ]
        ).clamp(max=s.shape[2] - 1)
        s = torch.gather(s, 2, idx[:, None, :, None].expand(-1, H, -1, D))
        z = torch.gather(z, 2, idx[:, None, :, None].expand(-1, H, -1, D))
    rest = dequantize(c, s, z, torch.float32)
    if sc.rotate:
        rest = rest @ hadamard(D, rest.device)
    rest = rest.to(dtype)
    if min(n) >= r:
        return torch.cat([first, rest], 2)
    # Rows shorter than raw_first: their real tokens are all raw (never the case for real prompts).
    out = torch.zeros((len(n), H, max(n), D), dtype=dtype, device=device)
    for i, k in enumerate(n):
        r_i = min(r, k)
        out[i, :, :r_i] = first[i, :, :r_i]
        out[i, :, r_i:k] = rest[i, :, : k - r_i]
    return out
