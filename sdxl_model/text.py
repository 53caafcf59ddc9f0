"""SDXL's text side, offline: the CLIP byte-level BPE tokenizer and the two CLIP text encoders.

Tokenizer: `CLIPTokenizer.open_clip()` (bigG, sgm `FrozenOpenCLIPEmbedder2`: ftfy + html unescape, pads with 0)
and `CLIPTokenizer.hf()` (CLIP ViT-L, sgm `FrozenCLIPEmbedder` through transformers: NFC + whitespace +
lowercase, pads with the end-of-text id 49407). Both read the BPE merges `bpe_simple_vocab_16e6.txt.gz`,
shipped with this package (sdxl_model/assets, the file OpenAI CLIP and open_clip ship), or a path the caller
gives (or $SDXL_CLIP_BPE_VOCAB). Ids are `[sot] + bpe + [eot]` padded to 77; a prompt
longer than 75 BPE tokens is truncated to its first 75 and the last position is always eot (prompt chunking is
not done).

Encoders (transformers, built from configs in code, no hub access):
- `clip_l_config()` / `build_clip_l()`: `CLIPTextModel`, ViT-L/14 text tower, 123,060,480 parameters.
- `clip_bigg_config()` / `build_clip_bigg()`: `CLIPTextModelWithProjection` with OpenCLIP ViT-bigG-14's text
  tower, 694,659,840 parameters; open_clip's layout in the sgm checkpoint has one more, the unused
  `logit_scale` (694,659,841), see `openclip_bigg_key_map`.
- `SDXLTextEncoder` runs both: context = cat(CLIP-L penultimate hidden state, bigG penultimate hidden state)
  → 2048 wide; pooled = bigG `final_layer_norm` output at the eot position @ text projection → 1280.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import html
import os
import pathlib
import unicodedata
from typing import Sequence

import torch
from torch import nn

from .keys import mismatch

SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
_N_MERGES = 49152 - 256 - 2
_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
            r"""[^\s\p{L}\p{N}]+""")
VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"


def default_vocab_path() -> pathlib.Path | None:
    """$SDXL_CLIP_BPE_VOCAB when set, else the BPE merges file packaged in sdxl_model/assets; None when that
    file is missing (a broken install)."""
    env = os.environ.get("SDXL_CLIP_BPE_VOCAB")
    if env:
        return pathlib.Path(env)
    packaged = pathlib.Path(__file__).resolve().parent / "assets" / VOCAB_FILENAME
    return packaged if packaged.is_file() else None


@functools.lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters: printable bytes map
    to themselves, the others to code points from 256 upwards (in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    # Insertion order matters: the vocabulary lists the printable bytes first, then the remapped ones.
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=4)
def _load_bpe(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_N_MERGES + 1]]
    symbols = list(_byte_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {tok: i for i, tok in enumerate(vocab_list)}
    ranks = {m: i for i, m in enumerate(merges)}
    if len(encoder) != VOCAB_SIZE:
        raise ValueError(f"{path}: expected a CLIP BPE vocabulary of {VOCAB_SIZE} tokens, got {len(encoder)}")
    return encoder, ranks


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split())


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer. `style` "open_clip" cleans with ftfy.fix_text + html.unescape twice and
    pads with 0 (as open_clip.tokenize, used for bigG); "hf" normalizes NFC + whitespace + lowercase without
    html unescaping and pads with 49407 (as transformers' CLIPTokenizer for openai/clip-vit-large-patch14)."""

    def __init__(self, vocab_path: str | os.PathLike | None = None, *, style: str = "open_clip",
                 pad_id: int | None = None, context_length: int = CONTEXT_LENGTH):
        if style not in ("open_clip", "hf"):
            raise ValueError(f"style must be 'open_clip' or 'hf', got {style!r}")
        path = pathlib.Path(vocab_path) if vocab_path is not None else default_vocab_path()
        if path is None or not path.is_file():
            where = vocab_path if vocab_path is not None else os.environ.get("SDXL_CLIP_BPE_VOCAB")
            raise FileNotFoundError(
                f"CLIP BPE vocabulary {VOCAB_FILENAME} not found "
                + (f"at {where}" if where else "in sdxl_model/assets (the package is incomplete: reinstall it)")
                + "; pass vocab_path= or set SDXL_CLIP_BPE_VOCAB")
        import regex  # the pattern needs \p{L} / \p{N}

        self.style = style
        self.pad_id = pad_id if pad_id is not None else (0 if style == "open_clip" else EOT_ID)
        self.context_length = context_length
        self.encoder, self.bpe_ranks = _load_bpe(str(path))
        self._byte_map = _byte_to_unicode()
        self._pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        self._cache: dict[str, str] = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}

    @classmethod
    def open_clip(cls, vocab_path=None) -> "CLIPTokenizer":
        return cls(vocab_path, style="open_clip")

    @classmethod
    def hf(cls, vocab_path=None) -> "CLIPTokenizer":
        return cls(vocab_path, style="hf")

    def clean(self, text: str) -> str:
        if self.style == "open_clip":
            try:
                import ftfy
                text = ftfy.fix_text(text)
            except ImportError:  # pragma: no cover - ftfy is installed by scripts/install.sh
                pass
            text = html.unescape(html.unescape(text)).strip()
        else:
            text = unicodedata.normalize("NFC", text)
        return _whitespace_clean(text).lower()

    def _bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                r = self.bpe_ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of one prompt, without sot/eot, untruncated."""
        ids = []
        for piece in self._pattern.findall(self.clean(text)):
            mapped = "".join(self._byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(mapped).split(" "))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """[B, context_length] int64 ids: sot, the BPE ids (truncated to context_length-2), eot, padding."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT_ID] + self.encode(text)[: self.context_length - 2] + [EOT_ID]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


