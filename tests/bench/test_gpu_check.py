"""bench/gpu_check.py's tree digest: it names the code that ran on a device machine whose git history is
older than the tree it was sent."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree(root: Path) -> Path:
    for rel, text in {
        "pyproject.toml": "[project]\n",
        "fastkd/a.py": "x = 1\n",
        "kernels/k.py": "y = 2\n",
        "bench/run.sh": "echo\n",
        "tests/t.py": "def test(): pass\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_digest_follows_the_code_only(gpu_check, tmp_path):
    root = _tree(tmp_path / "a")
    d0 = gpu_check.tree_digest(root)
    assert len(d0) == 16 and d0 == gpu_check.tree_digest(_tree(tmp_path / "b"))  # same code, same digest
    (root / "bench" / "results" / "x").mkdir(parents=True)
    (root / "bench" / "results" / "x" / "r.py").write_text("results\n")
    (root / "fastkd" / "__pycache__").mkdir()
    (root / "fastkd" / "__pycache__" / "a.py").write_text("cache\n")
    (root / "fastkd" / "notes.md").write_text("prose\n")
    assert gpu_check.tree_digest(root) == d0  # results, caches and prose do not count
    (root / "kernels" / "k.py").write_text("y = 3\n")
    d1 = gpu_check.tree_digest(root)
    assert d1 != d0
    (root / "kernels" / "k.py").rename(root / "kernels" / "k2.py")  # a rename is a change too
    assert gpu_check.tree_digest(root) not in (d0, d1)


def test_the_digest_command_prints_this_checkout(gpu_check, capsys):
    assert gpu_check.main(["--digest"]) == 0
    assert capsys.readouterr().out.strip() == gpu_check.tree_digest()
