"""Pictures of the concept hierarchy: a PNG of its top and an interactive HTML tree of all of it.

Nodes are alias classes (`insight.concepts.hierarchy`): one node per class,
shown by its representative, with its other members listed on it ("= name
#id, ..."); a dense class is tagged. Concepts are shown by their distinct
labels (`ConceptTable.label`: two concepts named alike are told apart). Rare
concepts (fewer firing tokens than ``concepts.min_support``) are outside the
tree: the HTML search finds them and says so. The DAG is drawn as a tree by hanging
every class under its primary parent (the first of its nearest parents:
strongest Dn); other parents are listed on the node ("also under ..."). The HTML page is self-contained (inline CSS, JS
and data; no network): nodes collapse and expand, children are built on first
expansion so tens of thousands of concepts stay responsive, and a search box
finds concepts (aliases included) by name, candidate name or id and reveals
their class in the tree.
"""

from __future__ import annotations

import html
import io
import json
import os
from pathlib import Path

from insight.atomic import write_atomic
from insight.concepts.table import Concept, ConceptTable


def tree_children(table: ConceptTable) -> dict[int, list[int]]:
    """Child classes (representatives) under the primary-parent spanning tree, most frequent first."""
    kids: dict[int, list[int]] = {c.id: [] for c in table}
    for c in table:
        if c.parents and c.is_representative:
            kids[c.parents[0]].append(c.id)
    for k in kids.values():
        k.sort(key=lambda i: (-table[i].frequency, i))
    return kids


def _name(table: ConceptTable, cid: int) -> str:
    """The concept's distinct label without a trailing ``#id`` (the pictures show the id beside it)."""
    label = table.label(cid)
    return label[: -len(f" #{cid}")] if label.endswith(f" #{cid}") else label


def is_rare(table: ConceptTable, c: Concept) -> bool:
    """Fired, but on fewer tokens than the table's ``min_support``: outside the tree (`insight.concepts.hierarchy`)."""
    return 0 < c.count < int(table.meta.get("min_support") or 0)


def _label(table: ConceptTable, c: Concept) -> str:
    """Representative label and id, how many aliases share the node, and a dense tag."""
    extra = f" (+{len(c.aliases)} alias{'es' if len(c.aliases) > 1 else ''})" if c.aliases else ""
    return f"{_name(table, c.id)} #{c.id}{extra}" + (" [dense]" if c.dense else "")


