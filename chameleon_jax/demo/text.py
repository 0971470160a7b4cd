"""Word-level vocabularies and tokenizers for the demo models (Chameleon's id layout in miniature)."""

from __future__ import annotations

from ..vocab import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, SEP_TOKEN, image_code_name

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
IMAGE_SPECIALS = (BOI_TOKEN, EOI_TOKEN, SEP_TOKEN, IMAGE_TOKEN)


def word_vocabulary(num_codes: int, words, vocab_size: int) -> dict[str, int]:
    """<unk> <s> </s> <pad> = 0..3, image codes from id 4 (in order), boi / eoi / sep / <image>,
    then ``words``, then ``tok{i}`` fillers up to ``vocab_size``."""
    vm = {name: i for i, name in enumerate(SPECIALS)}
    for code in range(num_codes):
        vm[image_code_name(code)] = len(vm)
    for name in IMAGE_SPECIALS:
        vm[name] = len(vm)
    for word in words:
        vm.setdefault(word, len(vm))
    if len(vm) > vocab_size:
        raise ValueError(f"vocabulary needs {len(vm)} ids but vocab_size is {vocab_size}")
    for i in range(len(vm), vocab_size):
        vm[f"tok{i}"] = i
    return vm


def word_tokenizer(vm: dict[str, int]):
    """A ``tokenizers`` WordLevel tokenizer over ``vm`` (whitespace-split words, <s> prepended)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=vm, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + IMAGE_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vm["<s>"])])
    return tok
