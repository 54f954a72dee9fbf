"""GGUF export: a model directory becomes one `.gguf` file that llama.cpp runs as `llama4`.

llama.cpp's llama4 (src/models/llama4.cpp in the llama.cpp that llama-cpp-python 0.3.36 vendors)
reads the sizes, head counts, RMS epsilon, RoPE base, expert count, top-k, expert width and the
MoE interleave step from the file, but hard-codes the rest of the architecture:

- chunked local attention (chunks of 8192) on three layers of every four, global on every fourth;
- every fourth layer (index 3, 7, ...) is NoPE, and only those use temperature tuning (floor
  scale 8192, scale 0.1);
- weightless QK-norm after RoPE on the RoPE layers, except for exactly 128 experts (Maverick);
- layer i is a MoE layer when (i + 1) % step == 0; the shared expert is as wide as a routed one;
- routing: top-k on raw router logits, sigmoid gates that scale the expert's input.

A config that differs on any of these would run as a *different* model, so `check_exportable`
refuses it by field name. Everything else maps one to one: Llama 4 rotates interleaved pairs,
llama.cpp's "normal" RoPE, so q and k are written unpermuted (unlike Llama 2/3 conversions).

The tokenizer goes into the file too: byte-level BPE under llama.cpp's `gpt2` model with the
pre-tokenizer that splits as ours does (`starcoder`: single digits, then the GPT-2 split; `gpt-2`
for tokenizers made before digits were split), our six specials as control tokens, no
automatic BOS (our prompts and chat template put `<|begin_of_text|>` where it belongs), and our
chat template. Runtimes that render the file's template with Jinja (llama-cpp-python, llama.cpp
with `--jinja`) prompt exactly as we do; llama.cpp's built-in C++ "llama4" template, which it
picks for this template when Jinja is off, adds "\\n\\n" after each header (and trims messages),
which our models were not trained with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from behemoth.durable import fsync_path
from behemoth import checkpoint
from behemoth.config import ModelConfig
from behemoth.errors import BehemothError
from behemoth.model import Transformer
from behemoth.model.rope import inverse_frequencies
from behemoth.tokenizer import CHAT_TEMPLATE, TOKENIZER_FILE, Tokenizer

if TYPE_CHECKING:
    import gguf

ARCHITECTURE = "llama4"
GGUF_DTYPES = ("f32", "f16", "q8_0")
TOKENIZER_MODEL = "gpt2"  # llama.cpp's name for byte-level BPE
# llama.cpp's names for the splits our tokenizers use: the plain GPT-2 split, and single digits before it
GPT2_PRE, DIGITS_THEN_GPT2_PRE = "gpt-2", "starcoder"

# What llama.cpp hard-codes for llama4 (see the module docstring).
LLAMA_CPP_CHUNK = 8192
LLAMA_CPP_NOPE_INTERVAL = 4
LLAMA_CPP_FLOOR_SCALE = 8192
LLAMA_CPP_ATTN_SCALE = 0.1
LLAMA_CPP_NO_QK_NORM_EXPERTS = 128  # the one expert count llama.cpp runs without QK-norm
LLAMA_CPP_MAX_EXPERTS = 1024
FLOAT16_MAX = float(np.finfo(np.float16).max)
Q8_0_BLOCK = 32  # values per Q8_0 block: 32 int8 values sharing one float16 scale (max |value| / 127)
Q8_0_MAX = 127 * FLOAT16_MAX  # beyond this a block's scale overflows float16

log = logging.getLogger("behemoth.export")


class ExportError(BehemothError):
    """A model cannot be exported as asked (its config, tokenizer, weights or the output path)."""


# -- public API -----------------------------------------------------------------------------------

def export_gguf(model_dir: Path, out_path: Path, dtype: str = "f32", *, overwrite: bool = False,
                name: str | None = None) -> Path:
    """Write the model directory `model_dir` (config, safetensors, tokenizer) as a GGUF file.

    dtype "f32" keeps every weight exact; "f16" stores the matrices in float16 (norms and the
    router stay float32, as llama.cpp's own converter keeps them); "q8_0" stores the matrices,
    the stacked expert weights included, as llama.cpp's Q8_0 (blocks of 32 int8 values along each
    row, one float16 scale per block: about 8.5 bits a weight), with the same float32 exceptions.
    A matrix whose rows are not a multiple of 32 long cannot be cut into blocks: it is stored as
    float16 instead, with a warning naming it (llama.cpp's converter does the same).

    The file is assembled under a temporary name in the output folder, fsynced and renamed, so
    `out_path` is never half written; an existing `out_path` is refused unless `overwrite`.
    Returns `out_path`.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    _check_target(out_path, overwrite)
    config = ModelConfig.load(model_dir)
    check_exportable(config)
    tokenizer, pre_tokenizer = _load_tokenizer(model_dir, config)
    model = checkpoint.load(model_dir)
    tensors = [(n, *_encode(n, t, dtype)) for n, t in gguf_tensors(model)]

    def fill(writer: gguf.GGUFWriter) -> None:
        _add_general(writer, name or checkpoint.model_name(model_dir), dtype)
        _add_hparams(writer, config)
        _add_vocab(writer, tokenizer, pre_tokenizer, config.vocab_size)
        for tensor_name, array, raw_dtype in tensors:
            writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)

    _write_atomically(out_path, overwrite, fill)
    return out_path


