"""Shared fixtures: tiny, seeded, offline TransformerLens models with a word tokenizer."""

import tempfile
import warnings

import pytest
import torch

TINY_WORDS = (
    "the eiffel tower is located in city of paris rome space needle seattle "
    "colosseum big ben london france italy capital a an and"
).split()
TINY_PROMPT = "The Eiffel Tower is located in the city of"
TINY_SUBJECT = "The Eiffel Tower"


def make_tiny_tokenizer(tmp_dir):
    """A word-level fast tokenizer (GPT-2 style leading-space tokens) with a BOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1, "<pad>": 2}
    for word in TINY_WORDS + [w.capitalize() for w in TINY_WORDS]:
        for piece in (word, "\u0120" + word):
            vocab.setdefault(piece, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<bos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    # TransformerLens reloads the tokenizer by name, so give it a local one.
    tok.save_pretrained(tmp_dir)
    return AutoTokenizer.from_pretrained(tmp_dir)


def tl4():
    """Whether the installed TransformerLens is 4.x (no HookedTransformer)."""
    from lenscope import compat

    return not compat.has_hooked_transformer()


def make_tiny_model(
    tokenizer=None,
    *,
    n_layers=4,
    positional="rotary",
    normalization="LN",
    d_vocab=None,
    seed=0,
    dtype=torch.float32,
    gated=False,
    bridge=None,
    init_range=None,
    n_ctx=32,
):
    """A randomly initialised TransformerLens model small enough for exhaustive checks.

    ``bridge=None`` gives the installed TransformerLens' default class: a
    ``HookedTransformer`` on 3.9, a compatibility-mode ``TransformerBridge`` on
    4.x (see :func:`make_tiny_bridge`). ``gated=True`` gives a Gemma/Llama-like
    layout: gated MLP, grouped-query attention (2 key/value heads), RMSNorm.
    ``init_range`` (the weights' initial std) above the default 0.02 gives
    peaked output distributions, which a lens has something to learn from.
    ``n_ctx`` is the longest prompt (long-prompt figures need more than 32).
    """
    if bridge is None:
        bridge = tl4()
    if bridge:
        return make_tiny_bridge(
            tokenizer,
            n_layers=n_layers,
            d_vocab=d_vocab,
            seed=seed,
            dtype=dtype,
            gated=gated,
            init_range=init_range,
            n_ctx=n_ctx,
        )
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=d_vocab or (len(tokenizer) if tokenizer is not None else 64),
        n_ctx=n_ctx,
        act_fn="silu" if gated else "gelu",
        normalization_type="RMS" if gated else normalization,
        gated_mlp=gated,
        n_key_value_heads=2 if gated else None,
        positional_embedding_type=positional,
        seed=seed,
        default_prepend_bos=True,
        dtype=dtype,
        model_name=f"tiny-{'gated-' if gated else ''}{positional}-{n_layers}l",
        **({} if init_range is None else {"initializer_range": init_range}),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


def make_tiny_bridge(
    tokenizer=None,
    *,
    n_layers=4,
    d_vocab=None,
    seed=0,
    dtype=torch.float32,
    gated=False,
    init_range=None,
    processing=True,
    n_ctx=32,
):
    """A TransformerBridge around a random Hugging Face model, booted without the hub.

    ``gated=False``: GPT-2 (learned absolute positions, LayerNorm, GELU MLP).
    ``gated=True``: Gemma-3 (rotary, RMSNorm, gated MLP, grouped-query attention
    with 2 key/value heads, QK-norm, sliding-window layers of width 4 so that
    a 10-token prompt exercises them). On TransformerLens 4 the bridge is put
    in compatibility mode, as :func:`lenscope.load_model` does; with
    ``processing=False`` without processing the weights (the raw Hugging Face
    residual stream; TransformerLens 3.9's bridge never processes them).
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

    from lenscope import compat
    from lenscope.loading import _compatible

    vocab = d_vocab or (len(tokenizer) if tokenizer is not None else 64)
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 2}
    if init_range is not None:
        special["initializer_range"] = init_range
    if gated:
        config = Gemma3TextConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=n_ctx,
            sliding_window=4,
            **special,
        )
        cls = Gemma3ForCausalLM
    else:
        config = GPT2Config(
            vocab_size=vocab, n_positions=n_ctx, n_embd=32, n_layer=n_layers, n_head=4, **special
        )
        cls = GPT2LMHeadModel
    config.architectures = [cls.__name__]
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf_model = cls(config).to(dtype).eval()
    name = f"tiny-{'gemma3' if gated else 'gpt2'}-{n_layers}l"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Without a tokenizer the bridge would ask the hub for one by name.
        model = compat.bridge_class().boot_transformers(
            name,
            hf_model=hf_model,
            tokenizer=tokenizer or make_tiny_tokenizer(tempfile.mkdtemp()),
            device="cpu",
            dtype=dtype,
        )
        if processing:
            model = _compatible(model)
        elif compat.tl_version() >= (4, 0):
            model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    if tokenizer is None:
        model.tokenizer = None
    model.eval()
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny matmuls on a shared 2-core machine are ~50x
    slower with two competing intra-op threads than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """4-layer rotary model with the word tokenizer (BOS prepended)."""
    return make_tiny_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gated_model(tiny_tokenizer):
    """4-layer gated-MLP, grouped-query-attention, RMSNorm model (Gemma/Llama layout)."""
    return make_tiny_model(tiny_tokenizer, gated=True, seed=3)


@pytest.fixture(scope="session")
def tiny_model_no_tokenizer():
    """4-layer model with learned absolute positions and no tokenizer."""
    return make_tiny_model(None, positional="standard")


@pytest.fixture(scope="session")
def tiny_bridge(tiny_tokenizer):
    """4-layer GPT-2-layout TransformerBridge (either TransformerLens version)."""
    return make_tiny_bridge(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gated_bridge(tiny_tokenizer):
    """4-layer Gemma-3-layout TransformerBridge (either TransformerLens version)."""
    return make_tiny_bridge(tiny_tokenizer, gated=True, seed=3)


@pytest.fixture(scope="session")
def gemma():
    """The real offline Gemma-3-270m in the installed TransformerLens' default class."""
    import lenscope

    return lenscope.load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="session")
def gemma_bridge(request):
    """The real offline Gemma-3-270m as a TransformerBridge (loaded once per session).

    On TransformerLens 4 the default class is the bridge: the same object as ``gemma``.
    """
    if tl4():
        return request.getfixturevalue("gemma")
    import lenscope

    return lenscope.load_model("gemma-3-270m", bridge=True, device="cpu")


def pytest_collection_modifyitems(config, items):
    """Run the model-loading tests first: they (re)build the offline model's cache,
    which every later slow test and notebook then loads instead of converting again."""
    items.sort(key=lambda item: 0 if item.path.name == "test_loading.py" else 1)
