"""From co-occurrence to a sound concept hierarchy (docs/method.md, Relations).

Relations keep the paper's definition: ``raw_parents`` lists, per concept i,
every j != i with Dn[i,j] > tau ("wherever i fires, j fires too": j covers i).
`build_hierarchy` turns those relations into a tree-like DAG by these rules:

1. **Aliases.** When j covers i *and* i covers j (Dn[i,j] > tau and
   Dn[j,i] > tau) neither is broader: by the relation's own reading they
   fire on the same tokens. Such concepts are *aliases* and form one alias
   class: the union of mutual pairs together with any remaining strongly
   connected component of the relation graph (i1 -> i2 -> ... -> i1 is the
   same statement spread over more concepts). Its *representative* is its
   most frequent member (ties: lower id); a singleton is its own class.
   Ordering aliases by tiny frequency differences instead (what the first
   version did) turns a block of k co-firing concepts into a chain of k levels.
2. **Dense concepts.** A concept active on more than ``dense_share`` of all
   tokens is *dense*; an alias class is dense when one of its members is.
   A broad enough concept covers most others by sheer extent, so Dn says
   little about what they are part of; a dense class is nobody's parent
   unless ``dense_parents`` allows it (it keeps its own parents and its tag).
3. **Parents are one-way.** Class B is a parent of class A when some
   i in A and j in B relate only one way (Dn[i,j] > tau, Dn[j,i] <= tau:
   every such cross-class relation is one-way, or i and j would be aliases)
   and B is not dense. The class graph is acyclic by construction.
4. **Nearest parents, only true ancestors.** Classes are processed parents
   first; a class's candidates are the classes it relates to one way (its
   *related* classes), deepest first. A candidate that is already an ancestor
   (through a deeper parent) is a shortcut and dropped: the transitive
   reduction. A candidate with an ancestor that is not related to the class
   is dropped too ("uncovered"): Dn is not transitive (i 80% inside j and j
   80% inside k can leave i half outside k), and a tree that hung i under j
   would claim k contains i where the data says it does not. So every
   ancestor of a concept covers it (Dn > tau for some pair of members): a
   path root > ... > concept reads true at every step.
5. **Rare concepts.** Dn[i,j] is a share of i's firing tokens, so with n of
   them its standard error is up to 0.5/sqrt(n): 0.1 at n = 25, where a true
   0.55 passes tau = 0.75 by chance. A concept that fired on fewer than
   ``min_support`` tokens (of the pass's split) is *rare*: no relation from
   or to it is used for the tree, so it joins no alias class, is nobody's
   parent and hangs under nobody (its raw relations stay in ``parents_all``;
   family naming still decodes it with them, but never with a rare one).
   On the quickstart champion (2,000 concepts, 22,344 tokens) the deepest
   chains ran through such concepts: 9 levels with every concept that fired,
   8 at min_support 25 (749 rare), 6 at 50.
6. **Levels** are computed on classes: 0 for root classes, else 1 + the
   largest parent level, the longest chain of strict one-way coverings.
   -1 for concepts outside the tree: those that never fired and rare ones.

Per concept, `Hierarchy` gives its class's facts: ``parents`` and
``children`` are representatives of the nearest parent/child classes,
strongest relation first (the largest Dn[i,j] over the class pair; ties:
lower id), and every member of a class has the class's level. The first
parent is the *primary* parent, under which drawings hang a class
(`insight.concepts.tree`). ``family`` is what family naming decodes with
a concept: its raw relations minus aliases and dense concepts, i.e. its
one-way parents (the paper's Dthr lists every j with Dn[i,j] > tau; inside a
co-firing block that makes every member's family the same block and every
name the same word).

``hierarchy.json`` (`Hierarchy.to_json`, read back by `Hierarchy.from_json`,
the one pair of functions that knows the layout)::

    format               "insight-hierarchy/2"
    levels               number of levels (max level + 1)
    roots                representatives of the root classes (ids)
    with_parents         concepts (any member of a class) that have a parent
    dense_share, dense_parents   the dense rule's settings
    dense                ids of dense concepts
    min_support          the rare rule's setting (firing tokens)
    rare                 ids of rare concepts (fired, but on fewer than min_support tokens; level -1)
    rare_edges_dropped   raw relations from or to a rare concept, unused
    alias_classes        number of classes with more than one member
    alias_edges          raw relations inside a class (not parent edges)
    dense_edges_dropped  raw cross-class relations into a dense class, unused
    shortcuts_dropped    class edges removed by the transitive reduction
    uncovered_dropped    class edges not used: the parent has an ancestor that does not cover the child
    classes              one object per class of concepts in the tree (fired, not rare):
                         {id (the representative), members (most frequent
                         first), level, parents, children (representatives),
                         dense}
    nodes                one object per concept: {id, level, alive,
                         alias_class (its representative), dense, rare, parents,
                         children, parents_all ([j, Dn[i,j]] raw, strongest
                         first), name?, frequency?}
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from insight.concepts.stats import ConceptStats

FORMAT = "insight-hierarchy/2"


def raw_parents(stats: ConceptStats, tau: float, block: int = 1024) -> list[list[tuple[int, float]]]:
    """Per concept, every j != i with Dn[i,j] > tau, strongest first, as (j, Dn[i,j])."""
    m = stats.n_concepts
    out: list[list[tuple[int, float]]] = []
    for start in range(0, m, block):
        dn = stats.dn_rows(start, min(m, start + block))
        for r in range(dn.shape[0]):
            i = start + r
            js = np.nonzero(dn[r] > tau)[0]
            js = js[js != i]
            order = np.lexsort((js, -dn[r, js]))
            out.append([(int(js[o]), float(dn[r, js[o]])) for o in order])
    return out


def sparse_rows(stats: ConceptStats, topk: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dn stored sparse: per row its ``topk`` largest non-zero entries, CSR (indptr, indices, values float32)."""
    m = stats.n_concepts
    indptr, indices, values = [0], [], []
    for start in range(0, m, block):
        dn = stats.dn_rows(start, min(m, start + block))
        for r in range(dn.shape[0]):
            nz = np.nonzero(dn[r])[0]
            if nz.size > topk:
                nz = nz[np.argpartition(-dn[r, nz], topk - 1)[:topk]]
            nz = nz[np.lexsort((nz, -dn[r, nz]))]
            indices.append(nz.astype(np.int32))
            values.append(dn[r, nz].astype(np.float32))
            indptr.append(indptr[-1] + nz.size)
    return (np.asarray(indptr, np.int64), np.concatenate(indices) if indices else np.zeros(0, np.int32),
            np.concatenate(values) if values else np.zeros(0, np.float32))


