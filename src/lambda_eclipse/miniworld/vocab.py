"""Label vocabularies, caption templates and the word-level CLIP tokenizer of the miniature world.

Every word a caption can contain is listed here, so the tokenizer built by :func:`build_word_tokenizer`
maps each one to exactly one token (a subject noun like "paper plane" is two tokens, one per word).
"""

from __future__ import annotations

from transformers import CLIPTokenizer

SHAPES: tuple[str, ...] = ("ball", "box", "ring", "cross", "star", "heart", "cone", "paper plane")
"""Object categories; the name is also the subject noun as it appears in captions."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "purple": (135, 45, 185),
    "pink": (245, 115, 185),
    "black": (25, 25, 25),
}
"""Object colours (saturated, so they stand out from the muted backgrounds)."""

TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
SIZES: tuple[str, ...] = ("small", "large")

BG_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (140, 140, 140),
    "white": (235, 235, 235),
    "beige": (222, 200, 160),
    "teal": (50, 140, 140),
    "lavender": (185, 165, 220),
}
"""Background colours, named apart from the object colours so labels never collide."""

BG_KINDS: tuple[str, ...] = ("plain", "gradient", "grid", "noisy")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# Caption templates: {objects} is the object chain, {background} e.g. "a teal grid background".
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{objects} on {background}",
    "a picture of {objects} on {background}",
    "{objects} in front of {background}",
    "an image of {objects} with {background}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a photo of {objects} over {background}",
    "{objects} placed against {background}",
)
"""Templates that training scenes never use (held-out prompts)."""

TEMPLATES: tuple[str, ...] = TRAIN_TEMPLATES + HELDOUT_TEMPLATES

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def caption_vocabulary() -> list[str]:
    """All distinct words any caption (any template, either kind) can contain, sorted."""
    words: set[str] = {"a", "background"}
    for text in TEMPLATES:
        words.update(w for w in text.replace("{objects}", " ").replace("{background}", " ").split())
    for group in (SHAPES, tuple(COLOURS), TEXTURES, SIZES, tuple(BG_COLOURS), BG_KINDS, RELATIONS):
        for phrase in group:
            words.update(phrase.split())
    return sorted(words)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table (the alphabet of the ByteLevel pre-tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _word_merges(words: list[str]) -> tuple[list[str], list[str]]:
    """Prefix merges that build each word into one token, ordered so BPE cannot take a wrong turn.

    Returns ``(new_tokens, merges)``. A word ``w`` is built left to right: ``w[:1] w[1]``, then
    ``w[:2] w[2]`` ... with ``</w>`` on the last character. Merges whose left side is longer than one
    character go first: after the first merge of a word only its own prefix is multi-character, so the
    next prefix merge always outranks any stray single-character pair. The first-level merges (two
    single characters) are then ordered so a word's own first pair outranks every first-level pair that
    occurs further inside it (a topological sort; ties keep a stable order).
    """
    later: list[str] = []
    first: dict[str, None] = {}
    tokens: dict[str, None] = {}
    inner_pairs: dict[str, set[str]] = {}
    for word in words:
        chars = list(word[:-1]) + [word[-1] + "</w>"]
        if len(chars) == 1:
            continue
        prefix = chars[0]
        for i in range(1, len(chars)):
            merge = f"{prefix} {chars[i]}"
            prefix = prefix + chars[i]
            tokens[prefix] = None
            if i == 1:
                first[merge] = None
                inner_pairs.setdefault(merge, set()).update(
                    f"{chars[j]} {chars[j + 1]}" for j in range(1, len(chars) - 1)
                )
            elif merge not in later:
                later.append(merge)
    # Topological order of first-level merges: a word's first pair must precede pairs inside it.
    pending = list(first)
    ordered: list[str] = []
    placed: set[str] = set()
    while pending:
        progress = False
        for merge in list(pending):
            blockers = {m for m, inner in inner_pairs.items() if merge in inner and m != merge}
            if blockers <= placed:
                ordered.append(merge)
                placed.add(merge)
                pending.remove(merge)
                progress = True
        if not progress:  # a cycle: keep going and let verification report the words it breaks
            ordered.extend(pending)
            break
    return list(tokens), later + ordered


def build_word_tokenizer(words: list[str], model_max_length: int = 32) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every word of ``words`` is exactly one token.

    Single byte-level characters (plain and with ``</w>``) are in the vocabulary too, so unknown words
    still tokenize, character by character. Ids: ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1 (also the
    pad token, as in OpenAI CLIP). Raises ``ValueError`` if some word does not come out as one token.
    """
    words = sorted({w.lower() for w in words if w.strip()})
    for w in words:
        if any(not (c.isalpha() or c.isdigit()) for c in w):
            raise ValueError(f"word {w!r}: only letters/digits can form one token under CLIP's pre-tokenizer")
    alphabet = list(_bytes_to_unicode().values())
    new_tokens, merges = _word_merges(words)
    vocab: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for tok in alphabet + [c + "</w>" for c in alphabet] + new_tokens:
        vocab.setdefault(tok, len(vocab))
    # tokenizers wants merges as (left, right) pairs; save_pretrained writes them as merges.txt lines.
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=model_max_length)
    bad = [w for w in words if len(tok(w, add_special_tokens=False)["input_ids"]) != 1]
    if bad:
        raise ValueError(f"words that do not encode to one token: {bad}")
    return tok


def miniworld_tokenizer(model_max_length: int = 32) -> CLIPTokenizer:
    """The tokenizer of the miniature world: :func:`build_word_tokenizer` over :func:`caption_vocabulary`."""
    return build_word_tokenizer(caption_vocabulary(), model_max_length)
