"""Benchmark: does the pipeline recover a concept hierarchy that is known?

Synthetic patch grids with a planted part-whole hierarchy go through the public
CLI exactly as a user's features would (`insight cache import` -> `insight
train` -> `insight concepts`), and what comes out is scored against what went in.

The data (``make_data``): orthonormal atoms in D dimensions.

* parents: whole objects, drawn as rectangles (regions) of patches carrying the
  parent's atom;
* children: parts, only ever inside a region of their own parent; a part patch
  carries the parent's atom *and* the child's atom;
* backgrounds: one texture atom per image on every patch outside the objects;
* coefficients vary per object and per patch, plus isotropic Gaussian noise.

The vocabulary (imported with the features as the cache's text embeddings):
a parent's word is its atom, a background's word its atom; a child's word is
what a patch of that part looks like in context, normalise(parent + r * child);
for every child there are also *confuser* words, the same part on each other
parent (normalise(other parent + r * child)), and random distractor words. A
child's bare direction is equally close to its word and to all its confusers,
so the child words are only separable through the parent: the decoder-row
baseline cannot name children, hierarchy-aware (family) naming can, if the
relations are right.

Scores:

* dictionary recovery: mean over planted atoms of the largest cosine with a
  decoder row (also per kind);
* hierarchy: each concept that fired is matched to the planted atom its decoder
  row is closest to (cosine >= ``--match``); a class of hierarchy.json (read with
  ``Hierarchy.load``; alias classes count as one node) stands for the atoms of its
  members. The hierarchy relates child atom a to atom b when a class standing for
  b is an *ancestor* of a class standing for a (the closure of the nearest-parent
  edges, so a true parent reached through an intermediate class counts; the
  planted hierarchy is one level deep, its closure is itself). Precision over
  those atom pairs, recall over the planted child -> parent pairs, F1; the wrong
  and missed pairs are listed. Classes that stand for no atom (split-off pieces,
  near-dead concepts) have no truth to be scored against: the edges they take
  part in are counted apart, and ``precision_edges`` is the share of all
  reported class edges that link a child atom's class to its own parent's;
* naming: the concept closest to each planted parent/child atom must carry that
  atom's word, for the decoder baseline and for the family method
  (``name_decoder`` / ``name_family`` of the concept table);
* diagnostics of the relation statistic: Dn[child, parent] of the matched
  concepts (relations.safetensors); the share of the child's patches where
  the parent's concept is silent; the share of the child concept's activation
  mass on patches outside every region of its parent; *mixed children*: child
  atoms whose closest concept fires (above the relations' activity floor) on its
  own atom's patches for at most tau of its firings, with the child atom it
  fires on instead (such a concept is covered by no parent, and covers a sibling).

The last stdout line is JSON; ``--markdown`` also prints the table of
docs/benchmarks.md.

    python bench/concept_recovery.py --markdown                     # k 1 2 3 x depth 3 6, eps_theta 2
    python bench/concept_recovery.py --k 1 --depth 6 --eps-theta 0 2 --seed 1   # one configuration
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("INSIGHT_LOG", "WARNING")
ROOT = Path(__file__).resolve().parents[1]

PARENTS = ["car", "dog", "tree", "house", "boat", "bird"]
CHILDREN = {"car": ["wheel", "windshield", "headlight"], "dog": ["ear", "paw", "snout"],
            "tree": ["leaf", "trunk", "branch"], "house": ["window", "door", "chimney"],
            "boat": ["sail", "hull", "mast"], "bird": ["beak", "wing", "feather"]}
BACKGROUNDS = ["sky", "grass", "water", "road"]


def make_data(seed: int = 0, n_images: int = 600, grid: int = 8, dim: int = 64, noise: float = 0.05,
              resid: float = 0.5, n_distract: int = 200) -> dict:
    """Grids (N, grid, grid, dim), the vocabulary and the planted truth (module doc)."""
    rng = np.random.default_rng(seed)
    kinds, words, parent_of = [], [], []
    for p in PARENTS:
        kinds.append("parent"), words.append(p), parent_of.append(-1)
    for pi, p in enumerate(PARENTS):
        for c in CHILDREN[p]:
            kinds.append("child"), words.append(c), parent_of.append(pi)
    for b in BACKGROUNDS:
        kinds.append("background"), words.append(b), parent_of.append(-1)
    n_atoms = len(words)
    if n_atoms > dim:
        raise ValueError(f"{n_atoms} orthonormal atoms need dim >= {n_atoms}")
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    atoms = q.T[:n_atoms].astype(np.float32)
    children_of = {pi: [a for a in range(n_atoms) if parent_of[a] == pi] for pi in range(len(PARENTS))}
    bg_ids = [a for a in range(n_atoms) if kinds[a] == "background"]

    vocab_words, vocab = [], []
    for a in range(n_atoms):
        vocab_words.append(words[a])
        vocab.append(atoms[a] if kinds[a] != "child" else atoms[parent_of[a]] + resid * atoms[a])
    for a in range(n_atoms):  # confusers: the same part on every other whole
        if kinds[a] == "child":
            for pi, p in enumerate(PARENTS):
                if pi != parent_of[a]:
                    vocab_words.append(f"{words[a]}-of-{p}")
                    vocab.append(atoms[pi] + resid * atoms[a])
    for i in range(n_distract):
        vocab_words.append(f"distractor{i:03d}")
        vocab.append(rng.normal(size=dim))
    vocab = np.asarray(vocab, np.float32)
    vocab /= np.linalg.norm(vocab, axis=1, keepdims=True)

    feats = np.zeros((n_images, grid, grid, dim), np.float32)
    for n in range(n_images):
        bg = int(rng.choice(bg_ids))
        feats[n] += rng.uniform(0.5, 1.5) * atoms[bg]
        for _ in range(int(rng.integers(1, 3))):
            pi = int(rng.integers(len(PARENTS)))
            h, w = (int(v) for v in rng.integers(3, 7, size=2))
            y0, x0 = int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
            region = (slice(y0, y0 + h), slice(x0, x0 + w))
            feats[n][region] = rng.uniform(1.0, 2.0) * atoms[pi]  # the object hides the background
            if rng.random() < 0.8:  # a visible part, inside the region
                c = int(rng.choice(children_of[pi]))
                ph, pw = max(1, h // 2), max(1, w // 2)
                py, px = y0 + int(rng.integers(0, h - ph + 1)), x0 + int(rng.integers(0, w - pw + 1))
                feats[n, py:py + ph, px:px + pw] += rng.uniform(0.8, 1.6) * atoms[c]
    feats *= rng.uniform(0.85, 1.15, size=feats.shape[:3] + (1,)).astype(np.float32)  # per-patch contrast
    feats += rng.normal(scale=noise, size=feats.shape).astype(np.float32)
    return {"feats": feats, "atoms": atoms, "kinds": kinds, "words": words, "parent_of": parent_of,
            "vocab": vocab, "vocab_words": vocab_words}


def cli(*args: str, timeout: int = 900) -> dict:
    """One `insight` command; its last stdout line is the step's JSON result."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "insight.cli", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT / "platform")})
    if p.returncode != 0:
        raise RuntimeError(f"insight {args[0]} failed:\n{p.stderr[-4000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["_wall_s"] = time.perf_counter() - t0
    return out


def hierarchy_scores(hier: Any, atom_of: np.ndarray, words: list[str], parent_of: list[int]) -> dict:
    """Planted child -> parent relations against the pipeline's hierarchy, over the planted concepts.

    A class stands for the atoms its members match (alias classes are one node). The hierarchy relates
    atom a to atom b when a class standing for a has a class standing for b among its *ancestors* (the
    closure of the nearest-parent edges: a true parent reached through an intermediate class still counts;
    the planted hierarchy is one level deep, so its closure is itself). Precision is over those atom pairs
    (a != b), recall over the planted pairs. Classes that stand for no atom (split-off pieces, near-dead
    concepts) have no truth to be scored against; the edges they take part in are counted apart
    (``edges_unmatched``) and in ``precision_edges``, the share of all reported class edges that link a
    child atom's class to its own parent atom's class.
    """
    true_pairs = {(a, p) for a, p in enumerate(parent_of) if p >= 0}
    live = [r for r, ms in hier.classes.items() if hier.alive[r] and not hier.rare[r]]
    atoms = {r: {int(atom_of[i]) for i in hier.classes[r] if atom_of[i] >= 0} for r in live}
    ancestors: dict[int, set[int]] = {}

    def up(r: int) -> set[int]:  # the class graph is acyclic (alias classes are its cycles)
        if r not in ancestors:
            ancestors[r] = set().union(*({p} | up(p) for p in hier.parents[r]))
        return ancestors[r]

    pred = {(a, b) for r in live for q in up(r) for a in atoms[r] for b in atoms.get(q, ()) if a != b}
    edges = [(r, q) for r in live for q in hier.parents[r]]
    right = sum(any((a, b) in true_pairs for a in atoms[r] for b in atoms.get(q, ())) for r, q in edges)
    hit = pred & true_pairs
    precision = len(hit) / len(pred) if pred else 0.0
    recall = len(hit) / len(true_pairs)
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "false_positives": sorted(f"{words[a]} < {words[b]}" for a, b in pred - true_pairs),
            "false_negatives": sorted(f"{words[a]} < {words[b]}" for a, b in true_pairs - pred),
            "edges_reported": len(edges), "edges_unmatched": sum(not atoms[r] or not atoms.get(q) for r, q in edges),
            "precision_edges": right / len(edges) if edges else 0.0,
            "levels": hier.levels, "alias_classes": hier.n_alias_classes}


