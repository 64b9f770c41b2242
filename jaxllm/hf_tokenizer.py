"""A model family's own tokenizer: a Hugging Face folder's `tokenizer.json`
(the `tokenizers` library), its chat template and its end-of-turn ids, behind
the interface of `jaxllm.tokenizer`.

The folder's files, as transformers reads them:
- `tokenizer.json`: the model (BPE, WordLevel, ...), normalizer, pre-tokenizer,
  post-processor (Llama 3's `<|begin_of_text|>`) and the added special tokens;
- `tokenizer_config.json`: the named special tokens (`bos_token`, `eos_token`,
  ...) and the `chat_template` (or a `chat_template.jinja` file beside it);
- `generation_config.json`: `eos_token_id`, one id or several (Llama 3 Instruct
  stops on `<|end_of_text|>`, `<|eom_id|>` and `<|eot_id|>`).

The chat template is rendered as transformers renders it: a sandboxed jinja2
environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, the `raise_exception`, `strftime_now`, `dict` and `namespace`
globals, a `tojson` that leaves non-ASCII and HTML characters as they are, and
the named special tokens as variables. Its text is tokenized with the special
tokens it spells, and without the post-processor's additions, as
`apply_chat_template(..., tokenize=True)` does.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


def _read_json(path: Path) -> dict:
    """A JSON object file, {} when absent; a damaged one is named."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} cannot be read as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an
    AddedToken dict with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict) -> str | None:
    """The folder's default chat template: `chat_template.jinja`, else
    tokenizer_config.json's `chat_template` (a string, or a list of named
    templates of which transformers takes "default")."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def has_chat_template(folder: str | os.PathLike) -> bool:
    """Whether a Hugging Face folder carries a chat template."""
    folder = Path(folder)
    try:
        return _chat_template(folder, _read_json(folder / "tokenizer_config.json")) is not None
    except ValueError:
        return False


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=8)
def _compile(template: str):
    """A chat template compiled in transformers' sandboxed environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks the
        assistant's tokens with it): here the block renders as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace, refusing underscore names as transformers does."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = Namespace
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], *,
                         add_generation_prompt: bool = True, special_tokens: dict | None = None,
                         **kwargs) -> str:
    """The text of `messages` (dicts with "role" and "content") in `template`,
    ending with the assistant's header when `add_generation_prompt`; `kwargs`
    reach the template too (Qwen3's `enable_thinking`)."""
    import jinja2

    if not messages:
        raise ValueError("a chat needs at least one message")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"a chat message is a dict with a 'role' and its 'content', "
                             f"not {m!r}")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return _compile(template).render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**(special_tokens or {}), **kwargs})
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"the chat template refused the conversation: {err}") from None


class HFTokenizer:
    """A Hugging Face folder's `tokenizer.json`, with its chat template and stops."""

    name = "hf"

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer

        folder = Path(directory)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a family's tokenizer is read from its "
                                    f"tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the library's parse errors, one type for all
            raise ValueError(f"{path} cannot be read by the tokenizers library: "
                             f"{str(err)[:160]}") from None
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        self.directory = str(folder.resolve())
        self.chat_template = _chat_template(folder, config)
        self.special_tokens = {k: t for k in SPECIAL_TOKENS
                               if (t := _token_text(config.get(k))) is not None}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        spec = json.loads(self._tok.to_str())
        decoders = (spec.get("decoder") or {})
        decoders = decoders.get("decoders", [decoders])
        self._byte_level = any((d or {}).get("type") == "ByteLevel" for d in decoders)
        self._clean_up = (bool(config.get("clean_up_tokenization_spaces", False))
                          and (spec.get("model") or {}).get("type") != "BPE")

        def token_id(what: str, text: str) -> int:
            i = self._tok.token_to_id(text)
            if i is None:
                raise ValueError(f"{folder / 'tokenizer_config.json'}: its {what} {text!r} is "
                                 f"not a token of {path.name}")
            return i

        eos = self.special_tokens.get("eos_token")
        stops = [token_id("eos_token", eos)] if eos is not None else []
        gen_eos = generation.get("eos_token_id")
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(i, int) and not isinstance(i, bool):
                if not 0 <= i < self.vocab_size:
                    raise ValueError(f"{folder / 'generation_config.json'}: eos_token_id {i} is "
                                     f"outside the vocabulary [0, {self.vocab_size})")
                stops.append(i)
        if not stops:
            raise ValueError(f"{folder} names no end-of-text token: neither an eos_token in "
                             f"tokenizer_config.json nor an eos_token_id in "
                             f"generation_config.json")
        self.stop_ids = tuple(dict.fromkeys(stops))
        self.eot_id = self.stop_ids[0]
        bos = self.special_tokens.get("bos_token")
        self.bos_id = token_id("bos_token", bos) if bos is not None else None

    def encode(self, text: str, *, allow_eot: bool = False) -> list[int]:
        """The text's ids; the special tokens it spells become their ids only
        with `allow_eot` (else they are text, like any user's words)."""
        self._tok.encode_special_tokens = not allow_eot
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as transformers' `tokenizer(text)` gives it: the family's
        beginning-of-text token added (Llama 3); end-of-text alone if that
        leaves nothing."""
        return self._tok.encode(text, add_special_tokens=True).ids or [self.eot_id]

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.directory} "
                             f"[0, {self.vocab_size})")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        text = self._tok.decode(self._check_ids(ids), skip_special_tokens=False)
        if self._clean_up:  # transformers' clean-up, which it leaves out for BPE
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                         (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for, so that a stream of tokens can end in the
        middle of a character: exact for byte-level BPE (GPT-2, Llama 3, Qwen3),
        whose tokens spell bytes; otherwise the decoded text's UTF-8."""
        ids = self._check_ids(ids)
        if not self._byte_level:
            return self.decode(ids).encode("utf-8")
        table = _unicode_to_byte()
        out = bytearray()
        for i in ids:
            for ch in self._tok.id_to_token(i) or "":
                b = table.get(ch)
                out.extend(bytes([b]) if b is not None else ch.encode("utf-8"))
        return bytes(out)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    **kwargs) -> str:
        """The conversation as the folder's chat template writes it."""
        if self.chat_template is None:
            raise ValueError(f"{self.directory} has no chat template (tokenizer_config.json's "
                             f"chat_template, or chat_template.jinja)")
        return render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, **kwargs)

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    **kwargs) -> list[int]:
        """The conversation's ids, as `apply_chat_template(..., tokenize=True)`."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                            **kwargs), allow_eot=True)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE's alphabet: each byte written as one printable character
    (GPT-2's `bytes_to_unicode`), inverted."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars
