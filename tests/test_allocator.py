"""steady_allocator(): freed CPU memory stays in the process, and a time calibration without it says so."""

import ctypes
import warnings

import pytest
import torch

import eenet_fast.allocator as allocator
from eenet_fast import steady_allocator, wrap
from eenet_fast.outputs import ExitOutputs
from eenet_fast.zoo import MultiExitCNN

glibc = pytest.mark.skipif(not allocator.has_glibc(), reason="mallopt and mallinfo2 are glibc's")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo() -> _MallInfo2:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


@glibc
def test_a_large_tensor_comes_from_the_heap_and_its_memory_stays_after_it_is_freed():
    assert steady_allocator() and steady_allocator()  # the conftest applied it; again is a no-op
    assert allocator.allocator_is_steady()
    before = _mallinfo()
    x = torch.ones(16 << 20)  # 64 MB: glibc's defaults would mmap it, and unmap it when freed
    during = _mallinfo()
    assert during.hblks == before.hblks and during.hblkhd == before.hblkhd  # no new mmapped block
    assert during.uordblks - before.uordblks >= x.numel() * 4
    del x
    after = _mallinfo()
    assert after.arena >= during.arena  # the heap did not shrink: the block was not given back
    # free in the heap now (in the whole suite the allocations around the test take a little of it)
    assert after.fordblks - before.fordblks >= (16 << 20) * 4 * 0.9


@pytest.mark.parametrize("environment, steady", [
    ({}, False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, True),
    ({"MALLOC_MMAP_MAX_": "0"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, True),
])
@glibc
def test_the_allocator_counts_as_steady_when_the_environment_makes_it_so(monkeypatch, environment, steady):
    monkeypatch.setattr(allocator, "_applied", False)
    for name in ("LD_PRELOAD", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert allocator.allocator_is_steady() is steady


@pytest.mark.parametrize("steady", [False, True])
def test_a_time_calibration_on_the_cpu_warns_when_freed_memory_goes_back_to_the_system(monkeypatch, steady):
    monkeypatch.setattr("eenet_fast.calibration.allocator_is_steady", lambda: steady)
    model = wrap(MultiExitCNN(widths=(4, 8, 8))).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 28, 28, generator=g)
    outputs = ExitOutputs(torch.stack(model.all_exits(x)), torch.randint(10, (32,), generator=g))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = model.calibrate(outputs, 3.0, "maxprob", costs="latency", example=x[:4], batch_size=4, progress=False)
    named = [w for w in caught if "steady_allocator()" in str(w.message)]
    assert policy.latency is not None
    assert len(named) == (0 if steady else 1)
    if named:
        assert "two levels" in str(named[0].message)