def export_gguf_lora(model_dir: Path, adapter_dir: Path, out_path: Path, *, overwrite: bool = False) -> Path:
    """Write the LoRA adapter `adapter_dir` (ours or PEFT's, for the base `model_dir`) as a llama.cpp
    adapter GGUF, loaded beside the base's GGUF (`llama-cli -m base.gguf --lora out.gguf`).

    Every tensor is float32 and named after the base tensor it adapts, `<name>.lora_a` [r, in] and
    `.lora_b` [out, r] (llama.cpp adds scale * b @ a; scale = adapter.lora.alpha / r, so alpha is
    written as our scale * r, which also carries rsLoRA). Routed experts are stacks [E, r, in] /
    [E, out, r]; our gate_up_proj adapter becomes two, ffn_gate_exps' and ffn_up_exps', sharing
    its A. Written atomically, as `export_gguf`."""
    from behemoth.lora_files import base_sha256, load_adapter_into
    from behemoth.model.lora import scale_of

    model_dir, adapter_dir, out_path = Path(model_dir), Path(adapter_dir), Path(out_path)
    _check_target(out_path, overwrite)
    check_exportable(ModelConfig.load(model_dir))
    model = checkpoint.load(model_dir, dtype=torch.float32)
    info = load_adapter_into(model, adapter_dir, expected_base=base_sha256(model), attach=True)
    tensors = [(name, tensor.detach().float().contiguous().numpy()) for name, tensor in gguf_lora_tensors(model)]

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type("adapter")
        writer.add_name(f"{info.base_model} LoRA")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", scale_of(info) * info.rank)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, array)

    _write_atomically(out_path, overwrite, fill)
    return out_path


def gguf_lora_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in llama.cpp's layout) for every adapter factor of `model`."""
    from behemoth.model.lora import ExpertLoRA, adapter_modules

    for site, module in adapter_modules(model).items():
        layer, _, local = site.removeprefix("model.layers.").partition(".")
        base = f"blk.{layer}."
        if not isinstance(module, ExpertLoRA):
            base += f"{MATRICES[local]}.weight"
            yield base + ".lora_a", module.lora_A.weight
            yield base + ".lora_b", module.lora_B.weight
            continue
        a, b = module.lora_A.transpose(1, 2), module.lora_B.transpose(1, 2)  # [E, r, in], [E, out, r]
        if local.endswith("gate_up_proj"):
            for stack, part in zip(("ffn_gate_exps", "ffn_up_exps"), b.chunk(2, dim=1)):
                yield f"{base}{stack}.weight.lora_a", a
                yield f"{base}{stack}.weight.lora_b", part
        else:
            yield f"{base}ffn_down_exps.weight.lora_a", a
            yield f"{base}ffn_down_exps.weight.lora_b", b


def check_exportable(config: ModelConfig) -> None:
    """Raise ExportError naming the first field llama.cpp's llama4 cannot represent."""
    for check in (_check_attention, _check_layers, _check_moe):
        problem = check(config)
        if problem:
            raise ExportError(f"cannot export to GGUF: {problem}")


# -- what llama.cpp can run -----------------------------------------------------------------------

