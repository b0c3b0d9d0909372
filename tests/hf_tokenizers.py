"""Tokenizers for the tokenizer and conversion tests: a sentencepiece model as `phijax tokenizer
train` makes it, a small phi-4-like Hugging Face tokenizer (a tiktoken-style byte-level BPE in a
tokenizer.json, phi-4's specials and chat template in tokenizer_config.json), and the texts both
must encode alike everywhere."""
import json
from pathlib import Path

from phijax.data.corpus import documents
from phijax.data.tokenizer import train_tokenizer

# ASCII, Unicode (accents, combining marks, emoji, CJK, a ligature), digits, whitespace runs,
# code and the chat specials
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "déjà vu — naïve café 🙂 中文字 ﬁ Ω e\u0301 \u00a0nbsp \u200bzero-width",
    "3.14159 + 2,718 = 5.85987; 1234567890 0x1F 1e-9",
    "  two  spaces,\ttab\t\tand\n\n\nnewlines   trailing   ",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # square\n\nclass A(B):\n\tpass\n",
    "<|im_start|>user<|im_sep|>Hi there<|im_end|><|im_start|>assistant<|im_sep|>Hello!"
    "<|im_end|><|endoftext|>",
    "", " ", "\n", "<|im_end|>", "x<|im_sep|>y",
]

# phi-4's chat template, as its tokenizer_config.json has it
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")
PHI4_SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                 "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_0|>"]
# cl100k's pre-tokenizer pattern, which phi-4's tokenizer.json splits with
CL100K = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4, déjà."}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6 🙂"}]


def train_texts() -> list[str]:
    return list(documents(["builtin:python-docs"])) + TEXTS


def sentencepiece_model(out: Path, vocab_size: int = 600) -> Path:
    return train_tokenizer(train_texts(), Path(out) / "sp", vocab_size=vocab_size)


def phi4_like(out: Path, vocab_size: int = 400, template: str = PHI4_CHAT_TEMPLATE,
              config: dict | None = None) -> Path:
    """A directory holding a byte-level BPE tokenizer.json of `vocab_size` learned tokens and
    phi-4's specials after them, and a tokenizer_config.json like phi-4's."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(train_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in PHI4_SPECIALS])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}
             for s in PHI4_SPECIALS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|dummy_0|>",
        "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
        "model_max_length": 16384, "chat_template": template, **(config or {})}, indent=2))
    return out
