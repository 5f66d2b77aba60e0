// meshnode console: one page served by the peer itself. It polls GET /api/console once a second and streams
// chat answers from /v1/chat/completions with fetch (EventSource cannot send headers). With an API token the
// page asks for it once, keeps it in localStorage and sends it as "Authorization: Bearer" on every data
// request; it never goes into a URL. Nothing is fetched from anywhere but this peer.
"use strict";

(() => {
  const TOKEN_KEY = "meshnode.apiToken";
  const POLL_MS = 1000;
  const WINDOW_S = 300; // the charts' time window: the series the peer keeps
  const PALETTE = ["#4263eb", "#0ca678", "#f08c00", "#ae3ec9", "#1098ad", "#d6336c", "#5c940d", "#7048e8",
    "#e8590c", "#0b7285", "#c2255c", "#495057"];

  let token = localStorage.getItem(TOKEN_KEY) || "";
  let snap = null;
  let snapshots = 0;
  const colors = new Map(); // node id -> colour, stable for the page's life
  const names = new Map(); // node id -> name

  // ---- small helpers ----------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "style") for (const [p, v] of Object.entries(value)) node.style.setProperty(p, v);
      else if (key === "data") for (const [d, v] of Object.entries(value)) node.dataset[d] = String(v);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  const shortId = (id) => (id ? `${id.slice(0, 6)}…${id.slice(-4)}` : "–");
  const nameOf = (id) => names.get(id) || shortId(id);

  function colorOf(id) {
    if (!colors.has(id)) colors.set(id, PALETTE[colors.size % PALETTE.length]);
    return colors.get(id);
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
  }

  const fixed = (x, digits) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits));
  const number = (x) => (Number.isInteger(x) ? String(x) : fixed(x, Math.abs(x) >= 100 ? 1 : 3));
  // Node ids inside a text (the planner's "why" names peers by id) shown by name.
  const named = (text) => String(text).replace(/12D3KooW[1-9A-HJ-NP-Za-km-z]{44}/g, (id) => nameOf(id));
  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

  function ago(t) {
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 90) return `${s.toFixed(0)} s ago`;
    if (s < 5400) return `${(s / 60).toFixed(0)} min ago`;
    return `${(s / 3600).toFixed(1)} h ago`;
  }

  // ---- the API, with the token as a header --------------------------------------------------------------

  class Unauthorized extends Error {}

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (token) h.Authorization = `Bearer ${token}`;
    return h;
  }

  async function call(path, init) {
    const opts = Object.assign({ cache: "no-store" }, init || {});
    opts.headers = headers(opts.headers);
    const r = await fetch(path, opts);
    if (r.status === 401) {
      askToken(Boolean(token));
      throw new Unauthorized("this peer's API wants a token");
    }
    if (!r.ok) {
      let err = { code: `HTTP_${r.status}`, message: r.statusText };
      try { err = (await r.json()).error || err; } catch (_) { /* not JSON */ }
      const e = new Error(err.message);
      e.code = err.code;
      throw e;
    }
    return r;
  }

  function askToken(refused) {
    $("token-dialog").hidden = false;
    $("token-error").hidden = !refused;
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token-input").value.trim();
    $("token-input").value = "";
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
    $("token-dialog").hidden = true;
    $("token-button").hidden = !token;
    poll();
  });
  $("token-button").addEventListener("click", () => askToken(false));
  $("token-button").hidden = !token;

  // ---- polling ------------------------------------------------------------------------------------------

  let timer = null;

  async function poll() {
    clearTimeout(timer);
    const started = Date.now();
    try {
      const r = await call("/api/console");
      snap = await r.json();
      snapshots += 1;
      document.body.dataset.snapshots = String(snapshots);
      render();
      setLive("live", `live · ${clock(snap.time)}`);
    } catch (e) {
      setLive("lost", e instanceof Unauthorized ? "waiting for the API token" : "peer unreachable, retrying…");
      if (e instanceof Unauthorized) return; // the token form polls again
    }
    timer = setTimeout(poll, Math.max(50, POLL_MS - (Date.now() - started)));
  }

  function setLive(state, text) {
    const live = $("live");
    live.dataset.state = state;
    live.textContent = text;
  }

  // ---- rendering ----------------------------------------------------------------------------------------

  function render() {
    const rows = [...snap.nodes.nodes].sort((a, b) => (a.name || a.node_id).localeCompare(b.name || b.node_id));
    for (const row of rows) {
      names.set(row.node_id, row.name || shortId(row.node_id));
      colorOf(row.node_id);
    }
    renderHeader(rows);
    renderPeers(rows);
    renderPlans();
    renderCharts();
    renderTransfers();
    renderErrors();
    renderModelChoice();
  }

  function renderHeader(rows) {
    const me = rows.find((r) => r.is_self);
    $("here").replaceChildren("this peer ", el("b", { text: me ? me.name || shortId(me.node_id) : shortId(snap.self) }));
    const lead = snap.nodes.coordinator;
    $("lead").replaceChildren("coordinator ", el("b", { text: lead ? nameOf(lead) : "none yet" }),
      ` · term ${snap.nodes.term}`);
    const by = {};
    for (const r of rows) by[r.status] = (by[r.status] || 0) + 1;
    $("counts").replaceChildren(el("b", { text: String(by.ready || 0) }), ` of ${rows.length} ready`);
    $("peer-summary").textContent = Object.entries(by).map(([s, n]) => `${n} ${s}`).join(" · ");
  }

  function rttTo(row) {
    const me = snap.nodes.nodes.find((r) => r.is_self);
    if (!me || row.is_self) return null;
    const mine = (me.links || {})[row.node_id];
    const theirs = (row.links || {})[me.node_id];
    return mine !== undefined ? mine : theirs !== undefined ? theirs : null;
  }

  function stageLabel(key) {
    // model@revision:start:end[:dtype]
    const parts = key.split(":");
    const model = parts[0].split("@")[0];
    return `${model} ${parts[1]}–${parts[2]}`;
  }

  function heartbeat(hb) {
    if (!hb || !hb.count) return "–";
    const bad = hb.off_pace + hb.missed;
    const steady = Math.round(100 * Math.max(0, 1 - bad / Math.max(1, hb.count)));
    return `${fixed(hb.mean_s, 2)} s · ${steady}% steady`;
  }

  function renderPeers(rows) {
    const cards = rows.map((row) => {
      const hw = row.hardware || {};
      const mem = hw.memory_gb || 0;
      const free = hw.memory_free_gb || 0;
      const rtt = rttTo(row);
      const gpus = (hw.gpus || []).map((g) => g.name).join(", ");
      const badges = [];
      if (row.is_coordinator) badges.push(el("span", { class: "badge coord", text: `coordinator · term ${snap.nodes.term}` }));
      if (row.is_self) badges.push(el("span", { class: "badge self", text: "this peer" }));
      for (const key of row.stages || []) badges.push(el("span", { class: "badge", text: stageLabel(key) }));
      const facts = [
        ["CPU", `${hw.cpu_cores || "?"} cores · ${fixed((row.compute_flops || 0) / 1e9, 0)} GFLOP/s`],
        ["GPU", gpus || "none"],
        ["memory", `${fixed(free, 1)} of ${fixed(mem, 1)} GB free`],
        ["load", fixed(hw.load, 2)],
        ["heartbeat", heartbeat(row.heartbeats)],
      ];
      if (rtt !== null) facts.push(["RTT from here", `${fixed(rtt, 2)} ms`]);
      if (row.status !== "ready") facts.push(["last seen", ago(row.last_seen)]);
      const kv = el("dl", { class: "kv" }, facts.map(([k, v]) => [el("dt", { text: k }), el("dd", { text: v, title: v })]));
      const used = mem > 0 ? Math.min(100, Math.max(0, 100 * (1 - free / mem))) : 0;
      return el("article", {
        class: `card${row.is_coordinator ? " coordinator" : ""}${row.is_self ? " self" : ""}`,
        data: { nodeId: row.node_id, status: row.status },
      },
      el("div", { class: "card-head" },
        el("span", { class: "swatch", style: { background: colorOf(row.node_id) } }),
        el("span", { class: "name", text: row.name || shortId(row.node_id) }),
        el("span", { class: "pill", text: row.status })),
      el("div", { class: "card-body" },
        el("div", { class: "id mono", text: shortId(row.node_id), title: row.node_id }),
        el("div", { class: "badges" }, badges),
        kv,
        el("div", { class: "meter", title: `memory used ${used.toFixed(0)}%` }, el("span", { style: { width: `${used}%` } }))));
    });
    $("peers").replaceChildren(...cards);
  }

  const WHY = [
    ["objective", "objective", (v) => v],
    ["ms_per_token", "", (v) => `${fixed(v, 2)} ms/token`],
    ["tokens_per_s", "", (v) => `${fixed(v, 1)} tokens/s`],
    ["bound", "bound by", (v) => named(v)],
    ["runner_up_ms", "runner-up", (v) => `${fixed(v, 2)} ms`],
  ];

  function whyChips(why) {
    if (!why || typeof why !== "object") return null;
    const chips = [];
    const known = new Set(WHY.map(([k]) => k));
    for (const [key, label, fmt] of WHY) {
      if (why[key] === undefined || why[key] === null) continue;
      chips.push(el("span", {}, label ? `${label} ` : "", el("b", { text: fmt(why[key]) })));
    }
    for (const [key, value] of Object.entries(why)) {
      if (known.has(key) || value === null || typeof value === "object") continue;
      chips.push(el("span", {}, `${key.replaceAll("_", " ")} `, el("b", { text: typeof value === "number" ? number(value) : named(value) })));
    }
    return el("div", { class: "why", title: "why the planner chose this plan" }, chips);
  }

  function stageReady(serving, node, start, end) {
    if (!serving) return false;
    const st = (serving.stages || []).find((s) => s.node_id === node && s.layers[0] === start && s.layers[1] === end);
    return Boolean(st && st.ready);
  }

  function planBar(splits, total, serving) {
    const segs = splits.map((s) => {
      const [start, end] = s.layer_range;
      const ready = stageReady(serving, s.assigned_node, start, end);
      const span = Math.max(1, end - start);
      return el("div", {
        class: "seg",
        data: { node: s.assigned_node, start, end, ready },
        title: `${nameOf(s.assigned_node)}: layers ${start}–${end}${ready ? ", ready" : ", loading"}`,
        style: { flex: `${span} ${span} 0`, background: colorOf(s.assigned_node) },
      }, el("span", { text: `${nameOf(s.assigned_node)} ${start}–${end}` }), el("span", { class: "tick", text: ready ? "✓" : "…" }));
    });
    return [el("div", { class: "bar" }, segs), el("div", { class: "axis" }, el("span", { text: "layer 0" }), el("span", { text: `${total}` }))];
  }

  function renderPlans() {
    const plans = snap.plans.plans || [];
    const servingRows = (snap.serving && snap.serving.models) || [];
    const errors = Object.assign({}, snap.plans.errors || {});
    if (!plans.length && !Object.keys(errors).length) {
      $("plans").replaceChildren(el("p", { class: "empty" }, "No model is planned yet. Ask for one with ",
        el("code", { text: "POST /api/model" }), " or ", el("code", { text: "meshnode start --serve ID" }), "."));
      return;
    }
    const blocks = plans.map((plan) => {
      const serving = servingRows.find((m) => m.model === plan.model);
      const split = plan.model_split_plan || {};
      const total = split.total_layers || 0;
      // GET /api/plan lists every pipeline as {splits, latency_s}, the plan's own splits first
      const replicas = (Array.isArray(plan.replicas) && plan.replicas.length ? plan.replicas : [split.splits || []])
        .map(r => (Array.isArray(r) ? r : r.splits || []));
      const ready = Boolean(serving && serving.ready);
      const bars = replicas.length === 1 ? planBar(replicas[0], total, serving)
        : replicas.map((r, i) => [el("div", { class: "replica-label", text: `replica ${i + 1}` }), planBar(r, total, serving)]);
      const err = errors[plan.model] || (serving && serving.errors && (serving.errors.plan || serving.errors.stage));
      delete errors[plan.model];
      return el("div", { class: "plan", data: { model: plan.model, epoch: plan.epoch } },
        el("div", { class: "plan-head" },
          el("span", { class: "model", text: plan.model }),
          el("span", { class: `state ${ready ? "ready" : "loading"}`, text: ready ? "serving" : "loading stages" }),
          el("span", { class: "meta", text: `revision ${String(plan.revision).slice(0, 12)} · epoch ${plan.epoch} · term ${plan.term} · ${plan.compute_dtype} · ${total} layers · ${(split.splits || []).length} stages · ${plan.reason || ""}` })),
        bars,
        whyChips(plan.why),
        err ? el("div", { class: "plan-error", text: `${err.code || ""} ${err.message || ""}` }) : null);
    });
    for (const [model, err] of Object.entries(errors)) {
      blocks.push(el("div", { class: "plan", data: { model } },
        el("div", { class: "plan-head" }, el("span", { class: "model", text: model }),
          el("span", { class: "state loading", text: "no plan" })),
        el("div", { class: "plan-error", text: `${err.code || ""} ${err.message || ""}` })));
    }
    $("plans").replaceChildren(...blocks);
  }

  function chart(target, points, key, color, unit, nowId) {
    const now = snap.time;
    const W = 300;
    const H = 70;
    // The last WINDOW_S seconds, or since the first sample when the peer has kept less (at least a minute).
    const span = points.length ? Math.min(WINDOW_S, Math.max(60, now - points[0].t)) : WINDOW_S;
    const values = points.filter((p) => p[key] !== null && p[key] !== undefined).map((p) => p[key]);
    const peak = Math.max(...values, 0);
    const top = peak > 0 ? peak * 1.15 : 1;
    const x = (t) => W * (1 - (now - t) / span);
    const y = (v) => H - 4 - (H - 10) * (v / top);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
    for (const frac of [0.25, 0.5, 0.75]) {
      root.append(svg("line", { x1: 0, x2: W, y1: H * frac, y2: H * frac, stroke: "#eceff4", "stroke-width": 1 }));
    }
    let run = [];
    const runs = [];
    for (const p of points) {
      if (p[key] === null || p[key] === undefined) { if (run.length) runs.push(run); run = []; continue; }
      run.push([x(p.t), y(p[key])]);
    }
    if (run.length) runs.push(run);
    for (const r of runs) {
      const line = r.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" ");
      if (r.length > 1) {
        root.append(svg("polygon", { points: `${r[0][0].toFixed(1)},${H} ${line} ${r[r.length - 1][0].toFixed(1)},${H}`,
          fill: color, "fill-opacity": 0.12 }));
      }
      root.append(svg("polyline", { points: line, fill: "none", stroke: color, "stroke-width": 1.6,
        "vector-effect": "non-scaling-stroke", "stroke-linejoin": "round" }));
      if (r.length === 1) {
        root.append(svg("line", { x1: r[0][0], x2: r[0][0], y1: r[0][1], y2: H, stroke: color, "stroke-width": 3,
          "vector-effect": "non-scaling-stroke" }));
      }
    }
    $(target).replaceChildren(root);
    $(target).dataset.peak = String(peak);
    const last = [...points].reverse().find((p) => p[key] !== null && p[key] !== undefined);
    $(nowId).textContent = last ? fixed(last[key], unit) : "–";
    $(nowId).title = `peak ${fixed(peak, unit)} in the last ${(span / 60).toFixed(1)} minutes`;
  }

  function renderCharts() {
    const points = snap.series || [];
    chart("chart-tps", points, "tokens_per_s", "#4263eb", 1, "tps-now");
    chart("chart-hop", points, "hop_ms", "#0ca678", 3, "hop-now");
    chart("chart-step", points, "step_ms", "#f08c00", 2, "step-now");
  }

  function renderTransfers() {
    const list = [...(snap.transfers || [])].sort((a, b) => (a.state === "running" ? 0 : 1) - (b.state === "running" ? 0 : 1)
      || a.elapsed_s - b.elapsed_s).slice(0, 8);
    if (!list.length) {
      $("transfers").replaceChildren(el("p", { class: "empty", text: "No transfer yet." }));
      return;
    }
    $("transfers").replaceChildren(...list.map((t) => {
      const pct = t.total_bytes > 0 ? Math.min(100, (100 * t.done_bytes) / t.total_bytes) : t.state === "done" ? 100 : 0;
      const sources = Object.entries(t.by_source || {}).map(([peer, n]) => el("span", {
        class: "hop", style: { background: peer === "partial" ? "#868e96" : colorOf(peer) },
        text: `${peer === "partial" ? "resumed" : nameOf(peer)} ${bytes(n)}`,
      }));
      const files = [...(t.files || [])].sort((a, b) => (a.state === "running" ? 0 : 1) - (b.state === "running" ? 0 : 1));
      const shown = files.slice(0, 10).map((f) => {
        const fp = f.size > 0 ? Math.min(100, (100 * f.done) / f.size) : 100;
        return el("li", {}, el("span", { class: "fname mono", text: f.name, title: f.name }),
          el("div", { class: "progress" }, el("span", { style: { width: `${fp}%` } })),
          el("span", { text: f.state === "done" ? "done" : `${fp.toFixed(0)}%` }));
      });
      if (files.length > shown.length) shown.push(el("li", {}, el("span", { text: `… ${files.length - shown.length} more files` })));
      const eta = t.eta_s !== null && t.eta_s !== undefined ? ` · ETA ${fixed(t.eta_s, 0)} s` : "";
      const speed = t.state === "running" ? ` · ${bytes(t.bytes_per_s)}/s` : "";
      return el("div", { class: "transfer", data: { state: t.state, model: t.model } },
        el("div", { class: "transfer-head" },
          el("span", { class: "model", text: `${t.model}${t.revision ? "@" + String(t.revision).slice(0, 10) : ""}` }),
          el("span", { class: `state ${t.state === "done" ? "ready" : "loading"}`, text: t.state }),
          el("span", { class: "meta", text: `${bytes(t.done_bytes)} of ${bytes(t.total_bytes)} · ${t.files_done}/${t.files_total} files${speed}${eta}` })),
        el("div", { class: "progress" }, el("span", { style: { width: `${pct}%` } })),
        sources.length ? el("div", { class: "sources" }, "from ", sources) : null,
        t.error ? el("div", { class: "plan-error", text: `${t.error.code} ${t.error.message}` }) : null,
        t.state === "running" && shown.length ? el("ul", { class: "files" }, shown) : null);
    }));
  }

  function renderErrors() {
    const errors = snap.errors || [];
    if (!errors.length) {
      $("errors").replaceChildren(el("li", { class: "empty", text: "Nothing went wrong." }));
      return;
    }
    $("errors").replaceChildren(...errors.slice(0, 60).map((e) => el("li", { data: { code: e.code } },
      el("time", { text: clock(e.time) }),
      el("span", { class: `code ${e.level === "warning" ? "warning" : ""}`, text: e.code || e.event || e.level }),
      el("span", { class: "msgtext" }, named(e.message), e.count > 1 ? el("span", { class: "times", text: `×${e.count}` }) : null))));
  }

  // ---- chat -----------------------------------------------------------------------------------------------

  let history = [];
  let busy = false;

  function renderModelChoice() {
    const select = $("chat-model");
    const served = snap.served || [];
    const current = select.value;
    const have = [...select.options].map((o) => o.value).join("\n");
    if (have !== (served.length ? served.join("\n") : "")) {
      select.replaceChildren(...(served.length ? served.map((m) => el("option", { value: m, text: m }))
        : [el("option", { value: "", text: "no model is ready" })]));
      if (served.includes(current)) select.value = current;
    }
    select.disabled = !served.length;
    $("chat-send").disabled = busy || !served.length;
  }

  function routeChips(route) {
    const chips = [];
    (route || []).forEach((hop, i) => {
      if (i) chips.push(el("span", { class: "arrow", text: "→" }));
      chips.push(el("span", { class: "hop", style: { background: colorOf(hop.node_id) }, text: `${nameOf(hop.node_id)} ${hop.layers[0]}–${hop.layers[1]}` }));
    });
    return el("div", { class: "route" }, "route ", chips);
  }

  async function send(text) {
    const model = $("chat-model").value;
    if (!text || !model || busy) return;
    busy = true;
    $("chat-send").disabled = true;
    history.push({ role: "user", content: text });
    const log = $("chat-log");
    log.append(el("div", { class: "msg user", text }));
    const out = el("span", { class: "text" });
    const details = el("div", { class: "details" });
    const bubble = el("div", { class: "msg assistant", data: { state: "streaming", chunks: 0, model } }, out, details);
    log.append(bubble);
    log.scrollTop = log.scrollHeight;
    let answer = "";
    let chunks = 0;
    let epoch = null;
    const t0 = performance.now();
    try {
      const body = { model, messages: history, stream: true, max_tokens: Number($("chat-max").value) || 64,
        temperature: Number($("chat-temp").value) || 0 };
      const r = await call("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
        headers: { "Content-Type": "application/json" } });
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        const { value, done: ended } = await reader.read();
        if (ended) break;
        bubble.dataset.reads = String(Number(bubble.dataset.reads || 0) + 1); // pieces as the network gave them
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
          if (!data) continue;
          if (data === "[DONE]") { done = true; break; }
          const obj = JSON.parse(data);
          if (obj.error) throw Object.assign(new Error(obj.error.message), { code: obj.error.code });
          const choice = (obj.choices || [])[0] || {};
          const piece = (choice.delta || {}).content;
          const mesh = obj.meshnode || {};
          if (mesh.epoch) {
            const e = mesh.epoch.join(".");
            if (epoch !== null && e !== epoch) {
              details.append(el("span", { class: "failover", text: `failover after ${chunks} tokens: plan ${epoch} → ${e}` }));
            }
            epoch = e;
          }
          if (piece) {
            answer += piece;
            out.textContent = answer;
            chunks += 1;
            bubble.dataset.chunks = String(chunks);
            log.scrollTop = log.scrollHeight;
          }
          if (choice.finish_reason) showDetails(details, obj, choice.finish_reason, performance.now() - t0);
        }
      }
      history.push({ role: "assistant", content: answer });
      bubble.dataset.state = "done";
    } catch (e) {
      history.pop();
      bubble.dataset.state = "error";
      details.append(el("span", { class: "error", text: `${e.code || "ERROR"}: ${e.message}` }));
    } finally {
      busy = false;
      $("chat-send").disabled = false;
    }
  }

  function showDetails(details, obj, finish, wallMs) {
    const m = obj.meshnode || {};
    const t = m.timings || {};
    const usage = obj.usage || {};
    details.append(routeChips(m.route));
    const facts = [`first token ${fixed(t.ttft_ms, 0)} ms`, `total ${fixed(t.total_ms, 0)} ms`,
      `${fixed(t.decode_tokens_per_s, 1)} tokens/s`, `${usage.completion_tokens || 0} tokens`, `finish: ${finish}`];
    details.append(el("span", { text: facts.join(" · "), title: `${fixed(wallMs, 0)} ms in this browser` }));
    if (m.failovers) {
      const epochs = (m.epochs || []).map((e) => e.join(".")).join(" → ");
      details.append(el("span", { class: "failover", text: `failed over ${m.failovers}× (plans ${epochs}): the answer was replayed, not restarted` }));
    }
  }

  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text || busy) return;
    input.value = "";
    send(text);
  });
  $("chat-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-clear").addEventListener("click", () => {
    if (busy) return;
    history = [];
    $("chat-log").replaceChildren();
  });

  poll();
})();