def _check_attention(config: ModelConfig) -> str | None:
    if config.attention_chunk_size != LLAMA_CPP_CHUNK:
        return (f"attention_chunk_size is {config.attention_chunk_size}, but llama.cpp's llama4 "
                f"always uses chunks of {LLAMA_CPP_CHUNK}")
    if not config.attn_temperature_tuning:
        return "attn_temperature_tuning is false, but llama.cpp's llama4 always tunes NoPE layers"
    if config.floor_scale != LLAMA_CPP_FLOOR_SCALE:
        return (f"floor_scale is {config.floor_scale}, but llama.cpp's llama4 always uses "
                f"{LLAMA_CPP_FLOOR_SCALE}")
    if not math.isclose(config.attn_scale, LLAMA_CPP_ATTN_SCALE, rel_tol=1e-6):
        return (f"attn_scale is {config.attn_scale}, but llama.cpp's llama4 always uses "
                f"{LLAMA_CPP_ATTN_SCALE}")
    wants_qk_norm = config.num_local_experts != LLAMA_CPP_NO_QK_NORM_EXPERTS
    if config.use_qk_norm != wants_qk_norm:
        return (f"use_qk_norm is {str(config.use_qk_norm).lower()}, but llama.cpp's llama4 applies "
                f"QK-norm exactly when num_local_experts != {LLAMA_CPP_NO_QK_NORM_EXPERTS} "
                f"(here {config.num_local_experts})")
    if config.attention_bias:
        return "attention_bias is true, but llama.cpp's llama4 has no attention biases"
    return None


def _check_layers(config: ModelConfig) -> str | None:
    n = config.num_hidden_layers
    expected = [int((i + 1) % LLAMA_CPP_NOPE_INTERVAL != 0) for i in range(n)]
    if config.no_rope_layers[:n] != expected:
        return (f"no_rope_layers is {config.no_rope_layers[:n]}, but llama.cpp's llama4 makes "
                f"exactly every {LLAMA_CPP_NOPE_INTERVAL}th layer NoPE ({expected})")
    if _moe_step(config) is None:
        return (f"moe_layers is {config.moe_layers}, but llama.cpp's llama4 can only make every "
                f"k-th layer a MoE layer (layers k-1, 2k-1, ...)")
    return None


def _check_moe(config: ModelConfig) -> str | None:
    if not 1 <= config.num_local_experts <= LLAMA_CPP_MAX_EXPERTS:
        # llama.cpp refuses a llama4 file without experts, even a dense one.
        return (f"num_local_experts is {config.num_local_experts}, llama.cpp's llama4 needs "
                f"1 to {LLAMA_CPP_MAX_EXPERTS}")
    if not 1 <= config.num_experts_per_tok <= config.num_local_experts:
        return (f"num_experts_per_tok is {config.num_experts_per_tok}, llama.cpp needs 1 to "
                f"num_local_experts ({config.num_local_experts})")
    return None


def _moe_step(config: ModelConfig) -> int | None:
    """llama.cpp's interleave step for this layout (0 = no MoE layer), or None if it has none."""
    layers = list(config.moe_layers or [])
    if not layers:
        return 0
    step = layers[0] + 1
    return step if layers == list(range(step - 1, config.num_hidden_layers, step)) else None


def _load_tokenizer(model_dir: Path, config: ModelConfig) -> tuple[Tokenizer, str]:
    """Our tokenizer, checked to be one llama.cpp's gpt2 tokenizer reproduces exactly, and the name
    of llama.cpp's pre-tokenizer that splits text as it does."""
    if not (model_dir / TOKENIZER_FILE).is_file():
        raise ExportError(f"{model_dir}: no {TOKENIZER_FILE}; a GGUF file carries its tokenizer, "
                          "so save the model together with it")
    tokenizer = Tokenizer.load(model_dir)
    pre, problem = _llama_cpp_pre_tokenizer(json.loads(tokenizer.backend.to_str()))
    if problem:
        raise ExportError(f"{model_dir / TOKENIZER_FILE}: cannot export to GGUF: {problem}")
    if tokenizer.vocab_size > config.vocab_size:
        raise ExportError(f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but "
                          f"vocab_size is {config.vocab_size}")
    return tokenizer, pre


