// The Insight page: upload an image, see its top concepts as heatmap overlays, open a
// concept (gallery, place in the hierarchy), segment into typed class names.
// Plain JS, no libraries, no network beyond this server (the page runs offline).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, image: null, explain: null, selected: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const e = body && body.error;
    throw new Error(e ? `${e.code}: ${e.message}` : `HTTP ${response.status}`);
  }
  return body;
}

function status(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "muted";
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = src;
  });
}

const png = (b64) => `data:image/png;base64,${b64}`;
const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));

function conceptLink(ref) {
  return el("a", { class: "concept-link", href: "#", dataset: { id: ref.id },
    onclick: (ev) => { ev.preventDefault(); showConcept(ref.id); } }, ref.label);
}

// ---------------------------------------------------------------- explain

function drawView(canvas, overlay) {
  const ctx = canvas.getContext("2d");
  const v = state.explain.view;
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(state.image, v.x, v.y, v.width, v.height, 0, 0, canvas.width, canvas.height);
  if (overlay) ctx.drawImage(overlay, 0, 0, canvas.width, canvas.height);
}

async function explain() {
  if (!state.file) return;
  status("Finding concepts…");
  const form = new FormData();
  form.append("image", state.file);
  form.append("top_k", $("topk").value || "8");
  form.append("format", "png");  // one overlay image per concept, which the canvas draws as it is
  try {
    // Both at once, but the server's verdict on the file comes first when both fail.
    const imageP = loadImage(URL.createObjectURL(state.file)).catch((e) => e);
    const result = await api("/v1/explain", { method: "POST", body: form });
    const image = await imageP;
    if (image instanceof Error) throw image;
    state.explain = result;
    state.image = image;
    state.selected = null;
    await renderConcepts();
    status(`${result.concepts.length} concepts in ${result.image.width}×${result.image.height} ` +
           `(${result.timing_ms.total} ms)`);
    $("segment-panel").hidden = false;
  } catch (err) {
    status(`Could not explain the image: ${err.message}`, true);
  }
}

async function renderConcepts() {
  const r = state.explain;
  $("explain-panel").hidden = false;
  const f = r.fidelity;
  $("fidelity").textContent = `Concepts reconstruct the features with cosine ${fmt(f.cosine)} ` +
    (f.fvu !== undefined ? `(FVU ${fmt(f.fvu)}) ` : "") +
    `using ${fmt(f.l0, 1)} active concepts per patch (grid ${r.grid.join("×")})` +
    (f.val_cosine !== undefined ? `; on images held out from training: cosine ${fmt(f.val_cosine)}, ` +
      `FVU ${fmt(f.val_fvu)}.` : ".");
  drawView($("view"), null);
  const list = $("concepts");
  list.replaceChildren();
  for (const c of r.concepts) {
    const overlay = await loadImage(png(c.heatmap_png));
    c._overlay = overlay;
    const thumb = el("canvas", { width: 140, height: 140 });
    drawView(thumb, overlay);
    const path = c.path.map((p) => p.label).join(" › ");
    const card = el("li", { class: "concept-card", dataset: { id: c.id }, title: path,
      onclick: () => select(c.id) },
      thumb,
      el("span", { class: "name" }, c.label),
      el("span", { class: "meta" }, `#${c.id} · level ${c.level} · peak ${fmt(c.score, 2)} · ${Math.round(100 * c.area)}% of patches`));
    list.append(card);
  }
}

function select(id) {
  state.selected = id;
  const c = state.explain.concepts.find((x) => x.id === id);
  drawView($("view"), c ? c._overlay : null);
  for (const card of document.querySelectorAll(".concept-card")) {
    card.classList.toggle("selected", Number(card.dataset.id) === id);
  }
  $("view-caption").textContent = c ? `overlay: ${c.label}` : "";
  showConcept(id);
}

// ---------------------------------------------------------------- concept detail