def score(data: dict, checkpoint: str, concepts_dir: str, match: float, eps: float = 0.001,
          eps_theta: float = 0.0, tau: float = 0.75) -> dict:
    """Dictionary, hierarchy and naming scores of one trained model (module doc)."""
    import torch

    from insight.concepts.hierarchy import Hierarchy
    from insight.concepts.table import ConceptTable, Relations
    from insight.sae import load_sae

    sae = load_sae(checkpoint)
    w_dec = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1).numpy()
    atoms, kinds, words, parent_of = data["atoms"], data["kinds"], data["words"], data["parent_of"]
    cos_am = atoms @ w_dec.T  # (atoms, concepts)
    hier = Hierarchy.load(concepts_dir)
    table = ConceptTable.load(concepts_dir)
    alive = hier.alive

    best_concept = np.where(alive[None, :], cos_am, -np.inf).argmax(1)  # per atom, its closest live concept
    recovery = cos_am.max(1)
    out: dict = {"dictionary": float(recovery.mean())}
    for kind in ("parent", "child", "background"):
        sel = [a for a in range(len(kinds)) if kinds[a] == kind]
        out[f"dictionary_{kind}"] = float(recovery[sel].mean())

    # concept -> planted atom; the hierarchy among planted concepts, scored on the ancestor closure
    atom_of = np.where(cos_am.max(0) >= match, cos_am.argmax(0), -1)
    true_edges = {(a, parent_of[a]) for a in range(len(kinds)) if kinds[a] == "child"}
    out.update(hierarchy_scores(hier, atom_of, words, parent_of))
    out["parent_child_same_class"] = int(sum(hier.alias_class[best_concept[a]] == hier.alias_class[best_concept[p]]
                                             for a, p in true_edges))

    # naming: the concept closest to each planted parent / child atom carries that atom's word
    for method in ("decoder", "family"):
        for kind in ("parent", "child"):
            sel = [a for a in range(len(kinds)) if kinds[a] == kind]
            names = [getattr(table.by_id(int(best_concept[a])), f"name_{method}") for a in sel]
            out[f"naming_{method}_{kind}"] = float(np.mean([n == words[a] for n, a in zip(names, sel, strict=True)]))
        sel = [a for a in range(len(kinds)) if kinds[a] in ("parent", "child")]
        out[f"naming_{method}"] = float(np.mean([getattr(table.by_id(int(best_concept[a])), f"name_{method}")
                                                 == words[a] for a in sel]))

    # the relation statistic on the planted pairs: Dn[child concept, parent concept]
    rel = Relations.load(Path(concepts_dir) / "relations.safetensors")
    dn = [rel.dn_row(int(best_concept[c])).get(int(best_concept[p]), 0.0) for c, p in sorted(true_edges)]
    out["dn_child_parent_median"] = float(np.median(dn))
    out["dn_child_parent_min"] = float(np.min(dn))
    # why Dn[child, parent] is low: is the parent silent on the child's patches, or does the child fire elsewhere?
    x = torch.from_numpy(data["feats"].reshape(-1, atoms.shape[1]))
    with torch.no_grad():
        z = sae.encode(x).numpy()
    present = (x.numpy() @ atoms.T) > 0.4  # patches that carry the atom (coefficients are >= 0.8 when planted)
    silent, outside = [], []
    for c, p in sorted(true_edges):
        ci, pi = int(best_concept[c]), int(best_concept[p])
        silent.append(float((z[present[:, c], pi] <= 0).mean()))
        zc = z[:, ci]
        outside.append(float(zc[~present[:, p]].sum() / max(zc.sum(), 1e-12)))
    out["parent_silent_on_child_patches"] = float(np.mean(silent))
    out["child_mass_outside_parent"] = float(np.mean(outside))
    # mixed children: the concept closest to a child atom fires (above the relations' activity floor) mostly on
    # patches that do not carry that atom, so no parent covers it (Dn <= tau); say which atom it fires on instead
    floor = max(eps, eps_theta * float(sae.threshold))
    mixed = []
    for c, _ in sorted(true_edges):
        on = z[:, int(best_concept[c])] > floor
        own = float(present[on, c].mean()) if on.any() else 0.0
        if not on.any():
            mixed.append(f"{words[c]} (silent)")
        elif own <= tau:
            others = present[on & ~present[:, c]].sum(0)  # the atoms of the patches it fires on instead
            parts = np.where([kinds[a] == "child" for a in range(len(kinds))], others, 0)
            other = words[int(parts.argmax())] if parts.any() else f"{words[int(others.argmax())]} alone"
            mixed.append(f"{words[c]} (+{other}: {own:.2f} own)")
    out["mixed_children"] = mixed
    out["threshold"] = float(sae.threshold)
    return out


