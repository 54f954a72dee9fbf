"""GGUF export: llama.cpp (through llama-cpp-python) runs the exported file as our model does.

Tolerances. Both sides compute in float32 (llama.cpp with an f32 KV cache: its default f16 cache
alone would move logits by about 1e-3). What differs is only the order of summation inside the
dot products, so logits (of size 1 to 3 here) agree to a few 1e-6 on short prompts and a few
1e-5 after 8200 tokens, where the attention sums run over thousands of keys. LOGITS_ATOL and
LONG_LOGITS_ATOL leave a margin of 10x or more over those, while a layout slip (tried on
purpose: gate and up swapped, or q/k permuted Llama 2 style) puts over 95% of the logits outside
them, by up to about 2. The two hard-coded features a short prompt cannot reach (the 8192 chunk and the
temperature floor) get their own check that our model without them lands at least 20x the
tolerance away from llama.cpp.

Q8_0 is lossy by design (and llama.cpp also rounds each matmul's input activations to 8 bits),
so a q8_0 file is judged as a quantization is: against our float32 model, the top-1 next token
of a briefly trained model on held-out text, and the mean logit error. Measured here (2026-12-07,
TINY trained for 60 steps, 512 held-out positions): agreement 0.998 (511 of 512), mean |logit
error| 0.0064, the file 0.54x the f16 one. Broken quantizations tried on purpose: block scales
stored 2x or 0.5x give agreement 0.90 and 0.78, values reversed inside their blocks 0.07, and
scales 1.1x, which top-1 barely sees (0.986), a mean logit error of 0.18.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from corpora import WORDS, write_phrase_corpus
from lora_support import randomise_adapters, save_adapted

from behemoth import checkpoint
from behemoth.config import ModelConfig, preset
from behemoth.errors import BehemothError
from behemoth.export import ExportError, export_gguf
from behemoth.export import gguf as gguf_export
from behemoth.inference.generate import generate
from behemoth.model import Transformer, init_weights
from behemoth.inference.kv_cache import LayerCache, ModelCache
from behemoth.tokenizer import CHAT_TEMPLATE, Tokenizer, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGITS_ATOL = 1e-4
LONG_LOGITS_ATOL = 5e-4
# float16 weights: we compare with our model holding the same float16-rounded weights, but
# llama.cpp also rounds each f16 matmul's *input activations* to float16 (ggml's f16 dot
# product), a relative error of up to 2^-11 per element that we do not make; measured up to
# 2e-3 on these logits (as large as the weight rounding itself, 2.6e-3), so 3x that.
F16_LOGITS_ATOL = 6e-3
# q8_0 against our float32 model (see the module docstring for what was measured).
Q8_0_TOP1_FLOOR = 0.98
Q8_0_MEAN_LOGIT_ERROR = 0.03
NEW_TOKENS = 24
LONG_PROMPT = 8200  # crosses llama.cpp's hard-coded chunk (8192) and temperature floor (8192)
TAIL = 16  # positions 8184..8199 are compared

# cpu-small with smaller width and depth; every value llama.cpp hard-codes stays as it is.
SMALL = preset("cpu-small").replace(hidden_size=128, head_dim=32, intermediate_size=256,
                                    intermediate_size_mlp=512, num_hidden_layers=4, vocab_size=512,
                                    initializer_range=0.05)
# The other layouts the exporter supports, as tiny models: tied embeddings with llama3 RoPE
# scaling (written as rope_freqs) and top-2 routing in every layer; and a dense model.
TINY = SMALL.replace(hidden_size=64, head_dim=16, intermediate_size=96, intermediate_size_mlp=160)
VARIANTS = {
    "tied-llama3-rope-top2-all-moe": TINY.replace(
        tie_word_embeddings=True, num_experts_per_tok=2, interleave_moe_layer_step=1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "dense": TINY.replace(moe_layers=[]),
}
# One narrow head, so 8200 tokens of attention stay fast on one thread (GQA is covered above).
LONG = SMALL.replace(hidden_size=64, num_attention_heads=1, num_key_value_heads=1, head_dim=32,
                     intermediate_size=64, intermediate_size_mlp=128, max_position_embeddings=16384)

TOKENIZER_STRINGS = [
    "the cat sat on a red house and then the cat was happy.",
    "<|begin_of_text|><|header_start|>user<|header_end|>Where is the dog?<|eot|>"
    "<|header_start|>assistant<|header_end|>",
    "naïve café crème, Ünïcödé 東京タワー 한국어 👩‍👩‍👧 👍🏽 e\u0301",
    "tabs\tand  double  spaces,\n\n\nnew lines \r\n and trailing   ",
    "don't we'll they're I'M 3.14159 1,000,000 #!@$%^&*()",
    "What is 41 plus 12? 53. In 2026-12-07 at 10:45, x2 = 1e-5; ²³ ½ Ⅻ ١٢٣ 4th 007",
    "<|eot <|pad|>inside<|end_of_text|>words <|unknown|> |> <|",
]


def training_texts() -> list[str]:
    """A few KB of phrases and some non-ASCII text, so merges cover multi-byte characters."""
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + rng.choice([". ", "!\n", "?\n\n"])
             for _ in range(300)]
    texts += ["naïve café crème, Ünïcödé 東京タワー 한국어. don't we'll 3.14 1,000\n"] * 20
    texts += ["What is 41 plus 12? It is 53. In 2026 and 1999.\n"] * 20  # numbers BPE would merge
    return texts


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is needed to run exported GGUF "
                                                   "files (pip install llama-cpp-python)")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(training_texts(), 400)


def with_token_ids(config: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    return config.replace(bos_token_id=tokenizer.bos_id, eos_token_id=[tokenizer.eos_id, tokenizer.eot_id],
                          pad_token_id=tokenizer.pad_id)


def saved_model(config: ModelConfig, tokenizer: Tokenizer | None, directory: Path, seed: int = 0) -> Transformer:
    model = Transformer(config)
    init_weights(model, seed=seed)
    checkpoint.save(model, directory, tokenizer)
    return model.eval()


@pytest.fixture(scope="module")
def small(tokenizer, tmp_path_factory) -> SimpleNamespace:
    """The cpu-small-like model, saved and exported as f32 and f16."""
    root = tmp_path_factory.mktemp("gguf")
    model = saved_model(with_token_ids(SMALL, tokenizer), tokenizer, root / "model")
    f32 = export_gguf(root / "model", root / "out" / "small-f32.gguf", "f32")
    f16 = export_gguf(root / "model", root / "out" / "small-f16.gguf", "f16")
    return SimpleNamespace(model=model, dir=root / "model", f32=f32, f16=f16)


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory) -> SimpleNamespace:
    """TINY trained for a couple of seconds on the phrase corpus (the loss falls from 6 to about
    0.5: confident on the template, unsure on the words each document picks), saved and exported
    as f16 and q8_0, with a held-out text of the same kind."""
    root = tmp_path_factory.mktemp("gguf-trained")
    ids = tokenizer.encode(write_phrase_corpus(root / "train.txt", 200, seed=0).read_text())
    model = Transformer(with_token_ids(TINY, tokenizer))
    init_weights(model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    starts = torch.randint(0, len(ids) - 33, (60, 8), generator=torch.Generator().manual_seed(0))
    for step_starts in starts:
        batch = torch.tensor([ids[s:s + 33] for s in step_starts.tolist()])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint.save(model, root / "model", tokenizer)
    held_out = write_phrase_corpus(root / "held-out.txt", 60, seed=1).read_text()
    return SimpleNamespace(model=model.eval(), held_out=[tokenizer.eos_id, *tokenizer.encode(held_out)[:511]],
                           f16=export_gguf(root / "model", root / "out" / "tiny-f16.gguf", "f16"),
                           q8_0=export_gguf(root / "model", root / "out" / "tiny-q8_0.gguf", "q8_0"))


@pytest.fixture(scope="module")
def open_llama(llama_cpp):
    """Opens GGUF files in llama.cpp with an f32 KV cache; closes them at the end of the module."""
    opened = []

    def open_(path: Path, n_ctx: int = 256, logits_all: bool = False, **kwargs):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                              n_threads=1, type_k=llama_cpp.GGML_TYPE_F32,
                              type_v=llama_cpp.GGML_TYPE_F32, **kwargs)
        opened.append(llm)
        return llm

    yield open_
    for llm in opened:
        llm.close()


def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Where did the cat sit?"}],
                                         add_generation_prompt=True)
    return [tokenizer.encode(chat),
            tokenizer.encode("the dog ran under a big tree and then"),
            [tokenizer.eos_id] + tokenizer.encode("the bird"),  # how our evaluation frames text
            [tokenizer.bos_id]]


def our_greedy(model: Transformer, ids: list[int]) -> list[int]:
    return generate(model, torch.tensor([ids]), max_new_tokens=NEW_TOKENS, temperature=0.0)[0].tolist()


def llama_greedy(llm, ids: list[int]) -> list[int]:
    return list(itertools.islice(llm.generate(ids, temp=0.0, repeat_penalty=1.0), NEW_TOKENS))


def smallest_margin(model: Transformer, ids: list[int], continuation: list[int]) -> float:
    """Smallest gap between the best and second-best logit along a greedy continuation: greedy
    decoding of two implementations can only differ where their logit error exceeds it."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + continuation]))[0, len(ids) - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def our_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def f16_rounded(model: Transformer) -> Transformer:
    """Our model with the weights the f16 file stores as float16 rounded to float16 (matrices
    except the router; vectors stay float32), computing in float32."""
    rounded = Transformer(model.config).eval()
    state = {name: t.half().float() if t.ndim >= 2 and not name.endswith("router.weight") else t
             for name, t in model.state_dict().items()}
    rounded.load_state_dict(state)
    return rounded


