"""Tile-config tables (sdxl_kernels.configs): the packaged tables, files that replace them, overrides, the
file format's strictness and the sweep candidates."""
import contextlib
import copy
import json

import pytest
import torch

from sdxl_kernels import (
    attention_ref,
    backends,
    configs,
    fourier_embedding,
    fourier_embedding_ref,
    group_norm_silu,
    group_norm_silu_ref,
    scaled_dot_product_attention,
)
from sdxl_kernels.ops import attention as attn
from sdxl_kernels.ops import fourier_embedding as fe
from sdxl_kernels.ops import group_norm_silu as gn
from sdxl_kernels.ops.attention import BwdConfig, FwdConfig
from sdxl_kernels.ops.fourier_embedding import FourierConfig
from sdxl_kernels.ops.group_norm_silu import GroupNormConfig

CPU = torch.device("cpu")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the Triton interpreter
ARCH = configs.device_arch(DEVICE)
needs_triton = pytest.mark.skipif(
    not (backends.triton_available() and (torch.cuda.is_available() or backends.triton_interpret())),
    reason="needs a GPU or the Triton interpreter",
)


@pytest.fixture(autouse=True)
def _fresh_tables(monkeypatch):
    monkeypatch.delenv(configs.ENV_VAR, raising=False)
    configs.reset()
    yield
    configs.reset()


def packaged(arch: int) -> dict:
    return json.loads(configs.packaged_path(arch).read_text(encoding="utf-8"))


# ---- the packaged tables ----------------------------------------------------------------------------------------


def test_families_are_declared_by_their_ops():
    assert list(configs.FAMILIES) == ["attention_fwd", "attention_bwd", "group_norm_silu", "fourier_embedding"]
    assert configs.FAMILIES["attention_fwd"].config is FwdConfig
    assert configs.FAMILIES["group_norm_silu"].classes == ("c2", "c4", "c8", "c16", "c32", "c64")
    assert configs.FAMILIES["fourier_embedding"].classes == ("all",)


def test_packaged_tables_hold_the_former_hard_coded_values():
    sm80, sm90 = configs.table(80), configs.table(90)
    assert sm80["attention_fwd"]["d64-long"] == FwdConfig(128, 64, 8, 3)
    assert sm90["attention_fwd"]["d128-long"] == FwdConfig(128, 128, 8, 2, tma=True)
    assert sm90["attention_bwd"]["d128"] == BwdConfig(16, 64, 128, 32, 8, 2, tma=True)
    assert sm80["attention_bwd"]["d256"] == BwdConfig(32, 32, 32, 32, 8, 1)
    for table in (sm80, sm90):
        assert [(c.block_c, c.block_s, c.num_warps) for c in table["group_norm_silu"].values()] == [
            (2, 1024, 8), (4, 512, 8), (8, 256, 8), (16, 128, 8), (32, 64, 8), (64, 32, 8)
        ]  # fmt: skip
        assert table["fourier_embedding"]["all"] == FourierConfig(512, 4)


@pytest.mark.parametrize("arch", configs.ARCHS)
def test_launchers_pick_the_packaged_table(arch):
    table = configs.load(configs.packaged_path(arch))[1]
    assert table == configs.table(arch)
    fwd, bwd, norm = table["attention_fwd"], table["attention_bwd"], table["group_norm_silu"]
    assert attn.fwd_config(64, 4096, CPU, arch=arch) == fwd["d64-long"]
    assert attn.fwd_config(40, 77, CPU, arch=arch) == fwd["d64-short"]
    assert attn.fwd_config(160, 128, CPU, arch=arch) == fwd["d256-long"]
    assert attn.bwd_config(80, CPU, arch=arch) == bwd["d128"]
    assert gn.tile_config(1, arch=arch) == norm["c2"]
    assert gn.tile_config(40, arch=arch) == norm["c64"]
    assert gn.tile_config(320, arch=arch) == norm["c64"]  # more channels than a tile: loops over chunks
    # CPU tensors (the interpreter) use the sm_80 table.
    assert attn.fwd_config(64, 77, CPU) == configs.table(80)["attention_fwd"]["d64-short"]


