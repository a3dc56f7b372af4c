"""Request bodies of the HTTP server without Ray: binary NumPy bodies give the same batch as JSON
ones, and every malformed, pickled or mistyped body is refused with its status and a reason."""

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from eenet_fast.http_io import NPY, NPZ, BadRequest, encode_inputs, parse_request

LIMIT = 1 << 20


def parse(body, dtypes=torch.float32, content_type=NPY, limit=LIMIT):
    return parse_request(body, dtypes, limit, content_type)


def refused(body, status, message, dtypes=torch.float32, content_type=NPY, limit=LIMIT):
    with pytest.raises(BadRequest, match=message) as info:
        parse(body, dtypes, content_type, limit)
    assert info.value.status == status


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def forged_npy(shape):
    """An .npy header declaring ``shape`` float32, followed by 16 bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(16)


def corrupted(archive):
    """``archive`` with bytes in the middle of its compressed data overwritten."""
    middle = len(archive) // 3
    return archive[:middle] + bytes(range(64)) + archive[middle + 64 :]


def zipped(members, compression=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(1, 7), (5, 1, 3, 3), (33, 2)])
def test_an_npy_body_gives_the_batch_a_json_body_gives(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
    body, content_type = encode_inputs(x)
    assert content_type == NPY
    from_npy = parse(body, content_type="application/x-npy; charset=binary")  # parameters are ignored
    from_json = parse(json.dumps({"inputs": x.tolist()}).encode(), content_type="application/json")
    assert from_npy.dtype == torch.float32 and from_npy.shape == shape
    assert torch.equal(from_npy, x) and torch.equal(from_json, x)


def test_numbers_become_the_servers_dtype_whatever_the_array_holds():
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    for array in (x, x.astype(np.float16), x.astype(np.int32), x.astype(np.uint8), x.astype(">f4"),
                  np.asfortranarray(x)):
        got = parse(npy(array))
        assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(x).float()), array.dtype
    assert parse(npy(x.astype(np.int16)), dtypes=torch.int64).dtype == torch.int64
    refused(npy(x + 0.5), 422, "must hold integers", dtypes=torch.int64)


def test_a_dict_input_travels_as_an_npz_archive():
    x = {"input_ids": torch.randint(0, 50, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.int64)}
    body, content_type = encode_inputs(x)
    assert content_type == NPZ
    got = parse(body, dtypes={"input_ids": torch.int64, "attention_mask": torch.int64}, content_type=NPZ)
    assert set(got) == set(x) and all(torch.equal(got[k], x[k]) for k in x)
    refused(body, 422, "unknown input keys \\['attention_mask'\\]", dtypes={"input_ids": torch.int64},
            content_type=NPZ)
    refused(body, 422, "one array as inputs, not an archive", content_type=NPZ)
    refused(encode_inputs(torch.zeros(2, 3))[0], 422, "send them as an application/x-npz",
            dtypes={"input_ids": torch.int64})


@pytest.mark.parametrize(
    "body, content_type, status, message",
    [
        (b"\x93NUMPY garbage", NPY, 400, "not a valid .npy file"),
        (b"", NPY, 400, "not a valid .npy file"),
        (npy(np.array([{"a": 1}], dtype=object)), NPY, 422, "pickled"),
        (pickle.dumps(np.zeros(3)), NPY, 400, "not a valid .npy file .*magic string"),
        (forged_npy((1 << 40, 784)), NPY, 400, "declares \\(1099511627776, 784\\) float32 .* but carries 16 bytes"),
        (npy(np.zeros((3, 2)))[:-8], NPY, 400, "declares \\(3, 2\\) float64 \\(48 bytes\\) but carries 40"),
        (npy(np.array(["a", "b"])), NPY, 422, "array of numbers .* got <U1"),
        (npy(np.zeros((2, 3), dtype=np.uint16)), NPY, 422, "got uint16"),
        (npy(np.ones((2, 2), dtype=np.complex64)), NPY, 422, "got complex64"),
        (npy(np.float32(3.0)), NPY, 422, "batch first"),
        (npy(np.array([[1.0, np.nan]], dtype=np.float32)), NPY, 422, "NaN or Infinity"),
        (npy(np.zeros((2, 2))), NPZ, 400, "is not an .npz archive but its Content-Type says application/x-npz"),
        (encode_inputs({"x": torch.zeros(1)})[0], NPY, 400, "is an .npz archive but its Content-Type says"),
        (zipped({"x.txt": b"hello"}), NPZ, 400, "only .npy members"),
        (zipped({"x.npy": forged_npy((1 << 40,))}), NPZ, 400, "member 'x.npy' declares"),
        (b"PK\x03\x04 not really a zip", NPZ, 400, "not a valid application/x-npz archive"),
        (corrupted(zipped({"x.npy": npy(np.arange(2000.0))}, zipfile.ZIP_DEFLATED)), NPZ, 400,
         "not a valid application/x-npz archive"),
    ],
    ids=["garbage", "empty", "object", "pickle", "forged-shape", "truncated", "strings", "uint16", "complex", "scalar",
         "nan", "npy-as-npz", "npz-as-npy", "npz-text", "npz-forged", "npz-garbage", "npz-corrupted"],
)
def test_a_bad_binary_body_is_refused_with_the_reason(body, content_type, status, message):
    dtypes = None if content_type == NPZ else torch.float32  # a server of dict inputs reads archives
    refused(body, status, message, dtypes=dtypes, content_type=content_type)


def test_an_oversized_body_is_refused_before_it_is_parsed():
    body, content_type = encode_inputs(torch.zeros(64, 64))
    refused(body, 413, f"has {len(body)} bytes, more than the 1000", content_type=content_type, limit=1000)
    bomb = zipped({"x.npy": npy(np.zeros((1000, 1000), dtype=np.float32))}, zipfile.ZIP_DEFLATED)  # 4 MB in ~4 kB
    assert len(bomb) < 10_000
    refused(bomb, 413, "the archive unpacks to 4000128 bytes, more than the 100000", dtypes={"x": torch.float32},
            content_type=NPZ, limit=100_000)


def test_without_a_binary_content_type_the_body_is_read_as_json():
    body, _ = encode_inputs(torch.zeros(2, 2))
    refused(body, 400, "not valid JSON", content_type=None)
    refused(body, 400, "not valid JSON", content_type="application/octet-stream")
