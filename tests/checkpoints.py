"""A tiny DeepSeek-V4 checkpoint with a real tokenizer, written for the text tests: random
weights in DeepSeek's quantized layout (:func:`dsv4rs.reference.export.export_deepseek`), a
byte-level BPE trained with ``tokenizers`` on a small text (so multi-byte characters span
tokens), and a tokenizer_config.json with special tokens and a DeepSeek-style chat template."""

from __future__ import annotations

import json
import os

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
THINK_END = "</think>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if not loop.first %}{{ raise_exception('the system message must come first') }}{% endif %}"
    "{{ message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}"
    "{%- if not thinking is defined or not thinking %}{{ '</think>' }}{% endif %}{% endif %}"
)

TEXT = """DeepSeek-V4 compresses the key-value cache: every four tokens become one entry in the
compressed sparse attention layers, and every hundred and twenty-eight tokens one entry in the
heavily compressed layers. The lightning indexer picks the entries each query attends to.
Café, naïve, façade, jalapeño; 東京 and 北京 are cities; emoji: 🙂 🚀 ✨. Numbers 0123456789.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine.
"""


def train_tokenizer(path: str, vocab_size: int = 360) -> int:
    """Writes tokenizer.json and tokenizer_config.json into ``path``; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, USER, ASSISTANT, "<think>", THINK_END]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))]),
    ])
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
              "bos_token": {"__type": "AddedToken", "content": BOS, "special": True},
              "eos_token": {"__type": "AddedToken", "content": EOS, "special": True},
              "model_max_length": 4096, "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return tok.get_vocab_size()


def write_hf(model, path, tensors: dict | None = None) -> dict:
    """``model`` as one shard under transformers' names (expert tensors stacked ``[E, ...]``),
    plus its config.json; ``tensors`` (default: the model's) are what the shard holds. Returns
    them."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    if tensors is None:
        tensors = {k: v.detach().contiguous() for k, v in model.checkpoint_tensors().items()}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf_dict() | {"model_type": "deepseek_v4"}, f)
    return tensors


def write_checkpoint(path: str, seed: int = 3, mtp: bool = True, **overrides) -> None:
    """A tiny random V4 (its vocabulary the tokenizer's) with tokenizer files, in ``path``."""
    from dsv4rs.model import DeepseekV4, V4Config, init_random
    from dsv4rs.reference.export import export_deepseek

    os.makedirs(path, exist_ok=True)
    vocab = train_tokenizer(path)
    cfg = V4Config.tiny(vocab_size=vocab, num_nextn_predict_layers=1 if mtp else 0, **overrides)
    export_deepseek(init_random(DeepseekV4(cfg), seed=seed), path, progress=False)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["eos_token_id"] = 1  # the tokenizer's EOS (special tokens come first)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