# ------------------------------------------------------------------------------------------------
# (a) greedy generation
# ------------------------------------------------------------------------------------------------

def test_greedy_tokens_equal_ours_f32(small, tokenizer, open_llama) -> None:
    llm = open_llama(small.f32, n_ctx=128)
    for ids in prompts(tokenizer):
        ours = our_greedy(small.model, ids)
        assert smallest_margin(small.model, ids, ours) > 10 * LOGITS_ATOL  # equality is expected
        assert llama_greedy(llm, ids) == ours, tokenizer.decode(ids)


def test_greedy_tokens_f16_equal_ours_except_at_float16_near_ties(small, tokenizer, open_llama) -> None:
    """llama.cpp on the f16 file generates what our model generates with the same weights rounded
    to float16, step for step, except where our best and second-best logits are closer than the
    two can disagree by (2 x F16_LOGITS_ATOL, since llama.cpp also rounds activations): there
    llama.cpp may take our second choice, after which the continuations are unrelated and
    comparison stops. Random weights have many such near-ties; a trained model far fewer."""
    llm = open_llama(small.f16, n_ctx=128)
    rounded = f16_rounded(small.model)
    compared = 0
    for ids in prompts(tokenizer):
        ours, theirs = our_greedy(rounded, ids), llama_greedy(llm, ids)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), NEW_TOKENS)
        compared += same
        if same < NEW_TOKENS:
            with torch.no_grad():
                logits = rounded(torch.tensor([ids + ours[:same]]))[0, -1]
            top = logits.topk(2)
            assert theirs[same] == int(top.indices[1]), "llama.cpp's choice is not our runner-up"
            assert float(top.values[0] - top.values[1]) < 2 * F16_LOGITS_ATOL, "diverged without a near-tie"
    assert compared >= NEW_TOKENS * 3  # most steps are decided, and agree


