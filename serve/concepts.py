"""What the server says about a concept: names, level, hierarchy path, gallery.

The model version's concept table (``LoadedModel.concepts``, mined by
`insight concepts`) gives names, candidates, parents, children, frequency and
gallery images. A model without one (a bare checkpoint, a version whose
concepts were never mined) still serves: concepts are then known by id, their
level is their Matryoshka group, and the hierarchy is empty. Every answer says
which of the two it is (``named``).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class ConceptRow:
    id: int
    level: int
    group: int
    name: str | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    children: list[int] = field(default_factory=list)
    frequency: float | None = None
    top_patches: list[dict[str, Any]] = field(default_factory=list)
    gallery: Path | None = None
    alias_class: int | None = None  # representative of its alias class (concepts related both ways)
    aliases: list[int] = field(default_factory=list)
    dense: bool = False
    distinct: str | None = None  # the name told apart from same-named concepts (`distinct_labels`)

    @property
    def label(self) -> str:
        """What a person reads: the distinct label, else the name, else '#id'."""
        return self.distinct or self.name or f"#{self.id}"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _ids(values: Any) -> list[int]:
    """Parents/children as plain ids, whether stored as ids or as (id, strength) / {"id": ...}."""
    out: list[int] = []
    for v in values or []:
        if isinstance(v, dict):
            v = v.get("id")
        elif isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            out.append(int(v))
    return out


def _plain(v: Any) -> Any:
    """A dataclass row (TopPatch, Candidate) as a JSON-able dict."""
    import dataclasses

    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v


def _candidates(values: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for v in values or []:
        v = _plain(v)
        if isinstance(v, dict):
            out.append({"name": str(v.get("name", v.get("word", ""))), "score": _float(v.get("score"))})
        elif isinstance(v, (list, tuple)) and v:
            out.append({"name": str(v[0]), "score": _float(v[1]) if len(v) > 1 else None})
        else:
            out.append({"name": str(v), "score": None})
    return out


def _float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


class ConceptIndex:
    """All concepts of one model, by id; searchable and with hierarchy paths."""

    def __init__(self, rows: list[ConceptRow], named: bool, source: str) -> None:
        self.rows = rows
        self.named = named
        self.source = source
        self.levels = sorted({r.level for r in rows})

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, concept_id: int) -> ConceptRow | None:
        return self.rows[concept_id] if 0 <= concept_id < len(self.rows) else None

    # ------------------------------------------------------------- building

    @classmethod
    def for_model(cls, loaded: Any) -> ConceptIndex:
        """From the model's concept table when it has one, else ids and groups only."""
        ends = [int(e) for e in loaded.sae.prefix_ends]
        table = None
        try:
            table = getattr(loaded, "concepts", None)
        except FileNotFoundError:
            log.info("model %s has no concept table; serving concepts by id", loaded.uri)
        except Exception as exc:  # noqa: BLE001 - a broken table must not stop serving the model
            log.warning("concept table of %s could not be read (%s); serving concepts by id", loaded.uri, exc)
        if table is not None:
            try:
                return cls.from_table(table, ends, loaded)
            except Exception as exc:  # noqa: BLE001
                log.warning("concept table of %s is unusable (%s); serving concepts by id", loaded.uri, exc)
        return cls.from_groups(ends)

    @staticmethod
    def _group_of(ends: list[int]) -> list[int]:
        out, start = [], 0
        for g, end in enumerate(ends):
            out.extend([g] * (end - start))
            start = end
        return out

    @classmethod
    def from_groups(cls, ends: list[int]) -> ConceptIndex:
        groups = cls._group_of(ends)
        rows = [ConceptRow(id=i, level=g, group=g) for i, g in enumerate(groups)]
        return cls(rows, named=False, source="sae groups (no concept table)")

    @classmethod
    def from_table(cls, table: Any, ends: list[int], loaded: Any) -> ConceptIndex:
        """From an `insight.concepts.table.ConceptTable` (an iterable of `Concept` rows)."""
        from insight.concepts.galleries import gallery_name
        from insight.models import CONCEPTS, GALLERIES

        groups = cls._group_of(ends)
        rows = [ConceptRow(id=i, level=g, group=g) for i, g in enumerate(groups)]
        folders = [f / GALLERIES for f in loaded.folders(CONCEPTS)]  # where `LoadedModel.concepts` looks
        named = False
        for rec in table:
            cid = int(_get(rec, "id"))
            if not 0 <= cid < len(rows):
                continue
            row = rows[cid]
            name = _get(rec, "name")
            if name:
                row.name, named = str(name), True
            level = _get(rec, "level")
            row.level = int(level) if level is not None else row.group
            group = _get(rec, "group")
            row.group = int(group) if group is not None else row.group
            row.candidates = _candidates(_get(rec, "candidates"))
            row.parents = [p for p in _ids(_get(rec, "parents")) if 0 <= p < len(rows) and p != cid]
            row.children = [c for c in _ids(_get(rec, "children")) if 0 <= c < len(rows) and c != cid]
            row.frequency = _float(_get(rec, "frequency"))
            row.top_patches = [_plain(p) for p in list(_get(rec, "top_patches") or [])[:50]]
            alias = _get(rec, "alias_class")
            row.alias_class = int(alias) if alias is not None and 0 <= int(alias) < len(rows) else cid
            row.aliases = [a for a in _ids(_get(rec, "aliases")) if 0 <= a < len(rows) and a != cid][:200]
            row.dense = bool(_get(rec, "dense") or False)
            row.gallery = next((f / gallery_name(cid) for f in folders if (f / gallery_name(cid)).is_file()), None)
        from insight.concepts.naming import distinct_labels

        labels = distinct_labels([(r.id, r.name, [str(c["name"]) for c in r.candidates], r.frequency)
                                  for r in rows if r.name])
        for cid, lab in labels.items():
            rows[cid].distinct = lab
        return cls(rows, named=named, source="concept table")

    # ------------------------------------------------------------- queries

    def path(self, concept_id: int, max_depth: int = 32) -> list[int]:
        """Root .. concept along the strongest parent at each step (cycles and depth bounded)."""
        chain = [concept_id]
        seen = {concept_id}
        row = self.get(concept_id)
        while row is not None and row.parents and len(chain) < max_depth:
            nxt = next((p for p in row.parents if p not in seen), None)
            if nxt is None:
                break
            chain.append(nxt)
            seen.add(nxt)
            row = self.get(nxt)
        return chain[::-1]

    def ref(self, concept_id: int) -> dict[str, Any]:
        row = self.rows[concept_id]
        return {"id": row.id, "name": row.name, "label": row.label, "level": row.level}

    def summary(self, concept_id: int) -> dict[str, Any]:
        row = self.rows[concept_id]
        return {
            **self.ref(concept_id),
            "group": row.group,
            "frequency": row.frequency,
            "parents": row.parents,
            "children_count": len(row.children),
            "has_gallery": row.gallery is not None,
        }

    def detail(self, concept_id: int) -> dict[str, Any] | None:
        row = self.get(concept_id)
        if row is None:
            return None
        gallery = None
        if row.gallery is not None:
            try:
                gallery = base64.b64encode(row.gallery.read_bytes()).decode("ascii")
            except OSError as exc:
                log.warning("gallery of concept %d unreadable: %s", concept_id, exc)
        return {
            **self.summary(concept_id),
            "candidates": row.candidates,
            "parents": [self.ref(p) for p in row.parents],
            "children": [self.ref(c) for c in row.children],
            "path": [self.ref(p) for p in self.path(concept_id)],
            "alias_class": self.ref(row.alias_class if row.alias_class is not None else row.id),
            "aliases": [self.ref(a) for a in row.aliases],
            "dense": row.dense,
            "top_patches": row.top_patches,
            "gallery_png": gallery,
            "named": self.named,
        }

    def search(self, q: str | None, level: int | None, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """(total matches, one page of summaries); ``q`` matches names, candidates or the id."""
        ql = (q or "").strip().lower()
        hits = []
        for row in self.rows:
            if level is not None and row.level != level:
                continue
            if ql:
                names = [row.label.lower()] + [str(c["name"]).lower() for c in row.candidates]
                if not any(ql in n for n in names) and ql.lstrip("#") != str(row.id):
                    continue
            hits.append(row.id)
        return len(hits), [self.summary(i) for i in hits[offset : offset + limit]]
