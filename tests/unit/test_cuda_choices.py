"""What `--precision auto` and `--attn-impl auto` pick on CUDA machines, with the device faked.

torch.cuda.is_bf16_supported() answers yes on V100 (7.0) and T4 (7.5) through emulation, which is
slower than fp32 there; only compute capability 8.0+ runs bf16 natively (and flash-attn 2).
"""

import importlib.util

import pytest
import torch

from swiftdist import model
from swiftdist.errors import SwiftdistError


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device of a chosen compute capability, with flash-attn installed; returns the setter."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # The emulating answer, as on a V100: auto must not trust it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))

    def with_capability(major: int, minor: int):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return with_capability


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"),
                                                  ((8, 6), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_on_native_hardware(fake_cuda, capability, expected):
    fake_cuda(*capability)
    assert model.resolve_precision("auto") == expected
    assert model.resolve_precision("fp32") == "fp32"  # an explicit choice stays


def test_auto_attention_never_picks_flash_for_fp32(fake_cuda):
    fake_cuda(9, 0)
    assert model.resolve_attn_impl("auto", precision="bf16") == "flash_attention_2"
    assert model.resolve_attn_impl("auto", precision="fp32") == "sdpa"
    # A caller that does not say its precision (inference in fp32) gets the one that runs in every precision.
    assert model.resolve_attn_impl("auto") == "sdpa"


def test_auto_attention_skips_flash_on_emulated_bf16(fake_cuda):
    fake_cuda(7, 5)  # T4: flash-attn 2 has no kernels for it
    assert model.resolve_attn_impl("auto", precision="bf16") == "sdpa"


def test_explicit_flash_with_fp32_is_refused_in_one_line(fake_cuda):
    fake_cuda(9, 0)
    with pytest.raises(SwiftdistError, match=r"flash_attention_2 computes in bf16 only.*--precision fp32") as err:
        model.resolve_attn_impl("flash_attention_2", precision="fp32")
    assert "\n" not in str(err.value)
    assert model.resolve_attn_impl("flash_attention_2", precision="bf16") == "flash_attention_2"