def test_shape_classes():
    assert [attn.fwd_class(d, lk) for d, lk in ((40, 77), (64, 128), (80, 4096), (256, 1))] == [
        "d64-short", "d64-long", "d128-long", "d256-short"
    ]  # fmt: skip
    assert [attn.bwd_class(d) for d in (1, 64, 65, 160)] == ["d64", "d64", "d128", "d256"]
    assert [gn.config_class(c) for c in (1, 2, 3, 16, 40, 64, 65, 640)] == [
        "c2", "c2", "c4", "c16", "c64", "c64", "c64", "c64"
    ]  # fmt: skip
    assert configs.shape_class("attention_fwd", head_dim=64, lk=77) == "d64-short"
    assert configs.shape_class("group_norm_silu", c_per_g=10) == "c16"
    assert configs.shape_class("fourier_embedding") == "all"


# ---- files and overrides change what the launchers launch --------------------------------------------------------


class Spy:
    """Stands in for a @triton.jit kernel and records the keyword arguments of each launch."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def spy(monkeypatch, module, name) -> Spy:
    s = Spy(getattr(module, name))
    monkeypatch.setattr(module, name, s)
    return s


# Tiles no table holds, so the spies can tell them apart from the packaged ones.
PICKS = {
    ("attention_fwd", "d64-short"): FwdConfig(16, 32, 4, 1),
    ("group_norm_silu", "c4"): GroupNormConfig(4, 16, 2, num_stages=2),
    ("fourier_embedding", "all"): FourierConfig(32, 1),
}


def _apply(how, monkeypatch, tmp_path, exit_stack):
    """Makes the launchers pick PICKS on ARCH (sm_80 under the interpreter) through a file or overrides."""
    if how == "file":
        table = {}
        for (family, cls), cfg in PICKS.items():
            table.setdefault(family, {})[cls] = cfg
        path = tmp_path / "sweep.json"
        configs.write(path, ARCH, table, notes=["a test"])
        monkeypatch.setenv(configs.ENV_VAR, str(path))
        configs.reset()
    else:
        for (family, cls), cfg in PICKS.items():
            exit_stack.enter_context(configs.override(family, cls, cfg, arch=ARCH if how == "override-arch" else None))


@needs_triton
@pytest.mark.parametrize("how", ["file", "override", "override-arch"])
def test_file_or_override_changes_the_launched_tiles(how, monkeypatch, tmp_path, poison):
    fwd = spy(monkeypatch, attn, "_attn_fwd_kernel")
    stats = spy(monkeypatch, gn, "_gn_stats_kernel")
    fourier = spy(monkeypatch, fe, "_fourier_kernel")
    for op in backends.OPS:
        backends.set_backend(op, "triton")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 37, 40, generator=gen).half().to(DEVICE)
    k, v = (torch.randn(1, 2, 21, 40, generator=gen).half().to(DEVICE) for _ in range(2))  # 21 keys: d64-short
    x, w, b = (torch.randn(*shape, generator=gen).to(DEVICE) for shape in ((2, 12, 5, 7), (12,), (12,)))
    t = torch.tensor([0.0, 3.5, 999.0], device=DEVICE)
    with contextlib.ExitStack() as stack:
        _apply(how, monkeypatch, tmp_path, stack)
        out = scaled_dot_product_attention(q, k, v)
        y = group_norm_silu(x, 3, w, b)  # 4 channels per group: c4
        emb = fourier_embedding(t, 70)
    assert (fwd.calls[0]["BLOCK_M"], fwd.calls[0]["BLOCK_N"]) == (16, 32)
    assert [stats.calls[0][k] for k in ("BLOCK_C", "BLOCK_S", "num_warps", "num_stages")] == [4, 16, 2, 2]
    assert (fourier.calls[0]["BLOCK"], fourier.calls[0]["num_warps"]) == (32, 1)
    ref = attention_ref(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)  # fp16: a few ulps
    torch.testing.assert_close(y.double(), group_norm_silu_ref(x.double(), 3, w.double(), b.double()), atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    # float32 phase: |v·f| up to ~1e3 carries ~6e-5 rounding, which cos/sin pass on (as test_fourier_embedding).
    torch.testing.assert_close(emb.double(), fourier_embedding_ref(t, 70, compute_dtype=torch.float64), atol=2e-4,
                               rtol=0)  # fmt: skip

    if how != "file":  # leaving the blocks restores the table
        scaled_dot_product_attention(q, k, v)
        assert fwd.calls[-1]["BLOCK_N"] == configs.table(ARCH)["attention_fwd"]["d64-short"].block_n


def test_a_file_for_another_arch_or_class_leaves_the_rest_alone(monkeypatch, tmp_path):
    path = tmp_path / "sm90-sweep.json"
    pick = FwdConfig(64, 64, 4, 4, tma=True)
    configs.write(path, 90, {"attention_fwd": {"d64-long": pick}})
    monkeypatch.setenv(configs.ENV_VAR, str(path))
    configs.reset()
    assert configs.table(80) == configs.load(configs.packaged_path(80))[1]
    sm90 = configs.load(configs.packaged_path(90))[1]
    sm90["attention_fwd"]["d64-long"] = pick
    assert configs.table(90) == sm90
    assert attn.fwd_config(64, 4096, CPU, arch=90) == pick


def test_override_nests_and_restores_on_exceptions():
    default = configs.get("attention_bwd", "d64", 90)
    outer, inner = BwdConfig(32, 64, 64, 32, 4, 2, tma=True), BwdConfig(16, 32, 32, 16, 4, 1)
    with configs.override("attention_bwd", "d64", outer, arch=90):
        assert attn.bwd_config(64, CPU, arch=90) == outer
        assert attn.bwd_config(64, CPU, arch=80) == configs.table(80)["attention_bwd"]["d64"]  # another arch
        with pytest.raises(RuntimeError, match="boom"):
            with configs.override("attention_bwd", "d64", inner):  # every arch
                assert attn.bwd_config(64, CPU, arch=90) == inner == attn.bwd_config(64, CPU, arch=80)
                raise RuntimeError("boom")
        assert attn.bwd_config(64, CPU, arch=90) == outer
        with configs.override("attention_bwd", "d64", default, arch=90):
            with configs.override("attention_bwd", "d64", outer, arch=90):  # equal to the outermost one
                pass
            assert configs.get("attention_bwd", "d64", 90) == default  # the inner one left, not the outermost
    assert configs.get("attention_bwd", "d64", 90) == default


@pytest.mark.parametrize("family, cls, cfg, arch, match", [
    ("attention_fwd", "d64-long", FwdConfig(128, 64, 8, 3, tma=True), 80, "tma = true needs sm_90"),
    ("attention_fwd", "d64-long", FwdConfig(128, 48, 8, 3), None, "block_n = 48: must be a power of two"),
    ("attention_fwd", "d64-long", GroupNormConfig(4, 16, 2), None, "expected a FwdConfig"),
    ("attention_fwd", "d32-long", FwdConfig(128, 64, 8, 3), None, "unknown class 'd32-long'"),
    ("attention", "d64-long", FwdConfig(128, 64, 8, 3), None, "unknown config family 'attention'"),
])  # fmt: skip
def test_override_refuses_what_does_not_fit(family, cls, cfg, arch, match):
    with pytest.raises(ValueError, match=match):
        with configs.override(family, cls, cfg, arch=arch):
            pass
    assert configs.get("attention_fwd", "d64-long", 80) == configs.table(80)["attention_fwd"]["d64-long"]


# ---- the file format ----------------------------------------------------------------------------------------


SM80, SM90 = packaged(80), packaged(90)


def _edit(entry: str, doc=SM80, **fields) -> dict:
    """A copy of doc with fields of entry ("family/cls") set (KeyError: deleted)."""
    doc = copy.deepcopy(doc)
    family, cls = entry.split("/")
    for key, value in fields.items():
        if value is KeyError:
            del doc[family][cls][key]
        else:
            doc[family][cls][key] = value
    return doc


C128 = {"c128": {"block_c": 128, "block_s": 16, "num_warps": 8}}
BAD = {
    "unknown key": (SM80 | {"attention": {}}, "unknown key 'attention'"),
    "unknown class": (SM80 | {"group_norm_silu": SM80["group_norm_silu"] | C128}, "group_norm_silu: unknown class 'c128'"),
    "unknown field": (_edit("attention_fwd/d64-long", block_k=64), "d64-long: unknown field 'block_k'"),
    "missing field": (_edit("attention_bwd/d128", num_warps=KeyError), "d128: missing field 'num_warps'"),
    "string": (_edit("attention_fwd/d64-long", block_m="128"), "field 'block_m' must be int, got '128'"),
    "float": (_edit("fourier_embedding/all", block=512.0), "field 'block' must be int, got 512.0"),
    "bool for int": (_edit("group_norm_silu/c2", num_warps=True), "field 'num_warps' must be int"),
    "int for bool": (_edit("attention_fwd/d64-long", SM90, tma=1), "field 'tma' must be bool, got 1"),
    "format": (SM80 | {"format": 2}, "format 2: this version reads format 1"),
    "no format": ({k: v for k, v in SM80.items() if k != "format"}, "format None"),
    "arch": (SM80 | {"arch": 75}, "arch 75: must be one of 80, 90"),
    "notes": (SM80 | {"notes": "tuned"}, "notes must be a list of strings"),
    "class not an object": (SM80 | {"attention_bwd": ["d64"]}, "attention_bwd: expected an object of classes"),
    "not power of two": (_edit("attention_fwd/d64-long", block_m=96), "block_m = 96: must be a power of two"),
    "block too small": (_edit("attention_bwd/d64", block_n2=8), r"block_n2 = 8: must be a power of two in 16\.\.256"),
    "warps": (_edit("attention_fwd/d128-short", num_warps=3), "num_warps = 3: must be one of 1, 2, 4, 8, 16"),
    "stages": (_edit("attention_fwd/d128-short", num_stages=0), r"num_stages = 0: must be in 1\.\.8"),
    "tma on sm_80": (_edit("attention_bwd/d256", tma=True), "d256: does not fit the kernel on sm_80: tma = true"),
    "gn block_c below its class": (_edit("group_norm_silu/c8", block_c=4), r"c8: .*block_c = 4: .* in 8\.\.256"),
    "gn tile too large": (_edit("group_norm_silu/c64", block_s=256), r"block_c · block_s = 16384: must be in 256\.\.2048"),
    "gn tile under a thread each": (_edit("group_norm_silu/c2", block_s=16), r"block_c · block_s = 32: must be in 256"),
    "gn stages": (_edit("group_norm_silu/c16", num_stages=9), r"num_stages = 9: must be in 1\.\.8"),
    "fourier block": (_edit("fourier_embedding/all", block=16), r"block = 16: must be a power of two in 32\.\.4096"),
}  # fmt: skip


@pytest.mark.parametrize("doc, match", BAD.values(), ids=BAD.keys())
def test_load_refuses_bad_files(doc, match, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(configs.ConfigError, match=match) as err:
        configs.load(path)
    assert str(err.value).startswith(f"{path}: ")


def test_a_bad_env_file_fails_the_first_lookup(monkeypatch, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": 1, "arch": 80,')
    monkeypatch.setenv(configs.ENV_VAR, str(path))
    configs.reset()
    with pytest.raises(configs.ConfigError, match="broken.json: not JSON"):
        attn.fwd_config(64, 77, CPU)
    monkeypatch.setenv(configs.ENV_VAR, str(tmp_path / "absent.json"))
    with pytest.raises(configs.ConfigError, match="absent.json: cannot read"):
        configs.table(90)


def test_partial_files_load_but_packaged_tables_are_complete(monkeypatch, tmp_path):
    path = tmp_path / "part.json"
    path.write_text(json.dumps({"format": 1, "arch": 90, "group_norm_silu": {"c8": {"block_c": 8, "block_s": 128,
                                                                                     "num_warps": 4}}}))
    assert configs.load(path) == (90, {"group_norm_silu": {"c8": GroupNormConfig(8, 128, 4)}})
    monkeypatch.setattr(configs, "packaged_path", lambda arch: path)
    with pytest.raises(configs.ConfigError, match="part.json: attention_fwd: missing classes d64-long, d64-short"):
        configs.table(90)


@pytest.mark.parametrize("arch", configs.ARCHS)
def test_write_load_round_trip_and_the_packaged_layout(arch, tmp_path):
    table = configs.table(arch)
    table["group_norm_silu"]["c4"] = GroupNormConfig(8, 128, 4, num_stages=2)
    path = tmp_path / "t.json"
    configs.write(path, arch, table, notes=["swept on a test"])
    assert configs.load(path) == (arch, table)
    doc = json.loads(path.read_text())
    assert doc["notes"] == ["swept on a test"] and doc["group_norm_silu"]["c4"]["num_stages"] == 2
    assert "num_stages" not in doc["group_norm_silu"]["c2"]  # None fields are left out
    # The packaged files are what `write` makes of them, so a sweep's commit changes only the lines it tuned.
    notes = packaged(arch)["notes"]
    configs.write(path, arch, configs.table(arch), notes)
    assert path.read_text() == configs.packaged_path(arch).read_text()


def test_dump_refuses_what_load_would():
    with pytest.raises(configs.ConfigError, match="attention_fwd/d64-long: does not fit the kernel on sm_80"):
        configs.dump(80, {"attention_fwd": {"d64-long": FwdConfig(128, 64, 8, 3, tma=True)}})
    with pytest.raises(configs.ConfigError, match="unknown class 'c3'"):
        configs.dump(80, {"group_norm_silu": {"c3": GroupNormConfig(4, 256, 4)}})
    with pytest.raises(configs.ConfigError, match="arch 70"):
        configs.dump(70, {})


# ---- sweep candidates -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", configs.ARCHS)
@pytest.mark.parametrize("family", ["attention_fwd", "attention_bwd", "group_norm_silu", "fourier_embedding"])
def test_candidates_fit_and_start_with_the_default(family, arch):
    fam = configs.FAMILIES[family]
    total = 0
    for cls in fam.classes:
        cands = configs.candidates(family, cls, arch)
        assert cands[0] == configs.get(family, cls, arch) and len(set(cands)) == len(cands) > 1
        for cfg in cands:
            fam.check(arch, cls, cfg)
            configs.dump(arch, {family: {cls: cfg}})  # types too
        if family.startswith("attention"):
            assert all(c.tma == (arch == 90) for c in cands[1:]), "sm_90 candidates go through TMA"
        total += len(cands)
    assert total <= 60, f"{family} on sm_{arch}: {total} candidates"


def test_candidates_start_with_the_table_in_force(monkeypatch, tmp_path):
    path = tmp_path / "t.json"
    pick = GroupNormConfig(16, 64, 4)
    configs.write(path, 80, {"group_norm_silu": {"c16": pick}})
    monkeypatch.setenv(configs.ENV_VAR, str(path))
    configs.reset()
    assert configs.candidates("group_norm_silu", "c16", 80)[0] == pick
