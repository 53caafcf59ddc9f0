"""Tokenizers (against sgm's tokens.json) and the two CLIP text encoders (names/shapes/counts against the sgm
keys listing; forward semantics against an independent plain-PyTorch open_clip-style reference)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from sdxl_model import text as T

from .conftest import FIXTURES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SGM = FIXTURES / "sgm"

needs_vocab = pytest.mark.skipif(
    T.default_vocab_path() is None,
    reason=f"{T.VOCAB_FILENAME} not found (sdxl_model/assets, or $SDXL_CLIP_BPE_VOCAB)")


def _transformers_or_skip():
    return pytest.importorskip("transformers", reason="transformers is not installed (scripts/install.sh)")


@pytest.fixture(scope="module")
def tokens():
    path = SGM / "tokens.json"
    if not path.is_file():
        pytest.skip(f"fixture {path} not found")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def keys():
    path = SGM / "sd_xl_base_1.0.keys.json"
    if not path.is_file():
        pytest.skip(f"fixture {path} not found")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------- tokenizer


@needs_vocab
def test_open_clip_tokenizer_matches_sgm(tokens):
    tok = T.CLIPTokenizer.open_clip()
    assert tok.pad_id == tokens["conventions"]["open_clip_pad_id"] == 0
    prompts = [p["prompt"] for p in tokens["prompts"]]
    ids = tok(prompts)
    assert ids.shape == (len(prompts), 77) and ids.dtype == torch.long
    for row, p in zip(ids.tolist(), tokens["prompts"]):
        assert row == p["ids_open_clip"], p["prompt"]
        assert tok.encode(p["prompt"]) == p["bpe_ids_untruncated"], p["prompt"]


@needs_vocab
def test_hf_tokenizer_matches_transformers_clip_tokenizer(tokens):
    tok = T.CLIPTokenizer.hf()
    assert tok.pad_id == T.EOT_ID
    ids = tok([p["prompt"] for p in tokens["prompts"]])
    for row, p in zip(ids.tolist(), tokens["prompts"]):
        assert row == p["ids_hf_clip_tokenizer_max_length_pad_eot"], p["prompt"]


@needs_vocab
@pytest.mark.parametrize("style", ["open_clip", "hf"])
def test_truncation_keeps_eot(style):
    tok = T.CLIPTokenizer(style=style)
    text = " ".join(["cat"] * 100)
    assert len(tok.encode(text)) == 100
    ids = tok(text)[0].tolist()
    assert len(ids) == 77 and ids[0] == T.SOT_ID and ids[-1] == T.EOT_ID
    assert ids[1:76] == tok.encode(text)[:75]
    exact = tok(" ".join(["cat"] * 75))[0].tolist()  # exactly fills the context: no padding, eot last
    assert exact[-1] == T.EOT_ID and exact[-2] != T.EOT_ID


def test_missing_vocab_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found at .*nope.txt.gz.*vocab_path="):
        T.CLIPTokenizer(tmp_path / "nope.txt.gz")
    monkeypatch.setenv("SDXL_CLIP_BPE_VOCAB", str(tmp_path / "gone.txt.gz"))
    with pytest.raises(FileNotFoundError, match="gone.txt.gz"):
        T.CLIPTokenizer()


def test_the_vocabulary_ships_with_the_package(monkeypatch):
    """A plain install tokenizes: the BPE merges are package data (no open_clip_torch, hence no torchvision)."""
    monkeypatch.delenv("SDXL_CLIP_BPE_VOCAB", raising=False)
    path = T.default_vocab_path()
    assert path is not None and path.parent.name == "assets" and path.parent.parent.name == "sdxl_model"
    assert path.stat().st_size == 1_356_917
    encoder, ranks = T._load_bpe(str(path))
    assert len(encoder) == T.VOCAB_SIZE == 49408 and len(ranks) == 49408 - 512 - 2


# ---------------------------------------------------------------------------------------------- full-size meta


def _meta(build):
    with torch.device("meta"):
        return build()


def test_clip_l_names_shapes_count_match_sgm(keys):
    _transformers_or_skip()
    model = _meta(T.build_clip_l)
    prefix = "conditioner.embedders.0.transformer."
    want = {k[len(prefix):]: v for k, v in keys["tensors"].items() if k.startswith(prefix)}
    got = {T.clip_l_checkpoint_key(k): list(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    n = sum(p.numel() for p in model.parameters())
    assert n == keys["embedders"]["conditioner.embedders.0"]["params"] == 123_060_480


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_bigg_key_map_names_shapes_count_match_sgm(which):
    _transformers_or_skip()
    path = SGM / f"sd_xl_{which}_1.0.keys.json"
    if not path.is_file():
        pytest.skip(f"fixture {path} not found")
    keys = json.loads(path.read_text())
    emb = "conditioner.embedders.1" if which == "base" else "conditioner.embedders.0"
    assert keys["embedders"][emb]["class"] == "FrozenOpenCLIPEmbedder2"
    prefix = emb + ".model."
    want = {k[len(prefix):]: v for k, v in keys["tensors"].items() if k.startswith(prefix)}
    model = _meta(T.build_clip_bigg)
    hf = {k: list(v.shape) for k, v in model.state_dict().items()}
    kmap = T.openclip_bigg_key_map()
    assert set(kmap) == set(want)
    covered = [d for dsts in kmap.values() for d in dsts]
    assert sorted(covered) == sorted(hf)  # every HF tensor is produced exactly once
    for src, dsts in kmap.items():
        shapes = [hf[d] for d in dsts]
        if len(dsts) == 3:
            assert [shapes[0][0] * 3] + shapes[0][1:] == want[src] and shapes[0] == shapes[1] == shapes[2]
        elif src == "text_projection":
            assert shapes[0][::-1] == want[src]
        elif dsts:
            assert shapes[0] == want[src], src
    n = sum(p.numel() for p in model.parameters())
    assert n + 1 == keys["embedders"][emb]["params"] == 694_659_841  # + open_clip's unused logit_scale
    # the meta state dict converts to the open_clip names and shapes exactly
    back = T.hf_to_openclip_bigg(model.state_dict())
    assert {k: list(v.shape) for k, v in back.items()} == want


# ---------------------------------------------------------------------------------------------- forward semantics

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


def _tiny_encoder(refiner=False):
    torch.manual_seed(0)
    clip_l = None if refiner else T.build_clip_l(T.clip_l_config(**TINY))
    g = T.build_clip_bigg(T.clip_bigg_config(**TINY, projection_dim=24))
    with torch.no_grad():  # make LayerNorm affine parameters non-trivial
        for m in ([g] if clip_l is None else [clip_l, g]):
            for name, p in m.named_parameters():
                if "layer_norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return T.SDXLTextEncoder(clip_l, g).eval()


def _ref_openclip_text(sd, ids, heads, act):
    """Plain-PyTorch open_clip TextTransformer on open_clip-named weights: returns (penultimate, pooled)."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    width = x.shape[-1]
    penult = None
    for i in range(layers):
        if i == layers - 1:
            penult = x
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        qkv = h @ sd[p + "attn.in_proj_weight"].t() + sd[p + "attn.in_proj_bias"]
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + mask, -1) @ v
        a = a.transpose(1, 2).flatten(2) @ sd[p + "attn.out_proj.weight"].t() + sd[p + "attn.out_proj.bias"]
        x = x + a
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = act(h @ sd[p + "mlp.c_fc.weight"].t() + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].t() + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (width,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    pooled = x[torch.arange(x.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return penult, pooled


def _hf_clip_l_as_openclip(model):
    """CLIP-L HF weights renamed into the open_clip layout (no projection), to reuse the reference."""
    sd = {T.clip_l_checkpoint_key(k)[len("text_model."):]: v for k, v in model.state_dict().items()}
    sd = {("text_model." + k): v for k, v in sd.items()}
    sd["text_projection.weight"] = torch.eye(sd["text_model.final_layer_norm.weight"].shape[0])
    return T.hf_to_openclip_bigg(sd, num_layers=TINY["num_hidden_layers"])


def _ids(n=2):
    g = torch.Generator().manual_seed(1)
    ids_g = torch.zeros(n, 77, dtype=torch.long)
    ids_l = torch.full((n, 77), T.EOT_ID, dtype=torch.long)
    for b, length in enumerate([5, 12, 3][:n]):
        body = torch.randint(0, 49000, (length,), generator=g)
        for ids in (ids_g, ids_l):
            ids[b, 0] = T.SOT_ID
            ids[b, 1:length + 1] = body
            ids[b, length + 1] = T.EOT_ID
    return ids_l, ids_g


@torch.no_grad()
def test_base_forward_matches_reference():
    _transformers_or_skip()
    enc = _tiny_encoder()
    ids_l, ids_g = _ids()
    context, pooled = enc.encode_ids(ids_l, ids_g)
    assert context.shape == (2, 77, 64) and pooled.shape == (2, 24)
    sd_g = T.hf_to_openclip_bigg(enc.clip_bigg.state_dict(), num_layers=TINY["num_hidden_layers"])
    pen_g, pool_g = _ref_openclip_text(sd_g, ids_g, 4, F.gelu)
    pen_l, _ = _ref_openclip_text(_hf_clip_l_as_openclip(enc.clip_l), ids_l, 4, lambda x: x * torch.sigmoid(1.702 * x))
    torch.testing.assert_close(context[..., :32], pen_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(context[..., 32:], pen_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, pool_g, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_refiner_forward_and_key_map_round_trip():
    _transformers_or_skip()
    enc = _tiny_encoder(refiner=True)
    _, ids_g = _ids()
    context, pooled = enc.encode_ids(None, ids_g)
    assert context.shape == (2, 77, 32) and pooled.shape == (2, 24)
    hf = enc.clip_bigg.state_dict()
    oc = T.hf_to_openclip_bigg(hf, num_layers=TINY["num_hidden_layers"])
    back = T.openclip_bigg_to_hf(oc, num_layers=TINY["num_hidden_layers"])
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    del oc["ln_final.bias"]
    oc["extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['ln_final.bias'\].*unexpected \['extra'\]"):
        T.openclip_bigg_to_hf(oc, num_layers=TINY["num_hidden_layers"])


@needs_vocab
@torch.no_grad()
def test_prompt_encoder_zero_empty():
    _transformers_or_skip()
    enc = _tiny_encoder()
    ctx, pooled = enc(["a photo of a cat", ""])
    assert ctx[1].abs().sum() > 0 and pooled[1].abs().sum() > 0
    ctx0, pooled0 = enc(["a photo of a cat", ""], zero_empty=True)
    assert torch.all(ctx0[1] == 0) and torch.all(pooled0[1] == 0)
    torch.testing.assert_close(ctx0[0], ctx[0])
    torch.testing.assert_close(pooled0[0], pooled[0])
    # the tokenizers used are the two SDXL conventions
    ids_l, ids_g = enc.tokenizer_l("a"), enc.tokenizer_g("a")
    assert ids_l[0, -1] == T.EOT_ID and ids_g[0, -1] == 0


def test_sdxl_text_encoder_presets_on_meta(keys):
    _transformers_or_skip()
    base = T.SDXLTextEncoder.sdxl_base(device="meta")
    refiner = T.SDXLTextEncoder.sdxl_refiner(device="meta")
    assert sum(p.numel() for p in base.parameters()) + 1 == keys["param_counts"]["conditioner"] == 817_720_321
    assert refiner.clip_l is None and sum(p.numel() for p in refiner.parameters()) == 694_659_840


@needs_vocab
@torch.no_grad()
def test_encode_prompts_context_and_y():
    _transformers_or_skip()
    from sdxl_model import conditioning as C

    torch.manual_seed(0)  # tiny encoders, but the real pooled width 1280 for the ADM layout
    g = T.build_clip_bigg(T.clip_bigg_config(**TINY, projection_dim=1280))
    base = T.SDXLTextEncoder(T.build_clip_l(T.clip_l_config(**TINY)), g).eval()
    ctx, y = C.encode_prompts(base, ["a cat", ""], original_size=(512, 768), zero_empty=True)
    assert ctx.shape == (2, 77, 64) and y.shape == (2, C.BASE_ADM_DIM)
    assert torch.all(y[1, :1280] == 0) and torch.all(ctx[1] == 0)
    torch.testing.assert_close(y[:, 1280:], C.micro_conditioning((512, 768), (0, 0), (1024, 1024)).expand(2, -1))
    refiner = T.SDXLTextEncoder(None, g).eval()
    ctx, y = C.encode_prompts(refiner, "a cat", aesthetic_score=2.5)
    assert ctx.shape == (1, 77, 32) and y.shape == (1, C.REFINER_ADM_DIM)
    torch.testing.assert_close(y[:, 1280:], C.refiner_micro_conditioning((1024, 1024), (0, 0), 2.5))
