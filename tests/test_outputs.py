import numpy as np
import pytest
import torch

from eenet_fast.errors import FileFormatError, InputError
from eenet_fast.outputs import ExitOutputs


def _outputs(k=3, n=20, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ExitOutputs(torch.randn(k, n, c, generator=g), torch.randint(c, (n,), generator=g), [1.0, 2.0, 3.5])


def test_npz_round_trip(tmp_path):
    out = _outputs()
    out.save(tmp_path / "val.npz")
    back = ExitOutputs.load(tmp_path / "val.npz")
    torch.testing.assert_close(back.logits, out.logits)
    assert back.labels.tolist() == out.labels.tolist()
    assert back.costs.tolist() == [1.0, 2.0, 3.5]


def test_reads_probs_npz_without_costs(tmp_path):
    probs = torch.softmax(torch.randn(2, 6, 4), -1)
    np.savez(tmp_path / "p.npz", probs=probs.numpy(), labels=np.arange(6) % 4)
    out = ExitOutputs.load(tmp_path / "p.npz")
    assert out.costs is None
    torch.testing.assert_close(out.features[0].probs, probs[0])
    torch.testing.assert_close(torch.softmax(out.logits, -1), probs)  # kept as logits of the same softmax
    with pytest.raises(ValueError, match="--costs"):
        out.require_costs()


def test_reads_the_authors_torch_format(tmp_path):
    probs = torch.softmax(torch.randn(3, 8, 10), -1)
    torch.save(probs, tmp_path / "probs.pt")
    out = ExitOutputs.load(tmp_path / "probs.pt")
    assert out.labels is None and out.logits.shape == (3, 8, 10)
    torch.testing.assert_close(out.features[2].probs, probs[2])
    torch.save({"probs": probs, "labels": torch.arange(8), "costs": torch.tensor([1.0, 2.0, 3.0])}, tmp_path / "d.pt")
    out = ExitOutputs.load(tmp_path / "d.pt")
    assert out.labels.tolist() == list(range(8)) and out.costs.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"logits": torch.randn(4, 5)}, ValueError, r"\[K, N, C\]"),
        ({"logits": torch.ones(2, 3, 4, dtype=torch.long)}, InputError, "floating point"),
        ({"labels": torch.tensor([0, 1, 7])}, ValueError, r"labels must lie in \[0, 3\]"),
        ({"labels": torch.tensor([0, 1])}, ValueError, r"labels must have shape \[N\] = \[3\]"),
        ({"costs": [1.0, 1.0]}, ValueError, "strictly increasing"),
        ({"costs": [1.0]}, ValueError, "2 numbers"),
        ({"costs": [-1.0, 1.0]}, ValueError, "positive"),
    ],
)
def test_bad_outputs_are_named(kwargs, error, match):
    args = {"logits": torch.randn(2, 3, 4), "labels": torch.tensor([0, 1, 2]), "costs": [1.0, 2.0]}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ExitOutputs(args["logits"], args["labels"], args["costs"])


def test_nan_logits_are_located():
    x = torch.randn(2, 5, 3)
    x[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="exit 1, sample 3"):
        ExitOutputs(x)


def test_probabilities_must_sum_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        ExitOutputs.from_probs(torch.rand(2, 5, 3) * 3)


def test_file_without_logits_is_explained(tmp_path):
    np.savez(tmp_path / "bad.npz", labels=np.arange(3))
    with pytest.raises(FileFormatError, match="'logits' or 'probs'"):
        ExitOutputs.load(tmp_path / "bad.npz")
    with pytest.raises(FileFormatError, match="unknown suffix '.csv'"):
        (tmp_path / "x.csv").write_text("")
        ExitOutputs.load(tmp_path / "x.csv")


def test_extreme_finite_logits_are_kept_and_give_finite_features():
    for logits in (torch.tensor([[[1e40, -1e40], [-1e40, 1e40]]], dtype=torch.float64),
                   torch.tensor([[[3e38, -3e38], [-3e38, 3e38]]])):
        out = ExitOutputs(logits, torch.tensor([0, 1]), [1.0])
        f = out.features[0]
        assert all(torch.isfinite(t).all() for t in (f.probs, f.max_score, f.entropy_conf))
        assert out.correct.all()


