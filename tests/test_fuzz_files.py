"""Fuzzing the files eenet_fast reads: corrupt the bytes of a valid ``.npz``, ``.pt`` and policy file
(flip bits, truncate, insert, delete); each must either load to the same content or raise the
library's own error (:class:`EENetError`), never anything else, and never run a pickle."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_utils import C, D, mlp_model, random_policy
from torch import nn

from eenet_fast import EENetError, ExitOutputs
from eenet_fast.persist import load_policy

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _mutations():
    """1 to 3 mutations, each at a position given as a fraction of the file's length."""
    position = st.floats(0, 1, exclude_max=True)
    return st.lists(
        st.one_of(
            st.tuples(st.just("flip"), position, st.integers(0, 7)),
            st.tuples(st.just("truncate"), position, st.just(0)),
            st.tuples(st.just("insert"), position, st.integers(0, 255)),
            st.tuples(st.just("delete"), position, st.just(0)),
        ),
        min_size=1,
        max_size=3,
    )


def _corrupt(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, fraction, value in mutations:
        position = int(fraction * len(out))
        if kind == "flip" and out:
            out[position] ^= 1 << value
        elif kind == "truncate":
            del out[position:]
        elif kind == "insert":
            out.insert(position, value)
        elif kind == "delete" and out:
            del out[position]
    return bytes(out)


def _outputs() -> ExitOutputs:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 6, 4, generator=g), -1)
    return ExitOutputs.from_probs(probs, torch.randint(4, (6,), generator=g), [1.0, 2.0, 3.0])


def _same_outputs(a: ExitOutputs, b: ExitOutputs) -> bool:
    same = lambda x, y: (x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype and torch.equal(x, y))  # noqa: E731
    return same(a.logits, b.logits) and same(a.labels, b.labels) and same(a.costs, b.costs)


TEMPORARY = tempfile.TemporaryDirectory(prefix="eenet-fuzz-")  # removed when the test session ends


def _valid_files():
    folder = Path(TEMPORARY.name)
    outputs = _outputs()
    outputs.save(folder / "valid.npz")
    probs = torch.softmax(outputs.logits, -1)
    torch.save({"probs": probs, "labels": outputs.labels, "costs": outputs.costs}, folder / "valid.pt")
    from_pt = ExitOutputs.load(folder / "valid.pt")
    model = mlp_model()
    model.heads[0] = nn.Linear(D, C)
    model.new_heads = (0,)  # a head wrap added: its weights are in the file
    random_policy(model, "eenet", 0, 0.5)
    model.save_policy(folder / "valid.safetensors")
    return folder, outputs, from_pt, model


FOLDER, OUTPUTS, FROM_PT, MODEL = _valid_files()


def _load_corrupted(suffix: str, data: bytes, load):
    path = FOLDER / f"corrupted{suffix}"
    path.write_bytes(data)
    try:
        return load(path)
    except EENetError:
        return None


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
@FUZZ
@given(mutations=_mutations())
def test_a_corrupted_exit_output_file_loads_the_same_or_is_refused(suffix, mutations):
    data = _corrupt((FOLDER / f"valid{suffix}").read_bytes(), mutations)
    loaded = _load_corrupted(suffix, data, ExitOutputs.load)
    assert loaded is None or _same_outputs(loaded, OUTPUTS if suffix == ".npz" else FROM_PT)


@FUZZ
@given(mutations=_mutations())
def test_a_corrupted_policy_file_loads_the_same_or_is_refused(mutations):
    data = _corrupt((FOLDER / "valid.safetensors").read_bytes(), mutations)
    saved = _load_corrupted(
        ".safetensors", data, lambda path: load_policy(path, MODEL.heads, MODEL.new_heads, stages=MODEL.stages)
    )
    if saved is None:
        return
    policy, original = saved.policy, MODEL.policy
    assert (policy.name, policy.options(), policy.budget, policy.num_classes) == (
        original.name, original.options(), original.budget, original.num_classes)
    assert torch.equal(policy.thresholds, original.thresholds) and torch.equal(policy.costs, original.costs)
    assert all(torch.equal(v, original.state_tensors()[k]) for k, v in policy.state_tensors().items())
    assert all(torch.equal(v, MODEL.heads[0].state_dict()[k]) for k, v in saved.heads[0].state_dict().items())


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_the_fuzzed_files_are_valid_to_begin_with(suffix):
    data = (FOLDER / f"valid{suffix}").read_bytes()
    if suffix == ".safetensors":
        assert _load_corrupted(suffix, data, lambda p: load_policy(p, MODEL.heads, MODEL.new_heads, stages=MODEL.stages))
    else:
        loaded = _load_corrupted(suffix, data, ExitOutputs.load)
        assert loaded is not None and _same_outputs(loaded, OUTPUTS if suffix == ".npz" else FROM_PT)
        assert np.isfinite(loaded.logits.numpy()).all()