def run_one(work: Path, cache: str, data: dict, k: int, depth: int, args: argparse.Namespace) -> list[dict]:
    """Train one configuration and mine it once per ``--eps-theta`` value, through the CLI; score each."""
    wd = work / f"k{k}-d{depth}"
    sets = [f"workdir={wd}", f"train.cache={cache}", f"sae.k={k}", f"sae.depth={depth}",
            f"sae.expansion={args.expansion}", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
            f"train.lr={args.lr}", f"sae.threshold_start_step={args.steps // 2}", "sae.threshold_beta=0.99",
            f"sae.dead_tokens={20 * args.batch}", "sae.aux_k=16", "cache.val_fraction=0.1",
            "train.log_every=100", f"train.checkpoint_every={args.steps}", "train.cpus_per_worker=1",
            "cluster.num_cpus=2", "concepts.gallery_per_group=0", "concepts.top_n=16",
            f"concepts.radius={args.radius}", f"train.seed={args.seed}", *args.set]
    flat = [x for s in sets for x in ("--set", s)]
    trained = cli("train", *flat)
    rows = []
    for eps_theta in args.eps_theta:
        mined = cli("concepts", "--model", trained["checkpoint"], *flat, "--set", f"concepts.eps_theta={eps_theta}")
        res = score(data, trained["checkpoint"], mined["out"], args.match, eps_theta=eps_theta)
        res.update(k=k, depth=depth, eps_theta=eps_theta, steps=args.steps, seed=args.seed,
                   val_fvu=trained.get("val_fvu"),
                   val_l0_per_k=trained.get("val_l0_per_k"), train_s=trained["_wall_s"], concepts_s=mined["_wall_s"])
        rows.append(res)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| k | depth | steps | seed | eps_theta | dictionary (parent / child) | hierarchy P / R / F1 | all edges: precision "
            "(unmatched) | mixed children | naming decoder | naming family (parent / child) | "
            "Dn[child, parent] median | val FVU | val L0/k |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['depth']} | {r['steps']} | {r['seed']} | {r['eps_theta']:g} | {r['dictionary']:.2f} "
            f"({r['dictionary_parent']:.2f} / {r['dictionary_child']:.2f}) | {r['precision']:.2f} / "
            f"{r['recall']:.2f} / {r['f1']:.2f} | {r['precision_edges']:.2f} ({r['edges_unmatched']} of "
            f"{r['edges_reported']}) | {len(r['mixed_children'])} | {r['naming_decoder']:.2f} | "
            f"{r['naming_family']:.2f} ({r['naming_family_parent']:.2f} / {r['naming_family_child']:.2f}) | "
            f"{r['dn_child_parent_median']:.2f} | {r['val_fvu']:.2f} | {r['val_l0_per_k']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--depth", type=int, nargs="+", default=[3, 6])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--expansion", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--radius", type=int, default=0, help="concepts.radius of the relation statistic")
    ap.add_argument("--eps-theta", type=float, nargs="+", default=[2.0],
                    help="concepts.eps_theta values, each mined from the same trained model (0: the reference)")
    ap.add_argument("--match", type=float, default=0.7, help="decoder cosine for a concept to stand for an atom")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="extra --set for train and concepts")
    ap.add_argument("--work", default=None, help="keep outputs here (default: a temporary folder)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="insight-recovery-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_data(args.seed, args.images)
        np.save(work / "grids.npy", data["feats"])
        np.save(work / "text.npy", data["vocab"])
        (work / "words.txt").write_text("\n".join(data["vocab_words"]) + "\n")
        imported = cli("cache", "import", "--features", str(work / "grids.npy"), "--text", str(work / "text.npy"),
                       "--words", str(work / "words.txt"), "--out", str(work / "cache"),
                       "--set", f"workdir={work}")
        rows = []
        for k, depth in itertools.product(args.k, args.depth):
            for r in run_one(work, imported["cache"], data, k, depth, args):
                rows.append(r)
                print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in r.items()}),
                      file=sys.stderr, flush=True)
        if args.markdown:
            print(markdown(rows))
        print(json.dumps({"images": args.images, "tokens": int(np.prod(data["feats"].shape[:3])),
                          "atoms": len(data["words"]), "vocabulary": len(data["vocab_words"]), "rows": rows}))


if __name__ == "__main__":
    main()