def _llama_cpp_pre_tokenizer(spec: dict[str, Any]) -> tuple[str, str | None]:
    """(llama.cpp's pre-tokenizer name, None) for a tokenizer.json llama.cpp reproduces, else ("", why not)."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "", "the model must be plain byte-level BPE"
    if spec.get("normalizer") is not None:
        return "", "a normalizer is set; llama.cpp's gpt-2 and starcoder pre-tokenizers have none"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    names = {1: GPT2_PRE, 2: DIGITS_THEN_GPT2_PRE}  # by the number of steps
    split = steps[-1] if steps else {}
    digits_first = len(steps) == 1 or steps[0] == {"type": "Digits", "individual_digits": True}
    if len(steps) in names and digits_first and split.get("type") == "ByteLevel" \
            and not split.get("add_prefix_space") and split.get("use_regex", True):
        return names[len(steps)], None
    return "", ("the pre-tokenizer must be ByteLevel(add_prefix_space=False, use_regex=True), "
                "alone or after Digits(individual_digits=True)")


# -- metadata -------------------------------------------------------------------------------------

def _add_general(writer: gguf.GGUFWriter, name: str, dtype: str) -> None:
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_hparams(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size_mlp)  # dense layers' MLP
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.intermediate_size)  # routed and shared experts
    writer.add_interleave_moe_layer_step(_moe_step(config) or 0)
    # No sliding_window key: llama.cpp reads its presence with value 0 as "no chunking at all".


def _add_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, pre_tokenizer: str, vocab_size: int) -> None:
    import gguf

    backend = tokenizer.backend
    by_id = {i: token for token, i in backend.get_vocab(with_added_tokens=True).items()}
    added = backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer: never produced by tokenizing
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(backend))
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.eot_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    # Our engine never prepends BOS: documents and chat prompts carry their own framing tokens.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _merges(backend: Any) -> list[str]:
    """BPE merges as "left right" strings (byte-level symbols never contain a plain space)."""
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


# -- tensors --------------------------------------------------------------------------------------

def gguf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in llama.cpp's layout) for every weight; raises if one is left over."""
    state = dict(model.state_dict())
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name].detach()

    yield "token_embd.weight", take("model.embed_tokens.weight")
    yield "output_norm.weight", take("model.norm.weight")
    if model.config.tie_word_embeddings:
        used.add("lm_head.weight")  # llama.cpp reuses token_embd when output is absent
    else:
        yield "output.weight", take("lm_head.weight")
    if model.config.rope_type != "default":
        yield "rope_freqs.weight", _rope_factors(model.config)
    for i in range(model.config.num_hidden_layers):
        yield from _layer_tensors(i, model.config.is_moe_layer(i), take)
    left = sorted(set(state) - used)
    if left:
        raise ExportError(f"cannot export to GGUF: no GGUF name for tensor {left[0]!r}")


# Our per-layer matrices (nn.Linear weights, [out, in]: llama.cpp's layout for a matrix) by GGUF name.
LAYER_MATRICES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output"}
MOE_MATRICES = {"feed_forward.router": "ffn_gate_inp", "feed_forward.shared_expert.gate_proj": "ffn_gate_shexp",
                "feed_forward.shared_expert.up_proj": "ffn_up_shexp",
                "feed_forward.shared_expert.down_proj": "ffn_down_shexp"}
DENSE_MATRICES = {f"feed_forward.{p}_proj": f"ffn_{p}" for p in ("gate", "up", "down")}
MATRICES = {**LAYER_MATRICES, **MOE_MATRICES, **DENSE_MATRICES}


