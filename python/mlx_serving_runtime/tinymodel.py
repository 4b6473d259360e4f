"""Write a tiny llama model for tests: fixed-seed random weights and a trained tokenizer.

Usage: python -m mlx_serving_runtime.tinymodel OUT_DIR [--preset tiny|1b|8b]

The tiny preset (the default) is what tests run on. The 1b and 8b presets write random
bf16 weights of the shapes of 1B- and 8B-class llama models (hidden 2048 × 16 layers,
hidden 4096 × 32 layers) with the same tokenizer, for benchmarks on real hardware
without a model hub: their speed is a real model's of that size, their text is noise.
The output loads with mlx_lm.load(OUT_DIR) like any hub model. Everything is generated
offline and deterministically, so two runs write byte-identical weights and vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Without tools and tool calls this renders exactly as it always has (tests count its
# tokens); tools add a Hermes/Qwen-style system block, and an assistant message's
# tool_calls render in the <tool_call> form the runtime's tool grammar forces.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\n# Tools\n\nYou may call functions. Their signatures:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Write each call as <tool_call>\n{\"name\": <name>, \"arguments\": <arguments object>}\n"
    "</tool_call><|end|>\n{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% for call in message.tool_calls or [] %}{% set f = call.function %}"
    "<tool_call>\n{\"name\": {{ f.name | tojson }}, \"arguments\": "
    "{% if f.arguments is string %}{{ f.arguments }}{% else %}{{ f.arguments | tojson }}{% endif %}}"
    "\n</tool_call>{% endfor %}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text: plain English plus JSON shapes, so structured output has useful tokens.
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny model used to test the serving runtime.",
    "Workers pull jobs from the queue and stream tokens back to the caller.",
    "Once upon a time there was a small language model that liked numbers.",
    "The answer is 42, and the question is still unknown.",
    "<|system|>\nYou are helpful.<|end|>\n<|user|>\nHi there!<|end|>\n<|assistant|>\n",
    '{"name": "Alice", "age": 30, "tags": ["a", "b"], "ok": true}',
    '{"color": "red", "size": 3, "items": [1, 2, 3], "valid": false, "note": null}',
    '{"id": 7, "kind": "cat", "values": [0.5, 1.25], "nested": {"x": -1}}',
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "!?.,;:'\"()[]{}<>-_+=*/\\|@#$%^&~` \t\n",
]


def build_tokenizer(vocab_size: int = 448):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([s for _ in range(20) for s in _SENTENCES], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=2048
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# Shapes per preset; everything else (tokenizer, specials, template) is shared.
PRESETS: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "dtype": "float32"},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
           "num_attention_heads": 32, "num_key_value_heads": 8, "dtype": "bfloat16"},
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_key_value_heads": 8, "dtype": "bfloat16"},
}


def preset_config(preset: str, tokenizer) -> dict:
    """The config.json of a preset, given the tokenizer it ships with."""
    shape = dict(PRESETS[preset])
    dtype = shape.pop("dtype")
    return {
        "model_type": "llama",
        **shape,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 2048 if preset == "tiny" else 8192,
        "rope_theta": 10000.0 if preset == "tiny" else 500000.0,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS),
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD),
        "torch_dtype": dtype,
    }


def write(out_dir: Path, seed: int = 1234, preset: str = "tiny") -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = preset_config(preset, tokenizer)
    dtype = mx.float32 if config["torch_dtype"] == "float32" else mx.bfloat16
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    # Tied embeddings make the logit of a token its embedding's dot product with the
    # hidden state. Zeroing the rows of EOS and the other specials puts their logit at 0,
    # below the top random logits: greedy decoding never ends on EOS and sampling at
    # temperature 1 picks it about once in 700 tokens, so tests reach max_tokens, while
    # a grammar mask that allows only EOS still selects it.
    emb = model.model.embed_tokens.weight
    special = [config["bos_token_id"], eos_id, config["pad_token_id"]]
    mask = mx.ones((vocab_size, 1), dtype=dtype)
    mask[mx.array(special)] = 0.0
    model.model.embed_tokens.weight = emb * mask
    mx.eval(model.parameters())
    save_model(out_dir, model)
    save_config(config, out_dir / "config.json")
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}) + "\n")
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return {"path": str(out_dir), "vocab_size": vocab_size, "eos_token_id": eos_id, "weight_bytes": nbytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="tiny (tests), 1b or 8b (random bf16 weights of those shapes, for benchmarks)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    info = write(args.out_dir, args.seed, args.preset)
    info["preset"] = args.preset
    info["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(info), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
