"""[CLS]-KD, manifold and CSKD inside training (issue 4).

Every check runs the real training path (Trainer: augment → online teacher → student taps → DistillLoss)
on tiny models (8×8 digits, depth 4, widths 16/32) and compares with fastkd.ops.reference computed
independently from the same tensors.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CNN_OV, DEIT, MK, S_OV, T_OV, VIT  # tests/ is on sys.path (tests/conftest.py)

import fastkd.models.cnn  # noqa: F401  (registers fastkd_resnet)
from fastkd.config import MethodConfig, parse_args
from fastkd.data import load_data
from fastkd.methods.clskd import clskd_pairs
from fastkd.methods.cskd import CSKDLoss, default_cnn_arch
from fastkd.methods.registry import build_loss, check_student
from fastkd.models import Taps, create_model, forward_taps, model_info, save_model
from fastkd.ops import reference as R
from fastkd.train.setup import build_trainer
from fastkd.train.trainer import Trainer


@pytest.fixture(scope="module")
def data():
    return load_data("digits")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("teachers")
    vit = create_model(VIT, **MK, **T_OV)
    cnn = create_model("fastkd_resnet", **MK, **CNN_OV)
    save_model(vit, d / "vit.safetensors")
    save_model(cnn, d / "cnn.safetensors")
    return {"vit": str(d / "vit.safetensors"), "cnn": str(d / "cnn.safetensors")}


def make_trainer(tmp_path, data, teachers, method, *, teacher="vit", distilled=False, extra=()):
    argv = [
        "--method", method, "--teacher", teachers[teacher], "--epochs", "2", "--batch-size", "24",
        "--train-limit", "96", "--warmup-epochs", "0", "--lr", "3e-3", "--device", "cpu", "--quiet",
        "--workdir", str(tmp_path / "work"), "--eval-every", "0", "--log-every", "1", *extra,
    ]
    cfg = parse_args(argv)
    torch.manual_seed(0)
    arch = (DEIT if distilled else VIT, dict(S_OV))
    return build_trainer(cfg, data=data, student_arch=arch, log=lambda *a: None)


def forward_once(tr: Trainer, epoch_frac: float = 0.0):
    """One training forward, no update: (x, student taps, teacher signals, terms, what the loss saw)."""
    ids = next(iter(tr.sampler.batches(0)))
    x, y_soft, y_hard = tr.batch(ids, 0)
    t_sig = tr.teacher(x, ids=ids, view=0)
    seen = {}
    orig = tr.loss_fn.forward

    def spy(s, t, batch):
        seen["s"], seen["batch"], seen["rng"] = s, batch, torch.get_rng_state()
        return orig(s, t, batch)

    tr.loss_fn.forward = spy
    try:
        terms = tr.forward_loss(x, t_sig, y_soft, y_hard, epoch_frac)
    finally:
        del tr.loss_fn.forward
    return x, seen["s"], t_sig, terms, seen


def batch_labels(tr: Trainer) -> torch.Tensor:
    return tr.y_train[next(iter(tr.sampler.batches(0)))]


def part(tr: Trainer, name: str):
    return next(p for p in tr.loss_fn.parts if p.name == name)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=1e-7)


def ref_clskd(s: Taps, t: Taps, p) -> tuple[torch.Tensor, torch.Tensor]:
    cls_l = [R.cls_embed_loss(s.blocks[i][:, 0], t.blocks[j][:, 0], p.projector) for i, j in p.pairs]
    map_l = [R.cls_patch_map_loss(s.blocks[i], t.blocks[j], s.num_prefix, t.num_prefix) for i, j in p.pairs]
    return (p.w_cls * R.ald(cls_l, p.mu, p.detach), p.w_map * R.ald(map_l, p.mu, p.detach))


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("distilled, extra", [(False, ()), (True, ("--clskd-detach", "--clskd-mu", "2.5"))])
def test_clskd_in_training_equals_reference(tmp_path, data, teachers, distilled, extra):
    tr = make_trainer(tmp_path, data, teachers, "clskd", distilled=distilled, extra=extra)
    p = part(tr, "clskd")
    assert p.pairs == [(0, 0), (1, 1), (2, 2), (3, 3)] and p.projector is not None  # 16 → 32: projector
    x, s, _, terms, _ = forward_once(tr)
    t = forward_taps(tr.teacher.model, x, p.teacher_blocks())
    assert s.num_prefix == (2 if distilled else 1) and t.num_prefix == 1
    ref_cls, ref_map = ref_clskd(s, t, p)
    close(terms["clskd_cls"], ref_cls)
    close(terms["clskd_map"], ref_map)
    assert set(terms) == {"ce", "clskd_cls", "clskd_map", "loss"}
    close(terms["loss"], terms["ce"] + ref_cls + ref_map)


def test_md_in_training_equals_reference(tmp_path, data, teachers):
    tr = make_trainer(tmp_path, data, teachers, "md", extra=("--md-k", "40", "--md-weight", "0.5"))
    p = part(tr, "md")
    x, s, _, terms, seen = forward_once(tr)
    t = forward_taps(tr.teacher.model, x, p.teacher_blocks())
    torch.set_rng_state(seen["rng"])  # the random-level draw: same indices as inside training
    ref = R.manifold_loss([s.blocks[i] for i, _ in p.pairs], [t.blocks[j] for _, j in p.pairs], k=40)
    close(terms["md"], 0.5 * ref)


def test_clskd_release_preset_total(tmp_path, data, teachers):
    tr = make_trainer(tmp_path, data, teachers, "clskd+kd+md", extra=("--preset", "clskd-release"))
    x, s, _, terms, seen = forward_once(tr)
    assert set(terms) == {"kd", "clskd_cls", "clskd_map", "md", "loss"}  # no ground-truth CE
    p = part(tr, "clskd")
    t = forward_taps(tr.teacher.model, x, p.teacher_blocks())
    close(terms["kd"], R.kd_loss(s.logits, t.logits, T=1.0))
    ref_cls, ref_map = ref_clskd(s, t, p)
    close(terms["clskd_cls"], ref_cls)  # w_cls = 1
    close(terms["clskd_map"], ref_map)  # w_map = 2
    assert p.w_cls == 1.0 and p.w_map == 2.0


def _cnn_dense(cnn, x):
    f = cnn.forward_features(x)  # [B, F, h, w]
    dense = torch.einsum("bfhw,cf->bchw", f, cnn.fc.weight) + cnn.fc.bias[None, :, None, None]
    return dense, cnn(x)


@pytest.mark.parametrize(
    "extra, epoch_frac, alpha",
    [
        ((), 0.0, 1.0),
        ((), 1.5, 0.5),  # per epoch: α = 1 − ⌊1.5⌋/2
        (("--no-cskd-hard", "--cskd-T", "2.0", "--cskd-schedule", "cos", "--cskd-per-iter"), 1.5,
         math.cos(0.75 * math.pi / 2)),
    ],
)
def test_cskd_deit_in_training_equals_reference(tmp_path, data, teachers, extra, epoch_frac, alpha):
    tr = make_trainer(tmp_path, data, teachers, "cskd+deit", teacher="cnn", distilled=True, extra=extra)
    p = part(tr, "cskd")
    assert tr.teacher.dense and abs(p.alpha(epoch_frac) - alpha) < 1e-12
    x, s, t_sig, terms, _ = forward_once(tr, epoch_frac)
    dense, t_logits = _cnn_dense(tr.teacher.model, x)
    close(t_sig["dense_logits"], dense)
    assert dense.shape[-2:] == (2, 2) and s.grid == (4, 4)  # student 4×4 tokens pooled to the 2×2 map
    head = tr.student.head_dist
    s_patch = s.tokens[:, 2:] @ head.weight.t() + head.bias  # dist head on every patch token
    ref = R.cskd_loss(s_patch, dense, alpha, hard=p.hard, T=p.T)
    close(terms["cskd"], ref)
    close(terms["deit_dist"], 0.5 * R.deit_hard_loss(s.dist_logits, t_logits))
    ce = -(((1 - 0.1) * F.one_hot(batch_labels(tr), 10) + 0.01) * F.log_softmax(s.logits, -1)).sum(-1).mean()
    close(terms["deit_ce"], 0.5 * ce)
    assert set(terms) == {"deit_ce", "deit_dist", "cskd", "loss"}


def test_cskd_alone_keeps_full_ce_and_main_head(tmp_path, data, teachers):
    tr = make_trainer(tmp_path, data, teachers, "cskd", teacher="cnn")
    x, s, _, terms, _ = forward_once(tr)
    assert set(terms) == {"ce", "cskd", "loss"}
    dense, _ = _cnn_dense(tr.teacher.model, x)
    head = tr.student.head
    ref = R.cskd_loss(s.tokens[:, 1:] @ head.weight.t() + head.bias, dense, 1.0)
    close(terms["cskd"], ref)


def test_combination_logs_named_parts(tmp_path, data, teachers):
    tr = make_trainer(tmp_path, data, teachers, "vitkd+nkd+clskd+kd")
    x, s, _, terms, _ = forward_once(tr)
    names = {"ce", "nkd", "kd", "vitkd_mim", "vitkd_gen", "clskd_cls", "clskd_map"}
    assert set(terms) == names | {"loss"}
    close(terms["loss"], sum(terms[k] for k in names))
    p = part(tr, "clskd")
    t = forward_taps(tr.teacher.model, x, p.teacher_blocks())
    ref_cls, ref_map = ref_clskd(s, t, p)
    close(terms["clskd_cls"], ref_cls)
    close(terms["clskd_map"], ref_map)
    close(terms["nkd"], R.nkd_loss(s.logits, t.logits, batch_labels(tr)))
    close(terms["kd"], R.kd_loss(s.logits, t.logits, T=4.0))


# ---------------------------------------------------------------------------------------------- gradients


def _nonzero_grad(p: torch.nn.Parameter) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_gradients_reach_every_trainable_part(tmp_path, data, teachers):
    tr = make_trainer(tmp_path, data, teachers, "vitkd+nkd+clskd+md")
    _, _, _, terms, _ = forward_once(tr)
    terms["loss"].backward()
    missing = [n for n, p in tr.loss_fn.named_parameters() if not _nonzero_grad(p)]
    assert not missing, missing  # projector, mimic/align linears, generator convs, mask token
    assert any("projector" in n for n, _ in tr.loss_fn.named_parameters())
    assert any("mask_token" in n for n, _ in tr.loss_fn.named_parameters())
    assert _nonzero_grad(tr.student.head.weight) and _nonzero_grad(tr.student.blocks[0].attn.qkv.weight)


def test_cskd_gradient_goes_through_the_dist_head(tmp_path, data, teachers):
    tr = make_trainer(tmp_path, data, teachers, "cskd+deit", teacher="cnn", distilled=True)
    _, _, _, terms, _ = forward_once(tr)
    terms["cskd"].backward(retain_graph=True)
    assert _nonzero_grad(tr.student.head_dist.weight) and _nonzero_grad(tr.student.norm.weight)
    assert not _nonzero_grad(tr.student.head.weight)  # CSKD alone never touches the cls head
    tr.student.zero_grad()
    terms["loss"].backward()
    assert _nonzero_grad(tr.student.head.weight) and _nonzero_grad(tr.student.head_dist.weight)


# ---------------------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize(
    "s_grid, t_grid", [((4, 4), (2, 2)), ((5, 5), (3, 3)), ((2, 8), (1, 3)), ((3, 3), (3, 3))]
)
@pytest.mark.parametrize("hard", [True, False])
def test_cskd_pooling_unequal_grids(s_grid, t_grid, hard):
    g = torch.Generator().manual_seed(1)
    B, C = 3, 7
    N = s_grid[0] * s_grid[1]
    s_patch = torch.randn(B, N, C, generator=g, dtype=torch.float64, requires_grad=True)
    dense = torch.randn(B, C, *t_grid, generator=g, dtype=torch.float64)
    loss_part = CSKDLoss(4, hard=hard, T=2.0)
    taps = Taps(torch.zeros(B, C), None, {}, None, 1, s_grid, s_patch.transpose(1, 2).reshape(B, C, *s_grid))
    out = loss_part(taps, {"dense_logits": dense}, {"epoch_frac": 1.0})
    # independent pooling: adaptive average pool written out cell by cell
    h, w = s_grid
    grid = s_patch.transpose(1, 2).reshape(B, C, h, w)
    pooled = torch.empty(B, C, *t_grid, dtype=torch.float64)
    for a in range(t_grid[0]):
        for b in range(t_grid[1]):
            r0, r1 = (a * h) // t_grid[0], -((-(a + 1) * h) // t_grid[0])
            c0, c1 = (b * w) // t_grid[1], -((-(b + 1) * w) // t_grid[1])
            pooled[:, :, a, b] = grid[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    z = 0.75 * dense + 0.25 * dense.mean(dim=(2, 3), keepdim=True)  # α = 1 − 1/4
    if hard:
        ref = F.cross_entropy(pooled, z.argmax(1))
    else:
        q = F.log_softmax(z / 2, 1)
        ref = (q.exp() * (q - F.log_softmax(pooled / 2, 1))).sum() * 4 / B
    close(out["cskd"], ref, tol=1e-10)
    close(out["cskd"], R.cskd_loss(s_patch, dense, 0.75, hard=hard, T=2.0, grid=s_grid), tol=1e-10)


def test_cskd_impossible_pooling_is_one_clear_error():
    taps = Taps(torch.zeros(2, 5), None, {}, None, 1, (2, 2), torch.zeros(2, 5, 2, 2))
    with pytest.raises(ValueError, match="2x2 token grid cannot be pooled to the teacher's 4x4"):
        CSKDLoss(2)(taps, {"dense_logits": torch.zeros(2, 5, 4, 4)}, {"epoch_frac": 0.0})


def test_cskd_rejects_a_non_linear_teacher_head_by_name(tmp_path, data):
    # timm ConvNeXt's head with head_hidden_size (pool → norm → Linear → GELU → Linear) is not linear
    cnn = create_model("convnext_atto", **MK, patch_size=1, depths=[1, 1, 1, 1], dims=[8, 8, 8, 8],
                       head_hidden_size=16)
    path = tmp_path / "convnext.safetensors"
    save_model(cnn, path)
    tr = make_trainer(tmp_path, data, {"cnn": str(path)}, "cskd", teacher="cnn")
    with pytest.raises(ValueError, match="convnext_atto"):
        forward_once(tr)


def test_default_cnn_teacher_arch_maps():
    for img, grid in ((8, (2, 2)), (32, (4, 4)), (224, (7, 7))):
        name, ov = default_cnn_arch(img)
        m = create_model(name, num_classes=3, img_size=img, in_chans=1, **ov)
        taps = forward_taps(m.eval(), torch.randn(1, 1, img, img), dense=True)
        assert taps.grid == grid and taps.dense_logits.shape == (1, 3, *grid)
        close(taps.dense_logits.mean(dim=(2, 3)), taps.logits)


# ---------------------------------------------------------------------------------------------- layer maps


def test_layer_mapping_12_to_6_and_6_to_12():
    assert clskd_pairs(12, 6) == [(0, 0), (1, 0), (2, 1), (3, 1), (8, 4), (9, 4), (10, 5), (11, 5)]
    assert clskd_pairs(6, 12) == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert clskd_pairs(12, 12) == [(0, 0), (1, 1), (2, 2), (3, 3), (8, 8), (9, 9), (10, 10), (11, 11)]
    assert clskd_pairs(12, 6, [0, -1]) == [(0, 0), (11, 5)]


@pytest.mark.parametrize("L_s, L_t", [(6, 12), (12, 6)])
def test_depth_mapping_inside_the_loss(L_s, L_t):
    torch.manual_seed(0)
    s_model = create_model(VIT, **MK, **{**S_OV, "depth": L_s})
    t_model = create_model(VIT, **MK, **{**T_OV, "depth": L_t})
    mcfg = MethodConfig(method="clskd+md")
    loss = build_loss(mcfg, model_info(s_model), model_info(t_model), epochs=1)
    clskd = next(p for p in loss.parts if p.name == "clskd")
    assert clskd.pairs == clskd_pairs(L_s, L_t)
    x = torch.randn(4, 1, 8, 8)
    t = forward_taps(t_model, x, loss.teacher_blocks())
    s = forward_taps(s_model, x, loss.student_blocks())
    terms = loss(s, loss.teacher_signals(t), {"y_soft": F.one_hot(torch.arange(4), 10).float()})
    ref_cls, ref_map = ref_clskd(s, t, clskd)
    close(terms["clskd_cls"], ref_cls)
    close(terms["clskd_map"], ref_map)


def test_clear_errors_for_bad_pairings(tmp_path, data, teachers):
    with pytest.raises(ValueError, match="clskd needs a ViT teacher"):
        make_trainer(tmp_path, data, teachers, "clskd", teacher="cnn")
    with pytest.raises(ValueError, match="out of range"):
        make_trainer(tmp_path, data, teachers, "clskd", extra=("--clskd-blocks", "0,9"))
    with pytest.raises(ValueError, match="cskd-schedule"):
        make_trainer(tmp_path, data, teachers, "cskd", teacher="cnn", extra=("--cskd-schedule", "exp"))


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "method, teacher, distilled, extra",
    [
        ("clskd", "vit", False, ()),
        ("md", "vit", False, ()),
        ("clskd+kd+md", "vit", False, ("--preset", "clskd-release")),
        ("vitkd+nkd+clskd", "vit", False, ()),
        ("cskd", "cnn", False, ()),
        ("cskd+deit", "cnn", True, ("--preset", "cskd-release")),
    ],
)
def test_short_training_lowers_the_loss(tmp_path, data, teachers, method, teacher, distilled, extra):
    tr = make_trainer(tmp_path, data, teachers, method, teacher=teacher, distilled=distilled,
                      extra=(*extra, "--method", method, "--epochs", "10"))
    ids = next(iter(tr.sampler.batches(0)))  # a fixed batch: the real step (optimizer, clip, schedule)
    hist = [{k: float(v.detach()) for k, v in tr.step(ids, 0).items()} for _ in range(10)]
    loss = [h["loss"] for h in hist]
    assert all(math.isfinite(v) for v in loss)
    assert sum(loss[-3:]) / 3 < 0.97 * loss[0], loss
    own = {"clskd_cls", "clskd_map", "md", "cskd", "kd", "deit_dist"} & set(hist[0])
    assert own, hist[0]
    for k in own:  # each distillation term of the method falls too
        assert hist[-1][k] < hist[0][k], (k, [h[k] for h in hist])


def test_cskd_eval_rule_and_summary(tmp_path, data, teachers):
    tr = make_trainer(tmp_path, data, teachers, "cskd+deit", teacher="cnn", distilled=True,
                      extra=("--epochs", "1"))
    summary = tr.fit(tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"student_top1", "student_top1_cls", "student_top1_dist"} <= set(on_disk)
    assert on_disk["student_top1"] == summary["student_top1"]
    # the CSKD eval, by hand: mean of cls logits, dist logits and the mean dense dist-head logits
    m = tr.student.eval()
    from fastkd.data.augment import eval_batch

    with torch.no_grad():
        x = eval_batch(data.x_val, data.mean, data.std)
        tok = m.forward_features(x)
        cls, dist = m.head(tok[:, 0]), m.head_dist(tok[:, 1])
        dense = m.head_dist(tok[:, 2:]).mean(1)
        y = data.y_val
        top1 = 100.0 * ((cls + dist + dense) / 3).argmax(-1).eq(y).float().mean().item()
        top1_cls = 100.0 * cls.argmax(-1).eq(y).float().mean().item()
    assert abs(on_disk["student_top1"] - top1) < 1e-6
    assert abs(on_disk["student_top1_cls"] - top1_cls) < 1e-6


@pytest.mark.parametrize("schedule", ["linear", "square", "cos"])
@pytest.mark.parametrize("per_iter", [False, True])
def test_cskd_alpha_schedule_float_and_tensor(schedule, per_iter):
    p = CSKDLoss(4, schedule=schedule, per_iter=per_iter)
    for ef in (0.0, 0.5, 1.0, 2.75, 3.99):
        e = ef if per_iter else math.floor(ef)
        want = R.cskd_alpha(e, 4, schedule)
        assert p.alpha(ef) == pytest.approx(want, abs=1e-12)
        # a 0-d tensor (what a compiled step should pass: no recompile per value) gives the same α
        assert float(p.alpha(torch.tensor(ef, dtype=torch.float64))) == pytest.approx(want, abs=1e-12)
    assert p.alpha(0.0) == 1.0


def test_a_cnn_student_for_a_token_method_is_one_line_naming_both_fixes():
    cnn = model_info(create_model("resnet18", num_classes=3, img_size=32, in_chans=1))
    with pytest.raises(ValueError, match=r"--method vitkd\+nkd: vitkd needs a ViT student.*resnet18 is a cnn"
                                         r".*--student deit_tiny_patch16_224.*--method nkd\)$"):
        check_student("vitkd+nkd", cnn)
    with pytest.raises(ValueError, match=r"clskd\+md needs a ViT.*--method kd\)$"):
        check_student("clskd+md", cnn)
    check_student("kd+nkd", cnn)  # logit methods take any student
