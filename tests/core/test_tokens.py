import pytest

from comfyui_personalize.attention.tokens import Token, embedding_names, parse_words, split_words, word_positions


def prompt_tokens():
    # "a photo of a sks-dog in (teddybear:1.2) , embedding:myemb" as the host lays it out: start token,
    # BPE pieces, a 2-vector embedding, end + padding; segment ids from the host's word ids
    pieces = [(None, 0), ("a</w>", 1), ("photo</w>", 1), ("of</w>", 1), ("a</w>", 1), ("sks</w>", 1), ("-</w>", 1),
              ("dog</w>", 1), ("in</w>", 1), ("teddy", 2), ("bear</w>", 2), (",</w>", 3),
              ("embedding:myemb", 4), ("embedding:myemb", 4), (None, 0), (None, 0)]
    return [Token(p, s) for p, s in pieces]


def test_words_rebuilt_from_pieces():
    words = split_words(prompt_tokens())
    assert [(w.text, w.positions) for w in words] == [
        ("a", (1,)), ("photo", (2,)), ("of", (3,)), ("a", (4,)), ("sks", (5,)), ("dog", (7,)), ("in", (8,)),
        ("teddybear", (9, 10)), ("embedding:myemb", (12, 13))]


def test_phrase_and_each_kind_of_word():
    toks = prompt_tokens()
    assert word_positions(toks, ["teddybear"]) == [(9, 10)]
    assert word_positions(toks, ["a"]) == [(1, 4)]
    assert word_positions(toks, ["embedding:myemb"]) == [(12, 13)]
    assert word_positions(toks, ["myemb"]) == [(12, 13)]
    assert word_positions(toks, ["photo of"]) == [(2, 3)]
    assert word_positions(toks, ["Dog,"]) == [(7,)]


def test_missing_word_lists_the_prompt_words():
    with pytest.raises(ValueError, match="'cat' is not a word of the prompt.*photo, of, sks, dog"):
        word_positions(prompt_tokens(), ["cat"])


def test_embedding_names_and_word_list_parsing():
    assert embedding_names("a photo of embedding:foo, (embedding:bar.pt:1.2) embedding:baz") == ["foo", "bar.pt", "baz"]
    assert parse_words(" dog, teddy bear ,,") == ["dog", "teddy bear"]
    with pytest.raises(ValueError, match="no words given"):
        parse_words(" , ")
