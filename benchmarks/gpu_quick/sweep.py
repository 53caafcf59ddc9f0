"""sweep: every declared candidate tile config of each Triton kernel family, timed at the SDXL shapes.

Planned ~140-160 s on an H100/H200 (cap 160 s): attention forward 2 classes × ~9 candidates × 2 shapes each,
attention backward 1 class × ~7 candidates × 4 shapes, GroupNorm+SiLU 3 classes × a few candidates × 2-4 shapes × 2
layouts, fourier a few; each timing a do_bench of 10 ms warm-up / 40 ms repetitions, most of the time going to
Triton JIT-compiling each candidate (~1-3 s). Classes are swept in table order (attention first); one whose
time runs out keeps the best found so far and the file is rewritten after every class.

Per (family, shape class) the figure is the sum of the medians over that class's SDXL shapes (forward for
attention_fwd; backward for attention_bwd; forward + backward for group_norm_silu); a candidate first has to
reproduce the table's config's output (within a tolerance of a few bf16 ulps: different tilings round
differently), or it gets an error row and cannot win. The best per class, and the table's config for every
class not swept, are written to OUTDIR/configs-sm<arch>.json in the format the launchers read
(sdxl_kernels/configs): commit it as sdxl_kernels/configs/sm<arch>.json to adopt it.
Dry run: the interpreter, tiny shapes (GroupNorm: one shape per class), the table's config and the first
candidate of each class, one call each.
"""
from __future__ import annotations

import dataclasses
import time

import torch

TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}
REP_MS, WARMUP_MS = 40, 10


@dataclasses.dataclass
class Shape:
    label: str
    make: object  # () -> (call, compare_outputs)
    cls: str


def _attention_shapes(ctx, family: str) -> list[Shape]:
    import sdxl_kernels
    from sdxl_kernels.ops import attention

    full = ((2, 10, 4096, 4096), (2, 20, 1024, 1024), (2, 10, 4096, 77), (2, 20, 1024, 77))
    dry = ((1, 2, 32, 128), (1, 2, 32, 77))  # Lk 128: the long-key class
    shapes = []
    for b, h, lq, lk in dry if ctx.dry_run else full:
        d = 64

        def make(b=b, h=h, lq=lq, lk=lk):
            g = torch.Generator(device=ctx.device).manual_seed(0)
            q, k, v, do = (torch.randn(b, n, h, d, device=ctx.device, dtype=torch.bfloat16, generator=g)
                           .transpose(1, 2) for n in (lq, lk, lk, lq))  # fmt: skip  # diffusers' [B, L, H, D] views
            if family == "attention_fwd":

                def call():
                    with torch.no_grad():
                        return sdxl_kernels.scaled_dot_product_attention(q, k, v)

                return call, call
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = sdxl_kernels.scaled_dot_product_attention(*leaves)
            grads = lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)  # noqa: E731
            return grads, grads

        cls = attention.fwd_class(d, lk) if family == "attention_fwd" else attention.bwd_class(d)
        shapes.append(Shape(f"{b}x{h}x{lq}x{lk}x{d}", make, cls))
    return shapes


