"""fastkd.ops.dispatch dispatch on CPU: reference by default and under FASTKD_KERNELS=0, the compiled
reference (same values) in fused mode, re-exports, and no kernel import on CPU."""

import os
import subprocess
import sys

import pytest
import torch

from fastkd.ops import dispatch as KF
from fastkd.ops import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def reset_mode():
    yield
    KF.set_fused(False)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(3, 10, generator=g) * 3).requires_grad_()
    t = torch.randn(3, 10, generator=g) * 3
    tok_s = torch.randn(3, 17, 24, generator=g).requires_grad_()
    tok_t = torch.randn(3, 17, 40, generator=g)
    w = (torch.randn(40, 24, generator=g) * 0.2).requires_grad_()
    return s, t, tok_s, tok_t, w


def _value_and_grad(fn, *args):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    for a in leaves:
        a.grad = None
    out = fn(*args)
    out.backward()
    return out.detach(), [a.grad.clone() for a in leaves]


def test_default_mode_is_the_reference():
    s, t, *_ = _inputs()
    assert not KF.is_fused()
    assert KF.active_path(s, t) == "reference"
    assert "reference" in KF.describe("cpu")
    assert torch.equal(KF.kd_loss(s, t), R.kd_loss(s, t))


def test_fastkd_kernels_0_forces_the_reference(monkeypatch):
    monkeypatch.setenv("FASTKD_KERNELS", "0")
    KF.set_fused(True)
    s, t, tok_s, tok_t, w = _inputs()
    assert KF.active_path(s, t) == "reference"
    assert "FASTKD_KERNELS=0" in KF.describe("cpu") and "FASTKD_KERNELS=0" in KF.describe("cuda")
    assert torch.equal(KF.nkd_loss(s, t, torch.tensor([1, 2, 3])), R.nkd_loss(s, t, torch.tensor([1, 2, 3])))
    assert torch.equal(KF.cls_patch_map_loss(tok_s, tok_t), R.cls_patch_map_loss(tok_s, tok_t))
    monkeypatch.delenv("FASTKD_KERNELS")
    KF.refresh_env()
    assert KF.active_path(s, t) == "compiled"


def test_cpu_fused_is_the_compiled_reference():
    """Fused mode on CPU: torch.compile of the reference, announced by describe(), same values and grads."""
    KF.set_fused(True)
    s, t, tok_s, tok_t, w = _inputs(1)
    assert KF.active_path(s, t) == "compiled"
    line = KF.describe("cpu")
    assert "compiled reference" in line and "\n" not in line
    for fn_kf, fn_ref, args in [
        (KF.kd_loss, R.kd_loss, (s, t, 2.0)),
        (
            lambda a, b: KF.cls_patch_map_loss(a, b, 1, 1),
            lambda a, b: R.cls_patch_map_loss(a, b, 1, 1),
            (tok_s, tok_t),
        ),
        (
            lambda a, b, c: KF.vitkd_mimic_loss([a[:, 1:]], [b[:, 1:]], [c], [None]),
            lambda a, b, c: R.vitkd_mimic_loss([a[:, 1:]], [b[:, 1:]], [c], [None]),
            (tok_s, tok_t, w),
        ),
    ]:
        v, g = _value_and_grad(fn_kf, *args)
        rv, rg = _value_and_grad(fn_ref, *args)
        torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-7)
        for a, b in zip(g, rg, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_token_kd_reference_path_semantics():
    """token_kd's fields are the documented reference quantities (this is also the CPU fused path's spec)."""
    s, t, tok_s, tok_t, w = _inputs(2)
    out = KF.token_kd(tok_s, tok_t, w, None, num_prefix_s=1, num_prefix_t=1)
    B, N = 3, 16
    torch.testing.assert_close(
        out.mimic, R.vitkd_mimic_loss([tok_s[:, 1:]], [tok_t[:, 1:]], [w], [None], alpha=B)
    )
    torch.testing.assert_close(out.cls_map, R.cls_patch_map_loss(tok_s, tok_t))
    torch.testing.assert_close(out.s_cls, torch.nn.functional.normalize(tok_s[:, 0], dim=-1))
    torch.testing.assert_close(out.t_cls, torch.nn.functional.normalize(tok_t[:, 0], dim=-1))
    assert out.s_cls.shape == (B, 24) and out.t_cls.shape == (B, 40) and N == tok_s.shape[1] - 1
    only_map = KF.token_kd(tok_s, tok_t, mimic=False)
    assert only_map.mimic is None and torch.equal(only_map.cls_map, out.cls_map)
    with pytest.raises(ValueError, match="nothing to compute"):
        KF.token_kd(tok_s, tok_t, mimic=False, cls_map=False)


def test_cpu_fused_inside_an_outer_compile():
    """The trainer compiles its step with fused losses inside: nested torch.compile must trace through."""
    KF.set_fused(True)
    s, t, *_ = _inputs(3)
    step = torch.compile(lambda a, b: KF.kd_loss(a, b, 4.0) * 2.0, fullgraph=True)
    torch.testing.assert_close(step(s, t), R.kd_loss(s, t, 4.0) * 2.0, rtol=1e-5, atol=1e-7)


def test_not_kernel_covered_functions_are_the_reference_ones():
    for name in (
        "ald",
        "cls_embed_loss",
        "cskd_alpha",
        "cskd_loss",
        "deit_hard_loss",
        "manifold_loss",
        "random_token_mask",
    ):
        assert getattr(KF, name) is getattr(R, name)
    for name in R.__all__:
        assert callable(getattr(KF, name)), name


def test_cpu_fused_mode_never_imports_the_kernels():
    """tests/kernels relies on this: on a CPU machine nothing imports fastkd.kernels before its conftest."""
    code = (
        "import sys, torch; import fastkd.ops.dispatch as KF; KF.set_fused(True); x = torch.randn(2, 5); "
        "assert KF.active_path(x) == 'compiled', KF.active_path(x); KF.describe(); KF.describe('cuda'); "
        "print(sorted(m for m in sys.modules if m.startswith('fastkd.kernels')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