async function showConcept(id) {
  const panel = $("detail");
  try {
    const d = await api(`/v1/concepts/${id}`);
    panel.hidden = false;
    panel.dataset.id = d.id;
    $("detail-name").textContent = d.named ? `“${d.label}” (#${d.id})` : d.label;
    $("detail-meta").textContent = `level ${d.level} · group ${d.group} · frequency ${fmt(d.frequency, 5)}` +
      (d.named ? "" : " · this model has no concept table: concepts are known by id");
    $("detail-path").replaceChildren(...d.path.map((p) => el("li", {}, p.id === d.id ? el("strong", {}, p.label) : conceptLink(p))));
    const chips = (items, empty) => (items.length ? items.map((p) => el("li", {}, conceptLink(p))) : [el("li", { class: "muted" }, empty)]);
    $("detail-parents").replaceChildren(...chips(d.parents, "none (a root)"));
    $("detail-children").replaceChildren(...chips(d.children, "none"));
    $("detail-candidates").replaceChildren(...(d.candidates.length
      ? d.candidates.map((c) => el("li", {}, `${c.name} ${fmt(c.score, 2)}`)) : [el("li", { class: "muted" }, "none")]));
    const gallery = $("gallery");
    gallery.replaceChildren(d.gallery_png
      ? el("img", { id: "gallery-img", src: png(d.gallery_png), alt: `top patches of ${d.label}` })
      : el("p", { id: "no-gallery", class: "muted" }, "No gallery images for this concept."));
  } catch (err) {
    status(`Could not load concept ${id}: ${err.message}`, true);
  }
}

// ---------------------------------------------------------------- segmentation

async function segment(ev) {
  ev.preventDefault();
  if (!state.file) return;
  const classes = $("classes").value.split(",").map((s) => s.trim()).filter((s) => s);
  if (!classes.length) { status("Type at least one class name.", true); return; }
  status("Segmenting…");
  const form = new FormData();
  form.append("image", state.file);
  form.append("classes", JSON.stringify(classes));
  try {
    const r = await api("/v1/segment", { method: "POST", body: form });
    const labels = await loadImage(png(r.label_map_png));
    const canvas = $("seg");
    const scale = Math.min(480 / state.image.width, 480 / state.image.height, 1.5);
    canvas.width = Math.round(state.image.width * scale);
    canvas.height = Math.round(state.image.height * scale);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 0.55;
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(labels, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
    const list = $("segments");
    list.replaceChildren();
    for (const s of r.segments) {
      const [cr, cg, cb] = r.palette[s.index];
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = `rgb(${cr},${cg},${cb})`;
      const concepts = el("ul", { class: "chips" });
      for (const c of s.concepts) {
        const bar = el("span", { class: c.share < 0 ? "share neg" : "share" });
        bar.style.width = `${Math.max(2, Math.round(60 * Math.abs(c.share)))}px`;
        concepts.append(el("li", { title: c.path.map((p) => p.label).join(" › ") }, bar, conceptLink(c),
          ` ${Math.round(100 * c.share)}%`));
      }
      list.append(el("li", { class: "segment", dataset: { index: s.index } },
        el("div", {}, swatch, el("strong", {}, s.class), ` · ${Math.round(100 * s.fraction)}% of the image · ` +
          `p ${fmt(s.mean_probability, 2)}`), concepts));
    }
    status(`Segmented into ${r.segments.length} of ${classes.length} classes (${r.timing_ms.total} ms).`);
  } catch (err) {
    status(`Could not segment: ${err.message}`, true);
  }
}

// ---------------------------------------------------------------- start

async function start() {
  $("file").addEventListener("change", () => {
    state.file = $("file").files[0] || null;
    explain();
  });
  $("topk").addEventListener("change", explain);
  $("segment-form").addEventListener("submit", segment);
  try {
    const m = await api("/v1/model");
    const version = m.version ? `v${m.version}` : (m.run_id ? `run ${m.run_id.slice(0, 8)}` : "checkpoint");
    $("model").textContent = `${m.name || "model"} ${version} · ${m.n_concepts} concepts in ${m.group_sizes.length} levels` +
      (m.concepts_named ? "" : " · unnamed (no concept table)");
    $("topk").max = m.limits.max_top_k;
  } catch (err) {
    $("model").textContent = `model unavailable: ${err.message}`;
  }
  document.body.dataset.ready = "1";
}

start();
