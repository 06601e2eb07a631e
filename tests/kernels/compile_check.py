"""Compile every shipped kernel configuration for real GPU targets on a machine without a GPU.

Run as a script (``python tests/kernels/compile_check.py [--jobs N]``) in a process WITHOUT
``TRITON_INTERPRET``: for each (kernel, config, dtype, flags) variant listed by the kernel modules'
``compile_specs()`` and each target (sm_80, sm_90a), ``triton.compile(ASTSource(...), target=GPUTarget)``
builds a cubin, and ``cuobjdump --dump-resource-usage`` (shipped in the Triton wheel) reports its
registers, STACK and LOCAL bytes (SMEM is Triton's dynamic shared memory from the kernel metadata).
Register spills show up as a per-thread STACK frame (LOCAL counts only global-scope local data), so
a variant passes only with STACK = LOCAL = 0.

Tensor cores: every build whose TTIR holds a ``tt.dot`` must lower each of them to a tensor-core MMA —
``wgmma.mma_async`` or ``mma.sync`` in the sm_90a PTX, ``mma.sync`` in the sm_80 PTX — and its TTGIR
must hold no dot on a ``#blocked`` (CUDA-core FMA) layout. Only variants whose spec name says
``exact`` (the fp32 "ieee" dot kept for autocast-off training) may skip that rule. ``dot_rule`` is the
rule; ``--selftest`` proves it rejects an fp32-operand dot that is not named ``exact`` (what every
fp32-token build of the kernels did before the bf16-in-registers rewrite) and accepts a bf16 one.

Prints one table row per build and exits non-zero if a build fails, spills or breaks the dot rule.
``test_compile_check.py`` runs it.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

TARGETS = (80, 90)


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(path):
        return path
    found = shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither in triton/backends/nvidia/bin nor on PATH)")
    return found


MODULES = ("token_kd", "masked_gen", "logit_kd", "randaug", "resized_crop")


def _specs(only=None):
    import importlib

    out = []
    for name in MODULES if only is None else (only,):
        mod = importlib.import_module(f"fastkd.kernels.{name}")
        for name, fn, ptrs, scalars, const, cfg in mod.compile_specs():
            out.append((f"{mod.__name__.rsplit('.', 1)[-1]}/{name}", fn, ptrs, scalars, const, cfg))
    return out


def specialize(fn, ptrs, scalars, const):
    """(signature, constexprs, attrs) for ``ASTSource``, specialized as the JIT does at launch time:
    pointers are 16-byte aligned, an int equal to 1 becomes a constant, an int divisible by 16 gets the
    divisibility hint (these hints decide vectorization and so register use)."""
    names = list(fn.arg_names)
    given = set(ptrs) | set(scalars) | set(const)
    if given != set(names) or len(given) != len(ptrs) + len(scalars) + len(const):
        raise ValueError(f"spec args {sorted(given)} != kernel args {sorted(names)}")
    sig, constexprs, attrs = {}, dict(const), {}
    for i, name in enumerate(names):
        if name in const:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(scalars[name], float):
            sig[name] = "fp32"
        elif scalars[name] == 1:
            sig[name] = "constexpr"
            constexprs[name] = 1
        else:
            sig[name] = "i32"
            if scalars[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def module_options(fn) -> dict:
    """The compile options the kernel's module launches it with (``COMPILE_OPTIONS``, e.g. no FMA
    contraction for RandAugment's bit-exact layer): the build must be the one that runs."""
    return dict(getattr(sys.modules[fn.fn.__module__], "COMPILE_OPTIONS", {}))


def fusion_rule(fn, kernel, options: dict | None = None) -> str | None:
    """A kernel launched with ``enable_fp_fusion=False`` must hold no fused multiply-add in its PTX."""
    if (module_options(fn) if options is None else options).get("enable_fp_fusion", True):
        return None
    n = len(re.findall(r"\bfma\.rn\.f(32|64)\b", kernel.asm["ptx"]))
    return f"{n} fma.rn in the PTX of a kernel launched without FMA contraction" if n else None


def build(fn, ptrs, scalars, const, num_warps, num_stages, cc):
    """Compile for sm_``cc``; returns (compiled kernel, resource-usage dict from cuobjdump)."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget

    if not hasattr(BaseBackend, "parse_attr"):  # triton < 3.3 used AttrsDescriptor objects instead
        raise RuntimeError(
            f"compile_check needs triton >= 3.3 (ASTSource attrs by arg path), found {triton.__version__}"
        )
    sig, constexprs, attrs = specialize(fn, ptrs, scalars, const)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, **module_options(fn)}
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(path)
    usage = {}
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key] = int(m.group(1)) if m else None
    usage["SMEM"] = int(getattr(kernel.metadata, "shared", 0) or 0)  # dynamic shared memory (bytes)
    return kernel, usage


def dot_facts(kernel) -> dict:
    """What the compiled kernel's IR says about its dots: counts of TTIR dots, CUDA-core (#blocked) TTGIR
    dots, and whether the PTX holds wgmma / mma.sync instructions."""
    ttir, ttgir, ptx = kernel.asm["ttir"], kernel.asm["ttgir"], kernel.asm["ptx"]
    fma_dots = 0
    for ln in ttgir.splitlines():
        if re.search(r"= tt\.dot\b", ln) and re.search(r"->\s*tensor<[^>]*#blocked", ln):
            fma_dots += 1
    return {
        "dots": len(re.findall(r"= tt\.dot\b", ttir)),
        "fma_dots": fma_dots,
        "wgmma": "wgmma.mma_async" in ptx,
        "mma": "mma.sync" in ptx,
    }


def dot_rule(name: str, cc: int, facts: dict) -> str | None:
    """None when the build obeys the tensor-core rule, else why not (see the module docstring)."""
    if not facts["dots"] or "exact" in name.split("/"):
        return None
    if facts["fma_dots"]:
        return f"{facts['fma_dots']} tl.dot on CUDA cores (FMA)"
    ok = (facts["wgmma"] or facts["mma"]) if cc >= 90 else facts["mma"]
    if not ok:
        return "tl.dot without " + ("wgmma/mma" if cc >= 90 else "mma")
    return None


def _build(job):
    """Compile spec ``index`` (of module ``only``) for compute capability ``cc``; returns a result row."""
    only, index, cc = job
    name, fn, ptrs, scalars, const, cfg = _specs(only)[index]
    row = {"name": name, "cc": cc, "warps": cfg.num_warps, "stages": cfg.num_stages}
    t0 = time.time()
    try:
        kernel, usage = build(fn, ptrs, scalars, const, cfg.num_warps, cfg.num_stages, cc)
        row.update(usage)
        row["target"] = next(
            (ln.split()[1] for ln in kernel.asm["ptx"].splitlines() if ln.startswith(".target")), "?"
        )
        row.update(dot_facts(kernel))
        row["dot_error"] = dot_rule(name, cc, row) or fusion_rule(fn, kernel)
    except Exception as e:  # reported as a failed row
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    row["seconds"] = round(time.time() - t0, 2)
    return row


def selftest() -> int:
    """Build one shipped exact (fp32 "ieee" dot) spec under a name without ``exact`` — the fp32-token
    kernels as they were before the rewrite — and one bf16-dot spec, on both targets: the rule must
    reject the first (FMA dot, no mma) and accept the second."""
    specs = _specs("token_kd")
    exact = next(s for s in specs if "/exact/" in s[0] and "/fwd/" in "/" + s[0])
    tc = next(s for s in specs if "/bf16dot/" in s[0] and s[0].split("/")[2] == "fp32")
    bad = 0
    for label, (_, fn, ptrs, scalars, const, cfg), renamed, want in (
        ("fp32 dot named as a tensor-core variant", exact, exact[0].replace("/exact/", "/fp32dot/"), False),
        ("bf16 dot on fp32 tokens", tc, tc[0], True),
    ):
        for cc in TARGETS:
            kernel, _ = build(fn, ptrs, scalars, const, cfg.num_warps, cfg.num_stages, cc)
            facts = dot_facts(kernel)
            why = dot_rule(renamed, cc, facts)
            ok = (why is None) == want
            bad += not ok
            verdict = f"{why or 'accepted'} {'OK' if ok else 'WRONG'}"
            print(f"selftest sm_{cc} {label}: {renamed}: {facts} -> {verdict}")
    # the FMA rule: RandAugment's layer kernel built with contraction (Triton's default) holds FMAs and is
    # rejected
    import fastkd.kernels.randaug as randaug

    name, fn, ptrs, scalars, const, cfg = next(s for s in randaug.compile_specs() if s[0] == "layer/C3")
    saved = randaug.COMPILE_OPTIONS
    for label, opts, want in (("randaug built with FMA contraction", {}, False),
                              ("randaug built as launched", saved, True)):
        randaug.COMPILE_OPTIONS = opts
        try:
            kernel, _ = build(fn, ptrs, scalars, const, cfg.num_warps, cfg.num_stages, 90)
        finally:
            randaug.COMPILE_OPTIONS = saved
        why = fusion_rule(fn, kernel, options=saved)
        ok = (why is None) == want
        bad += not ok
        print(f"selftest sm_90 {label}: randaug/{name}: -> {why or 'accepted'} {'OK' if ok else 'WRONG'}")
    print(f"compile_check selftest: {'passed' if not bad else 'FAILED'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--only", choices=MODULES, help="check one kernel module")
    ap.add_argument("--selftest", action="store_true", help="prove the dot rule rejects an fp32 dot")
    ap.add_argument("--match", help="check only the variants whose name contains this substring")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (kernels must be real JIT functions)", file=sys.stderr)
        return 2
    if args.selftest:
        return selftest()
    specs = _specs(args.only)
    jobs = [
        (args.only, i, cc)
        for i in range(len(specs))
        if args.match is None or args.match in specs[i][0]
        for cc in TARGETS
    ]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(_build, jobs, chunksize=4))
    bad = 0
    print(
        f"{'kernel variant':<62} {'target':>6} {'warps':>5} {'REG':>4} {'SMEM':>7} "
        f"{'STACK':>5} {'LOCAL':>5}  dot"
    )
    for r in rows:
        if "error" in r:
            bad += 1
            print(
                f"{r['name']:<62} {'sm_' + str(r['cc']):>6} {'':>5} {'':>4} {'':>7} {'':>5} {'':>5}  "
                f"FAILED {r['error']}"
            )
            continue
        spills = bool(r["LOCAL"] or r["STACK"])
        tc = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else ("fma" if r["dots"] else "-"))
        note = (
            tc
            + (" SPILLS" if spills else "")
            + (f" BROKEN-RULE ({r['dot_error']})" if r["dot_error"] else "")
        )
        bad += bool(spills or r["dot_error"])
        print(
            f"{r['name']:<62} {r['target']:>6} {r['warps']:>5} {r['REG']:>4} {r['SMEM']:>7} "
            f"{r['STACK']:>5} {r['LOCAL']:>5}  {note}"
        )
    print(
        f"compile_check: {len(rows)} builds ({len(rows) // len(TARGETS)} variants x {len(TARGETS)} targets), "
        f"{bad} bad, {time.time() - t0:.0f}s"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
