"""Q-KVComm and the KV wire format: exact headers, values within the quantization bound, sizes equal
to the formula, refusal of corrupted payloads and of payloads for another receiver, B's logits at 8
bits close to KVComm's, and a bit allocation that follows the sensitivity profile."""

import numpy as np
import pytest
import torch

from cross_model import kv_wire
from cross_model.data import load_task_examples
from cross_model.methods.base import ModelPair
from cross_model.methods.qkvcomm import allocate_bits
from cross_model.methods.registry import resolve_method
from cross_model.models import load_model


def payload(bits, dtype="float32", tokens=7, heads=2, dim=16, seed=0, scheme=None):
    g = torch.Generator().manual_seed(seed)
    p = kv_wire.KVPayload(
        "model-a",
        "model-b",
        [0, 2],
        [0, 2],
        [1, 3],
        [1, 3],
        dtype,
        bits,
        kv_heads=heads,
        head_dim=dim,
        tokens=tokens,
        scheme=scheme or kv_wire.QuantScheme.plain(),
    )
    dt = kv_wire.DTYPES[dtype]
    for _ in p.layers:
        k = torch.randn(heads, tokens, dim, generator=g) * 3
        k[:, :, 5] += 40  # an outlier channel, as keys have
        p.keys.append(k.to(dt))
        p.values.append(torch.randn(heads, tokens, dim, generator=g).to(dt))
    for _ in p.sink_layers:
        p.sink_keys.append(torch.randn(heads, 1, dim, generator=g).to(dt))
        p.sink_values.append(torch.randn(heads, 1, dim, generator=g).to(dt))
    return p


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_bit_packing_round_trips(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=1001).astype(np.uint8)
    packed = kv_wire.pack_bits(codes, bits)
    assert len(packed) == -(-1001 * bits // 8)
    np.testing.assert_array_equal(kv_wire.unpack_bits(packed, bits, 1001), codes)


@pytest.mark.parametrize(
    "bits, value_bits",
    [
        ([2, 2], None),
        ([3, 4], None),
        ([8, 8], None),
        ([32, 4], None),
        ([5, 6], None),
        ([7, 2], None),
        ([4, 8], [2, 32]),
        ([32, 6], [3, 7]),
    ],
)
def test_round_trip_header_exact_values_within_bound(bits, value_bits):
    p = payload(bits)
    p.value_bits = value_bits
    blob = kv_wire.encode(p)
    assert len(blob) == kv_wire.payload_size(p.header())
    got = kv_wire.decode(blob, "model-b", 2, 16)
    assert got.header() == p.header() and (got.value_bits or got.bits) == (value_bits or bits)
    assert ("value_bits" in got.header()) == (value_bits is not None)  # the usual header stays v2's
    for kb, vb, k, v, k2, v2 in zip(
        bits, value_bits or bits, p.keys, p.values, got.keys, got.values
    ):
        # half a step per group (float16 scales are what both sides use), plus float16 rounding of the zero;
        # each of keys and values at its own width, raw (equal) at the dtype's
        if kb == 32:
            assert torch.equal(k, k2)
        else:
            k_step = (k.amax(1, keepdim=True) - k.amin(1, keepdim=True)) / (2**kb - 1)
            assert ((k - k2).abs() <= k_step / 2 * 1.01 + 0.05).all() and (k - k2).abs().max() > 0
        if vb == 32:
            assert torch.equal(v, v2)
        else:
            v_step = (v.amax((0, 2), keepdim=True) - v.amin((0, 2), keepdim=True)) / (2**vb - 1)
            assert ((v - v2).abs() <= v_step / 2 * 1.01 + 1e-2).all()
    for a, b in zip(p.sink_keys + p.sink_values, got.sink_keys + got.sink_values):
        assert torch.equal(a, b)


SCHEMES = [
    kv_wire.QuantScheme(),  # the default: rotated, first token raw, values per head, clipped
    kv_wire.QuantScheme(key_group=3, value_group="token", rotate=False, raw_first=2, clip=False),
    kv_wire.QuantScheme(key_group=4, value_group="head", rotate=True, raw_first=0, clip=False),
    kv_wire.QuantScheme(raw_first=20, sink_bits=8),  # every token raw, sinks in 8 bits
]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_scheme_round_trips_within_its_bound(scheme, dtype):
    p = payload([2, 3], dtype=dtype, tokens=9, scheme=scheme)
    p.sink_dtype = "float16" if dtype == "float32" else None
    blob = kv_wire.encode(p)
    assert len(blob) == kv_wire.payload_size(p.header())
    got = kv_wire.decode(blob, "model-b", 2, 16)
    assert got.header() == p.header() and got.scheme == scheme
    raw_dtype = kv_wire.DTYPES[p.header()["sink_dtype"]]
    r = min(scheme.raw_first, 9)
    rot = kv_wire.hadamard(16) if scheme.rotate else torch.eye(16)
    for x, y in zip(p.sink_keys + p.sink_values, got.sink_keys + got.sink_values):
        if scheme.sink_bits == 16:
            assert torch.equal(y, x.to(raw_dtype).to(x.dtype))
        else:  # within half an 8-bit step of each head's range, plus float16 rounding of the zero and
            # the rounding of B's values to the model's dtype (2^-8 relative in bfloat16)
            xf = x.float()
            step = (xf.amax((1, 2), keepdim=True) - xf.amin((1, 2), keepdim=True)) / 255
            assert (
                (y.float() - xf).abs()
                <= step / 2 * 1.01 + 2e-3 * xf.abs().amax() + xf.abs() * 2**-8
            ).all()
            assert not torch.equal(y, x)
    for bits, k, v, k2, v2 in zip(p.bits, p.keys, p.values, got.keys, got.values):
        for x, y in ((k, k2), (v, v2)):
            # the leading tokens travel raw, in the raw dtype
            assert torch.equal(y[:, :r], x[:, :r].to(raw_dtype).to(x.dtype))
        if r == 9:
            continue
        if scheme.clip:
            continue  # checked against min-max below: a per-value bound for a clipped range says little
        # In the rotated domain each group is within half a step of its own min-max range.
        shrink = 0.0
        kr, vr = k[:, r:].float() @ rot, v[:, r:].float() @ rot
        ke, ve = (
            (k2[:, r:].float() - k[:, r:].float()) @ rot,
            (v2[:, r:].float() - v[:, r:].float()) @ rot,
        )
        g = scheme.key_group or kr.shape[1]
        for i in range(0, kr.shape[1], g):
            grp = kr[:, i : i + g]
            span = grp.amax(1, keepdim=True) - grp.amin(1, keepdim=True)
            assert (
                ke[:, i : i + g].abs() <= span / (2**bits - 1) / 2 * 1.01 + shrink * span + 0.1
            ).all()
        dims = (2,) if scheme.value_group == "head" else (0, 2)
        span = vr.amax(dims, keepdim=True) - vr.amin(dims, keepdim=True)
        assert (ve.abs() <= span / (2**bits - 1) / 2 * 1.01 + shrink * span + 0.03).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_clipped_scheme_never_loses_to_min_max_on_the_wire(dtype):
    """Clipping picks, per group, the range with the least squared error, min-max among them: through
    encode and decode its error can only be lower (up to the rounding of B's values to the dtype)."""
    from dataclasses import replace

    clipped = kv_wire.QuantScheme()
    assert clipped.clip
    for bits in (2, 3, 4):
        errors = {}
        for name, scheme in (("clip", clipped), ("minmax", replace(clipped, clip=False))):
            p = payload([bits, bits], dtype=dtype, tokens=9, scheme=scheme, seed=bits)
            got = kv_wire.decode(kv_wire.encode(p), "model-b", 2, 16)
            r = min(scheme.raw_first, 9)
            errors[name] = [
                float((y[:, r:].float() - x[:, r:].float()).pow(2).sum())
                for x, y in zip(p.keys + p.values, got.keys + got.values)
            ]
        for c, m in zip(errors["clip"], errors["minmax"]):
            assert c <= m * (1.02 if dtype == "bfloat16" else 1.0001) + 1e-6, (bits, c, m)
        # and at 2 bits, with the keys' outlier channel, clipping wins outright somewhere
        if bits == 2:
            assert sum(errors["clip"]) < 0.95 * sum(errors["minmax"])


def test_hadamard_is_its_own_inverse():
    h = kv_wire.hadamard(64)
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-6, rtol=0)
    assert h.abs().unique().numel() == 1  # every entry +-1/8: outliers spread evenly over channels


def test_clipping_never_loses_to_min_max_and_wins_on_heavy_tails():
    torch.manual_seed(0)  # the draw, not the order the tests ran in, decides the tails
    x = torch.distributions.StudentT(2.0).sample((4, 64, 32)).clamp(-1000, 1000)
    for bits in (2, 3):
        errs = []
        for clip in (False, True):
            c, s, z = kv_wire.quantize(x, bits, (1,), clip=clip)
            errs.append(((kv_wire.dequantize(c, s, z, torch.float32) - x) ** 2).sum(1))
        assert (
            errs[1] <= errs[0] * (1 + 1e-5)
        ).all()  # per group: min-max is one of the ranges tried
        assert errs[1].sum() < 0.8 * errs[0].sum()


def test_scheme_errors_name_the_fix():
    with pytest.raises(ValueError, match="power-of-two head dimension.*rotate: false"):
        kv_wire.encode(payload([2, 2], dim=12, scheme=kv_wire.QuantScheme()))
    assert kv_wire.decode(
        kv_wire.encode(payload([2, 2], dim=12, scheme=kv_wire.QuantScheme(rotate=False))),
        "model-b",
        2,
        12,
    )
    with pytest.raises(ValueError, match="value_group is 'head' or 'token'"):
        make(value_group="channel")
    with pytest.raises(ValueError, match="key_group and raw_first must be >= 0"):
        make(raw_first=-1)


