"""The concept table: one row per concept, stored as Parquet and JSON beside the model.

Row schema (Parquet types; the JSON file holds the same rows as objects):

    id                  int32   concept index (decoder row)
    group               int16   Matryoshka group of the concept (0 = the coarsest prefix)
    level               int16   depth in the concept DAG: 0 = root, -1 = outside it (never fired, or rare)
    name                string  final name (by the method in `naming`)
    naming              string  "family" or "decoder": the method that named it
    candidates          list<struct<name: string, score: float32>>  top names of that method, best first
    name_family         string  best name of the hierarchy-aware method
    candidates_family   list<struct<name, score>>
    name_decoder        string  best name of the decoder-row baseline
    candidates_decoder  list<struct<name, score>>
    parents             list<int32>  representatives of the nearest parent alias classes, strongest first
                                     (one-way relations, transitively reduced; `insight.concepts.hierarchy`)
    children            list<int32>  representatives of the classes whose nearest parents include this one's
    parents_all         list<struct<id: int32, strength: float32>>  every j with Dn[i,j] > tau (raw)
    frequency           float64 share of tokens where the concept is active (z > eps)
    count               int64   tokens where it is active
    mass                float64 summed activation, D[i,i]
    top_patches         list<struct<image_id: string, row: int16, col: int16, activation: float32>>
    alias_class         int32   representative (most frequent member) of its alias class: concepts that
                                cover each other both ways (Dn > tau both ways); its own id when alone
    aliases             list<int32>  the other members of its alias class, most frequent first
    dense               bool    active on more than concepts.dense_share of tokens (nobody's parent by default)

Every member of an alias class has the class's level, parents and children.

Table-level facts (model, cache, tau, eps, radius, tokens, vocabulary, group
sizes, grid) are in ``meta``: the Parquet schema metadata key
``insight.concepts`` and the JSON file's ``meta`` object. Both files are
written atomically; `ConceptTable.load` reads either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "insight-concepts/1"
PARQUET = "concepts.parquet"
JSON = "concepts.json"
META_KEY = b"insight.concepts"


@dataclass(frozen=True)
class Candidate:
    name: str
    score: float


@dataclass(frozen=True)
class Relation:
    id: int
    strength: float  # Dn[i, id]


@dataclass(frozen=True)
class TopPatch:
    image_id: str
    row: int
    col: int
    activation: float


@dataclass
class Concept:
    id: int
    group: int
    level: int
    name: str
    naming: str
    candidates: list[Candidate]
    name_family: str
    candidates_family: list[Candidate]
    name_decoder: str
    candidates_decoder: list[Candidate]
    parents: list[int]
    children: list[int]
    parents_all: list[Relation]
    frequency: float
    count: int
    mass: float
    top_patches: list[TopPatch] = field(default_factory=list)
    alias_class: int = -1  # -1: its own class (tables written before alias classes existed)
    aliases: list[int] = field(default_factory=list)
    dense: bool = False

    def __post_init__(self) -> None:
        if self.alias_class < 0:
            self.alias_class = self.id

    @property
    def is_representative(self) -> bool:
        """The concept stands for its alias class (it is alone in it, or its most frequent member)."""
        return self.alias_class == self.id

    @property
    def alive(self) -> bool:
        return self.count > 0

    @property
    def mean_activation(self) -> float:
        return self.mass / self.count if self.count else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Concept:
        def cands(x: list[dict[str, Any]] | None) -> list[Candidate]:
            return [Candidate(str(c["name"]), float(c["score"])) for c in x or []]

        return cls(
            id=int(d["id"]), group=int(d["group"]), level=int(d["level"]), name=str(d["name"]),
            naming=str(d["naming"]), candidates=cands(d["candidates"]), name_family=str(d["name_family"]),
            candidates_family=cands(d["candidates_family"]), name_decoder=str(d["name_decoder"]),
            candidates_decoder=cands(d["candidates_decoder"]), parents=[int(p) for p in d["parents"] or []],
            children=[int(c) for c in d["children"] or []],
            parents_all=[Relation(int(r["id"]), float(r["strength"])) for r in d["parents_all"] or []],
            frequency=float(d["frequency"]), count=int(d["count"]), mass=float(d["mass"]),
            top_patches=[TopPatch(str(p["image_id"]), int(p["row"]), int(p["col"]), float(p["activation"]))
                         for p in d["top_patches"] or []],
            alias_class=int(d["alias_class"]) if d.get("alias_class") is not None else -1,
            aliases=[int(a) for a in d.get("aliases") or []], dense=bool(d.get("dense") or False),
        )


def _schema():
    import pyarrow as pa

    cand = pa.list_(pa.struct([("name", pa.string()), ("score", pa.float32())]))
    return pa.schema([
        ("id", pa.int32()), ("group", pa.int16()), ("level", pa.int16()), ("name", pa.string()),
        ("naming", pa.string()), ("candidates", cand), ("name_family", pa.string()), ("candidates_family", cand),
        ("name_decoder", pa.string()), ("candidates_decoder", cand), ("parents", pa.list_(pa.int32())),
        ("children", pa.list_(pa.int32())),
        ("parents_all", pa.list_(pa.struct([("id", pa.int32()), ("strength", pa.float32())]))),
        ("frequency", pa.float64()), ("count", pa.int64()), ("mass", pa.float64()),
        ("top_patches", pa.list_(pa.struct([("image_id", pa.string()), ("row", pa.int16()), ("col", pa.int16()),
                                            ("activation", pa.float32())]))),
        ("alias_class", pa.int32()), ("aliases", pa.list_(pa.int32())), ("dense", pa.bool_()),
    ])


from insight.atomic import write_atomic as _atomic_bytes  # noqa: E402


class ConceptTable:
    """All concepts of one model, with lookups by id, name, level and group."""

    def __init__(self, concepts: list[Concept], meta: dict[str, Any] | None = None) -> None:
        self.concepts = sorted(concepts, key=lambda c: c.id)
        self.meta = dict(meta or {})
        self._by_id = {c.id: c for c in self.concepts}
        self._by_name: dict[str, list[Concept]] = {}
        for c in self.concepts:
            self._by_name.setdefault(c.name.lower(), []).append(c)

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self) -> Iterator[Concept]:
        return iter(self.concepts)

    def __getitem__(self, concept_id: int) -> Concept:
        return self.by_id(concept_id)

    # ---------------------------------------------------------------- lookups

    def by_id(self, concept_id: int) -> Concept:
        try:
            return self._by_id[int(concept_id)]
        except KeyError:
            raise KeyError(f"no concept with id {concept_id} (the table has ids 0..{len(self) - 1})") from None

    def label(self, concept_id: int) -> str:
        """What a person reads for the concept: its name, told apart from other concepts with the same name
        (``name (next distinguishing candidate)`` or ``name #id``; `insight.concepts.naming.distinct_labels`)."""
        labels = self.__dict__.get("_labels")
        if labels is None:
            from insight.concepts.naming import distinct_labels

            labels = self._labels = distinct_labels([(c.id, c.name, [x.name for x in c.candidates], c.frequency)
                                                     for c in self.concepts])
        return labels[self.by_id(concept_id).id]

    def by_name(self, name: str) -> list[Concept]:
        """Concepts whose final name is ``name`` (case-insensitive), most frequent first."""
        return sorted(self._by_name.get(name.lower(), []), key=lambda c: -c.frequency)

    def search(self, text: str) -> list[Concept]:
        """Concepts whose final or candidate names contain ``text`` (case-insensitive), most frequent first."""
        t = text.lower()
        hits = [c for c in self.concepts
                if t in c.name.lower() or any(t in x.name.lower() for x in c.candidates)]
        return sorted(hits, key=lambda c: -c.frequency)

    def at_level(self, level: int) -> list[Concept]:
        """Concepts at a DAG depth (0 = roots, -1 = never fired or rare), most frequent first."""
        return sorted((c for c in self.concepts if c.level == level), key=lambda c: -c.frequency)

    def in_group(self, group: int) -> list[Concept]:
        """Concepts of a Matryoshka group, most frequent first."""
        return sorted((c for c in self.concepts if c.group == group), key=lambda c: -c.frequency)

    def roots(self) -> list[Concept]:
        return self.at_level(0)

    def alias_members(self, concept_id: int) -> list[Concept]:
        """The concept's alias class, its representative first, then most frequent first."""
        c = self.by_id(concept_id)
        rep = self.by_id(c.alias_class)
        return [rep] + [self.by_id(a) for a in rep.aliases]

    @property
    def n_alias_classes(self) -> int:
        """Alias classes with more than one member."""
        return sum(1 for c in self.concepts if c.is_representative and c.aliases)

    def parents_of(self, concept_id: int) -> list[Concept]:
        return [self.by_id(p) for p in self.by_id(concept_id).parents]

    def children_of(self, concept_id: int) -> list[Concept]:
        return [self.by_id(c) for c in self.by_id(concept_id).children]

    def ancestors(self, concept_id: int) -> list[int]:
        """Every concept above ``concept_id`` in the DAG, nearest first."""
        out: list[int] = []
        frontier = list(self.by_id(concept_id).parents)
        seen: set[int] = set()
        while frontier:
            nxt = []
            for p in frontier:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
                    nxt += self.by_id(p).parents
            frontier = nxt
        return out

    @property
    def with_parents(self) -> int:
        return sum(1 for c in self.concepts if c.parents)

    # ---------------------------------------------------------------- storage

    def to_arrow(self):
        import pyarrow as pa

        schema = _schema().with_metadata({META_KEY: json.dumps({"format": FORMAT, **self.meta}, default=str)})
        return pa.Table.from_pylist([c.to_dict() for c in self.concepts], schema=schema)

    def save(self, folder: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``concepts.parquet`` and ``concepts.json`` into ``folder`` (each atomically)."""
        import io

        import pyarrow.parquet as pq

        out = Path(folder)
        buf = io.BytesIO()
        pq.write_table(self.to_arrow(), buf)
        _atomic_bytes(out / PARQUET, buf.getvalue())
        doc = {"format": FORMAT, "meta": self.meta, "concepts": [c.to_dict() for c in self.concepts]}
        _atomic_bytes(out / JSON, json.dumps(doc, default=str).encode())
        return {"parquet": out / PARQUET, "json": out / JSON}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ConceptTable:
        """Read a table from a folder (Parquet preferred, else JSON) or from either file."""
        p = Path(path)
        if p.is_dir():
            p = p / PARQUET if (p / PARQUET).is_file() else p / JSON
        if not p.is_file():
            raise FileNotFoundError(f"no concept table at {path} (expected {PARQUET} or {JSON})")
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(p)
            raw = (table.schema.metadata or {}).get(META_KEY)
            meta = json.loads(raw) if raw else {}
            if meta.pop("format", FORMAT) != FORMAT:
                raise ValueError(f"{p}: not an {FORMAT} concept table")
            return cls([Concept.from_dict(r) for r in table.to_pylist()], meta)
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{p}: not an {FORMAT} concept table")
        return cls([Concept.from_dict(r) for r in doc["concepts"]], doc.get("meta", {}))


# ------------------------------------------------------------------ relations (co-occurrence matrices)

RELATIONS = "relations.safetensors"
RELATIONS_FORMAT = "insight-relations/1"


@dataclass
class Relations:
    """Dn and M stored sparse (CSR, float32), with per-concept counts and masses.

    ``dn_*``: per row i the ``topk`` largest non-zero Dn[i,j] (all of them when
    a row has fewer), largest first; Dn[i,i] = 1 is included. ``mean_*``: M[i,:],
    the mean code over i's top patches, exactly (it is sparse by nature). A
    dense M x M float16 would be 128 MB at M = 8192 and mostly zeros.
    """

    dn_indptr: Any
    dn_indices: Any
    dn_values: Any
    mean_indptr: Any
    mean_indices: Any
    mean_values: Any
    count: Any
    mass: Any
    meta: dict[str, Any]

    @property
    def n_concepts(self) -> int:
        return len(self.dn_indptr) - 1

    def dn_row(self, i: int) -> dict[int, float]:
        a, b = int(self.dn_indptr[i]), int(self.dn_indptr[i + 1])
        return dict(zip(self.dn_indices[a:b].tolist(), self.dn_values[a:b].tolist(), strict=True))

    def dn_dense(self):
        """Dense (M, M) float32 Dn with the stored entries (zeros elsewhere)."""
        import numpy as np

        m = self.n_concepts
        out = np.zeros((m, m), np.float32)
        rows = np.repeat(np.arange(m), np.diff(self.dn_indptr))
        out[rows, self.dn_indices] = self.dn_values
        return out

    def save(self, folder: str | os.PathLike[str]) -> Path:
        from safetensors.numpy import save as st_save

        tensors = {k: getattr(self, k) for k in ("dn_indptr", "dn_indices", "dn_values", "mean_indptr",
                                                 "mean_indices", "mean_values", "count", "mass")}
        meta = {"format": RELATIONS_FORMAT, "meta": json.dumps(self.meta, default=str)}
        path = Path(folder) / RELATIONS
        _atomic_bytes(path, st_save(tensors, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Relations:
        from safetensors import safe_open

        p = Path(path)
        if p.is_dir():
            p = p / RELATIONS
        if not p.is_file():
            raise FileNotFoundError(f"no relations file at {path}")
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != RELATIONS_FORMAT:
                raise ValueError(f"{p}: not an {RELATIONS_FORMAT} file")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        return cls(**arrays, meta=json.loads(meta.get("meta", "{}")))
