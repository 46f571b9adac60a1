"""A checkpoint's tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, and the chat
template of ``tokenizer_config.json`` (or ``chat_template.jinja``) rendered with jinja2 the way
transformers' ``apply_chat_template`` renders it.

Why not transformers' tokenizer itself: it pulls in transformers (and its hub client) for what is
a JSON file and a template; ``tokenizers`` is the same Rust tokenizer transformers' fast
tokenizers wrap, and jinja2 is what transformers renders templates with. The semantics kept:
a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks`` and the ``loopcontrols``
extension; ``raise_exception(message)`` and ``strftime_now(format)`` as globals; ``tojson``
without HTML escaping (``ensure_ascii=False``); the special tokens (``bos_token``,
``eos_token``, ...) as strings beside ``messages``, ``tools``, ``add_generation_prompt`` and any
extra keyword; the rendered text encoded without adding special tokens (the template writes
them). A prompt given as text is encoded with them (``add_bos_token`` as the config says).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or ``{"content": ...}``."""
    if isinstance(token, Mapping):
        return token.get("content")
    return token if isinstance(token, str) else None


class ChatTemplateError(ValueError):
    """A chat template that fails to render (its ``raise_exception``, or a jinja2 error)."""


class Tokenizer:
    """Encodes and decodes text for one checkpoint and renders its chat template.

    Args:
        path: a folder with ``tokenizer.json`` and, optionally, ``tokenizer_config.json`` (special
            tokens, ``add_bos_token``/``add_eos_token``, ``chat_template``) and
            ``chat_template.jinja`` (preferred over the config's template, as transformers does).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from tokenizers import Tokenizer as _Tok

        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"tokenizer: no tokenizer.json in {path}")
        self._tok = _Tok.from_file(file)
        cfg: dict[str, Any] = {}
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(config_file):
            with open(config_file, encoding="utf-8") as f:
                cfg = json.load(f)
        self.special_tokens = {n: t for n in SPECIAL_NAMES if (t := _content(cfg.get(n))) is not None}
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.add_eos = bool(cfg.get("add_eos_token", False))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        self.chat_template: str | None = template
        self._compiled = None

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        """The id of a token's text (``None`` for ``None`` or a text that is no token)."""
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence token's id, if the tokenizer config names one."""
        return self.token_id(self.special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence token's id, if the tokenizer config names one."""
        return self.token_id(self.special_tokens.get("eos_token"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the tokenizer's post-processor runs
        and BOS/EOS are added where the config asks and the post-processor did not."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        if not isinstance(add_special_tokens, bool):
            raise ValueError(f"add_special_tokens: expected True or False, got {add_special_tokens!r}")
        ids = list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        if add_special_tokens:
            bos, eos = self.bos_token_id, self.eos_token_id
            if self.add_bos and bos is not None and ids[:1] != [bos]:
                ids.insert(0, bos)
            if self.add_eos and eos is not None and ids[-1:] != [eos]:
                ids.append(eos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids (ints or a 1-d integer tensor; ids past the vocabulary decode to
        nothing, as the tokenizers library does)."""
        from dsv4rs.cache import int_ids

        vals = int_ids("ids", ids)
        vals = vals.tolist() if not isinstance(vals, list) else vals
        if vals and (min(vals) < 0 or max(vals) >= 1 << 32):
            raise ValueError(f"ids: token ids must lie in [0, 2^32), got {min(vals)}..{max(vals)}")
        if not isinstance(skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens: expected True or False, got {skip_special_tokens!r}")
        return self._tok.decode(vals, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
                            **kwargs: Any) -> str | list[int]:
        """The conversation rendered by the chat template (text, or with ``tokenize`` its ids,
        encoded without adding special tokens); ``kwargs`` reach the template (e.g. a thinking
        switch)."""
        if self.chat_template is None:
            raise ChatTemplateError("chat_template: the checkpoint's tokenizer_config.json has none")
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise ChatTemplateError(f"messages: expected a sequence of {{'role', 'content'}} mappings, got "
                                    f"{type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise ChatTemplateError(f"messages[{i}]: expected a mapping with a string 'role'")
        import jinja2

        if self._compiled is None:
            self._compiled = _environment().from_string(self.chat_template)
        context = {**self.special_tokens, **kwargs}
        try:
            text = self._compiled.render(messages=[dict(m) for m in messages], tools=tools,
                                         add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat_template: {e}") from None
        except Exception as e:  # noqa: BLE001  (the template is the checkpoint's code: e.g. str + int on a message)
            raise ChatTemplateError(f"chat_template: {type(e).__name__}: {e} (rendering the messages)") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _environment():
    """The jinja2 environment transformers renders chat templates in (see the module docstring)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