def _group_norm_shapes(ctx) -> list[Shape]:
    import sdxl_kernels
    from sdxl_kernels.ops import group_norm_silu

    full = ((2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32), (1, 512, 256, 256))
    dry = {(1, 320, 4, 4): ("nchw",), (1, 1280, 2, 2): ("channels_last",)}
    shapes = []
    for shape in dry if ctx.dry_run else full:
        for layout in dry[shape] if ctx.dry_run else ("nchw", "channels_last"):

            def make(shape=shape, layout=layout):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                x = torch.randn(shape, device=ctx.device, dtype=torch.bfloat16).contiguous(memory_format=fmt)
                x.requires_grad_()
                w = torch.ones(shape[1], device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
                b = torch.zeros_like(w, requires_grad=True)
                dy = torch.randn_like(x)

                def call():  # forward and backward: one tile config serves both
                    y = sdxl_kernels.group_norm_silu(x, 32, w, b, 1e-5)
                    return torch.autograd.grad(y, (x, w, b), dy)[0], y.detach()

                return call, lambda: call()[1]

            shapes.append(Shape(f"{'x'.join(map(str, shape))}-{layout}", make,
                                group_norm_silu.config_class(shape[1] // 32)))  # fmt: skip
    return shapes


def _fourier_shapes(ctx) -> list[Shape]:
    import sdxl_kernels
    from sdxl_kernels.ops import fourier_embedding

    def make():
        values = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, device=ctx.device, dtype=torch.float32)
        call = lambda: sdxl_kernels.fourier_embedding(values, 256)  # noqa: E731
        return call, call

    return [Shape("2x6x256", make, fourier_embedding.config_class())]


SHAPES = {"attention_fwd": lambda ctx: _attention_shapes(ctx, "attention_fwd"),
          "attention_bwd": lambda ctx: _attention_shapes(ctx, "attention_bwd"),
          "group_norm_silu": _group_norm_shapes, "fourier_embedding": _fourier_shapes}  # fmt: skip
OP_OF = {"attention_fwd": "scaled_dot_product_attention", "attention_bwd": "scaled_dot_product_attention",
         "group_norm_silu": "group_norm_silu", "fourier_embedding": "fourier_embedding"}  # fmt: skip


def _time(fn, device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))
    t0 = time.perf_counter()  # dry run: one call (the comparison before it ran the candidate already)
    fn()
    return (time.perf_counter() - t0) * 1e3


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def time_candidate(family, cls, cfg, arch, built, refs: dict, device) -> dict[str, float]:
    """{shape: ms} of one candidate over its class's shapes, after it reproduces the first config's outputs
    (`refs`, filled by the table's config, which candidates() puts first)."""
    from sdxl_kernels import configs

    from .. import timing

    with configs.override(family, cls, cfg, arch=arch), timing.forced_backend(OP_OF[family], "ours-triton"):
        for shape, _, compare in built:
            got = _flat(compare())
            if shape.label not in refs:
                refs[shape.label] = [t.detach().clone() for t in got]
                continue
            for a, b in zip(got, refs[shape.label]):
                tol = TOL[b.dtype] * max(1.0, b.abs().max().item())
                err = (a.float() - b.float()).abs().max().item()
                if not err <= tol:
                    raise AssertionError(f"{shape.label}: differs from the table's config by {err:.3g} > {tol:.3g}")
        return {shape.label: _time(call, device) for shape, call, _ in built}


def run(ctx) -> list[str]:
    from sdxl_kernels import configs

    device = ctx.device
    arch = configs.device_arch(device)
    table = configs.table(arch)
    best_table = {name: dict(entries) for name, entries in table.items()}
    failures, notes = [], []
    out_path = ctx.out / f"configs-sm{arch}.json"
    for family, shapes_of in SHAPES.items():
        shapes = shapes_of(ctx)
        for cls in dict.fromkeys(s.cls for s in shapes):
            members = [s for s in shapes if s.cls == cls]
            built = [(s, *s.make()) for s in members]
            cands = configs.candidates(family, cls, arch)
            if ctx.dry_run:
                cands = cands[:2]
            default = table[family][cls]
            refs, results = {}, []
            for cfg in cands:
                if ctx.left() < 5:
                    notes.append(f"{family}/{cls}: time ran out after {len(results)} of {len(cands)} candidates")
                    break
                row = dict(op="sweep", family=family, cls=cls, config=dataclasses.asdict(cfg),
                           is_default=cfg == default, arch=arch)  # fmt: skip
                try:
                    per_shape = time_candidate(family, cls, cfg, arch, built, refs, device)
                    ms = sum(per_shape.values())
                    ctx.row(**row, ms=ms, per_shape=per_shape)
                    results.append((ms, cfg))
                except Exception as exc:  # a candidate that fails to compile or to match cannot win
                    ctx.row(**row, error=f"{type(exc).__name__}: {exc}"[:1000])
                    if cfg == default:
                        failures.append(f"{family}/{cls}: the table's own config failed: {exc}"[:300])
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if results:
                ms, cfg = min(results, key=lambda r: r[0])
                default_ms = next((m for m, c in results if c == default), None)
                best_table[family][cls] = cfg
                ctx.log.write(dict(family=family, cls=cls, best=dataclasses.asdict(cfg), best_ms=ms,
                                   default=dataclasses.asdict(default), default_ms=default_ms,
                                   gain=default_ms / ms if default_ms else None, candidates=len(results)),
                              kind="best")  # fmt: skip
            # written after every class: a step cut short still leaves a valid file with what it found
            configs.write(out_path, arch, best_table, notes=_notes(ctx, arch, notes))
            del built
    configs.write(out_path, arch, best_table, notes=_notes(ctx, arch, notes))
    ctx.row(op="sweep", written=str(out_path))
    return failures


def _notes(ctx, arch: int, extra: list[str]) -> list[str]:
    import json

    env = {}
    try:
        env = json.loads((ctx.out / "env.json").read_text())
    except (OSError, ValueError):
        pass
    what = "DRY RUN on the CPU (interpreter): these timings mean nothing" if ctx.dry_run else (
        f"swept on {env.get('gpu', '?')} (sm_{arch}), torch {env.get('torch')}, triton {env.get('triton')}, "
        f"commit {env.get('git_commit')}")  # fmt: skip
    return [f"benchmarks.gpu_quick sweep: {what}; per class the fastest candidate (sum of medians over the "
            "class's SDXL shapes), the table's config where a class was not swept", *extra]  # fmt: skip
