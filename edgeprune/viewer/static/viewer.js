"use strict";
(function () {
  const D = JSON.parse(document.getElementById("edgeprune-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const N = D.nodes, S = D.sources, two = S.length === 2;
  const isReader = k => ["q", "k", "v", "mlp", "output"].includes(k);
  const outs = new Set(D.outputs || [D.output]);  // position-aware: resid_post in every span
  const guides = D.guides || D.feeds;  // the head drawn beside a Q/K/V input (feeds: every head it feeds)
  const el = (tag, attrs, parent) => {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  };
  const fmt = v => (typeof v === "number" ? (Number.isInteger(v) ? v.toLocaleString("en") : v.toPrecision(4)) : String(v));
  const state = { n: S.map(s => s.default_n), sel: null, pins: new Set(), zoom: 1, lock: false };
  const current = S.map(() => []);  // per source: indices (into its ranking) of the edges kept

  // The same rule as circuit.remove_dangling: keep an edge only on a path embedding -> resid_post.
  function dangling(ws, rs) {
    let live = ws.map((_, i) => i);
    for (;;) {
      const reached = new Set(D.embeds);
      let changed = true;
      while (changed) {
        changed = false;
        for (const i of live) if (reached.has(ws[i])) for (const n of D.feeds[rs[i]]) if (!reached.has(n)) { reached.add(n); changed = true; }
      }
      const useful = new Set();
      const leads = r => outs.has(r) || D.feeds[r].some(n => useful.has(n));
      changed = true;
      while (changed) {
        changed = false;
        for (const i of live) if (!useful.has(ws[i]) && leads(rs[i])) { useful.add(ws[i]); changed = true; }
      }
      const next = live.filter(i => reached.has(ws[i]) && leads(rs[i]));
      if (next.length === live.length) return next;
      live = next;
    }
  }

  function select(k) {
    const s = S[k], n = state.n[k];
    if (s.values === null) { current[k] = s.w.map((_, i) => i); return; }  // a fixed circuit, as in its file
    current[k] = dangling(s.w.slice(0, n), s.r.slice(0, n));
  }

  const svg = document.getElementById("svg");
  const gRows = document.getElementById("rows"), gEdges = document.getElementById("edges"), gNodes = document.getElementById("nodes");
  function size() { svg.setAttribute("width", D.width * state.zoom); svg.setAttribute("height", D.height * state.zoom); svg.setAttribute("viewBox", `0 0 ${D.width} ${D.height}`); }
  for (const row of D.rows) { const t = el("text", { x: 8, y: row.y + 3, class: "rowlabel" }, gRows); t.textContent = row.label; }
  for (const c of D.columns || []) {
    const t = el("text", { x: c.x, y: 12, class: "rowlabel", "text-anchor": "middle" }, gRows); t.textContent = c.label;
    if (c.tokens !== undefined) { const u = el("text", { x: c.x, y: D.height - 2, class: "tokens", "text-anchor": "middle" }, gRows); u.textContent = JSON.stringify(c.tokens); }
  }

  const edgeName = (w, r) => `${N[w].name} \u2192 ${N[r].name}`;
  function path(w, r) {
    const a = N[w], b = N[r];
    const y1 = a.y - (a.kind === "head" || a.kind === "mlp" || a.kind === "embed" ? 8 : 4);
    const y2 = b.y + (b.kind === "mlp" || b.kind === "output" ? 8 : 4);
    const ym = (y1 + y2) / 2;
    // writer and reader in one column (MLP -> MLP, MLP -> resid_post): bow sideways, further for longer
    // edges, so m0 -> m4 is not drawn over m0 -> m1 -> ... and no edge runs through the boxes between
    const bow = Math.abs(a.x - b.x) < 1 ? Math.min(240, 14 + 0.18 * Math.abs(y1 - y2)) : 0;
    return `M${a.x},${y1} C${a.x + bow},${ym} ${b.x + bow},${ym} ${b.x},${y2}`;
  }
  const membership = {};  // "w,r" -> bit mask of the sources holding the edge
  let drawn = [];  // [w, r, mask, [k, i] of the first source holding it]

  function render() {
    S.forEach((_, k) => select(k));
    for (const key in membership) delete membership[key];
    const firsts = {};
    S.forEach((s, k) => current[k].forEach(i => {
      const key = s.w[i] + "," + s.r[i];
      membership[key] = (membership[key] || 0) | (1 << k);
      if (!(key in firsts)) firsts[key] = [k, i];
    }));
    drawn = Object.keys(membership).map(key => { const [w, r] = key.split(",").map(Number); return [w, r, membership[key], firsts[key]]; });
    drawn.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    gEdges.textContent = "";
    const used = new Set([...outs, ...D.embeds]);
    // width by importance rank within what is shown (rank 1 widest), never by raw value: a run's
    // largest |log_alpha| is its most pruned edge, and no spread over the values (size-dependent stack)
    const rankOf = S.map((_, k) => { const m = new Map(); current[k].forEach((i, p) => m.set(i, p)); return m; });
    for (const [w, r, mask, [k, i]] of drawn) {
      used.add(w); used.add(r); for (const n of guides[r]) used.add(n);
      const kind = N[r].kind;
      const colour = two ? (mask === 3 ? "#222222" : mask === 1 ? "#D55E00" : "#0072B2") : D.colours[kind];
      const shown = current[k].length, rank = rankOf[k].get(i);
      const width = S[k].values ? 0.6 + 2.4 * (shown > 1 ? 1 - rank / (shown - 1) : 1) : 1.2;
      const negative = S[k].signed && S[k].values && S[k].values[i] < 0;  // a signed score below zero: dashed
      const attrs = { d: path(w, r), class: "edge " + (two ? ["", "only-a", "only-b", "both"][mask] : kind), stroke: colour,
        "stroke-width": width.toFixed(2), "data-w": N[w].name, "data-r": N[r].name, "data-rank": rank + 1 };
      if (negative) attrs["stroke-dasharray"] = "5 3";
      const p = el("path", attrs, gEdges);
      p.addEventListener("mouseenter", () => showEdge(w, r, mask, k, i));
    }
    gNodes.textContent = "";
    const names = document.getElementById("names"); names.textContent = "";
    N.forEach((nd, id) => {
      if (!used.has(id)) return;
      const g = el("g", { class: "node", "data-name": nd.name, id: "node-" + id }, gNodes);
      if (["q", "k", "v"].includes(nd.kind)) {
        for (const h of guides[id]) el("path", { d: `M${nd.x},${nd.y - 4} L${N[h].x},${N[h].y + 8}`, class: "guide", stroke: D.colours[nd.kind] }, g);
        el("circle", { cx: nd.x, cy: nd.y, r: 4, fill: D.colours[nd.kind] }, g);
      } else {
        const w = nd.kind === "head" ? 44 : 70;
        el("rect", { x: nd.x - w / 2, y: nd.y - 8, width: w, height: 16, rx: nd.kind === "head" ? 2 : 6, fill: D.colours[nd.kind] }, g);
        const t = el("text", { x: nd.x, y: nd.y + 3, "text-anchor": "middle" }, g); t.textContent = nd.label || nd.name;
      }
      g.addEventListener("mouseenter", () => showNode(id));
      g.addEventListener("click", ev => { ev.stopPropagation(); choose(id, ev.shiftKey); });
      const o = document.createElement("option"); o.value = nd.name; names.appendChild(o);
    });
    document.getElementById("empty").hidden = drawn.length > 0;
    const gone = [...state.pins].filter(id => !used.has(id));
    if (gone.length) {  // the slider removed pinned nodes: drop them from the selection
      gone.forEach(id => state.pins.delete(id));
      if (!state.pins.has(state.sel)) state.sel = state.pins.size ? [...state.pins][0] : null;
      if (!state.pins.size) clear();
      document.getElementById("info").textContent = `${gone.map(id => N[id].name).join(", ")}: not in the circuit at this size`;
    }
    controls(); if (state.pins.size) highlight(); saveState();
  }

  function degree(id, k) {  // in the drawn union, or (k) in source k's circuit
    let into = 0, out = 0;
    const head = N[id].kind === "head";
    const feedsIt = r => r === id || (head && D.feeds[r].includes(id));
    const pairs = k === undefined ? drawn : current[k].map(i => [S[k].w[i], S[k].r[i]]);
    for (const [w, r] of pairs) { if (w === id) out++; if (feedsIt(r)) into++; }
    return [into, out];
  }
  function showNode(id) {
    const nd = N[id], [into, out] = degree(id);
    let text = `${nd.name}\nkind: ${nd.kind}\nin-degree: ${into}  out-degree: ${out}`;
    if (two) S.forEach((s, k) => { const [i, o] = degree(id, k); text += `\n${"AB"[k]}: in-degree ${i}  out-degree ${o}`; });
    if (state.pins.size > 1) text += `\npinned: ${[...state.pins].map(p => N[p].name).join(", ")}`;
    S.forEach(s => { if (s.node_values && nd.name in s.node_values) text += `\nnode log_alpha (${s.label}): ${fmt(s.node_values[nd.name])}`; });
    document.getElementById("info").textContent = text;
  }
  function showEdge(w, r, mask, k, i) {
    let text = `${edgeName(w, r)}\nreader kind: ${N[r].kind}`;
    S.forEach((s, kk) => {
      const j = s.w.findIndex((ww, jj) => ww === w && s.r[jj] === r);
      if (j < 0) return;
      text += `\n${two ? s.label + ": " : ""}rank ${j + 1} of ${fmt(s.candidates)}` + (s.values ? `, ${s.value_name} ${fmt(s.values[j])}` : "");
    });
    if (two) text += `\nin: ${mask === 3 ? "both" : mask === 1 ? "A only" : "B only"}`;
    document.getElementById("info").textContent = text;
  }

  // ancestors / descendants of a node in the drawn circuit
  function related(id, mode) {
    const nodesUp = new Set([id]), nodesDown = new Set([id]), edgesOn = new Set();
    const headOf = r => (N[r].kind === "mlp" ? [r] : D.feeds[r]);
    if (mode !== "down") {
      let changed = true;
      while (changed) { changed = false; drawn.forEach(([w, r], e) => { if (headOf(r).some(n => nodesUp.has(n)) || nodesUp.has(r)) { edgesOn.add(e); if (!nodesUp.has(w)) { nodesUp.add(w); changed = true; } } }); }
    }
    if (mode !== "up") {
      let changed = true;
      while (changed) { changed = false; drawn.forEach(([w, r], e) => { if (nodesDown.has(w)) { edgesOn.add(e); for (const n of [r, ...headOf(r)]) if (!nodesDown.has(n)) { nodesDown.add(n); changed = true; } } }); }
    }
    return [new Set([...nodesUp, ...nodesDown]), edgesOn];
  }
  function highlight() {  // the union of the pinned nodes' ancestors / descendants
    const nodes = new Set(), edges = new Set();
    for (const id of state.pins) { const [ns, es] = related(id, document.getElementById("mode").value); ns.forEach(n => nodes.add(n)); es.forEach(e => edges.add(e)); }
    const paths = gEdges.children;
    for (let e = 0; e < paths.length; e++) paths[e].classList.toggle("faded", !edges.has(e));
    for (const g of gNodes.children) {
      const nid = Number(g.id.slice(5));
      const near = nodes.has(nid) || D.feeds[nid].some(h => nodes.has(h));
      g.classList.toggle("faded", !near); g.classList.toggle("sel", state.pins.has(nid));
    }
  }
  function clear() { state.sel = null; state.pins.clear(); for (const c of [...gEdges.children, ...gNodes.children]) c.classList.remove("faded", "sel"); saveState(); }
  function choose(id, add) {  // click: select this node; shift+click: pin it beside the others (again: unpin)
    if (!add) state.pins.clear();
    if (add && state.pins.has(id)) state.pins.delete(id); else state.pins.add(id);
    state.sel = id;
    if (!state.pins.size) { clear(); return; }
    highlight(); showNode(id); saveState();
  }
  document.getElementById("canvas").addEventListener("click", () => { if (!dragged) clear(); });
  document.getElementById("mode").addEventListener("change", () => { if (state.pins.size) highlight(); saveState(); });
  document.getElementById("search").addEventListener("change", ev => {
    const text = ev.target.value.trim(); state.q = text;
    const shown = id => document.getElementById("node-" + id) !== null;
    let id = N.findIndex((nd, i) => nd.name === text && shown(i));
    const matches = [];  // by prefix: "a1" finds a1.h0, a1.g0.k, ...
    if (id < 0) N.forEach((nd, i) => { if (text && nd.name.startsWith(text) && shown(i)) matches.push(i); });
    if (id < 0 && matches.length) id = matches[0];
    if (id < 0) { document.getElementById("info").textContent = `no node ${text} in this circuit`; return; }
    choose(id, false); document.getElementById("node-" + id).scrollIntoView({ block: "center", inline: "center" });
    if (matches.length > 1) document.getElementById("info").textContent += `\n${matches.length} nodes start with ${text}: ` + matches.slice(0, 12).map(i => N[i].name).join(", ") + (matches.length > 12 ? ", ..." : "");
  });

  // The figures of the circuit on screen, never another size's: measured at this prefix (or, for
  // points without one, this edge count), or by definition (0 edges: the empty circuit; every edge:
  // the full model); otherwise the two measured neighbours, labelled as such.
  function figuresAt(s, k, count) {
    const exact = s.points.find(p => (p.prefix !== undefined ? p.prefix === state.n[k] : p.edges === count));
    if (exact) return { kind: "measured", rows: [exact] };
    if (count === 0) return { kind: "empty" };
    if (s.values && s.shipped === s.candidates && state.n[k] === s.shipped && count === s.candidates) return { kind: "full" };
    let below = null, above = null;
    for (const p of s.points) {
      if (p.edges < count && (below === null || p.edges > below.edges)) below = p;
      if (p.edges > count && (above === null || p.edges < above.edges)) above = p;
    }
    return { kind: "between", rows: [below, above].filter(p => p !== null) };
  }
  function plot(s, count) {  // faithfulness vs edges (log x) of the measured points, a marker at the slider
    const pts = s.points.filter(p => typeof p.faithfulness === "number" && p.edges > 0 && p.prefix !== undefined);
    if (pts.length < 2) return null;
    const W = 300, H = 70, x0 = Math.log(pts[0].edges), x1 = Math.log(pts[pts.length - 1].edges) || x0 + 1;
    let lo = 0, hi = 1;
    for (const p of pts) { lo = Math.min(lo, p.faithfulness); hi = Math.max(hi, p.faithfulness); }
    const X = e => 4 + (W - 8) * (Math.log(Math.max(e, 1)) - x0) / (x1 - x0 || 1), Y = f => H - 4 - (H - 8) * (f - lo) / (hi - lo || 1);
    const g = el("svg", { width: W, height: H, class: "plot" });
    el("path", { d: pts.map((p, i) => `${i ? "L" : "M"}${X(p.edges).toFixed(1)},${Y(p.faithfulness).toFixed(1)}`).join(" "), class: "curve" }, g);
    for (const p of pts) el("circle", { cx: X(p.edges), cy: Y(p.faithfulness), r: 2 }, g);
    if (count > 0) el("line", { x1: X(count), x2: X(count), y1: 0, y2: H, class: "marker" }, g);
    return g;
  }
  const SHOW = ["faithfulness", "kl", "logit_diff_ratio", "exact_match", "accuracy_circuit"];
  function controls() {
    const box = document.getElementById("controls");
    S.forEach((s, k) => {
      let div = document.getElementById("src-" + k);
      if (!div) {
        div = document.createElement("div"); div.className = "src"; div.id = "src-" + k; box.appendChild(div);
        div.innerHTML = `<b>${two ? "ABCD"[k] + ": " : ""}</b><span class="lab"></span><br>` +
          (s.values ? `<input type="range" id="slider-${k}" min="0" max="${s.shipped}" value="${state.n[k]}">` : "") +
          `<div>edges in circuit: <span class="count" id="count-${k}"></span></div><div class="prefix"></div><div class="metrics"></div>` +
          `<div class="note"></div>`;
        div.querySelector(".lab").textContent = s.label;
        if (s.values) div.querySelector("input").addEventListener("input", ev => { state.n[k] = Number(ev.target.value); if (state.lock) match(k); render(); });
        div.querySelector(".note").textContent = s.values
          ? `ranked by ${s.rank_by}; the page holds the top ${fmt(s.shipped)} of ${fmt(s.candidates)} edges (cap ${fmt(D.cap)}, --max-edges)`
          : `a fixed circuit from its file${s.graph_known ? "" : " (graph inferred from the names)"}`;
      }
      const count = current[k].length;
      document.getElementById("count-" + k).textContent = fmt(count);
      div.querySelector(".prefix").textContent = s.values ? `top ${fmt(state.n[k])} ranked edges, dangling edges removed` : "";
      const m = div.querySelector(".metrics"), fig = figuresAt(s, k, count);
      m.textContent = "";
      const t = document.createElement("table"); t.className = "m";
      const add = (a, b) => { const tr = t.insertRow(); tr.insertCell().textContent = a; tr.insertCell().textContent = b; };
      const where = p => `${p.split ? p.split + ", " : ""}${p.source}`;
      if (fig.kind === "empty") { add("empty circuit (every edge ablated)", ""); add("faithfulness", "0 (by definition)"); }
      else if (fig.kind === "full") { add("every edge: the full model", ""); add("faithfulness", "1 (by definition)"); add("kl", "0 (by definition)"); }
      else if (fig.kind === "measured") { const p = fig.rows[0]; add(`measured at these ${fmt(p.edges)} edges (${where(p)})`, ""); SHOW.concat(Object.keys(p).filter(key => key.endsWith("/faithfulness"))).filter(key => key in p).forEach(key => add(key, fmt(p[key]))); }
      else {
        add(s.points.length ? `not measured at ${fmt(count)} edges` : "not evaluated (edgeprune view --no-eval, or no config)", "");
        for (const p of fig.rows) add(`measured at ${fmt(p.edges)} edges (${p.edges < count ? "fewer" : "more"}; ${where(p)})`, `faithfulness ${"faithfulness" in p ? fmt(p.faithfulness) : "-"}`);
      }
      t.dataset.kind = fig.kind;
      m.appendChild(t);
      const chart = plot(s, count);
      if (chart) m.appendChild(chart);
    });
    const cmp = document.getElementById("compare");
    if (two && !document.getElementById("lock")) {
      const l = document.createElement("label"); l.innerHTML = `<input type="checkbox" id="lock"> equal size (moving one slider sets the other to the same edge count)`;
      cmp.before(l);
      l.querySelector("input").addEventListener("change", ev => { state.lock = ev.target.checked; if (state.lock) { match(0); render(); } });
    }
    if (two) {
      const a = new Set(current[0].map(i => S[0].w[i] + "," + S[0].r[i])), b = new Set(current[1].map(i => S[1].w[i] + "," + S[1].r[i]));
      const both = [...a].filter(x => b.has(x)).length, union = a.size + b.size - both;
      cmp.innerHTML = `both: <span class="count" id="count-both">${both}</span> &nbsp; A only: <span class="count" id="count-a-only">${a.size - both}</span>` +
        ` &nbsp; B only: <span class="count" id="count-b-only">${b.size - both}</span><br>IoU: <span class="count" id="iou">${union ? (both / union).toFixed(4) : "n/a"}</span>`;
    }
  }

  // equal size: the other source's prefix whose circuit's edge count is nearest this one's
  function match(k) {
    const j = 1 - k, s = S[j];
    if (!s.values) return;
    select(k);
    const want = current[k].length, countAt = n => { state.n[j] = n; select(j); return current[j].length; };
    let lo = 0, hi = s.shipped;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (countAt(mid) < want) lo = mid + 1; else hi = mid; }
    const below = Math.max(0, lo - 1), pick = Math.abs(countAt(lo) - want) <= Math.abs(countAt(below) - want) ? lo : below;
    state.n[j] = pick;
    const el2 = document.getElementById("slider-" + j); if (el2) el2.value = pick;
  }

  // the view in the URL (#n=120&pin=a1.h0,m2&mode=up&q=a1): a link reopens the same view
  function saveState() {
    const parts = [`n=${state.n.join(",")}`];
    if (state.pins.size) parts.push("pin=" + [...state.pins].map(id => encodeURIComponent(N[id].name)).join(","));
    const mode = document.getElementById("mode").value; if (mode !== "both") parts.push(`mode=${mode}`);
    if (state.q) parts.push("q=" + encodeURIComponent(state.q));
    if (state.lock) parts.push("lock=1");
    history.replaceState(null, "", "#" + parts.join("&"));
  }
  function loadState() {
    const h = new URLSearchParams(location.hash.slice(1));
    if (h.has("n")) h.get("n").split(",").forEach((v, k) => { const n = Number(v); if (k < S.length && Number.isInteger(n) && n >= 0) state.n[k] = Math.min(n, S[k].shipped || n); });
    if (h.has("mode")) document.getElementById("mode").value = h.get("mode");
    if (h.has("q")) { state.q = h.get("q"); document.getElementById("search").value = state.q; }
    state.lock = h.get("lock") === "1";
    const byName = new Map(N.map((nd, i) => [nd.name, i]));
    return (h.get("pin") || "").split(",").filter(Boolean).map(x => byName.get(decodeURIComponent(x))).filter(x => x !== undefined);
  }

  // the slider's circuit as edges.json: [writer, reader] pairs (position-aware: [writer, reader, span]
  // triples) in the masks' order, as `edgeprune export` writes them
  function exportEdges(k) {
    const s = S[k], plain = nd => (nd.label !== undefined ? nd.label : nd.name);
    const spanOf = nd => nd.name.slice(nd.name.lastIndexOf("@") + 1);
    const rows = current[k].slice().sort((a, b) => s.gi[a] - s.gi[b]).map(i => {
      const w = N[s.w[i]], r = N[s.r[i]];
      return D.spans ? [plain(w), plain(r), spanOf(r)] : [plain(w), plain(r)];
    });
    return JSON.stringify(rows);
  }
  function download(k) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([exportEdges(k)], { type: "application/json" }));
    a.download = "edges.json"; a.click(); setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  // zoom on the wheel (about the cursor), pan by dragging the background, open fitted to the circuit
  const canvas = document.getElementById("canvas");
  let drag = null, dragged = false;
  function zoomAt(factor, cx, cy) {
    const r = canvas.getBoundingClientRect(), x = canvas.scrollLeft + cx - r.left, y = canvas.scrollTop + cy - r.top;
    const z0 = state.zoom; state.zoom = Math.min(8, Math.max(0.05, z0 * factor)); size();
    canvas.scrollLeft = x * state.zoom / z0 - (cx - r.left); canvas.scrollTop = y * state.zoom / z0 - (cy - r.top);
  }
  canvas.addEventListener("wheel", ev => { ev.preventDefault(); zoomAt(ev.deltaY < 0 ? 1.15 : 1 / 1.15, ev.clientX, ev.clientY); }, { passive: false });
  canvas.addEventListener("mousedown", ev => { drag = { x: ev.clientX, y: ev.clientY, l: canvas.scrollLeft, t: canvas.scrollTop }; dragged = false; });
  window.addEventListener("mousemove", ev => {
    if (!drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) dragged = true;
    canvas.scrollLeft = drag.l - dx; canvas.scrollTop = drag.t - dy;
  });
  window.addEventListener("mouseup", () => { drag = null; });
  function fit() {
    const b = gNodes.childElementCount ? gNodes.getBBox() : { x: 0, y: 0, width: D.width, height: D.height };
    const pad = 30, w = b.width + 2 * pad, h = b.height + 2 * pad;
    state.zoom = Math.min(2, canvas.clientWidth / w, canvas.clientHeight / h); size();
    canvas.scrollLeft = (b.x - pad) * state.zoom - Math.max(0, (canvas.clientWidth - w * state.zoom) / 2);
    canvas.scrollTop = (b.y - pad) * state.zoom - Math.max(0, (canvas.clientHeight - h * state.zoom) / 2);
  }

  const legend = document.getElementById("legend");
  const items = two ? [["#222222", "in both"], ["#D55E00", "A only"], ["#0072B2", "B only"]]
    : [["q", "query input"], ["k", "key input"], ["v", "value input"], ["mlp", "MLP input"], ["output", "resid_post"]].map(([k, t]) => [D.colours[k], "edge into a " + t]);
  for (const [c, t] of items) { const d = document.createElement("div"); d.innerHTML = `<span class="sw" style="background:${c}"></span>`; d.append(t); legend.appendChild(d); }
  const notes = ["width: rank within the circuit shown (rank 1 widest)"];
  if (S.some(s => s.signed)) notes.push("dashed: a negative score (ablating the edge raises the metric)");
  notes.push("dotted: a Q/K/V input to its head");
  for (const t of notes) { const d = document.createElement("div"); d.className = "note"; d.textContent = t; legend.appendChild(d); }
  document.getElementById("title").textContent = D.title;
  document.getElementById("graphinfo").textContent = `graph: ${D.graph}`;
  document.getElementById("zin").onclick = () => { state.zoom *= 1.25; size(); };
  document.getElementById("zout").onclick = () => { state.zoom /= 1.25; size(); };
  document.getElementById("zfit").onclick = fit;
  const pinned = loadState();
  size(); render();
  S.forEach((s, k) => {  // an export button per circuit
    const b = document.createElement("button"); b.id = "export-" + k; b.textContent = "download edges.json";
    b.addEventListener("click", () => download(k)); document.getElementById("src-" + k).appendChild(b);
  });
  if (two && state.lock) { document.getElementById("lock").checked = true; match(0); render(); }
  if (pinned.length) { pinned.forEach(id => state.pins.add(id)); state.sel = pinned[0]; highlight(); showNode(pinned[0]); }
  fit(); saveState();
  window.edgeprune = { ready: true, sources: S.length, exportEdges, state: () => ({ n: [...state.n], pins: [...state.pins].map(id => N[id].name), zoom: state.zoom }),
    setSize(k, n) { state.n[k] = n; const s = document.getElementById("slider-" + k); if (s) s.value = n; if (state.lock) match(k); render(); } };
  document.body.setAttribute("data-ready", "1");
})();
