"""Write a sliced (and recovered) model as one GGUF file that llama.cpp loads, per-layer shapes included.

Architecture. A uniform model (every layer the same shape, nothing dropped) is
written as llama.cpp's plain `llama`; any other as `deci`, whose loader reads
`head_count`, `head_count_kv` and `feed_forward_length` as one value per layer
and sizes every layer's tensors from them (`src/models/deci.cpp` in llama.cpp):

    blk.i.attn_q: (n_head[i] * head_dim, hidden)   attn_k, attn_v: (n_head_kv[i] * head_dim, hidden)
    blk.i.attn_output: (hidden, n_head[i] * head_dim)
    blk.i.ffn_gate, ffn_up: (n_ff[i], hidden)      ffn_down: (hidden, n_ff[i])

(numpy shapes, rows first; GGUF stores the reverse). n_head 0 drops the
attention sublayer. Two limits of that engine are worked around exactly:

- head_dim and the rotary width are read only when layer 0 has heads, so a dropped
  attention in layer 0 is written as one query/KV head whose output projection is
  zero (it adds exactly 0, as the dropped sublayer does);
- a layer with n_ff 0 skips the rest of the layer, its attention output with it, so
  a dropped MLP is written as `ZERO_FFN` channels whose down projection is zero.

Rotary layout: transformers rotates the two halves of each head (rotate_half),
llama.cpp's `llama`/`deci` rotate adjacent pairs, so q and k rows (and biases) are
permuted within each head, as llama.cpp's own converter does. Qwen2's q/k/v biases
are loaded by both architectures; tied embeddings are written once (llama.cpp
reuses token_embd as the output).

Weights are f32, f16, or Q8_0 through gguf's own quantizer (2-D tensors; norms and
biases stay f32). A Q8_0 row must be a multiple of 32 values: FFN widths are padded
with zero channels to whole blocks (exact, `padded_ffn`; `padding_bytes` says what
it costs), and the attention rows (heads x head_dim) are checked before anything is
written. The file is written next to its target and
renamed into place (`pruning.files.replacing`), so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from finetune.hf_writer import is_uniform
from pruning import adapter
from pruning.architecture import Architecture
from pruning.files import replacing

ZERO_FFN = 32  # channels standing in for a dropped MLP (one Q8_0 block)
GGUF_TYPES = ("f32", "f16", "q8_0")
# Byte-level BPE pre-tokenizer regexes (tokenizer.json) -> llama.cpp's name for that pre-tokenizer
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
SPLIT_PRE_TOKENIZERS = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


class GGUFExportError(ValueError):
    """A model, architecture or tokenizer the GGUF export cannot write; the message says what to change."""


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise GGUFExportError("GGUF export needs the gguf package: pip install 'prunesearch[serve]' "
                              "(or pip install gguf)") from err
    return gguf


def block_size(gguf_type: str) -> int:
    """Row lengths a tensor type holds are multiples of this (1 for f32/f16, 32 for Q8_0)."""
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    return {"f32": 1, "f16": 1, "q8_0": 32}[gguf_type]


def check_architecture(arch: Architecture, gguf_type: str) -> None:
    """Raise GGUFExportError unless every attention row of `arch` is a whole number of `gguf_type` blocks (FFN
    widths are padded to one, `padded_ffn`)."""
    block, s = block_size(gguf_type), arch.spec
    rows = {"hidden_size": s.hidden_size}
    for i, x in enumerate(arch.layers):
        rows[f"layer {i} query heads * head_dim"] = max(x.query_heads, 1 if i == 0 else 0) * s.head_dim
    bad = {name: n for name, n in rows.items() if n % block}
    if bad:
        raise GGUFExportError(f"GGUF {gguf_type} stores rows in blocks of {block} values, but {bad} are not "
                              f"multiples of {block}; export as f16 or f32")


def padded_ffn(channels: int, gguf_type: str) -> int:
    """FFN width written for `channels` kept: rounded up to whole blocks with zero channels, which are exact (a
    zero gate and up row gives silu(0) * 0 = 0, and a zero down column adds nothing); a dropped MLP is written as
    `ZERO_FFN` zero channels (module docstring)."""
    block = block_size(gguf_type)
    return ZERO_FFN if channels == 0 else -(-channels // block) * block


def padding_bytes(arch: Architecture, gguf_type: str) -> int:
    """Bytes the zero FFN channels of `padded_ffn` add to the file (gate, up and down: 3 x hidden values each)."""
    per_value = {"f32": 4, "f16": 2, "q8_0": 34 / 32}[gguf_type]  # Q8_0: 32 int8 and one f16 scale per block
    pad = sum(padded_ffn(x.ffn_channels, gguf_type) - x.ffn_channels for x in arch.layers if x.ffn_channels)
    return round(pad * 3 * arch.spec.hidden_size * per_value)


def _permute(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Rows of each head from halves order (transformers) to interleaved pairs (llama.cpp): (heads*d, ...)."""
    return w.reshape(-1, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _layer_tensors(parts: adapter.LayerParts, shape, i: int, spec, gguf_type: str) -> tuple[dict, int, int, int]:
    """({short name: array}, n_head, n_head_kv, n_ff) of layer `i` as llama.cpp expects it."""
    h, d = spec.hidden_size, spec.head_dim
    out: dict[str, np.ndarray] = {}
    n_head, n_kv = shape.query_heads, shape.kv_heads
    if not shape.attention_dropped:
        out["attn_norm.weight"] = _numpy(parts.attention_norm.weight)
        for name, lin, permute in (("attn_q", parts.q, True), ("attn_k", parts.k, True), ("attn_v", parts.v, False),
                                   ("attn_output", parts.o, False)):
            for kind in ("weight", "bias"):
                t = getattr(lin, kind)
                if t is not None:
                    out[f"{name}.{kind}"] = _permute(_numpy(t), d) if permute else _numpy(t)
    elif i == 0:  # stand-in head: llama.cpp reads head_dim from layer 0 (module docstring)
        n_head = n_kv = 1
        out["attn_norm.weight"] = np.ones(h, np.float32)
        out.update({f"{n}.weight": np.zeros((d, h), np.float32) for n in ("attn_q", "attn_k", "attn_v")})
        out["attn_output.weight"] = np.zeros((h, d), np.float32)
    n_ff = padded_ffn(shape.ffn_channels, gguf_type)
    pad = n_ff - shape.ffn_channels  # zero channels (`padded_ffn`)
    if shape.mlp_dropped:  # zero FFN: llama.cpp would skip the layer's attention output with n_ff 0
        out["ffn_norm.weight"] = np.ones(h, np.float32)
        out.update({f"{n}.weight": np.zeros((n_ff, h), np.float32) for n in ("ffn_gate", "ffn_up")})
        out["ffn_down.weight"] = np.zeros((h, n_ff), np.float32)
    else:
        out["ffn_norm.weight"] = _numpy(parts.mlp_norm.weight)
        for name, lin in (("ffn_gate", parts.gate), ("ffn_up", parts.up)):
            out[f"{name}.weight"] = np.pad(_numpy(lin.weight), ((0, pad), (0, 0)))
            if lin.bias is not None:
                out[f"{name}.bias"] = np.pad(_numpy(lin.bias), (0, pad))
        out["ffn_down.weight"] = np.pad(_numpy(parts.down.weight), ((0, 0), (0, pad)))
        if parts.down.bias is not None:
            out["ffn_down.bias"] = _numpy(parts.down.bias)
    return out, n_head, n_kv, n_ff


def _tokenizer_pre(data: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer.json's pre-tokenizer."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in SPLIT_PRE_TOKENIZERS:
            return SPLIT_PRE_TOKENIZERS[regex]
    raise GGUFExportError(f"cannot convert this tokenizer's pre-tokenizer for llama.cpp ({json.dumps(pre)[:200]}); "
                          "supported are GPT-2 byte-level BPE, Llama 3 and Qwen2 BPE")


@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` tokenizer model holds it."""

    pre: str  # llama.cpp's pre-tokenizer name
    tokens: tuple[str, ...]  # one per embedding row
    types: tuple[int, ...]  # gguf.TokenType per token
    special: object  # gguf.SpecialVocab: merges, special token ids, add_bos/add_eos


def read_vocab(tokenizer, vocab_size: int) -> Vocab:
    """Convert a byte-level BPE tokenizer as llama.cpp's converter does, one token per embedding row: rows no
    token has are `[PAD<i>]` (unused), added tokens past the rows are left out (`tokens_left_out`);
    GGUFExportError for any other tokenizer, or one whose own vocabulary is larger than the embedding."""
    gguf = _gguf()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        model, decoder = data.get("model", {}), data.get("decoder") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
            raise GGUFExportError(
                f"cannot convert a {model.get('type', 'non-tokenizer.json')} tokenizer "
                f"(decoder {decoder.get('type')}) to GGUF: only byte-level BPE tokenizers (GPT-2 style, Llama 3, "
                "Qwen2) are supported; SentencePiece tokenizers (Llama 2, Mistral) are not yet")
        pre = _tokenizer_pre(data)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    vocab, added = tokenizer.get_vocab(), tokenizer.added_tokens_decoder
    beyond = [i for i in vocab.values() if i >= vocab_size and i not in added]
    if beyond:
        raise GGUFExportError(f"the tokenizer has ids up to {max(beyond)} but the model only "
                              f"{vocab_size} embeddings; export the tokenizer the model was trained with")
    reverse = {i: t for t, i in vocab.items() if i < vocab_size}  # added tokens past the embedding: left out
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[i])
            special_token = i in added and added[i].special
            types.append(gguf.TokenType.CONTROL if special_token else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    return Vocab(pre, tuple(tokens), tuple(types), special)


def tokens_left_out(tokenizer, vocab_size: int) -> list[str]:
    """Added tokens with ids past the model's `vocab_size` embeddings (a tokenizer's extra special tokens): they
    have no embedding row, so were never trained, and the GGUF vocabulary leaves them out."""
    return [t.content for i, t in sorted(tokenizer.added_tokens_decoder.items()) if i >= vocab_size]


def check_export(arch: Architecture, config: PretrainedConfig, tokenizer, gguf_type: str) -> None:
    """Everything `export_gguf` would refuse, checked up front: the gguf package, the architecture, the model's
    rotary embeddings (adapter.UnsupportedModelError), the tokenizer."""
    _gguf()
    check_architecture(arch, gguf_type)
    adapter.engine_params(config)
    read_vocab(tokenizer, arch.spec.vocab_size)


def _write_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.types))
    vocab.special.add_to_gguf(writer, quiet=True)


def _add_tensor(gguf, writer, name: str, array: np.ndarray, gguf_type: str) -> None:
    if array.ndim == 1 or gguf_type == "f32":
        writer.add_tensor(name, array.astype(np.float32))
    elif gguf_type == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def _write_model(gguf, writer, arch_name: str, model: PreTrainedModel, arch: Architecture, gguf_type: str) -> None:
    spec, params = arch.spec, adapter.engine_params(model.config)
    tensors: dict[str, np.ndarray] = {"token_embd.weight": _numpy(model.get_input_embeddings().weight)}
    heads, kv_heads, ffn = [], [], []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        layer_tensors, n_head, n_kv, n_ff = _layer_tensors(adapter.layer_parts(layer), arch.layers[i], i, spec,
                                                             gguf_type)
        tensors.update({f"blk.{i}.{name}": t for name, t in layer_tensors.items()})
        heads.append(n_head)
        kv_heads.append(n_kv)
        ffn.append(n_ff)
    tensors["output_norm.weight"] = _numpy(adapter.final_norm(model).weight)
    if not spec.tie_embeddings:
        tensors["output.weight"] = _numpy(model.get_output_embeddings().weight)
    uniform = arch_name != "deci"
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(params.context_length)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(ffn[0] if uniform else ffn)
    writer.add_head_count(heads[0] if uniform else heads)
    writer.add_head_count_kv(kv_heads[0] if uniform else kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(params.rope_theta)
    writer.add_layer_norm_rms_eps(params.rms_norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[gguf_type])
    for name, array in tensors.items():
        _add_tensor(gguf, writer, name, array, gguf_type)


@torch.no_grad()
def export_gguf(model: PreTrainedModel, arch: Architecture, tokenizer, out_path: str | Path, gguf_type: str = "f16",
                force: bool = False) -> Path:
    """Write `model` (sliced to `arch`) with its tokenizer as one GGUF file at `out_path`; return the path.

    Refuses an existing `out_path` unless `force`, an architecture `gguf_type` cannot hold, a
    tokenizer llama.cpp cannot take; all checks run before the file exists.
    """
    gguf = _gguf()
    out = Path(out_path)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another path or pass force=True (--force)")
    check_export(arch, model.config, tokenizer, gguf_type)
    vocab = read_vocab(tokenizer, arch.spec.vocab_size)
    arch_name = adapter.FAMILIES[arch.spec.family].gguf_arch if is_uniform(arch) else "deci"
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        writer.add_name(Path(arch.spec.base_model).name + "-pruned")
        _write_vocab(writer, vocab)
        _write_model(gguf, writer, arch_name, model, arch, gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
