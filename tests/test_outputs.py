import numpy as np
import pytest
import torch

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
        ({"logits": torch.ones(2, 3, 4, dtype=torch.long)}, TypeError, "floating point"),
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
    with pytest.raises(KeyError, match="'logits' or 'probs'"):
        ExitOutputs.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="unknown exit-output format"):
        (tmp_path / "x.csv").write_text("")
        ExitOutputs.load(tmp_path / "x.csv")