def _layer_tensors(i: int, is_moe: bool, take: Callable[[str], torch.Tensor]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    src, dst = f"model.layers.{i}.", f"blk.{i}."
    yield dst + "attn_norm.weight", take(src + "input_layernorm.weight")
    yield dst + "ffn_norm.weight", take(src + "post_attention_layernorm.weight")
    for ours, theirs in {**LAYER_MATRICES, **(MOE_MATRICES if is_moe else DENSE_MATRICES)}.items():
        yield f"{dst}{theirs}.weight", take(f"{src}{ours}.weight")
    if is_moe:
        # Ours are stacked for x @ W: gate_up [E, hidden, 2I] (gate first), down [E, I, hidden].
        # llama.cpp wants per-expert [out, in] matrices: gate/up [E, I, hidden], down [E, hidden, I].
        gate, up = take(src + "feed_forward.experts.gate_up_proj").transpose(1, 2).chunk(2, dim=1)
        yield dst + "ffn_gate_exps.weight", gate
        yield dst + "ffn_up_exps.weight", up
        yield dst + "ffn_down_exps.weight", take(src + "feed_forward.experts.down_proj").transpose(1, 2)


def _rope_factors(config: ModelConfig) -> torch.Tensor:
    """llama.cpp divides each pair's base frequency by its factor: base / scaled, from our own
    frequencies so the file rotates exactly as our model does."""
    plain = inverse_frequencies(config.replace(rope_scaling=None))
    return plain / inverse_frequencies(config)


def _encode(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """The tensor as a contiguous numpy array as it is stored in the file, and the quantized type
    its bytes hold (None for float32 and float16, which the array's own dtype names)."""
    values = tensor.to(torch.float32).contiguous().numpy()
    if not np.isfinite(values).all():
        raise ExportError(f"cannot export to GGUF: tensor {name} holds NaN or infinite values")
    # As llama.cpp's converter does: vectors (norms, RoPE factors) and the router stay float32;
    # the router's choice is a discrete decision that float16 rounding could flip.
    if dtype == "f32" or values.ndim < 2 or name.endswith("ffn_gate_inp.weight"):
        return values, None
    peak = float(np.abs(values).max(initial=0.0))
    if dtype == "q8_0":
        # Blocks run along the last axis, the one llama.cpp's dot products run over (a matrix's
        # input dimension; for the stacked experts, each expert's rows).
        if values.shape[-1] % Q8_0_BLOCK == 0:
            if peak > Q8_0_MAX:
                raise ExportError(f"cannot export to GGUF q8_0: tensor {name} has values up to {peak:.4g}, "
                                  f"beyond what Q8_0's float16 block scales hold ({Q8_0_MAX:.4g}); "
                                  "export as f32")
            gguf = _import_gguf()
            return gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        log.warning("GGUF q8_0: tensor %s is stored as f16: its rows hold %d values, not a multiple of "
                    "Q8_0's blocks of %d", name, values.shape[-1], Q8_0_BLOCK)
    if peak > FLOAT16_MAX:
        raise ExportError(f"cannot export to GGUF {dtype}: tensor {name} has values up to {peak:.4g}, "
                          f"beyond float16's {FLOAT16_MAX:.0f}; export as f32")
    return values.astype(np.float16), None


# -- writing --------------------------------------------------------------------------------------

def _check_target(out_path: Path, overwrite: bool) -> None:
    """Refuse early, before any work, what `_write_atomically` would refuse at the end."""
    if out_path.is_dir():
        raise ExportError(f"{out_path}: is a directory; give the path of the .gguf file to write")
    if out_path.exists() and not overwrite:
        raise _exists(out_path)


def _write_atomically(out_path: Path, overwrite: bool, fill: Callable[[gguf.GGUFWriter], None]) -> None:
    """Write to a temporary file beside `out_path`, fsync, then move it into place.

    Without `overwrite` the move is a hard link, which fails if `out_path` appeared meanwhile,
    so a file someone else wrote is never replaced.
    """
    gguf = _import_gguf()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_temporary(out_path)
    try:
        writer = gguf.GGUFWriter(temporary, ARCHITECTURE)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fsync_path(temporary)
        _move_into_place(temporary, out_path, overwrite)
        fsync_path(out_path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _import_gguf() -> Any:
    try:
        import gguf
        import gguf.quants
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install 'gguf>=0.10,<1'") from None
    return gguf


def _new_temporary(out_path: Path) -> Path:
    """A fresh empty file beside `out_path`, with the permissions a plain new file gets (mkstemp's
    are 0600, which would make the released model unreadable to others)."""
    while True:
        temporary = out_path.with_name(f".{out_path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue


def _move_into_place(temporary: Path, out_path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(temporary, out_path)
        return
    try:
        os.link(temporary, out_path)
    except FileExistsError:
        raise _exists(out_path) from None


def _exists(out_path: Path) -> ExportError:
    return ExportError(f"{out_path}: already exists; choose another path or overwrite it explicitly "
                       "(--overwrite)")