@dataclass
class Hierarchy:
    """The concept DAG over alias classes: raw relations, nearest parents/children, levels, aliases, dense tags."""

    n_concepts: int
    alive: np.ndarray  # bool (M,)
    parents_all: list[list[tuple[int, float]]]  # raw: Dn > tau, strongest first
    parents: list[list[int]]  # representatives of the nearest parent classes (same for every member)
    children: list[list[int]]  # representatives of the nearest child classes
    level: np.ndarray  # int (M,), the class's level; -1 for concepts that never fired
    alias_class: np.ndarray  # int (M,): the representative of each concept's alias class
    dense: np.ndarray  # bool (M,): active on more than dense_share of tokens
    dense_share: float = 1.0
    dense_parents: bool = False
    alias_edges: int = 0
    dense_edges_dropped: int = 0
    shortcuts_dropped: int = 0
    uncovered_dropped: int = 0
    _members: dict[int, list[int]] = field(default_factory=dict, repr=False)
    rare: np.ndarray | None = None  # bool (M,): fired on fewer than min_support tokens, outside the tree
    min_support: int = 0
    rare_edges_dropped: int = 0

    def __post_init__(self) -> None:
        if self.rare is None:
            self.rare = np.zeros(self.n_concepts, bool)
        if not self._members:
            members: dict[int, list[int]] = {}
            for i in range(self.n_concepts):
                members.setdefault(int(self.alias_class[i]), []).append(i)
            self._members = {r: sorted(ms, key=lambda i, r=r: (i != r, i)) for r, ms in members.items()}

    @property
    def classes(self) -> dict[int, list[int]]:
        """Representative -> members (the representative first, then by id), for every concept."""
        return self._members

    def members(self, i: int) -> list[int]:
        """Concept i's alias class (itself included), representative first."""
        return self._members[int(self.alias_class[i])]

    @property
    def dense_class(self) -> np.ndarray:
        """bool (M,): the concept's alias class holds a dense concept."""
        flag = np.zeros(self.n_concepts, bool)
        for ms in self._members.values():
            if self.dense[ms].any():
                flag[ms] = True
        return flag

    @property
    def roots(self) -> list[int]:
        """Representatives of the root classes."""
        return [i for i in range(self.n_concepts) if self.alive[i] and not self.rare[i] and not self.parents[i]
                and self.alias_class[i] == i]

    @property
    def with_parents(self) -> int:
        return sum(1 for p in self.parents if p)

    @property
    def levels(self) -> int:
        return int(self.level.max(initial=-1)) + 1

    @property
    def n_alias_classes(self) -> int:
        """Classes with more than one member."""
        return sum(1 for ms in self._members.values() if len(ms) > 1)

    @property
    def family(self) -> list[list[tuple[int, float]]]:
        """Per concept, the relations family naming decodes with it: one-way parents, not dense, not rare
        (module doc)."""
        dense = self.dense_class
        out = []
        for i, ps in enumerate(self.parents_all):
            a = self.alias_class[i]
            out.append([(j, s) for j, s in ps if self.alias_class[j] != a and not self.rare[j]
                        and (self.dense_parents or not dense[j])])
        return out

    def to_json(self, names: list[str] | None = None, frequency: np.ndarray | None = None) -> dict[str, Any]:
        """The hierarchy.json document (layout in the module doc)."""
        dense = self.dense_class
        classes = [{"id": rep, "members": ms, "level": int(self.level[rep]), "parents": self.parents[rep],
                    "children": self.children[rep], "dense": bool(dense[rep])}
                   for rep, ms in sorted(self._members.items()) if self.alive[rep] and not self.rare[rep]]
        nodes = []
        for i in range(self.n_concepts):
            node: dict[str, Any] = {"id": i, "level": int(self.level[i]), "alive": bool(self.alive[i]),
                                    "alias_class": int(self.alias_class[i]), "dense": bool(self.dense[i]),
                                    "rare": bool(self.rare[i]),
                                    "parents": self.parents[i], "children": self.children[i],
                                    "parents_all": [[j, round(s, 6)] for j, s in self.parents_all[i]]}
            if names is not None:
                node["name"] = names[i]
            if frequency is not None:
                node["frequency"] = float(frequency[i])
            nodes.append(node)
        return {"format": FORMAT, "levels": self.levels, "roots": self.roots, "with_parents": self.with_parents,
                "dense_share": self.dense_share, "dense_parents": self.dense_parents,
                "dense": [int(i) for i in np.nonzero(self.dense)[0]], "min_support": self.min_support,
                "rare": [int(i) for i in np.nonzero(self.rare)[0]], "rare_edges_dropped": self.rare_edges_dropped,
                "alias_classes": self.n_alias_classes,
                "alias_edges": self.alias_edges, "dense_edges_dropped": self.dense_edges_dropped,
                "shortcuts_dropped": self.shortcuts_dropped, "uncovered_dropped": self.uncovered_dropped,
                "classes": classes, "nodes": nodes}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Hierarchy:
        """Read a hierarchy.json document back (the inverse of `to_json`)."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} document")
        nodes = sorted(doc["nodes"], key=lambda n: int(n["id"]))
        m = len(nodes)
        members = {int(c["id"]): [int(x) for x in c["members"]] for c in doc["classes"]}
        for n in nodes:  # concepts that never fired are singletons, not listed among the classes
            members.setdefault(int(n["alias_class"]), [int(n["id"])])
        return cls(m, np.array([bool(n["alive"]) for n in nodes], bool),
                   [[(int(j), float(s)) for j, s in n["parents_all"]] for n in nodes],
                   [[int(p) for p in n["parents"]] for n in nodes], [[int(c) for c in n["children"]] for n in nodes],
                   np.array([int(n["level"]) for n in nodes], np.int64),
                   np.array([int(n["alias_class"]) for n in nodes], np.int64),
                   np.array([bool(n["dense"]) for n in nodes], bool), float(doc["dense_share"]),
                   bool(doc["dense_parents"]), int(doc["alias_edges"]), int(doc["dense_edges_dropped"]),
                   int(doc["shortcuts_dropped"]), int(doc["uncovered_dropped"]), members,
                   np.array([bool(n.get("rare", False)) for n in nodes], bool), int(doc.get("min_support", 0)),
                   int(doc.get("rare_edges_dropped", 0)))

    @classmethod
    def load(cls, path: Any) -> Hierarchy:
        """Read ``hierarchy.json`` from a file or a concepts folder."""
        import json
        from pathlib import Path

        p = Path(path)
        if p.is_dir():
            p = p / "hierarchy.json"
        try:
            return cls.from_json(json.loads(p.read_text()))
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{p}: {exc}") from None


def _sccs(n: int, edges: list[list[int]]) -> list[int]:
    """Strongly connected component label of every node (iterative Tarjan)."""
    index = [-1] * n
    low = [0] * n
    on_stack = [False] * n
    comp = [-1] * n
    stack: list[int] = []
    counter = n_comp = 0
    for root in range(n):
        if index[root] != -1:
            continue
        work = [(root, 0)]
        while work:
            v, pos = work.pop()
            if pos == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            advanced = False
            for k in range(pos, len(edges[v])):
                w = edges[v][k]
                if index[w] == -1:
                    work.append((v, k + 1))
                    work.append((w, 0))
                    advanced = True
                    break
                if on_stack[w]:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    comp[w] = n_comp
                    if w == v:
                        break
                n_comp += 1
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
    return comp


def dense_mask(count: np.ndarray, tokens: int, dense_share: float) -> np.ndarray:
    """Concepts active on more than ``dense_share`` of ``tokens``."""
    count = np.asarray(count)
    return (count > dense_share * tokens) & (count > 0) if tokens > 0 else np.zeros(count.shape, bool)


def build_hierarchy(parents_all: list[list[tuple[int, float]]], count: np.ndarray, *, tokens: int = 0,
                    dense_share: float = 1.0, dense_parents: bool = False, min_support: int = 0) -> Hierarchy:
    """Raw relations + firing counts (of ``tokens`` tokens) -> alias classes and their DAG (see the module doc)."""
    m = len(parents_all)
    count = np.asarray(count)
    alive = count > 0
    rare = alive & (count < min_support)
    placed = alive & ~rare  # concepts whose relations the tree uses
    dense = dense_mask(count, tokens, dense_share)
    edges = [[j for j, _ in ps if j != i and placed[i] and placed[j]] for i, ps in enumerate(parents_all)]
    comp = _sccs(m, edges)
    by_comp: dict[int, list[int]] = {}
    for i in range(m):
        by_comp.setdefault(comp[i], []).append(i)
    rep = np.arange(m)
    members: dict[int, list[int]] = {}
    for ms in by_comp.values():
        r = min(ms, key=lambda i: (-int(count[i]), i))
        rep[ms] = r
        members[r] = [r] + [i for i in sorted(ms, key=lambda i: (-int(count[i]), i)) if i != r]
    dense_cls = np.zeros(m, bool)
    for r, ms in members.items():
        dense_cls[r] = bool(dense[ms].any())

    # class edges a -> b (b a parent of a), with the strongest raw relation between the two classes
    strength: dict[int, dict[int, float]] = {}
    alias_edges = dense_dropped = rare_dropped = 0
    for i in range(m):
        if not alive[i]:
            continue
        a = int(rep[i])
        for j, s in parents_all[i]:
            if j == i or not alive[j]:
                continue
            if rare[i] or rare[j]:
                rare_dropped += 1
                continue
            b = int(rep[j])
            if a == b:
                alias_edges += 1
            elif dense_cls[b] and not dense_parents:
                dense_dropped += 1
            else:
                row = strength.setdefault(a, {})
                row[b] = max(row.get(b, 0.0), float(s))
    reps = sorted(members)
    dag = {a: sorted(strength.get(a, {})) for a in reps}

    # topological order of classes, parents first (Kahn; ids break ties so the order is deterministic)
    n_parents = {a: len(dag[a]) for a in reps}
    kids: dict[int, list[int]] = {a: [] for a in reps}
    for a in reps:
        for b in dag[a]:
            kids[b].append(a)
    heap = [a for a in reps if n_parents[a] == 0]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        v = heapq.heappop(heap)
        order.append(v)
        for c in kids[v]:
            n_parents[c] -= 1
            if n_parents[c] == 0:
                heapq.heappush(heap, c)
    if len(order) != len(reps):  # pragma: no cover - alias classes are the SCCs: the class graph is acyclic
        raise RuntimeError("concept relations still hold a cycle between alias classes")

    # nearest parents, classes in topological order; ancestors and related classes as Python int bitsets over
    # representative ids. Candidates deepest first: one already among the ancestors is a shortcut; one with an
    # ancestor that does not cover this class would make the tree claim a relation the data denies.
    related = {a: sum(1 << b for b in dag[a]) for a in reps}
    ancestors: dict[int, int] = {}
    cls_parents: dict[int, list[int]] = {a: [] for a in reps}
    cls_level: dict[int, int] = {}
    shortcuts = uncovered = 0
    for v in order:
        acc = 0
        for p in sorted(dag[v], key=lambda p, v=v: (-cls_level[p], -strength[v][p], p)):
            if acc >> p & 1:
                shortcuts += 1
            elif ancestors[p] & ~related[v]:
                uncovered += 1
            else:
                cls_parents[v].append(p)
                acc |= ancestors[p] | (1 << p)
        ancestors[v] = acc
        cls_level[v] = 1 + max((cls_level[p] for p in cls_parents[v]), default=-1) if placed[v] else -1
    cls_children: dict[int, list[int]] = {a: [] for a in reps}
    for v in reps:
        cls_parents[v].sort(key=lambda p, v=v: (-strength[v][p], p))
        for p in cls_parents[v]:
            cls_children[p].append(v)

    level = np.array([cls_level[int(rep[i])] for i in range(m)], np.int64)
    parents = [list(cls_parents[int(rep[i])]) for i in range(m)]
    children = [list(cls_children[int(rep[i])]) for i in range(m)]
    return Hierarchy(m, alive, parents_all, parents, children, level, rep.astype(np.int64), dense,
                     float(dense_share), bool(dense_parents), alias_edges, dense_dropped, shortcuts, uncovered,
                     members, rare, int(min_support), rare_dropped)
