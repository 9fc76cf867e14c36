"""`precision: auto`: bf16 only where the CPU computes it natively, read from /proc/cpuinfo."""

import pytest

from bertscale.hardware import cpu_facts, resolve_precision

CPUINFO = """processor\t: 0
model name\t: {model}
flags\t\t: fpu sse2 avx2 {extra}

processor\t: 1
model name\t: {model}
flags\t\t: fpu sse2 avx2 {extra}
"""


def facts(tmp_path, model, extra):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(model=model, extra=extra))
    return cpu_facts(str(path))


@pytest.mark.parametrize("model, extra, expected, flag", [
    ("Intel Xeon Platinum 8480", "avx512f amx_tile amx_bf16 avx512_bf16", "bf16", "amx_bf16"),
    ("AMD EPYC 9654", "avx512f avx512_bf16", "bf16", "avx512_bf16"),
    ("AMD EPYC 7763", "", "fp32", "emulated"),
])
def test_auto_is_bf16_only_with_native_bf16_instructions(tmp_path, model, extra, expected, flag):
    cpu = facts(tmp_path, model, extra)
    chosen = resolve_precision("auto", "cpu", cpu)
    assert chosen.name == expected
    assert model in chosen.reason and flag in chosen.reason
    assert cpu.native_bf16 == (expected == "bf16")


def test_an_explicit_precision_is_kept_and_a_wrong_one_named(tmp_path):
    cpu = facts(tmp_path, "AMD EPYC 7763", "")
    assert resolve_precision("bf16", "cpu", cpu).name == "bf16"
    assert resolve_precision("fp32", "cpu", cpu).reason == "set in the config"
    with pytest.raises(ValueError, match="fp17.*auto, fp32, bf16, fp16"):
        resolve_precision("fp17", "cpu", cpu)


def test_an_unreadable_cpuinfo_means_no_native_bf16(tmp_path):
    cpu = cpu_facts(str(tmp_path / "missing"))
    assert cpu.model == "unknown" and not cpu.native_bf16
    assert resolve_precision("auto", "cpu", cpu).name == "fp32"


def test_compile_auto_is_on_for_cuda_only():
    from bertscale.hardware import resolve_compile

    assert resolve_compile("auto", "cpu")[0] is False and resolve_compile("auto", "cuda")[0] is True
    assert resolve_compile(True, "cpu") == (True, "set in the config")
    assert resolve_compile(False, "cuda")[0] is False
    with pytest.raises(ValueError, match="auto, true or false"):
        resolve_compile("yes", "cpu")
