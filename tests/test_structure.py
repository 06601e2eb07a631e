"""The package's shape (issue 11): no import cycle, method names only where methods live, short files,
a toy method that trains by registering one Method, and one teacher for train and cache."""

import ast
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "fastkd"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        if "kernels" in p.relative_to(PKG).parts:
            continue
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, name: str, is_pkg: bool) -> set[str]:
    """Every fastkd module a file imports, at any depth (function-level imports included; TYPE_CHECKING
    blocks excluded); importing ``a.b.c`` also imports packages ``a.b`` and ``a``."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    pkg = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    g = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(path, name, path.name == "__init__.py"):
            parts = imp.split(".")
            for k in range(1, len(parts) + 1):  # a module imports its parent packages too
                m = ".".join(parts[:k])
                if m in mods and m != name and not name.startswith(m + "."):
                    deps.add(m)
        g[name] = deps
    return g


def test_no_import_cycle_in_fastkd():
    g = _graph()
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(g[n]):
            if state.get(d) == 1:
                cyc = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cyc))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_trainer_imports_neither_cache_nor_teacher_factory():
    deps = _graph()["fastkd.train.trainer"]
    assert not any(d.startswith("fastkd.cache") for d in deps), deps
    assert "fastkd.teachers.factory" not in deps and "fastkd.train.setup" not in deps


METHOD_NAMES = ("cskd", "deit", "vitkd", "nkd", "clskd", "md", "kd", "ce")
ALLOWED = {"fastkd/methods/registry.py", "fastkd/methods/base.py", "fastkd/config.py",
           "fastkd/cache/__main__.py", "fastkd/study.py"}  # registry, config and CLI parsing


def test_method_names_only_in_their_own_files():
    pat = re.compile(r"""(?<![\w-])["'](""" + "|".join(METHOD_NAMES) + r""")["']""")
    bad = []
    for p in sorted(PKG.rglob("*.py")):
        rel = str(p.relative_to(REPO))
        if rel in ALLOWED or "kernels" in p.relative_to(PKG).parts:
            continue
        own = p.stem if p.parent.name == "methods" else None
        for i, line in enumerate(p.read_text().splitlines(), 1):
            for m in pat.finditer(line):
                if m.group(1) != own:
                    bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "method names outside their method file:\n" + "\n".join(bad)


def test_no_file_over_500_lines_but_the_reference():
    long = []
    for p in sorted(PKG.rglob("*.py")):
        if "kernels" in p.relative_to(PKG).parts or p == PKG / "ops" / "reference.py":
            continue
        n = len(p.read_text().splitlines())
        if n > 500:
            long.append(f"{p.relative_to(REPO)}: {n} lines")
    assert not long, long


def test_registry_matches_the_cli_vocabulary():
    from fastkd.config import METHODS
    from fastkd.methods.registry import method_names

    assert method_names() == METHODS


def test_a_registered_toy_method_trains_one_step(tmp_path):
    """Adding a method = one Method: register a toy logit-matching method and train it for one step."""
    from fastkd.config import parse_args
    from fastkd.methods import base
    from fastkd.methods.base import BuildContext, LossPart, Method, register
    from fastkd.methods.registry import build_loss, report_terms
    from fastkd.models import create_model, default_arch, model_info, save_model
    from fastkd.train import setup
    from fastkd.train.trainer import Trainer

    class ToyLoss(LossPart):
        name = "toy"
        signals = ("logits",)

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def teacher_signals(self, t):
            return {"logits": t.logits}

        def forward(self, s, t, batch):
            return {"toy_mse": (self.scale * s.logits.float() - t["logits"]).pow(2).mean()}

    def build(mcfg, s_info, t_info, ctx: BuildContext):
        return ToyLoss()

    register(Method("toy", build, terms=("toy_mse",)))
    try:
        args = ["--epochs", "1", "--batch-size", "32", "--quiet", "--workdir", str(tmp_path),
                "--train-limit", "64", "--device", "cpu"]
        cfg = parse_args(args)
        full, data = setup.build_data(cfg, log=lambda *a: None)
        name, ov = default_arch("teacher", data.img_size, data.in_chans, data.num_classes)
        mk = dict(num_classes=data.num_classes, img_size=data.img_size, in_chans=data.in_chans)
        tpath = tmp_path / "t.safetensors"
        save_model(create_model(name, **mk, **{**ov, "depth": 1}), tpath)
        cfg.model.teacher = str(tpath)
        cfg.method.method = "toy"
        aug = setup.build_aug(cfg, data)
        student, arch = setup.build_student(cfg, data, torch.device("cpu"))
        t_model, _ = setup.resolve_teacher(cfg, full, torch.device("cpu"), log=lambda *a: None)
        loss = build_loss(cfg.method, model_info(student), model_info(t_model), epochs=1)
        from fastkd.teachers.online import OnlineTeacher

        tr = Trainer(cfg, data, aug, student, OnlineTeacher(t_model, loss), loss, student_arch=arch,
                     log=lambda *a: None)
        terms = tr.step(next(iter(tr.sampler.batches(0))), 0)
        assert set(terms) == {"ce", "toy_mse", "loss", "grad_norm"}
        assert torch.isfinite(terms["loss"]) and tr.step_idx == 1
        assert loss.parts[1].scale.grad is not None and "toy_mse" in report_terms()
    finally:
        base.REGISTRY.pop("toy", None)


def test_cache_and_train_build_the_identical_teacher_with_shape_overrides(tmp_path):
    """`--teacher vit_... --teacher-patch-size 8` (and the other --teacher-* shape flags) mean the same
    teacher to train and to cache (the cache used to ignore them)."""
    from fastkd.cache.build import run_parts
    from fastkd.config import parse_args
    from fastkd.train import setup

    args = ["--teacher", "vit_tiny_patch16_224", "--teacher-patch-size", "2", "--teacher-depth", "1",
            "--teacher-embed-dim", "48", "--teacher-heads", "2", "--method", "kd", "--device", "cpu",
            "--workdir", str(tmp_path), "--quiet"]
    cfg = parse_args(args)
    rp = run_parts(cfg, log=lambda *a: None)
    t_cache, src_cache = setup.resolve_teacher(cfg, rp.full, rp.device, log=lambda *a: None)
    tr = setup.build_trainer(parse_args(args), log=lambda *a: None)
    t_train = tr.teacher.model
    info = model_info_of(t_cache)
    assert info == model_info_of(t_train)
    assert (info.depth, info.embed_dim, info.grid) == (1, 48, (4, 4))
    assert src_cache == tr.teacher.source == "vit_tiny_patch16_224"
    sd_c, sd_t = t_cache.state_dict(), t_train.state_dict()
    assert sd_c.keys() == sd_t.keys() and all(sd_c[k].shape == sd_t[k].shape for k in sd_c)


def model_info_of(m):
    from fastkd.models import model_info

    return model_info(m)