# ------------------------------------------------------------------------------------------------
# (b) tokenizer and chat template
# ------------------------------------------------------------------------------------------------

def test_llama_cpp_tokenizes_as_we_do(small, tokenizer, open_llama) -> None:
    llm = open_llama(small.f32, n_ctx=64)
    assert llm.metadata["tokenizer.ggml.pre"] == "starcoder"
    for text in TOKENIZER_STRINGS:
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True) == text.encode(), text
    assert llm.token_bos() == tokenizer.bos_id and llm.token_eos() == tokenizer.eos_id
    assert llm.tokenize(b"hello", add_bos=True, special=True) == tokenizer.encode("hello")  # no BOS added


def test_tokenizer_with_the_plain_gpt2_split_still_exports(tokenizer, open_llama, tmp_path) -> None:
    """A tokenizer made before digits were split (plain GPT-2 split) goes out as llama.cpp's gpt-2."""
    from tokenizers import pre_tokenizers

    tokenizer.save_pretrained(tmp_path / "new")
    backend = Tokenizer.load(tmp_path / "new").backend  # a copy: the module's tokenizer stays as it is
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    legacy = Tokenizer(backend)
    saved_model(with_token_ids(TINY, legacy), legacy, tmp_path / "model")
    llm = open_llama(export_gguf(tmp_path / "model", tmp_path / "legacy.gguf"), n_ctx=64)
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
    for text in TOKENIZER_STRINGS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == legacy.encode(text), text


