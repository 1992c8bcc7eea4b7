"""Text from streamed tokens: the pieces add up to one decode of all tokens, and stop strings are caught across
token boundaries without a stream ever showing part of one."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st

from shiftlib.serve.detokenize import Detokenizer, StopStrings, TextStream, decoder

SETTINGS = settings(max_examples=60, deadline=None)
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, héllo wörld ☃ 😀 €uro ab xyz"] * 3


@functools.lru_cache(maxsize=None)
def tok():
    """A byte-level BPE tokenizer over all 256 bytes (Llama-3, Qwen, GPT style): its merges split multi-byte
    characters across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=330, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


@functools.lru_cache(maxsize=None)
def sentencepiece_tok():
    """A SentencePiece-style tokenizer (``▁`` for spaces, the first one dropped when decoding)."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world, héllo wörld ☃"],
                           vocab_size=120, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp)


def chunks(draw, tokens: list[int]) -> list[list[int]]:
    """``tokens`` cut into steps of 1-3 tokens (speculative steps bring several)."""
    out, i = [], 0
    while i < len(tokens):
        n = draw(st.integers(1, 3))
        out.append(tokens[i : i + n])
        i += n
    return out


def stream(decode, prompt, steps, stops=(), min_tokens=0) -> list[str]:
    text = TextStream(decode, prompt, list(stops), min_tokens)
    pieces = []
    for step in steps:
        pieces.append(text.add(step))
        if text.stopped:
            return pieces
    return pieces + [text.finish()]


texts = st.text(st.sampled_from("ab xyz.,éö☃€😀\n"), min_size=1, max_size=40)


@SETTINGS
@given(st.data(), texts, texts)
def test_streamed_pieces_add_up_to_the_decoded_text(data, prompt_text, text):
    t = tok()
    tokens = t.encode(text, add_special_tokens=False)
    got = stream(decoder(t), t.encode(prompt_text, add_special_tokens=False), chunks(data.draw, tokens))
    assert "".join(got) == t.decode(tokens, skip_special_tokens=True)
    if "\ufffd" not in text:  # a multi-byte character split over tokens is never shown half
        assert all("\ufffd" not in p for p in got)


@SETTINGS
@given(st.data(), st.lists(st.integers(0, 319), min_size=1, max_size=30))
def test_any_token_sequence_streams_to_its_decode(data, tokens):
    """Random ids (bytes that need not form UTF-8, special tokens): the pieces still add up."""
    t = tok()
    got = stream(decoder(t), [0], chunks(data.draw, tokens))
    assert "".join(got) == t.decode(tokens, skip_special_tokens=True)


@SETTINGS
@given(st.data(), st.text(st.sampled_from("abc xyz"), min_size=1, max_size=30))
def test_sentencepiece_text_keeps_the_space_before_the_first_new_word(data, text):
    t = sentencepiece_tok()
    prompt = t.encode("the quick", add_special_tokens=False)
    tokens = t.encode(text, add_special_tokens=False)
    got = stream(decoder(t), prompt, chunks(data.draw, tokens))
    whole = t.decode(prompt + tokens)
    assert "".join(got) == whole[len(t.decode(prompt)):]


@SETTINGS
@given(st.data(), texts)
def test_a_stop_string_across_tokens_ends_the_text_before_it(data, text):
    t = tok()
    tokens = t.encode(text, add_special_tokens=False)
    full = t.decode(tokens)
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start : start + data.draw(st.integers(1, 6))]
    decoy = data.draw(st.text(st.sampled_from("abxé"), min_size=1, max_size=4))
    got = stream(decoder(t), [0], chunks(data.draw, tokens), [decoy, stop])
    cut = min((full.find(s) + len(s), full.find(s)) for s in (stop, decoy) if s in full)[1]  # complete first
    assert "".join(got) == full[:cut]


@SETTINGS
@given(st.lists(st.text(st.sampled_from("ab"), max_size=4)), st.lists(st.text(st.sampled_from("ab"), min_size=1,
                                                                                 max_size=3), min_size=1, max_size=3))
def test_no_piece_shows_text_that_later_turns_out_to_be_a_stop_string(pieces, stops):
    """Fed piece by piece, the shown text is always a prefix of the final answer: held text may still become
    a stop string, shown text never is part of one."""
    full = "".join(pieces)
    hits = [(full.find(s) + len(s), full.find(s)) for s in stops if s in full]
    want = full[: min(hits)[1]] if hits else full
    s, shown = StopStrings(stops), ""
    for p in pieces:
        shown += s.feed(p)
        assert want.startswith(shown)
    assert shown + s.flush() == want


def test_stop_strings_are_looked_for_only_in_text_after_min_tokens():
    t = tok()
    tokens = t.encode("ab ab ab", add_special_tokens=False)
    steps = [[x] for x in tokens]
    assert "".join(stream(decoder(t), [0], steps, ["ab"])) == ""
    assert "".join(stream(decoder(t), [0], steps, ["ab"], min_tokens=len(tokens) + 1)) == "ab ab ab"


def test_the_windowed_decode_uses_the_prompt_for_context():
    t = tok()
    d = Detokenizer(decoder(t), t.encode("Hello", add_special_tokens=False))
    assert d.add(t.encode(" world", add_special_tokens=False)) + d.flush() == " world"
