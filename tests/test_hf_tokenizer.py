"""Hugging Face tokenizers (`tokenizer.json`) and chat templates, against
transformers on the same folders: small tokenizers trained here with the
`tokenizers` library (nothing from the hub), with Llama-3-style and
Qwen3-style special tokens and chat templates."""

import json
import shutil
from pathlib import Path

import pytest

from jaxllm.hf_tokenizer import HFTokenizer, render_chat_template

CORPUS = ["Every effort moves you forward, and every step counts.",
          "The quick brown fox jumps over the lazy dog; naïve café, 東京 🚀.",
          "def f(x):\n    return x * 2  # tabs\tand spaces", "Hello, world! It's 3.14 o'clock."] * 3
TEXTS = ["Hello, world", "", " leading and trailing spaces  ", "naïve café — 東京 🚀 end\n\n",
         "a <|eot_id|> b <|im_end|> c <|endoftext|>", "unseen words: zebra xylophone"]

# A Llama-3.2-style template: the bos token, a dated system header, trimmed turns.
LLAMA_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception("after the system message, roles are user and assistant") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# A Qwen3-style template: ChatML turns, a namespace, reasoning kept after the
# last question only, tool output as JSON, enable_thinking.
QWEN_TEMPLATE = """{%- set ns = namespace(last_query_index=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_query_index = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('the system message comes first') }}
        {%- endif %}
        {{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content | tojson + '\\n</tool_response><|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and reasoning %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

CHATS = [
    [{"role": "user", "content": "Name three colors."}],
    [{"role": "system", "content": "  You answer briefly.  "},
     {"role": "user", "content": "What is 東京?"},
     {"role": "assistant", "content": "A city."},
     {"role": "user", "content": "And <|eot_id|> <|im_end|>?"}],
]
QWEN_CHATS = CHATS + [
    [{"role": "user", "content": "Think first."},
     {"role": "assistant", "content": "<think>\nsteps\n</think>\n\nDone."},
     {"role": "tool", "content": {"temp": "20°C", "html": "<b>"}},
     {"role": "assistant", "content": "Warm.", "reasoning_content": "it said 20"}],
]


def _byte_level_bpe(specials, bos=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:  # Llama 3 prepends its bos token to every encoded text
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _save(folder, tok, config, generation=None):
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(ours, transformers') for a Llama-3-style, a Qwen3-style and a WordLevel folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hf_tokenizers")
    llama_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                      "<|end_header_id|>", "<|eot_id|>"]
    llama = _byte_level_bpe(llama_specials, bos="<|begin_of_text|>")
    eot = llama.token_to_id("<|eot_id|>")
    llama_dir = _save(root / "llama", llama,
                      {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                       "chat_template": LLAMA_TEMPLATE},
                      {"bos_token_id": 0, "eos_token_id": [1, eot]})
    qwen = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    qwen_dir = _save(root / "qwen", qwen, {"eos_token": "<|im_end|>",
                                           "pad_token": "<|endoftext|>",
                                           "chat_template": QWEN_TEMPLATE})
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(CORPUS, trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "[EOS]"], show_progress=False))
    words_dir = _save(root / "words", words, {"eos_token": "[EOS]", "unk_token": "[UNK]"})
    return {name: (HFTokenizer(d), AutoTokenizer.from_pretrained(d))
            for name, d in (("llama", llama_dir), ("qwen", qwen_dir), ("words", words_dir))}


@pytest.mark.parametrize("name", ["llama", "qwen", "words"])
def test_encode_decode_as_transformers(folders, name):
    ours, theirs = folders[name]
    for text in TEXTS:
        assert ours.encode_prompt(text) == (theirs.encode(text) or [ours.eot_id]), text
        assert ours.encode(text, allow_eot=True) == theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False,
                                                  split_special_tokens=True)
        ids = ours.encode_prompt(text)
        assert ours.decode(ids) == theirs.decode(ids)
    assert ours.vocab_size == len(theirs)


def test_special_tokens_and_stops(folders):
    llama, theirs = folders["llama"]
    assert llama.bos_id == theirs.bos_token_id == 0
    assert llama.eot_id == theirs.eos_token_id == theirs.convert_tokens_to_ids("<|eot_id|>")
    assert llama.stop_ids == (llama.eot_id, 1)  # eos_token, then generation_config's others
    assert llama.encode_prompt("Hi")[0] == llama.bos_id
    qwen, theirs = folders["qwen"]
    assert qwen.bos_id is None and qwen.stop_ids == (theirs.convert_tokens_to_ids("<|im_end|>"),)
    # a user's text that spells a special token stays text unless asked
    assert qwen.eot_id not in qwen.encode("x <|im_end|>")
    assert qwen.eot_id in qwen.encode("x <|im_end|>", allow_eot=True)


@pytest.mark.parametrize("name", ["llama", "qwen", "words"])
def test_streamed_bytes_spell_the_text(folders, name):
    ours, _ = folders[name]
    for text in TEXTS:
        ids = ours.encode(text, allow_eot=True)
        streamed = b"".join(ours.decode_bytes([i]) for i in ids)
        if name == "words":  # a word-level vocabulary spells words, not bytes
            assert streamed.decode() == "".join(ours.decode([i]) for i in ids)
        else:
            assert streamed.decode("utf-8") == ours.decode(ids)


@pytest.mark.parametrize("name,chats", [("llama", CHATS), ("qwen", QWEN_CHATS)])
def test_chat_template_as_transformers(folders, name, chats):
    ours, theirs = folders[name]
    for chat in chats:
        for gen in (True, False):
            text = theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours.render_chat(chat, add_generation_prompt=gen) == text
            ids = theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True,
                                             return_dict=False)
            assert ours.encode_chat(chat, add_generation_prompt=gen) == ids
    chat = CHATS[0]
    if name == "llama":  # a pinned date, as transformers passes keyword arguments
        kw = {"date_string": "01 Jan 2030"}
        assert "01 Jan 2030" in ours.render_chat(chat, **kw)
    else:
        kw = {"enable_thinking": False}
        assert ours.render_chat(chat, **kw).endswith("<think>\n\n</think>\n\n")
    assert ours.encode_chat(chat, **kw) == theirs.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False, **kw)


def test_template_errors_are_sentences(folders):
    llama, _ = folders["llama"]
    with pytest.raises(ValueError, match="roles are user and assistant"):
        llama.render_chat([{"role": "system", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(ValueError, match="at least one message"):
        llama.render_chat([])
    with pytest.raises(ValueError, match="'role'"):
        llama.render_chat([{"content": "no role"}])
    words, _ = folders["words"]
    with pytest.raises(ValueError, match="has no chat template"):
        words.render_chat(CHATS[0])
    with pytest.raises(Exception, match="underscore"):
        render_chat_template("{% set ns = namespace(_x=1) %}", CHATS[0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        words.decode([10**6])


def test_chat_template_jinja_file_and_bad_folders(folders, tmp_path):
    qwen, _ = folders["qwen"]
    src = tmp_path / "q"
    src.mkdir()
    shutil.copy(Path(qwen.directory) / "tokenizer.json", src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (src / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert HFTokenizer(src).render_chat(CHATS[0]) == "Name three colors.!"
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="'<|nope|>' is not a token"):
        HFTokenizer(src)
    (src / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="names no end-of-text token"):
        HFTokenizer(src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        HFTokenizer(src)
    (src / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizers library"):
        HFTokenizer(src)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(tmp_path / "nowhere")