def test_sinks_travel_in_their_own_dtype():
    p = payload([4, 4])
    p.sink_dtype = "float16"
    got = kv_wire.decode(kv_wire.encode(p), "model-b", 2, 16)
    assert got.sink_keys[0].dtype == torch.float32
    torch.testing.assert_close(got.sink_keys[0], p.sink_keys[0].half().float(), rtol=0, atol=0)
    assert (
        len(kv_wire.encode(p)) == len(kv_wire.encode(payload([4, 4]))) - 2 * 2 * 2 * 16 * 2
    )  # layers, k+v, heads, dims, bytes


def test_bfloat16_payload_round_trips_raw():
    p = payload([16, 16], dtype="bfloat16")
    got = kv_wire.decode(kv_wire.encode(p), "model-b", 2, 16)
    assert all(torch.equal(a, b) for a, b in zip(p.keys + p.values, got.keys + got.values))
    assert got.keys[0].dtype == torch.bfloat16


def test_corrupted_or_misaddressed_payloads_are_refused():
    blob = bytearray(kv_wire.encode(payload([4, 4])))
    for pos in (2, 20, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(kv_wire.PayloadError, match="checksum"):
            kv_wire.decode(bytes(bad), "model-b", 2, 16)
    with pytest.raises(kv_wire.PayloadError, match="checksum|too short"):
        kv_wire.decode(bytes(blob[:-9]), "model-b", 2, 16)
    with pytest.raises(
        kv_wire.PayloadError, match="made for receiver 'model-b'.*not for 'model-c'"
    ):
        kv_wire.decode(bytes(blob), "model-c", 2, 16)
    with pytest.raises(kv_wire.PayloadError, match="not for 'model-b' \\(4 x 16\\)"):
        kv_wire.decode(bytes(blob), "model-b", 4, 16)


def test_allocation_follows_sensitivity():
    profile = {
        0: {2: 5.0, 4: 0.5, 8: 0.0},
        1: {2: 0.1, 4: 0.01, 8: 0.0},
        2: {2: 0.2, 4: 0.02, 8: 0.0},
    }
    bits = allocate_bits(profile, 4.0, [2, 4, 8])
    assert sum(bits.values()) / 3 <= 4.0
    assert bits[0] >= bits[1] and bits[0] >= bits[2]  # the sensitive layer keeps the most bits
    assert allocate_bits(profile, 8, [2, 4, 8]) == {0: 8, 1: 8, 2: 8}
    assert allocate_bits(profile, 2, [2, 4, 8]) == {0: 2, 1: 2, 2: 2}


def make(**params):
    lm = load_model("tiny-llama-64")
    cls, p = resolve_method("qkvcomm", params)
    return cls(p, ModelPair(lm, lm))


@pytest.fixture(scope="module")
def examples():
    test, calib = load_task_examples("countries", 4, 3, seed=5)
    return test, calib


def test_eight_bits_keep_receiver_logits_close_to_kvcomm(examples):
    test, _ = examples
    m = make(selection="layers", layers_list=[1, 2])
    selected = m.selected_layers()
    raw = m.first_logits(test, selected, None)
    eight = m.first_logits(test, selected, [8] * len(selected))
    two = m.first_logits(test, selected, [2] * len(selected))
    scale = raw.abs().max()
    assert (eight - raw).abs().max() < 0.02 * scale
    assert (two - raw).abs().max() > (eight - raw).abs().max()  # fewer bits, further away


def test_payload_size_is_the_encoded_length_and_beats_raw(examples):
    test, _ = examples
    m = make(selection="layers", layers_list=[1, 2], bits=2)
    preds = m.run_batch(test)
    for p in preds:
        assert p.error is None
        wire = m.wire_payload({0, 1, 2}, p.sender_prefill_tokens, [2, 2, 2])
        wire.sink_dtype = "float16"  # a float32 model's sinks travel in float16
        wire.scheme = m.params.scheme()
        assert p.payload_bytes == kv_wire.payload_size(wire.header())
        raw = make(selection="layers", layers_list=[1, 2]).payload_bytes(
            p.sender_prefill_tokens, {0, 1, 2}
        )
        assert p.payload_bytes < raw / 4  # float32 -> 2 bits, less the scales
        assert p.extra["compression_vs_bf16"] > 1
    batched = [p.answer for p in preds]
    assert batched == [m.run_batch([e])[0].answer for e in test]


def test_values_at_their_own_width_and_the_compression_ratios(examples):
    test, _ = examples
    m = make(selection="layers", layers_list=[1, 2], bits=4, value_bits=2)
    lm = m.pair.sender.info
    for p, e in zip(m.run_batch(test), test):
        n = p.sender_prefill_tokens
        wire = m.wire_payload({0, 1, 2}, n, [4, 4, 4])
        wire.value_bits, wire.sink_dtype, wire.scheme = [2, 2, 2], "float16", m.params.scheme()
        assert p.payload_bytes == kv_wire.payload_size(wire.header())
        assert (
            p.payload_bytes
            < make(selection="layers", layers_list=[1, 2], bits=4).run_batch([e])[0].payload_bytes
        )
        full = 2 * lm.num_layers * lm.num_kv_heads * n * lm.head_dim * 4  # A's whole float32 cache
        assert p.extra["compression_vs_full_cache"] == round(full / p.payload_bytes, 3)
        assert p.extra["payload_vs_text"] == round(p.payload_bytes / len(e.prompt_A.encode()), 3)
        assert p.extra["mean_bits"] == 3.0  # (4 x 3 key widths + 2 x 3 value widths) / 6
    with pytest.raises(ValueError, match="value_bits: one of"):
        make(value_bits=1)


def test_target_bits_are_allocated_on_the_calibration_split(examples):
    test, calib = examples
    m = make(selection="calibrate", top_layers=0.5, target_bits=3)
    uncalibrated = m.run_batch(test)  # recorded as errors, never dropped
    assert all(p.error and "run the calibrate stage first" in p.error for p in uncalibrated)
    cal = m.calibrate(calib)
    assert set(cal["calibration_ids"]).isdisjoint(e.example_id for e in test)
    bits = [cal["layer_bits"][str(l)] for l in cal["selected"]]
    assert sum(bits) / len(bits) <= 3
    restored = make(selection="calibrate", top_layers=0.5, target_bits=3)
    restored.load_calibration(cal)
    assert [p.answer for p in restored.run_batch(test)] == [p.answer for p in m.run_batch(test)]
    with pytest.raises(ValueError, match="target_bits"):
        make(target_bits=1)
    with pytest.raises(ValueError, match="bits: one of"):
        make(bits=9)


@pytest.mark.slow
def test_default_scheme_keeps_smollm2_closer_to_kvcomm_than_min_max(smollm2):
    """The measurement behind QuantScheme's defaults (bench/choose_qkvcomm_scheme.py), on the real model
    and on calibration items, never test items: at 2 and 3 bits B's first-token distribution (KL from
    unquantized KVComm's) moves less with the default scheme than with plain min-max quantization."""
    _, calib = load_task_examples("tipsheets", 1, 12, seed=0)
    test = calib
    kl = {}
    for name, scheme in (
        ("default", {}),
        ("plain", {"value_group": "token", "rotate": False, "raw_first": 0, "clip": False}),
    ):
        cls, p = resolve_method(
            "qkvcomm", {"selection": "layers", "layers_list": [3, 5, 7, 9, 17], **scheme}
        )
        m = cls(p, ModelPair(smollm2, smollm2))
        selected = m.selected_layers()
        ref = m.first_logits(test, selected, None).float().log_softmax(-1)
        for bits in (2, 3):
            got = m.first_logits(test, selected, [bits] * len(selected)).float().log_softmax(-1)
            kl[name, bits] = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert kl["default", 2] < 0.7 * kl["plain", 2] and kl["default", 3] < 0.7 * kl["plain", 3], kl


@pytest.mark.parametrize(
    "scheme",
    [
        kv_wire.QuantScheme(),
        kv_wire.QuantScheme(sink_bits=8),
        kv_wire.QuantScheme.plain(),
        kv_wire.QuantScheme(key_group=4, value_group="token", raw_first=2),
        kv_wire.QuantScheme(clip=False, rotate=False, raw_first=0, key_group=3),
    ],
    ids=["default", "sink8", "plain", "groups", "noclip"],
)
@pytest.mark.parametrize(
    "dtype,bits,sink_dtype,value_bits",
    [
        (torch.float32, (2, 3), None, None),
        (torch.float32, (4, 8), "float16", None),
        (torch.float32, (32, 4), None, None),
        (torch.bfloat16, (4, 16), None, None),
        (torch.float32, (5, 7), None, (2, 32)),
        (torch.bfloat16, (16, 6), None, (3, 4)),
    ],
)
def test_batched_wire_gives_every_row_the_bytes_and_tensors_of_its_own_frame(
    scheme, dtype, bits, sink_dtype, value_bits
):
    """The batch path (one device pass per layer) against `kv_wire.encode`/`decode` row by row: the same
    bytes, the same decoded tensors, for rows of different lengths, left padding and a shared-prefix hole."""
    from cross_model.kv_wire_batch import decode_batch, encode_batch

    torch.manual_seed(0)
    B, H, T, D = 3, 2, 11, 16
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[0, 2:] = 1
    mask[1, 5:] = 1
    mask[2, :3] = 1  # [prefix | pad | suffix]
    mask[2, 6:] = 1
    keys = [torch.randn(B, H, T, D).to(dtype) * 3 for _ in bits]
    values = [torch.randn(B, H, T, D).to(dtype) for _ in bits]
    sink_k = [torch.randn(B, H, 1, D).to(dtype) for _ in range(2)]
    sink_v = [torch.randn(B, H, 1, D).to(dtype) for _ in range(2)]

    def payload(tokens):
        return kv_wire.KVPayload(
            "a",
            "b",
            [0, 1],
            [0, 1],
            [5, 6],
            [5, 6],
            kv_wire.dtype_name(dtype),
            list(bits),
            kv_heads=H,
            head_dim=D,
            tokens=tokens,
            sink_dtype=sink_dtype,
            scheme=scheme,
            value_bits=list(value_bits) if value_bits else None,
        )

    blobs = encode_batch(payload(0), keys, values, sink_k, sink_v, mask)
    got_k, got_v, got_sk, got_sv, lengths, _ = decode_batch(blobs, "b", H, D)
    for i in range(B):
        idx = mask[i].nonzero().squeeze(-1)
        p = payload(len(idx))
        p.keys, p.values = [k[i][:, idx] for k in keys], [v[i][:, idx] for v in values]
        p.sink_keys, p.sink_values = [k[i] for k in sink_k], [v[i] for v in sink_v]
        assert blobs[i] == kv_wire.encode(p) and lengths[i] == len(idx)
        ref = kv_wire.decode(blobs[i], "b", H, D)
        for j in range(len(bits)):
            assert torch.equal(got_k[j][i, :, : len(idx)], ref.keys[j]) and torch.equal(
                got_v[j][i, :, : len(idx)], ref.values[j]
            )
        for j in range(2):
            assert torch.equal(got_sk[j][i], ref.sink_keys[j]) and torch.equal(
                got_sv[j][i], ref.sink_values[j]
            )


def test_a_context_asked_again_is_encoded_once_and_gives_the_same_bytes(examples):
    from dataclasses import replace

    test, _ = examples
    m = make(selection="layers", layers_list=[1, 2], bits=3)
    off = make(selection="layers", layers_list=[1, 2], bits=3, payload_cache_mb=0)
    again = [
        replace(test[0], example_id="again", prompt_B="Where is it?")
    ]  # the same context, another question
    first = m.run_batch(test + again)
    assert [p.extra["payload_cache_hit"] for p in first] == [False] * len(test) + [True]
    assert first[-1].payload_bytes == first[0].payload_bytes
    second = m.run_batch(test)
    assert all(p.extra["payload_cache_hit"] for p in second) and m.payload_cache.hits >= len(test)
    reference = off.run_batch(test)
    assert "payload_cache_hit" not in reference[0].extra
    assert [(p.answer, p.payload_bytes) for p in second] == [
        (p.answer, p.payload_bytes) for p in reference
    ]
    from cross_model.methods.qkvcomm import PayloadCache

    small = PayloadCache(10)
    small.put(("a",), b"12345678")
    small.put(("b",), b"1234")  # over 10 bytes: the least recently used goes
    assert list(small.entries) == [("b",)] and small.get(("a",)) is None and small.misses == 1


def test_a_byte_budget_picks_each_examples_widest_fitting_width(examples):
    test, _ = examples
    wide = make(selection="layers", layers_list=[1, 2], bits=8, payload_cache_mb=0).run_batch(test)
    four = make(selection="layers", layers_list=[1, 2], bits=4, payload_cache_mb=0).run_batch(test)
    budget = max(p.payload_bytes for p in four)  # every row fits 4 bits, none 8
    assert budget < min(p.payload_bytes for p in wide)
    m = make(
        selection="layers",
        layers_list=[1, 2],
        byte_budget=budget,
        bit_choices=[2, 3, 4, 8],
        payload_cache_mb=0,
    )
    got = m.run_batch(test)
    assert [p.extra["bits"] for p in got] == [4] * len(test) and all(
        p.extra["within_budget"] for p in got
    )
    assert [(p.answer, p.payload_bytes) for p in got] == [(p.answer, p.payload_bytes) for p in four]
    tiny = make(
        selection="layers", layers_list=[1, 2], byte_budget=100, payload_cache_mb=0
    ).run_batch(test[:1])
    assert (
        tiny[0].extra["bits"] == 2
        and tiny[0].extra["within_budget"] is False
        and tiny[0].payload_bytes > 100
    )
    with pytest.raises(ValueError, match="byte_budget"):
        make(byte_budget=1000, target_bits=3)
