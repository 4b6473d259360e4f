"""The model presets: tiny is what every test runs on; 1b and 8b have the shapes
their names promise (checked on the config, without writing gigabytes)."""

from mlx_serving_runtime import tinymodel


def _params(cfg: dict) -> int:
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter
    return layers * per_layer + cfg["vocab_size"] * h


def test_presets_have_their_sizes() -> None:
    tok = tinymodel.build_tokenizer()
    tiny = tinymodel.preset_config("tiny", tok)
    assert tiny["hidden_size"] == 64 and tiny["torch_dtype"] == "float32"
    one = tinymodel.preset_config("1b", tok)
    eight = tinymodel.preset_config("8b", tok)
    assert 0.8e9 < _params(one) < 1.3e9, _params(one)
    assert 6.5e9 < _params(eight) < 8.5e9, _params(eight)
    for cfg in (one, eight):
        assert cfg["torch_dtype"] == "bfloat16"
        assert cfg["eos_token_id"] == tiny["eos_token_id"] and cfg["vocab_size"] == tiny["vocab_size"]