# --------------------------------------------------------------------------------------------------------------
# Text encoders (transformers models built from configs in code; never downloads anything)
# --------------------------------------------------------------------------------------------------------------

CLIP_L_HIDDEN = 768
BIGG_HIDDEN = 1280
CONTEXT_DIM = CLIP_L_HIDDEN + BIGG_HIDDEN  # 2048
POOLED_DIM = 1280


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    return transformers


def clip_l_config(**overrides):
    """`CLIPTextConfig` of OpenAI CLIP ViT-L/14's text tower (SDXL base `text_encoder`); `overrides` replace
    fields (e.g. a small width for tests)."""
    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=3072, projection_dim=768,
              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=CONTEXT_LENGTH,
              hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=SOT_ID, eos_token_id=EOT_ID,
              pad_token_id=1)
    kw.update(overrides)
    return _transformers().CLIPTextConfig(**kw)


def clip_bigg_config(**overrides):
    """`CLIPTextConfig` of OpenCLIP ViT-bigG/14's text tower (SDXL base `text_encoder_2`, the refiner's only
    text encoder); `overrides` replace fields."""
    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
              num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=CONTEXT_LENGTH,
              hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=SOT_ID, eos_token_id=EOT_ID, pad_token_id=1)
    kw.update(overrides)
    return _transformers().CLIPTextConfig(**kw)


def build_clip_l(config=None):
    """`transformers.CLIPTextModel` for CLIP-L (random init; build under `torch.device("meta")` to skip
    allocation, then load weights with assign=True)."""
    return _transformers().CLIPTextModel(config if config is not None else clip_l_config())


def build_clip_bigg(config=None):
    """`transformers.CLIPTextModelWithProjection` for OpenCLIP bigG (random init)."""
    return _transformers().CLIPTextModelWithProjection(config if config is not None else clip_bigg_config())


def clip_l_checkpoint_key(name: str) -> str:
    """A `CLIPTextModel` state-dict name in the released checkpoint's transformers-4 layout (`text_model.*`;
    transformers ≥ 5 drops that level from `CLIPTextModel.state_dict()`). Prefix with
    `conditioner.embedders.0.transformer.` for the SDXL base single file."""
    return name if name.startswith("text_model.") else "text_model." + name


