"""From co-occurrence to a clean concept hierarchy (METHOD.md section 3).

``raw_parents``: j is a parent of i when Dn[i,j] > tau and j != i (wherever i
fires, j fires too). Those relations can form cycles (two concepts that always
fire together are each other's parent) and carry redundant shortcuts (a
grandparent is also above tau). `build_hierarchy` turns them into a DAG:

1. Cycles are broken deterministically. Inside every strongly connected
   component, an edge child -> parent is kept only when the parent ranks
   higher: more frequent, ties to the lower id. Mutual parents thus resolve to
   "the more frequent one is the parent"; edges between components are kept.
2. Transitive reduction: a parent is dropped when it is also an ancestor of
   another of the concept's parents, so each concept keeps its nearest parents.
3. Levels: 0 for roots, else 1 + the largest parent level (the longest path
   from a root); -1 for concepts that never fired (they take no part).

Each concept's parents are listed strongest Dn first (ties: lower id); the
first one is its *primary* parent, under which drawings hang it so the DAG can
be shown as a tree (`insight.concepts.tree`); the other parents stay listed.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from insight.concepts.stats import ConceptStats


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
    """The concept DAG: raw relations, kept (reduced) parents, children, levels."""

    n_concepts: int
    alive: np.ndarray  # bool (M,)
    parents_all: list[list[tuple[int, float]]]  # raw: Dn > tau, strongest first
    parents: list[list[int]]  # nearest parents after cycle breaking + transitive reduction
    children: list[list[int]]
    level: np.ndarray  # int (M,), -1 for concepts that never fired
    cycle_edges_dropped: list[tuple[int, int]] = field(default_factory=list)  # (child, parent)
    shortcuts_dropped: int = 0

    @property
    def roots(self) -> list[int]:
        return [i for i in range(self.n_concepts) if self.alive[i] and not self.parents[i]]

    @property
    def with_parents(self) -> int:
        return sum(1 for p in self.parents if p)

    def to_json(self, names: list[str] | None = None, frequency: np.ndarray | None = None) -> dict[str, Any]:
        nodes = []
        for i in range(self.n_concepts):
            node: dict[str, Any] = {"id": i, "level": int(self.level[i]), "alive": bool(self.alive[i]),
                                    "parents": self.parents[i], "children": self.children[i],
                                    "parents_all": [[j, round(s, 6)] for j, s in self.parents_all[i]]}
            if names is not None:
                node["name"] = names[i]
            if frequency is not None:
                node["frequency"] = float(frequency[i])
            nodes.append(node)
        return {"roots": self.roots, "levels": int(self.level.max(initial=-1)) + 1,
                "with_parents": self.with_parents, "cycle_edges_dropped": [list(e) for e in self.cycle_edges_dropped],
                "shortcuts_dropped": self.shortcuts_dropped, "nodes": nodes}


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


def build_hierarchy(parents_all: list[list[tuple[int, float]]], count: np.ndarray) -> Hierarchy:
    """Raw parent relations + firing counts -> a clean DAG (see the module doc)."""
    m = len(parents_all)
    alive = np.asarray(count) > 0
    edges = [[j for j, _ in ps if alive[i] and alive[j]] for i, ps in enumerate(parents_all)]
    comp = _sccs(m, edges)

    def ranks_above(j: int, i: int) -> bool:  # is j the better parent candidate than i
        return (-int(count[j]), j) < (-int(count[i]), i)

    dropped: list[tuple[int, int]] = []
    dag = [[] for _ in range(m)]
    for i in range(m):
        for j in edges[i]:
            if comp[i] == comp[j] and not ranks_above(j, i):
                dropped.append((i, j))
            else:
                dag[i].append(j)

    # topological order, parents first (Kahn; ids break ties so the order is deterministic)
    n_parents = [len(p) for p in dag]
    kids: list[list[int]] = [[] for _ in range(m)]
    for i in range(m):
        for j in dag[i]:
            kids[j].append(i)
    heap = [i for i in range(m) if n_parents[i] == 0]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        v = heapq.heappop(heap)
        order.append(v)
        for c in kids[v]:
            n_parents[c] -= 1
            if n_parents[c] == 0:
                heapq.heappush(heap, c)
    if len(order) != m:  # pragma: no cover - cycle breaking guarantees a DAG
        raise RuntimeError("concept relations still hold a cycle after cycle breaking")

    # ancestors as Python int bitsets; a parent that is another parent's ancestor is a shortcut
    ancestors = [0] * m
    parents: list[list[int]] = [[] for _ in range(m)]
    shortcuts = 0
    for v in order:
        ps = dag[v]
        for p in ps:
            others = 0
            for q in ps:
                if q != p:
                    others |= ancestors[q]
            if others >> p & 1:
                shortcuts += 1
            else:
                parents[v].append(p)
        acc = 0
        for p in ps:
            acc |= ancestors[p] | (1 << p)
        ancestors[v] = acc
    level = np.full(m, -1, np.int64)
    for v in order:
        if alive[v]:
            level[v] = 1 + max((int(level[p]) for p in parents[v]), default=-1)
    children: list[list[int]] = [[] for _ in range(m)]
    for v in range(m):
        for p in parents[v]:
            children[p].append(v)
    strength = [dict(ps) for ps in parents_all]
    for v in range(m):
        parents[v].sort(key=lambda p, v=v: (-strength[v].get(p, 0.0), p))
        children[v].sort()
    return Hierarchy(m, alive, parents_all, parents, children, level, dropped, shortcuts)