def test_chat_template_renders_as_ours(small, tokenizer, open_llama, llama_cpp) -> None:
    llm = open_llama(small.f32, n_ctx=64)
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|eot|> there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Où?"}]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token="<|end_of_text|>",
        bos_token="<|begin_of_text|>")
    assert formatter(messages=messages).prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------
# (c) logits
# ------------------------------------------------------------------------------------------------

def test_prompt_logits_match_f32(small, tokenizer, open_llama) -> None:
    llm = open_llama(small.f32, n_ctx=128, logits_all=True)
    for ids in prompts(tokenizer):
        np.testing.assert_allclose(llama_logits(llm, ids), our_logits(small.model, ids), rtol=0, atol=LOGITS_ATOL)


def test_prompt_logits_match_f16_within_rounding(small, tokenizer, open_llama) -> None:
    llm = open_llama(small.f16, n_ctx=128, logits_all=True)
    rounded = f16_rounded(small.model)
    for ids in prompts(tokenizer):
        np.testing.assert_allclose(llama_logits(llm, ids), our_logits(rounded, ids), rtol=0, atol=F16_LOGITS_ATOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_other_layouts_match(variant, tokenizer, open_llama, tmp_path) -> None:
    model = saved_model(with_token_ids(VARIANTS[variant], tokenizer), tokenizer, tmp_path / "model", seed=1)
    llm = open_llama(export_gguf(tmp_path / "model", tmp_path / "model.gguf"), n_ctx=256, logits_all=True)
    ids = torch.randint(6, tokenizer.vocab_size, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    np.testing.assert_allclose(llama_logits(llm, ids), our_logits(model, ids), rtol=0, atol=LOGITS_ATOL)


def test_long_context_matches_across_chunk_and_temperature_floor(tokenizer, open_llama, tmp_path) -> None:
    """Position 8191 is the first whose temperature scale differs from 1, position 8192 the first
    of the second chunk: the values llama.cpp hard-codes agree with our config's."""
    model = Transformer(with_token_ids(LONG, tokenizer))
    init_weights(model, seed=0)
    with torch.no_grad():  # sharper attention in the NoPE layer, so its temperature visibly matters
        for proj in (model.model.layers[3].self_attn.q_proj, model.model.layers[3].self_attn.k_proj):
            proj.weight.mul_(4.0)
    checkpoint.save(model, tmp_path / "model", tokenizer)
    model.eval()
    out = export_gguf(tmp_path / "model", tmp_path / "long.gguf")
    ids = torch.randint(6, tokenizer.vocab_size, (LONG_PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    theirs = llama_logits(open_llama(out, n_ctx=LONG_PROMPT + 8, logits_all=True), ids)[-TAIL:]
    # The comparison sees both features: our model without either lands far from llama.cpp.
    variants = [Transformer(model.config.replace(**change)).eval()
                for change in (dict(attention_chunk_size=None), dict(attn_temperature_tuning=False))]
    for variant in variants:
        variant.load_state_dict(model.state_dict())
    ours, *others = tail_logits([model, *variants], ids)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=LONG_LOGITS_ATOL)
    for other in others:
        assert np.abs(other[-8:] - theirs[-8:]).max() > 20 * LONG_LOGITS_ATOL



def tail_logits(models: list[Transformer], ids: list[int], piece: int = 1024) -> list[np.ndarray]:
    """Logits of the last TAIL positions of a long prompt for each model.

    The models differ only in chunking and temperature tuning, which act from position 8191 on,
    so the keys and values before the tail are the same for all: the prefix is prefilled once,
    by the first model, into a cache that keeps every key (valid for any chunking, since each
    model's own attention mask decides visibility), and each model continues from a copy.
    """
    prefix = len(ids) - TAIL
    config = models[0].config
    cache = ModelCache([LayerCache(1, config.num_key_value_heads, config.head_dim, None, len(ids), torch.float32)
                        for _ in range(config.num_hidden_layers)])
    with torch.no_grad():
        for start in range(0, prefix, piece):
            tokens = torch.tensor([ids[start:min(start + piece, prefix)]])
            models[0](tokens, torch.arange(start, start + tokens.shape[1])[None], cache.layers)
        tail = torch.tensor([ids[prefix:]])
        positions = torch.arange(prefix, len(ids))[None]
        return [m(tail, positions, copy.deepcopy(cache).layers)[0].numpy() for m in models]


def test_f16_file_keeps_vectors_and_router_in_f32(small) -> None:
    import gguf

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(small.f16).tensors}
    f32 = {n for n, t in types.items() if t == gguf.GGMLQuantizationType.F32}
    assert f32 == {n for n in types if n.endswith(("norm.weight", "ffn_gate_inp.weight"))}
    assert all(t == gguf.GGMLQuantizationType.F16 for n, t in types.items() if n not in f32)
    assert {t.tensor_type for t in gguf.GGUFReader(small.f32).tensors} == {gguf.GGMLQuantizationType.F32}


# ------------------------------------------------------------------------------------------------
# (d) Q8_0
# ------------------------------------------------------------------------------------------------

def test_q8_0_next_tokens_agree_with_our_float_model(trained, open_llama) -> None:
    llm = open_llama(trained.q8_0, n_ctx=len(trained.held_out) + 8, logits_all=True)
    theirs, ours = llama_logits(llm, trained.held_out), our_logits(trained.model, trained.held_out)
    agreement = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    assert agreement >= Q8_0_TOP1_FLOOR, f"top-1 agreement {agreement:.3f} on {len(ours)} positions"
    assert float(np.abs(theirs - ours).mean()) <= Q8_0_MEAN_LOGIT_ERROR
    # 8.5 bits a weight (int8 + a float16 scale per 32) against 16; vectors, router and metadata as in f16
    assert trained.q8_0.stat().st_size < 0.6 * trained.f16.stat().st_size


def test_q8_0_file_quantizes_matrices_and_experts_and_keeps_vectors_and_router_f32(trained) -> None:
    import gguf

    reader = gguf.GGUFReader(trained.q8_0)
    types = {t.name: t.tensor_type for t in reader.tensors}
    f32 = {n for n, t in types.items() if t == gguf.GGMLQuantizationType.F32}
    assert f32 == {n for n in types if n.endswith(("norm.weight", "ffn_gate_inp.weight"))}
    assert all(t == gguf.GGMLQuantizationType.Q8_0 for n, t in types.items() if n not in f32)
    assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight",
            "token_embd.weight", "output.weight"} <= set(types)
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == gguf.LlamaFileType.MOSTLY_Q8_0


def test_q8_0_stores_rows_not_a_multiple_of_32_as_f16_and_says_so(tokenizer, open_llama, tmp_path, caplog) -> None:
    """Experts 80 wide: the down projections' rows (80 values) cannot be cut into Q8_0's blocks of
    32, so they go out as float16; everything else as usual. llama.cpp runs the mixed file."""
    import gguf

    model = saved_model(with_token_ids(TINY.replace(intermediate_size=80), tokenizer), tokenizer,
                        tmp_path / "model", seed=1)
    with caplog.at_level(logging.WARNING, logger="behemoth.export"):
        out = export_gguf(tmp_path / "model", tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    f16 = {n for n, t in types.items() if t == "F16"}
    assert f16 == {f"blk.{i}.{n}.weight" for i in (1, 3) for n in ("ffn_down_exps", "ffn_down_shexp")}
    assert types["blk.1.ffn_up_exps.weight"] == types["blk.0.ffn_down.weight"] == "Q8_0"
    warned = [r.getMessage() for r in caplog.records if r.name == "behemoth.export"]
    assert len(warned) == len(f16)
    assert ("GGUF q8_0: tensor blk.1.ffn_down_exps.weight is stored as f16: its rows hold 80 values, "
            "not a multiple of Q8_0's blocks of 32") in warned
    llm = open_llama(out, n_ctx=256, logits_all=True)
    ids = torch.randint(6, tokenizer.vocab_size, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    assert float(np.abs(llama_logits(llm, ids) - our_logits(model, ids)).mean()) <= Q8_0_MEAN_LOGIT_ERROR


def test_cli_exports_q8_0_and_lists_it(small, tmp_path, capsys) -> None:
    from behemoth.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--dtype {f32,f16,q8_0}" in capsys.readouterr().out
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(small.dir), "--format", "gguf", "--out", str(out), "--dtype", "q8_0"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert out.stat().st_size < 0.6 * small.f16.stat().st_size


# ------------------------------------------------------------------------------------------------
# (e) refusals
# ------------------------------------------------------------------------------------------------

REFUSED = [
    ("attention_chunk_size", dict(attention_chunk_size=4096)),
    ("attention_chunk_size", dict(attention_chunk_size=None)),
    ("no_rope_layers", dict(no_rope_layer_interval=2)),
    ("no_rope_layers", dict(no_rope_layers=[1, 1, 1, 1])),
    ("attn_temperature_tuning", dict(attn_temperature_tuning=False)),
    ("floor_scale", dict(floor_scale=4096)),
    ("attn_scale", dict(attn_scale=0.2)),
    ("use_qk_norm", dict(use_qk_norm=False)),
    ("use_qk_norm", dict(num_local_experts=128)),  # llama.cpp drops QK-norm for 128 experts
    ("moe_layers", dict(moe_layers=[0, 2])),
    ("attention_bias", dict(attention_bias=True)),
]


@pytest.mark.parametrize(("field", "change"), REFUSED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(REFUSED)])
def test_configs_llama_cpp_would_run_differently_are_refused(field, change, tmp_path) -> None:
    """Refused from config.json alone, before any weight is read."""
    (tmp_path / "model").mkdir()
    SMALL.replace(**change).save(tmp_path / "model" / "config.json")
    with pytest.raises(ExportError, match=rf"^cannot export to GGUF: {field} ") as err:
        export_gguf(tmp_path / "model", tmp_path / "out" / "m.gguf")
    assert "\n" not in str(err.value) and isinstance(err.value, BehemothError)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(small, tmp_path) -> None:
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(small.dir, target)
    assert target.read_bytes() == b"keep me"
    export_gguf(small.dir, target, overwrite=True)
    assert sha256(target) == sha256(small.f32)  # the export is deterministic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left


def test_output_appearing_during_export_is_not_replaced(small, tmp_path, monkeypatch) -> None:
    """The final move refuses a file that appeared after the early check (it links, never renames)."""
    target = tmp_path / "m.gguf"
    target.write_bytes(b"someone else's")
    monkeypatch.setattr(gguf_export, "_check_target", lambda out, overwrite: None)
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(small.dir, target)
    assert target.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_bad_requests_are_refused(small, tokenizer, tmp_path) -> None:
    with pytest.raises(ExportError, match=r"^dtype must be one of f32, f16, q8_0, got 'bf16'$"):
        export_gguf(small.dir, tmp_path / "m.gguf", "bf16")
    with pytest.raises(ExportError, match="is a directory"):
        export_gguf(small.dir, tmp_path)
    saved_model(TINY, None, tmp_path / "no-tokenizer")
    with pytest.raises(ExportError, match="no tokenizer.json"):
        export_gguf(tmp_path / "no-tokenizer", tmp_path / "m.gguf")
    saved_model(TINY.replace(vocab_size=300), tokenizer, tmp_path / "small-vocab")
    with pytest.raises(ExportError, match="the tokenizer has 400 tokens but vocab_size is 300"):
        export_gguf(tmp_path / "small-vocab", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_llama_cpp_would_get_wrong_are_refused(tokenizer, tmp_path) -> None:
    model = Transformer(TINY)
    init_weights(model, seed=0)
    with torch.no_grad():
        model.model.layers[1].feed_forward.experts.down_proj[3, 0, 0] = 1e5  # beyond float16
    checkpoint.save(model, tmp_path / "big", tokenizer)
    with pytest.raises(ExportError, match=r"tensor blk\.1\.ffn_down_exps\.weight has values up to 1e\+05"):
        export_gguf(tmp_path / "big", tmp_path / "big.gguf", "f16")
    export_gguf(tmp_path / "big", tmp_path / "big.gguf", "f32")  # float32 holds it
    export_gguf(tmp_path / "big", tmp_path / "big-q8_0.gguf", "q8_0")  # and so do Q8_0's block scales
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    checkpoint.save(model, tmp_path / "nan", tokenizer)
    with pytest.raises(ExportError, match=r"tensor blk\.0\.attn_q\.weight holds NaN"):
        export_gguf(tmp_path / "nan", tmp_path / "nan.gguf")


# ------------------------------------------------------------------------------------------------
# (f) LoRA adapters as llama.cpp adapter files
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, rslora", [(["all", "router"], False), (["experts", "q_proj"], True)])
def test_lora_adapter_gguf_runs_beside_the_base_as_our_adapted_model(small, tokenizer, open_llama, tmp_path,
                                                                    targets, rslora) -> None:
    from behemoth.lora_files import base_sha256
    from behemoth.model.lora import apply_lora
    from behemoth.train.config import LoraConfig

    adapted = checkpoint.load(small.dir)
    base_hash = base_sha256(adapted)
    settings = LoraConfig(rank=4, alpha=8.0, targets=targets, use_rslora=rslora)
    apply_lora(adapted, settings)
    randomise_adapters(adapted, seed=4)
    adapted.eval()
    save_adapted(adapted, tmp_path / "adapter", settings, str(small.dir), base_hash)
    out = gguf_export.export_gguf_lora(small.dir, tmp_path / "adapter", tmp_path / "adapter.gguf")
    reader = __import__("gguf").GGUFReader(str(out))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    llm = open_llama(small.f32, n_ctx=128, logits_all=True, lora_path=str(out))
    for ids in prompts(tokenizer):
        ours = our_logits(adapted, ids)
        assert np.abs(ours - our_logits(small.model, ids)).max() > 100 * LOGITS_ATOL  # the adapter acts
        np.testing.assert_allclose(llama_logits(llm, ids), ours, rtol=0, atol=LOGITS_ATOL)


def test_lora_adapter_gguf_for_another_base_is_refused(small, tmp_path) -> None:
    from behemoth.model.lora import apply_lora
    from behemoth.train.config import LoraConfig

    other = Transformer(small.model.config)
    init_weights(other, seed=5)
    settings = LoraConfig(rank=2, alpha=2.0, targets=["attention"])
    apply_lora(other, settings)
    save_adapted(other, tmp_path / "adapter", settings, "elsewhere", "0" * 64)
    with pytest.raises(BehemothError, match="was trained on another base"):
        gguf_export.export_gguf_lora(small.dir, tmp_path / "adapter", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_cli_exports_a_lora_adapter_and_refuses_a_mismatched_request(small, tmp_path, capsys) -> None:
    from behemoth.cli import main
    from behemoth.lora_files import base_sha256
    from behemoth.model.lora import apply_lora
    from behemoth.train.config import LoraConfig

    model = checkpoint.load(small.dir)
    info_hash = base_sha256(model)
    settings = LoraConfig(rank=2, alpha=4.0, targets=["attention"])
    apply_lora(model, settings)
    save_adapted(model, tmp_path / "adapter", settings, str(small.dir), info_hash)
    out = tmp_path / "a.gguf"
    assert main(["export", "--model", str(small.dir), "--format", "gguf-lora", "--adapter",
                 str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and out.is_file()
    for extra in (["--format", "gguf", "--adapter", str(tmp_path / "adapter")], ["--format", "gguf-lora"]):
        assert main(["export", "--model", str(small.dir), *extra, "--out", str(tmp_path / "b.gguf")]) == 2
        err = capsys.readouterr().err
        assert "--adapter goes with --format gguf-lora" in err and err.count("\n") == 1
    assert not (tmp_path / "b.gguf").exists()