def _valid_npz(path):
    ExitOutputs(torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 0]), [1.0, 2.0]).save(path)
    return path.read_bytes()


class Crafted:  # a pickle that would run code if unpickled
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle ran')",))


def _write(kind, path):
    """Write a hostile-but-fair file of kind ``kind`` at ``path`` (suffix chosen by the case)."""
    good = _valid_npz(path.with_name("good.npz"))
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("logits,labels\n0.1,0\n")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "npy":
        np.save(open(path, "wb"), np.zeros((2, 4, 3)))
    elif kind == "object_array":
        np.savez(open(path, "wb"), logits=np.array([{"a": 1}], dtype=object))
    elif kind == "string_logits":
        np.savez(open(path, "wb"), logits=np.array([[["a", "b"]]]))
    elif kind == "complex_logits":
        np.savez(open(path, "wb"), logits=np.ones((1, 2, 2), dtype=np.complex64))
    elif kind == "bad_labels":
        np.savez(open(path, "wb"), logits=np.zeros((1, 2, 2), dtype=np.float32), labels=np.array([0.5, 1.0]))
    elif kind == "flipped_byte":
        data = bytearray(good)
        data[250] ^= 0x08  # in the logits' float data
        path.write_bytes(bytes(data))
    elif kind == "pt_tuple":
        torch.save((torch.rand(2, 4, 3),), path)
    elif kind == "pt_numpy":
        torch.save(np.ones((2, 4, 3)), path)
    elif kind == "pt_int_keys":
        torch.save({0: torch.rand(2, 4, 3)}, path)
    elif kind == "pt_pickle":
        torch.save({"probs": Crafted()}, path)
    elif kind == "pt_truncated":
        torch.save(torch.softmax(torch.randn(2, 4, 3), -1), path)
        path.write_bytes(path.read_bytes()[:-300])
    elif kind == "pt_text":
        path.write_text("not a torch file")


@pytest.mark.parametrize(
    "kind, suffix, match",
    [
        ("empty", ".npz", "not a readable zip archive"),
        ("text", ".npz", "not a readable zip archive"),
        ("truncated", ".npz", "not a readable zip archive"),
        ("npy", ".npz", "not a readable zip archive"),
        ("object_array", ".npz", "cannot be read"),
        ("string_logits", ".npz", "logits must be an array of numbers"),
        ("complex_logits", ".npz", "logits must be an array of numbers"),
        ("bad_labels", ".npz", "labels must be integer class indices"),
        ("flipped_byte", ".npz", "fails its CRC check|not a readable zip"),
        ("pt_tuple", ".pt", "holds a tuple"),
        ("pt_numpy", ".pt", "cannot be read|holds a ndarray"),
        ("pt_int_keys", ".pt", "keys that are not names"),
        ("pt_pickle", ".pt", "cannot be read"),
        ("pt_truncated", ".pt", "not a readable zip archive|cannot be read"),
        ("pt_text", ".pt", "cannot be read"),
    ],
)
def test_a_bad_file_is_a_file_format_error_naming_the_file_and_a_valid_one(tmp_path, kind, suffix, match):
    path = tmp_path / f"bad{suffix}"
    _write(kind, path)
    with pytest.raises(FileFormatError, match=match) as caught:
        ExitOutputs.load(path)
    message = str(caught.value)
    assert str(path) in message
    if "valid exit outputs" not in message:
        assert "a valid exit-output file is" in message


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        ExitOutputs.load(tmp_path / "nope.npz")


def test_save_is_whole_or_absent(tmp_path, monkeypatch):
    out = _outputs()
    out.save(tmp_path / "val.npz")
    before = (tmp_path / "val.npz").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("eenet_fast.files.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        ExitOutputs(out.logits * 2, out.labels, out.costs).save(tmp_path / "val.npz")
    assert (tmp_path / "val.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.npz"]  # no temporary file left