def openclip_bigg_key_map(num_layers: int = 32) -> dict[str, tuple[str, ...]]:
    """open_clip bigG name (relative to `conditioner.embedders.{1 base | 0 refiner}.model.`) → the
    `CLIPTextModelWithProjection` names it becomes. `attn.in_proj_weight/bias` [3·H, H] splits row-wise into
    q, k, v (in that order); `text_projection` [H, P] (used as x @ P) becomes `text_projection.weight` = its
    transpose. `logit_scale` (the CLIP contrastive temperature) maps to nothing: the text encoder does not use
    it. See `openclip_bigg_to_hf` / `hf_to_openclip_bigg`."""
    m: dict[str, tuple[str, ...]] = {
        "token_embedding.weight": ("text_model.embeddings.token_embedding.weight",),
        "positional_embedding": ("text_model.embeddings.position_embedding.weight",),
        "ln_final.weight": ("text_model.final_layer_norm.weight",),
        "ln_final.bias": ("text_model.final_layer_norm.bias",),
        "text_projection": ("text_projection.weight",),
        "logit_scale": (),
    }
    for i in range(num_layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            m[src + f"attn.in_proj_{kind}"] = tuple(dst + f"self_attn.{p}_proj.{kind}" for p in "qkv")
            m[src + f"attn.out_proj.{kind}"] = (dst + f"self_attn.out_proj.{kind}",)
            m[src + f"ln_1.{kind}"] = (dst + f"layer_norm1.{kind}",)
            m[src + f"ln_2.{kind}"] = (dst + f"layer_norm2.{kind}",)
            m[src + f"mlp.c_fc.{kind}"] = (dst + f"mlp.fc1.{kind}",)
            m[src + f"mlp.c_proj.{kind}"] = (dst + f"mlp.fc2.{kind}",)
    return m


def openclip_bigg_to_hf(state: dict[str, torch.Tensor], num_layers: int = 32) -> dict[str, torch.Tensor]:
    """open_clip-layout bigG tensors (prefix already stripped) → `CLIPTextModelWithProjection` state dict.
    Strict: missing or unexpected names raise one error listing them."""
    kmap = openclip_bigg_key_map(num_layers)
    wrong = mismatch(set(kmap) - {"logit_scale"}, set(state) - {"logit_scale"}, show=10)  # logit_scale: optional
    if wrong:
        raise KeyError(f"open_clip bigG state dict does not match: {wrong}")
    out = {}
    for src, dsts in kmap.items():
        if not dsts or src not in state:
            continue
        t = state[src]
        if len(dsts) == 3:
            for d, part in zip(dsts, t.chunk(3, dim=0)):
                out[d] = part
        elif src == "text_projection":
            out[dsts[0]] = t.t()
        else:
            out[dsts[0]] = t
    return out


def hf_to_openclip_bigg(state: dict[str, torch.Tensor], num_layers: int = 32,
                        logit_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The inverse of `openclip_bigg_to_hf` (for saving the single-file layout). `logit_scale` defaults to
    ln(1/0.07), open_clip's initial value, when not given."""
    out = {}
    for src, dsts in openclip_bigg_key_map(num_layers).items():
        if not dsts:
            continue
        if len(dsts) == 3:
            out[src] = torch.cat([state[d] for d in dsts], dim=0)
        elif src == "text_projection":
            out[src] = state[dsts[0]].t().contiguous()
        else:
            out[src] = state[dsts[0]]
    ref = out["ln_final.weight"]
    out["logit_scale"] = (logit_scale if logit_scale is not None
                          else torch.tensor(2.6592600345611572, dtype=ref.dtype, device=ref.device))
    return out


def _eot_positions(ids: torch.Tensor) -> torch.Tensor:
    """Index of the first eot per row (sgm pools at `ids.argmax(-1)`: eot 49407 is the largest id, and argmax
    returns the first maximum, so this equals it for both paddings)."""
    return (ids == EOT_ID).int().argmax(dim=-1)


class SDXLTextEncoder(nn.Module):
    """Prompts → (context [B, 77, 2048 | 1280], pooled [B, 1280]) as sgm's GeneralConditioner computes them.

    `clip_l` is None for the refiner (context = bigG's penultimate hidden state alone, 1280 wide).
    context = cat(CLIP-L hidden_states[-2], bigG hidden_states[-2]) — the penultimate layers, without the final
    layer norm, causal mask only (no padding mask); pooled = bigG final_layer_norm(last layer) at the eot
    position @ text projection. `zero_empty` replaces the rows of empty prompts by zeros (context and pooled):
    sgm's `force_uc_zero_embeddings` for the base's negative prompt, diffusers' `force_zeros_for_empty_prompt`.
    """

    def __init__(self, clip_l: nn.Module | None, clip_bigg: nn.Module, *, tokenizer_l: CLIPTokenizer | None = None,
                 tokenizer_g: CLIPTokenizer | None = None):
        super().__init__()
        self.clip_l = clip_l
        self.clip_bigg = clip_bigg
        self._tok_l = tokenizer_l
        self._tok_g = tokenizer_g

    @classmethod
    def sdxl_base(cls, device: torch.device | str | None = None) -> "SDXLTextEncoder":
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(build_clip_l(), build_clip_bigg())

    @classmethod
    def sdxl_refiner(cls, device: torch.device | str | None = None) -> "SDXLTextEncoder":
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(None, build_clip_bigg())

    @property
    def tokenizer_l(self) -> CLIPTokenizer:
        if self._tok_l is None:
            self._tok_l = CLIPTokenizer.hf()
        return self._tok_l

    @property
    def tokenizer_g(self) -> CLIPTokenizer:
        if self._tok_g is None:
            self._tok_g = CLIPTokenizer.open_clip()
        return self._tok_g

    def encode_ids(self, ids_l: torch.Tensor | None, ids_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ([B, 77] each; `ids_l` None for the refiner) → (context, pooled)."""
        g = self.clip_bigg
        dev = next(g.parameters()).device
        ids_g = ids_g.to(dev)
        out_g = g(input_ids=ids_g, output_hidden_states=True)
        last = out_g.last_hidden_state  # final_layer_norm already applied by the HF text transformer
        pooled_in = last[torch.arange(last.shape[0], device=dev), _eot_positions(ids_g)]
        pooled = g.text_projection(pooled_in)
        ctx_g = out_g.hidden_states[-2]
        if self.clip_l is None:
            return ctx_g, pooled
        if ids_l is None:
            raise ValueError("the base text encoder needs CLIP-L token ids")
        out_l = self.clip_l(input_ids=ids_l.to(dev), output_hidden_states=True)
        ctx_l = out_l.hidden_states[-2]
        return torch.cat([ctx_l, ctx_g.to(ctx_l.dtype)], dim=-1), pooled

    def forward(self, prompts: str | Sequence[str], *, zero_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids_l = self.tokenizer_l(prompts) if self.clip_l is not None else None
        context, pooled = self.encode_ids(ids_l, self.tokenizer_g(prompts))
        if zero_empty:
            empty = torch.tensor([p == "" for p in prompts], device=context.device)
            if empty.any():
                context = context.masked_fill(empty[:, None, None], 0)
                pooled = pooled.masked_fill(empty[:, None], 0)
        return context, pooled

