"""torch.library.opcheck on every fastkd custom op: schema, autograd registration, fake tensors (shapes,
dtypes, strides as the real kernels produce them) and AOT dispatch — what torch.compile relies on."""

import pytest
import torch
from kd_testutil import DEVICE

from fastkd.kernels import logit_kd as lk
from fastkd.kernels import masked_gen as mg
from fastkd.kernels import token_kd as tk


def _inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)
    s, t = r(3, 17, 24).requires_grad_(), r(3, 17, 40)
    W, b, tok = r(40, 24).requires_grad_(), r(40).requires_grad_(), r(40).requires_grad_()
    mask = (torch.rand(3, 16, generator=g) > 0.5).to(DEVICE)
    sl, tlg = r(3, 10).requires_grad_(), r(3, 10)
    y = torch.tensor([1, 2, 3], device=DEVICE)
    return dict(s=s, t=t, W=W, b=b, tok=tok, mask=mask, sl=sl, tl=tlg, y=y, G=r(3, 40, 4, 4).requires_grad_())


CASES = {
    "token_kd: mimic + map": lambda x: (tk.token_kd_op, (x["s"], x["t"], x["W"], x["b"], 1, 1, True, True)),
    "token_kd: mimic on patch views": lambda x: (
        tk.token_kd_op,
        (x["s"][:, 1:], x["t"][:, 1:], x["W"], x["b"], 0, 0, True, False),
    ),
    "token_kd: student map only": lambda x: (tk.token_kd_op, (x["s"], None, None, None, 1, 0, False, True)),
    "token_kd: mimic on patch views, amp (bf16 tensor cores)": lambda x: (
        tk.token_kd_op,
        (x["s"][:, 1:], x["t"][:, 1:], x["W"], x["b"], 0, 0, True, False, True),
    ),
    "token_kd: mimic on patch views, amp, stored residual": lambda x: (
        tk.token_kd_op,
        (x["s"][:, 1:], x["t"][:, 1:], x["W"], x["b"], 0, 0, True, False, True, True),
    ),
    "token_kd: mimic + map, amp": lambda x: (
        tk.token_kd_op,
        (x["s"], x["t"], x["W"], x["b"], 1, 1, True, True, True),
    ),
    "token_kd: mimic + map, the dispatch's factors": lambda x: (
        tk.token_kd_op,
        (x["s"], x["t"], x["W"], x["b"], 1, 1, True, True, False, False, 3e-5 / 3, 1.0 / 48),
    ),
    "token_kd: mimic on patch views, amp, stored residual, ViTKD's α/B": lambda x: (
        tk.token_kd_op,
        (x["s"][:, 1:], x["t"][:, 1:], x["W"], x["b"], 0, 0, True, False, True, True, 1e-5),
    ),
    "gen_input: amp": lambda x: (
        mg.gen_input_op,
        (x["s"][:, 1:], x["mask"], x["W"], x["b"], x["tok"], 4, 4, torch.bfloat16, True),
    ),
    "gen_input": lambda x: (
        mg.gen_input_op,
        (x["s"][:, 1:], x["mask"], x["W"], x["b"], x["tok"], 4, 4, torch.float32),
    ),
    "gen_loss": lambda x: (mg.gen_loss_op, (x["G"], x["t"][:, 1:].detach(), x["mask"], 0.5, True)),
    "logit_kd: nkd": lambda x: (lk.logit_kd_op, (x["sl"], x["tl"], x["y"], 2.0, 1.0, True, True)),
    "logit_kd_topk: kd": lambda x: (
        lk.logit_kd_topk_op,
        (x["sl"], *x["tl"].topk(4, 1), x["tl"].logsumexp(1), x["y"], 2.0, 1.0, False, True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case):
    op, args = CASES[case](_inputs())
    torch.library.opcheck(tk.token_kd_custom_op if op is tk.token_kd_op else op, args)


def test_opcheck_backward_ops():
    x = _inputs()
    s, t, W, b = (v.detach() for v in (x["s"], x["t"], x["W"], x["b"]))
    mim, msum, a_s, s_cls, t_cls, stats = tk.token_kd_op(s, t, W, b, 1, 1, True, True)
    one = torch.tensor(0.7, device=DEVICE)
    g_as, g_cls = torch.ones_like(a_s), torch.ones_like(s_cls)
    flags = (1, 1, True, True, True, True)
    torch.library.opcheck(
        tk.token_kd_backward_op, (one, one, g_as, g_cls, s, t, W, b, a_s, stats, s_cls, *flags)
    )
    dx = torch.ones(3, 40, 4, 4, device=DEVICE)
    args = (dx, s[:, 1:], x["mask"], W, b, x["tok"].detach(), 4, 4, True, True, True)
    torch.library.opcheck(mg.gen_input_backward_op, args)
