"""The int4 layouts: qtool/compressed-tensors ``pack-quantized`` and GPTQ v1."""

from __future__ import annotations

import pytest
import torch

from qtool.quant.packing import (
    pack_gptq,
    pack_int4,
    pack_int4_dim0,
    unpack_gptq,
    unpack_int4,
    unpack_int4_dim0,
)


def codes(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, (rows, cols), generator=g).to(torch.int8)


@pytest.mark.parametrize("cols", [1, 7, 8, 9, 15, 16, 33, 64, 100])
def test_pack_unpack_round_trip(cols):
    q = codes(5, cols, seed=cols)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, -(-cols // 8))
    assert torch.equal(unpack_int4(packed, cols), q)


def test_all_sixteen_values_and_nibble_order():
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(2, 8)
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed, 8), q)
    # column c lives at bits 4c..4c+3 as the unsigned nibble q + 8 (lowest nibble = column 0)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    assert int(words[0, 0]) == 0x76543210
    assert int(words[1, 0]) == 0xFEDCBA98
    # the top nibble set makes the int32 word negative: the sign bit is handled
    assert int(packed[1, 0]) < 0


def test_ragged_tail_is_padded_with_code_zero():
    q = torch.full((1, 3), -8, dtype=torch.int8)
    words = pack_int4(q).to(torch.int64) & 0xFFFFFFFF
    assert int(words[0, 0]) == 0x88888000


def test_pack_rejects_wrong_inputs():
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        pack_int4(torch.zeros(8, dtype=torch.int8))
    with pytest.raises(TypeError, match="int32"):
        unpack_int4(torch.zeros(2, 1, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="cannot unpack 9 columns from 1 words"):
        unpack_int4(torch.zeros(2, 1, dtype=torch.int32), 9)


@pytest.mark.parametrize("rows", [1, 8, 13, 64])
def test_dim0_round_trip(rows):
    q = codes(rows, 3, seed=rows)
    packed = pack_int4_dim0(q)
    assert packed.shape == (-(-rows // 8), 3)
    assert torch.equal(unpack_int4_dim0(packed, rows), q)
    # dim-0 packing is dim-1 packing of the transpose
    assert torch.equal(packed, pack_int4(q.t().contiguous()).t())


@pytest.mark.parametrize("shape", [(8, 8), (24, 64), (5, 128)])
def test_gptq_round_trip(shape):
    q = codes(*shape, seed=shape[1])
    qweight = pack_gptq(q)
    out, cols = shape
    assert qweight.shape == (cols // 8, out) and qweight.dtype == torch.int32
    assert torch.equal(unpack_gptq(qweight, cols), q)
    # word i of column o holds input rows 8i..8i+7 of output o, lowest nibble first
    word = int(qweight[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * k)) & 0xF for k in range(8)] == [int(v) + 8 for v in q[0, :8]]


def test_gptq_needs_width_divisible_by_8():
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_gptq(codes(4, 12))


@pytest.fixture(scope="module")
def ct_helpers():
    return pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


@pytest.mark.parametrize("shape", [(3, 8), (16, 64), (7, 256)])
def test_equals_compressed_tensors_pack_to_int32(ct_helpers, shape):
    q = codes(*shape, seed=shape[0])
    assert torch.equal(pack_int4(q), ct_helpers.pack_to_int32(q, 4))
    assert torch.equal(
        pack_int4_dim0(q.t().contiguous()), ct_helpers.pack_to_int32(q.t().contiguous(), 4, packed_dim=0)
    )


@pytest.mark.parametrize("cols", [3, 9, 100])
def test_ragged_widths_read_back_by_compressed_tensors(ct_helpers, cols):
    # the padding nibbles differ (qtool pads with code 0, compressed-tensors with nibble 0),
    # but each side reads the other's words back to the same codes
    q = codes(4, cols, seed=cols)
    assert torch.equal(ct_helpers.unpack_from_int32(pack_int4(q), 4, torch.Size(q.shape)), q)
    assert torch.equal(unpack_int4(ct_helpers.pack_to_int32(q, 4), cols), q)
    zp = codes(cols, 2, seed=cols + 1)
    assert torch.equal(
        ct_helpers.unpack_from_int32(pack_int4_dim0(zp), 4, torch.Size(zp.shape), packed_dim=0), zp
    )
