"""The backends: selection, and the triton backend against the torch one (same exits, logits and
predictions on a real CNN; nested states compacted alike)."""

import math

import pytest
import torch

pytest.importorskip("triton")

from eenet_fast.kernels import compaction as compaction_kernels  # noqa: E402
from eenet_fast.kernels import exit_decision as decision_kernels  # noqa: E402
from eenet_fast.kernels.compaction import compact  # noqa: E402
from eenet_fast.kernels.exit_decision import exit_decision  # noqa: E402
from kernel_utils import DEVICE, gen, keep_flags  # noqa: E402

from eenet_fast import make_policy  # noqa: E402
from eenet_fast.backends import TorchBackend, TritonBackend, select_backend  # noqa: E402
from eenet_fast.decision import ScoreHeadParams  # noqa: E402
from eenet_fast.outputs import ExitOutputs  # noqa: E402
from eenet_fast.wrapping import wrap  # noqa: E402
from eenet_fast.zoo import MultiExitCNN  # noqa: E402


def tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["all", "none", "random"])
def test_backends_compact_nested_state_alike(mode):
    batch = 40
    g = gen(3)
    keep = keep_flags(batch, mode).to(DEVICE)
    state = {
        "h": torch.randn(batch, 4, 3, 3, generator=g).half().to(memory_format=torch.channels_last),
        "pair": (torch.randint(9, (batch, 2), generator=g), torch.randn(batch, generator=g)),
        "scale": torch.tensor(2.0),
    }
    state = {"h": state["h"].to(DEVICE), "pair": tuple(t.to(DEVICE) for t in state["pair"]), "scale": state["scale"]}
    extra = (torch.arange(batch, device=DEVICE), torch.rand(batch, 2, device=DEVICE))
    assert tensors_equal(TritonBackend.compact(keep, state, *extra), TorchBackend.compact(keep, state, *extra))


def test_backend_selection():
    assert select_backend("torch", DEVICE) is TorchBackend
    assert select_backend("triton", DEVICE) is TritonBackend
    assert select_backend("auto", DEVICE) is (TritonBackend if DEVICE.type == "cuda" else TorchBackend)
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend("cuda", DEVICE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CPU tensors outside the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(decision_kernels, "INTERPRET", False)
    monkeypatch.setattr(compaction_kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        exit_decision(torch.randn(2, 3), ScoreHeadParams.select(0), torch.empty(2, 0), 0.0)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        compact(torch.ones(2, dtype=torch.bool), torch.zeros(2))
    with pytest.raises(RuntimeError, match="backend='triton' is not available.*CUDA"):
        select_backend("triton", torch.device("cpu"))


@pytest.fixture(scope="module")
def cnn_pair():
    """The same MultiExitCNN behind the torch and the triton backend."""
    torch.manual_seed(0)
    net = MultiExitCNN(widths=(4, 8, 8)).eval().to(DEVICE)
    return wrap(net, backend="torch").eval(), wrap(net, backend="triton").eval()


@pytest.mark.parametrize(
    "name, options",
    [
        ("eenet", {"hidden": 16, "epochs": 2, "progress": False}),
        ("maxprob", {}),
        ("entropy", {}),
        ("patience", {}),
        ("search", {"rounds": 1, "samples": 4}),
    ],
)
def test_triton_backend_matches_torch_backend(cnn_pair, name, options):
    torch_model, triton_model = cnn_pair
    g = gen(21)
    x_val = torch.randn(96, 1, 28, 28, generator=g).mul(3).to(DEVICE)
    outputs = ExitOutputs(
        torch.stack(torch_model.all_exits(x_val)).cpu(), torch.randint(10, (96,), generator=g), [1.0, 2.0, 3.0]
    )
    torch_model.policy = triton_model.policy = make_policy(name, **options).fit(outputs, 1.8)
    x = torch.randn(50, 1, 28, 28, generator=g).mul(3).to(DEVICE)
    x[3] = math.nan
    ref, got = torch_model(x), triton_model(x)
    assert torch.equal(got.exits, ref.exits)
    assert torch.equal(got.nonfinite, ref.nonfinite) and got.nonfinite.tolist() == [i == 3 for i in range(50)]
    finite = ~ref.nonfinite
    torch.testing.assert_close(got.logits[finite], ref.logits[finite], rtol=0, atol=0)
    assert torch.equal(got.predictions[finite], ref.predictions[finite])
    assert got.exits[3] == 2
    assert triton_model(x[:0]).exits.shape == (0,)
