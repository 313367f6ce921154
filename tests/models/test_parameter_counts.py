"""Every built-in model's parameter count, built on meta: exactly the count its architecture's
formula gives for its config, and close to the figure its paper (or released checkpoint) states.

Each formula is written from the architecture, weight by weight, independently of the module
code; a tied weight counts once.
"""

from __future__ import annotations

import functools

import pytest

from autopar.models.registry import BUILTIN_MODELS, parameter_count

count = functools.cache(parameter_count)  # each model built once on meta for both tests


def gpt(c) -> int:
    # per block 12 d^2 + 13 d: qkv 3d^2 + 3d, proj d^2 + d, fc 4d^2 + 4d, proj 4d^2 + d, two
    # LayerNorms 4d; token and position embeddings (the head is the token embedding); final LN
    L, d = c.n_layer, c.d_model
    return 12 * L * d * d + 13 * L * d + (c.vocab_size + c.seq_len) * d + 2 * d


def llama(c) -> int:
    # per block: wq, wo d^2 each; wk, wv d x (kv heads x head dim); SwiGLU 3 d f; two RMSNorms;
    # embedding and untied output layer; final RMSNorm
    L, d, f = c.n_layer, c.d_model, c.ffn_hidden
    kv = c.n_kv_head * (d // c.n_head)
    return L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * c.vocab_size * d + d


def mixtral(c) -> int:
    # Llama's, each block's SwiGLU replaced by E of them and a router (d x E, no bias)
    L, d, f, E = c.n_layer, c.d_model, c.ffn_hidden, c.n_experts
    return llama(c) + L * (3 * d * f * (E - 1) + d * E)


def palm(c) -> int:
    # per block: wq, wo d x (heads x head dim); one key head and one value head; SwiGLU 3 d f;
    # one LayerNorm scale; shared embedding; final LayerNorm scale
    L, d, f, inner = c.n_layer, c.d_model, c.ffn_hidden, c.n_head * c.head_dim
    return L * (2 * d * inner + 2 * d * c.head_dim + 3 * d * f + d) + c.vocab_size * d + d


def bert(c) -> int:
    # embeddings: words, positions, 2 token types, LayerNorm; per layer: qkv and proj with
    # biases 4d^2 + 4d, feed-forward 2 d f + f + d, two LayerNorms 4d; MLM head: dense
    # d^2 + d, LayerNorm 2d, output bias V (its weight is the word embedding)
    L, d, f, V = c.n_layer, c.d_model, c.d_ff, c.vocab_size
    embeddings = (V + c.max_positions + c.type_vocab_size) * d + 2 * d
    layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    return embeddings + L * layer + d * d + d + 2 * d + V


def t5(c, ffn=None) -> int:
    # shared embedding; encoder blocks: q, k, v, o (d x heads x d_kv each), feed-forward,
    # two scales; decoder blocks: self and cross attention, feed-forward, three scales;
    # a relative position table (buckets x heads) in each stack's first block; final scales
    L, d, inner = c.n_layer, c.d_model, c.n_head * c.d_kv
    ffn = ffn or (lambda i: 2 * d * c.d_ff)
    encoder = sum(4 * d * inner + ffn(i) + 2 * d for i in range(L))
    decoder = sum(8 * d * inner + ffn(i) + 3 * d for i in range(L))
    return c.vocab_size * d + encoder + decoder + 2 * c.num_buckets * c.n_head + 2 * d


def switch(c) -> int:
    # T5 whose odd blocks (of each stack) hold E experts of 2 d f and a router d x E
    def ffn(i):
        dense = 2 * c.d_model * c.d_ff
        return c.n_experts * dense + c.d_model * c.n_experts if i % 2 else dense

    return t5(c, ffn)


def vit(c) -> int:
    # patch convolution with bias; class token; positions (patches + 1); per block:
    # 4d^2 + 2 d m + 9d + m (qkv, proj, MLP with biases, two LayerNorms); final LN; head
    L, d, m = c.n_layer, c.d_model, c.d_mlp
    patch = c.channels * c.patch_size**2 * d + d
    return (patch + d + (c.n_patches + 1) * d + L * (4 * d * d + 2 * d * m + 9 * d + m) + 2 * d
            + d * c.n_classes + c.n_classes)


def swin(c) -> int:
    # patch convolution and its LayerNorm; per block at width w: 12 w^2 + 13 w (qkv, proj, MLP
    # of 4w with biases, two LayerNorms) + a (2 W - 1)^2 x heads bias table, W the stage's window
    # (no larger than the stage); per merging from w: LayerNorm of 4w, 4w -> 2w without bias;
    # final LayerNorm and head
    total = c.channels * c.patch_size**2 * c.embed_dim + c.embed_dim + 2 * c.embed_dim
    w, side = c.embed_dim, c.image_size // c.patch_size
    for stage, (depth, heads) in enumerate(zip(c.depths, c.heads)):
        if stage:
            total += 8 * w + 8 * w * w
            w, side = 2 * w, side // 2
        window = min(c.window, side)
        total += depth * (12 * w * w + 13 * w + (2 * window - 1) ** 2 * heads)
    return total + 2 * w + w * c.n_classes + c.n_classes


FORMULAS = {"GPT": gpt, "Llama": llama, "Mixtral": mixtral, "PaLM": palm, "BERT": bert, "T5": t5,
            "Switch": switch, "ViT": vit, "Swin": swin}

# name -> (stated count, relative tolerance, where it is stated). Papers round; where the
# released checkpoint's exact count is known, it is used (tolerance 0).
PUBLISHED = {
    # Brown et al. 2020, Table 2.1; the vocabulary here is padded from 50257 to 50304
    "gpt3-125m": (125e6, 0.01, "GPT-3 Table 2.1"),
    "gpt3-350m": (350e6, 0.02, "GPT-3 Table 2.1"),
    "gpt3-760m": (760e6, 0.01, "GPT-3 Table 2.1"),
    "gpt3-1.3b": (1.3e9, 0.02, "GPT-3 Table 2.1"),
    "gpt3-2.7b": (2.7e9, 0.02, "GPT-3 Table 2.1"),
    "gpt3-6.7b": (6.7e9, 0.01, "GPT-3 Table 2.1"),
    "gpt3-13b": (13.0e9, 0.02, "GPT-3 Table 2.1"),
    "gpt3-175b": (175.0e9, 0.01, "GPT-3 Table 2.1"),
    # the released Llama checkpoints
    "llama2-7b": (6_738_415_616, 0, "Llama 2 7B checkpoint"),
    "llama2-13b": (13_015_864_320, 0, "Llama 2 13B checkpoint"),
    "llama2-70b": (68_976_648_192, 0, "Llama 2 70B checkpoint"),
    "llama3-8b": (8_030_261_248, 0, "Llama 3 8B checkpoint"),
    "llama3-70b": (70_553_706_496, 0, "Llama 3 70B checkpoint"),
    "llama3-405b": (405e9, 0.005, "Llama 3 paper, Table 3"),
    # Chowdhery et al. 2022, Table 1 (two decimals of billions)
    "palm-8b": (8.63e9, 0.001, "PaLM Table 1"),
    "palm-62b": (62.50e9, 0.001, "PaLM Table 1"),
    "palm-540b": (540.35e9, 0.001, "PaLM Table 1"),
    # bert-base-uncased's masked-LM model (no pooler); the paper says 110M and 340M
    "bert-base": (109_514_298, 0, "bert-base-uncased, masked-LM head"),
    "bert-large": (340e6, 0.02, "BERT section 3"),
    # "Mixtral has 47B total parameters" (Jiang et al. 2024, section 2); the released
    # checkpoint: 46,702,792,704
    "mixtral-8x7b": (47e9, 0.01, "Mixtral paper, section 2"),
    # the released T5 checkpoints (the paper rounds to 220M and 770M)
    "t5-base": (222_903_552, 0, "t5-base checkpoint"),
    "t5-large": (737_668_096, 0, "t5-large checkpoint"),
    "t5-3b": (2.8e9, 0.02, "T5 section 3.7"),
    "t5-11b": (11e9, 0.03, "T5 section 3.7"),
    # Fedus et al. 2022, Table 9 rounds to whole billions (the checkpoints: 7.4B, 26.4B)
    "switch-base-128": (7e9, 0.07, "Switch Table 9"),
    "switch-large-128": (26e9, 0.02, "Switch Table 9"),
    # timm's vit_*_224 and swin_*_patch4_window7_224, ImageNet-1k heads
    "vit-b16": (86_567_656, 0, "timm vit_base_patch16_224"),
    "vit-l16": (304_326_632, 0, "timm vit_large_patch16_224"),
    "vit-h14": (632_045_800, 0, "timm vit_huge_patch14_224"),
    "swin-t": (28_288_354, 0, "timm swin_tiny_patch4_window7_224"),
    "swin-b": (87_768_224, 0, "timm swin_base_patch4_window7_224"),
    "swin-l": (196_532_476, 0, "timm swin_large_patch4_window7_224"),
}


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_count_is_the_architectures_formula(name):
    family, cfg = BUILTIN_MODELS[name]
    assert count(name) == FORMULAS[family.name](cfg)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_count_is_the_published_one(name):
    stated, tolerance, source = PUBLISHED[name]
    assert count(name) == pytest.approx(stated, rel=tolerance, abs=0), source


def test_every_published_size_is_checked():
    sizes = {name for name in BUILTIN_MODELS
             if not name.endswith(("-test", "-tiny")) and not name.startswith(("gpt-",
                                                                                 "switch-base-"))}
    assert sizes <= set(PUBLISHED)
