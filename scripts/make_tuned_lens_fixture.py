"""Write tests/data/tuned_lens_package/: lenses saved and decoded by the tuned-lens package itself.

Run with a Python that has the ``tuned-lens`` package (0.2.0 was used:
``python -m venv v && v/bin/pip install tuned-lens torch``); lenscope's tests
then check, without that package, that ``lenscope.TunedLens.load`` reads its
files and decodes the same logits. For each of two tiny random Hugging Face
models (GPT-2: LayerNorm; Llama: RMSNorm; tuned-lens 0.2.0 does not know
Gemma-3) it saves the model
(``save_pretrained``), a ``tuned_lens.TunedLens`` with random translators
(``lens.save``), a prompt's token ids and the logits ``lens(hidden_states[i], i)``
of every layer ``i``.
"""

import sys
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from tuned_lens.nn.lenses import TunedLens

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/tuned_lens_package")
VOCAB = 64
special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 2, "initializer_range": 0.3}
configs = {
    "gpt2": (
        GPT2LMHeadModel,
        GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=4, n_head=4, **special),
    ),
    "llama": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            **special,
        ),
    ),
}
for name, (cls, config) in configs.items():
    config.architectures = [cls.__name__]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).eval()
    lens = TunedLens.from_model(model)
    with torch.no_grad():
        for translator in lens.layer_translators:
            translator.weight.normal_(0, 0.05)
            translator.bias.normal_(0, 0.2)
    folder = OUT / name
    model.save_pretrained(folder / "model")
    lens.save(folder / "lens")
    tokens = torch.tensor([[0, 5, 9, 13, 22, 31, 40, 7, 3, 11]])
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
        logits = torch.stack([lens(hidden[i], i)[0] for i in range(len(lens))])
    torch.save(
        {"tokens": tokens, "logits": logits, "tuned_lens": version("tuned-lens")},
        folder / "expected.pt",
    )
    print(name, tuple(logits.shape), "tuned-lens", version("tuned-lens"))