def draw_tree_png(table: ConceptTable, path: str | os.PathLike[str], roots: int = 12, depth: int = 3,
                  children_first: int = 5, children_deeper: int = 3) -> Path:
    """The top of the hierarchy: the most frequent roots and their most frequent descendants.

    Left to right (labels stay horizontal and readable); nodes coloured by
    Matryoshka group; "+N more" marks children left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kids = tree_children(table)
    top = [c for c in table.roots() if c.is_representative][:roots]
    # layout: leaves on consecutive rows, parents centred on their children
    pos: dict[object, tuple[float, float]] = {}
    labels: dict[object, tuple[str, int | None]] = {}
    edges: list[tuple[object, object]] = []
    row = [0.0]

    def place(node: int, d: int) -> float:
        limit = (children_first if d == 0 else children_deeper) if d + 1 < depth else 0
        shown = kids[node][:limit]
        ys = [place(c, d + 1) for c in shown]
        for c in shown:
            edges.append((node, c))
        hidden = len(kids[node]) - len(shown)
        if hidden > 0 and shown:
            key = ("more", node)
            pos[key] = (d + 1, row[0])
            labels[key] = (f"+{hidden} more", None)
            edges.append((node, key))
            ys.append(row[0])
            row[0] += 1
        if not ys:
            y = row[0]
            row[0] += 1
        else:
            y = sum(ys) / len(ys)
        pos[node] = (d, y)
        c = table[node]
        labels[node] = (_label(table, c) + (f"  (+{hidden} below)" if hidden > 0 and not shown else ""), c.group)
        return y

    for r in top:
        place(r.id, 0)
        row[0] += 0.5
    n_rows = max(1.0, row[0])
    groups = sorted({c.group for c in table})
    cmap = plt.get_cmap("tab10")
    fig_h = min(60.0, max(3.0, 0.3 * n_rows + 1.2))
    fig, ax = plt.subplots(figsize=(3.4 * depth + 1.5, fig_h), dpi=110)
    for a, b in edges:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        xm = x0 + 0.5
        ax.plot([x0 + 0.05, xm, xm, x1 - 0.02], [y0, y0, y1, y1], color="#9aa3ad", lw=0.8, zorder=1)
    for key, (x, y) in pos.items():
        text, group = labels[key]
        color = "#f2f2f2" if group is None else cmap(groups.index(group) % 10)
        ax.text(x, y, text, fontsize=8, va="center", ha="left", zorder=2,
                bbox={"boxstyle": "round,pad=0.25", "fc": color, "ec": "#555", "lw": 0.5, "alpha": 0.85})
    for g in groups:
        ax.scatter([], [], color=cmap(groups.index(g) % 10), label=f"group {g}")
    ax.set_xlim(-0.1, depth + 0.4)
    ax.set_ylim(n_rows, -1)
    ax.axis("off")
    n_roots = sum(1 for c in table.roots() if c.is_representative)
    levels = 1 + max((c.level for c in table), default=-1)
    rare = sum(is_rare(table, c) for c in table)
    ax.set_title(f"Concept hierarchy: top {len(top)} of {n_roots} root classes by frequency, {depth} of {levels} "
                 f"levels drawn ({table.with_parents} of {len(table)} concepts have a parent; "
                 f"{table.n_alias_classes} alias classes; {rare} rare, outside the tree)", fontsize=10, loc="left")
    if groups:
        ax.legend(loc="upper right", fontsize=7, frameon=False, title="Matryoshka", title_fontsize=7)
    if not top:
        ax.text(0, 0, "no concept fired on this cache", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    out = write_atomic(path, buf.getvalue())
    return out


_CSS = """
body{font:14px system-ui,sans-serif;margin:0;color:#1d232a;background:#fafbfc}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #d8dde3;padding:10px 16px;z-index:2}
h1{font-size:17px;margin:0 0 6px} .meta{color:#5b6570;font-size:12px}
#q{width:340px;padding:5px 8px;font-size:14px;border:1px solid #b8c0c8;border-radius:4px}
#hits{max-height:180px;overflow:auto;font-size:13px;margin-top:6px}
#hits div{cursor:pointer;padding:1px 4px} #hits div:hover{background:#eef3f8}
main{padding:8px 16px} ul{list-style:none;margin:0;padding-left:20px} #tree{padding-left:0}
li{margin:1px 0} .tog{display:inline-block;width:16px;cursor:pointer;color:#47617a;user-select:none}
.nm{font-weight:600} .id{color:#7a8591;font-size:12px} .info{color:#5b6570;font-size:12px;margin-left:6px}
.also a{color:#2a6db0;cursor:pointer;text-decoration:underline dotted} .hit>.row{background:#fff3b0}
.g{display:inline-block;font-size:11px;padding:0 4px;border-radius:3px;background:#e3e8ee;margin-left:4px}
button{font-size:12px;margin-left:6px}
"""

_JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const N = {}; D.nodes.forEach(n => N[n.i] = n);
const built = {};
function el(tag, cls, text){ const e=document.createElement(tag); if(cls) e.className=cls; if(text!==undefined) e.textContent=text; return e; }
function li(id){
  const n = N[id]; const item = el('li'); item.id = 'n-' + id;
  const row = el('div', 'row'); item.appendChild(row);
  const tog = el('span', 'tog', n.c.length ? '\u25b8' : '\u2022'); row.appendChild(tog);
  row.appendChild(el('span', 'nm', n.n)); row.appendChild(el('span', 'id', ' #' + id));
  if (n.d) row.appendChild(el('span', 'g', 'dense'));
  if (n.a.length) row.appendChild(el('span', 'info', '= ' + n.a.map(a => a.n + ' #' + a.i).join(', ')));
  row.appendChild(el('span', 'g', 'group ' + n.g)); row.appendChild(el('span', 'g', 'level ' + n.l));
  row.appendChild(el('span', 'info', (100 * n.f).toFixed(3) + '% of patches' + (n.c.length ? ', ' + n.c.length + ' children' : '')));
  const cands = el('span', 'info', n.k); row.appendChild(cands);
  if (n.p.length > 1){
    const also = el('span', 'info also', ' also under: ');
    n.p.slice(1).forEach((p, j) => { if (j) also.appendChild(document.createTextNode(', '));
      const a = el('a', null, N[p] ? N[p].n + ' #' + p : '#' + p); a.onclick = () => reveal(p); also.appendChild(a); });
    row.appendChild(also);
  }
  if (n.c.length) tog.onclick = () => toggle(id);
  return item;
}
function expand(id){
  const item = document.getElementById('n-' + id); if (!item || !N[id].c.length) return;
  if (!built[id]){ const ul = el('ul'); N[id].c.forEach(c => ul.appendChild(li(c))); item.appendChild(ul); built[id] = ul; }
  built[id].style.display = ''; item.querySelector('.tog').textContent = '\u25be';
}
function collapse(id){ if (built[id]){ built[id].style.display = 'none'; document.getElementById('n-' + id).querySelector('.tog').textContent = '\u25b8'; } }
function toggle(id){ (built[id] && built[id].style.display !== 'none') ? collapse(id) : expand(id); }
function path(id){ const out = []; let cur = id; const seen = new Set();
  while (N[cur] && N[cur].p.length && !seen.has(cur)){ seen.add(cur); cur = N[cur].p[0]; out.unshift(cur); } return out; }
function reveal(id){
  path(id).forEach(expand);
  document.querySelectorAll('.hit').forEach(e => e.classList.remove('hit'));
  const item = document.getElementById('n-' + id);
  if (item){ item.classList.add('hit'); item.scrollIntoView({block: 'center'}); }
}
const tree = document.getElementById('tree'); D.roots.forEach(r => tree.appendChild(li(r)));
const q = document.getElementById('q'), hits = document.getElementById('hits');
q.oninput = () => {
  const t = q.value.trim().toLowerCase(); hits.textContent = ''; if (!t) return;
  const match = x => x.n.toLowerCase().includes(t) || x.k.toLowerCase().includes(t) || ('#' + x.i) === t || String(x.i) === t;
  const found = [];
  D.nodes.forEach(n => [n].concat(n.a).forEach(x => { if (match(x)) found.push([x, n]); }));
  found.sort((a, b) => b[0].f - a[0].f);
  if (!found.length){ hits.appendChild(el('div', null, 'no concept matches')); return; }
  found.slice(0, 60).forEach(([x, n]) => { const d = el('div', null, x.n + ' #' + x.i + (x.i !== n.i ? ' (alias of ' + n.n + ' #' + n.i + ')' : '') + (n.r ? '  (rare: outside the tree' : '  (level ' + n.l) + ', ' + (100 * x.f).toFixed(3) + '%)  ' + x.k); d.onclick = () => reveal(n.i); hits.appendChild(d); });
};
document.getElementById('expand').onclick = () => { D.roots.forEach(function walk(id){ expand(id); N[id].c.forEach(walk); }); };
document.getElementById('collapse').onclick = () => Object.keys(built).forEach(collapse);
"""


def write_tree_html(table: ConceptTable, path: str | os.PathLike[str], title: str = "Concept hierarchy") -> Path:
    """The whole hierarchy as one self-contained HTML page (module doc)."""
    kids = tree_children(table)
    alive = [c for c in table if c.alive]
    reps = [c for c in alive if c.is_representative]

    def cands(c: Concept) -> str:
        return ", ".join(f"{x.name} {x.score:.2f}" for x in c.candidates)

    nodes = [{"i": c.id, "n": _name(table, c.id), "f": c.frequency, "l": c.level, "g": c.group, "p": c.parents,
              "c": kids[c.id], "k": cands(c), "d": c.dense, "r": is_rare(table, c),
              "a": [{"i": a, "n": _name(table, a), "f": table[a].frequency, "k": cands(table[a])} for a in c.aliases]}
             for c in reps]
    rare = sum(is_rare(table, c) for c in alive)
    roots = [c.id for c in sorted(reps, key=lambda c: (-c.frequency, c.id)) if not c.parents and c.level >= 0]
    data = json.dumps({"nodes": nodes, "roots": roots}, separators=(",", ":")).replace("</", "<\\/")
    dead = len(table) - len(alive)
    meta = html.escape(f"{len(alive)} concepts that fired ({dead} never fired) in {len(reps)} alias classes "
                       f"({table.n_alias_classes} with more than one member), {len(roots)} root classes, "
                       f"{table.with_parents} concepts with a parent, {sum(c.dense for c in alive)} dense "
                       f"(active on more than {table.meta.get('dense_share')} of patches), {rare} rare "
                       f"(fewer than {table.meta.get('min_support')} firing tokens: outside the tree); "
                       f"tau={table.meta.get('tau')}, "
                       f"radius={table.meta.get('radius')}, named by {table.meta.get('naming')}; "
                       f"model {table.meta.get('model', '?')}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<div class='meta'>{meta}</div><div style='margin-top:6px'>"
            "<input id='q' placeholder='search a concept: name, candidate name or #id' autocomplete='off'>"
            "<button id='expand'>expand all</button><button id='collapse'>collapse all</button></div>"
            "<div id='hits'></div></header><main><ul id='tree'></ul></main>"
            f"<script type='application/json' id='data'>{data}</script><script>{_JS}</script></body></html>")
    return write_atomic(path, page.encode("utf-8"))
