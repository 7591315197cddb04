// Stethoscope dashboard: charts (linked zoom, zoom re-fetch, log axes chosen from the data and
// kept as the user sets them, EMA smoothing, click-to-zoom on alerts), the page's one live
// poll (tables, lists and chart state together), sortable runs table, alert acknowledgement.
// Text from the server is set with textContent or as a property value; the live regions are
// HTML rendered by the server's autoescaping templates (the same that render the page), parsed
// with DOMParser (which runs no script; the CSP allows none inline either).
"use strict";
(function () {
  const ZOOM_DEBOUNCE_MS = 250;
  const IDLE_POLL_FACTOR = 5;  // finished, failed or diverged runs are polled 5x less often
  const ZOOM_PAD = 0.25;       // a click on an alert shows its range and a quarter more each side
  const PLOT_CONFIG = { responsive: true, displaylogo: false, scrollZoom: false,
    modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d"] };
  const STORE_PREFIX = "stethoscope.";
  const DARK = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
  const DARK_LAYOUT = { paper_bgcolor: "#171a21", plot_bgcolor: "#1d212a", font: { color: "#d6dae3" } };
  const DARK_AXIS = { gridcolor: "#2c323d", linecolor: "#3a414e", zerolinecolor: "#3a414e" };

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const c of children || []) node.append(c);
    return node;
  }

  function stored(key) {
    try { return window.localStorage.getItem(STORE_PREFIX + key); } catch (_) { return null; }
  }
  function store(key, value) {
    try {
      if (value === null) window.localStorage.removeItem(STORE_PREFIX + key);
      else window.localStorage.setItem(STORE_PREFIX + key, value);
    } catch (_) { /* private mode: the URL still keeps it */ }
  }
  function setParam(name, value) {
    const url = new URL(location.href);
    if (value === null || value === "") url.searchParams.delete(name); else url.searchParams.set(name, value);
    history.replaceState(history.state, "", url.pathname + url.search + url.hash);
  }

  async function getJSON(url, init) {
    init = Object.assign({}, init || {});
    // A state change says it is JSON even without a body: with authentication off the server
    // takes no other (a page of another site cannot send it without asking first).
    const sends = init.method && init.method !== "GET" ? { "Content-Type": "application/json" } : {};
    init.headers = Object.assign({ Accept: "application/json" }, sends, init.headers || {});
    const resp = await fetch(url, init);
    if (resp.status === 401) {  // authentication is on and the login has ended: log in again
      location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
    }
    if (!resp.ok) {
      let detail = resp.statusText;
      try { detail = (await resp.json()).detail || detail; } catch (_) { /* not JSON */ }
      const err = new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
      err.status = resp.status;
      throw err;
    }
    return resp.status === 204 ? null : resp.json();
  }

  // ---- y scale: the user's choice (URL, then local storage), else the data's ------------
  // URL: ?y=loss:log,grad:linear. Local storage: stethoscope.y.<panel> = log | linear.
  function scaleChoices() {
    const out = {};
    const raw = new URLSearchParams(location.search).get("y") || "";
    for (const part of raw.split(",")) {
      const [id, kind] = part.split(":");
      if (id && (kind === "log" || kind === "linear")) out[id] = kind;
    }
    return out;
  }

  // Debiased exponential moving average (as TensorBoard's smoothing slider): gaps stay gaps.
  function ema(ys, weight) {
    let last = 0, n = 0;
    return ys.map((y) => {
      if (y === null || y === undefined || !Number.isFinite(y)) return y;
      last = last * weight + (1 - weight) * y;
      n += 1;
      return last / (1 - Math.pow(weight, n));
    });
  }

  function isLine(t) {
    return (t.type === undefined || t.type === "scatter") && t.mode === "lines" && !t.meta;
  }

  // ---- charts -------------------------------------------------------------------------
  class Charts {
    constructor(root) {
      this.root = root;
      this.src = root.dataset.src;
      this.pollMs = Number(root.dataset.pollMs || 1500);
      const q = new URLSearchParams(location.search);
      const s = Number(q.get("start")), e = Number(q.get("end"));
      // ?start=&end= opens the page zoomed (an alert's "show on chart" link, a shared URL).
      this.range = q.has("start") && q.has("end") && Number.isFinite(s) && Number.isFinite(e) && e > s ? [s, e] : null;
      this.choice = scaleChoices();  // panel id -> "log" | "linear", the user's
      this.logY = {};                 // panel id -> bool, what is drawn
      this.panels = {};               // panel id -> {box, plot, toggle}
      this.syncing = false;           // true while we move the other panels ourselves
      this.loading = false;
      this.again = false;
      this.renders = 0;
      this.drawn = null;              // the run's version (steps, alerts, events) the charts show
      this.zoomTimer = null;
      this.match = "";                // series whose name contains this are drawn first
      const sm = q.has("smooth") ? q.get("smooth") : stored("smooth");
      this.smooth = Math.min(0.99, Math.max(0, Number(sm) || 0));
      this.data = null;
    }

    url() {
      const params = new URLSearchParams();
      if (this.range) {
        params.set("start", String(Math.floor(this.range[0])));
        params.set("end", String(Math.ceil(this.range[1])));
      }
      if (this.match) params.set("match", this.match);
      const query = params.toString();
      if (!query) return this.src;
      return this.src + (this.src.includes("?") ? "&" : "?") + query;
    }

    bindFilter(form) {
      // A run with more series than a chart draws: the server says how many it left out
      // (each panel's note); the filter brings the ones whose name matches to the front.
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        this.match = (form.elements.match.value || "").trim();
        this.load();
      });
    }

    bindSmoothing(input, output) {
      input.value = String(this.smooth);
      output.textContent = this.smooth.toFixed(2);
      input.addEventListener("input", () => {
        this.smooth = Number(input.value) || 0;
        output.textContent = this.smooth.toFixed(2);
        store("smooth", this.smooth ? String(this.smooth) : null);
        setParam("smooth", this.smooth ? String(this.smooth) : null);
        if (this.data) this.render(this.data);
      });
    }

    async load(first) {
      if (this.loading) { this.again = true; return; }
      this.loading = true;
      try {
        const data = await (first || getJSON(this.url()));
        this.data = data;
        await this.render(data);
      } catch (e) {
        console.warn("stethoscope: chart data not loaded:", e.message);
      } finally {
        this.loading = false;
        if (this.again) { this.again = false; this.load(); }
      }
    }

    setScale(id, log) {
      this.choice[id] = log ? "log" : "linear";
      store("y." + id, this.choice[id]);
      setParam("y", Object.entries(this.choice).map(([k, v]) => k + ":" + v).join(","));
    }

    panelBox(p) {
      let entry = this.panels[p.id];
      if (entry) return entry;
      const plot = el("div", { className: "plot", id: "plot-" + p.id });
      const bar = el("div", { className: "bar" });
      let toggle = null;
      if (p.log_toggle) {
        toggle = el("input", { type: "checkbox", className: "logy" });
        toggle.addEventListener("change", () => {
          this.setScale(p.id, toggle.checked);
          this.logY[p.id] = toggle.checked;
          Plotly.relayout(plot, { "yaxis.type": toggle.checked ? "log" : "linear", "yaxis.autorange": true });
        });
        bar.append(el("label", {}, [toggle, " log y"]));
      }
      const note = el("span", { className: "muted note" });
      bar.append(note);
      const box = el("div", { className: "panel", id: "panel-" + p.id }, [bar, plot]);
      box.dataset.panel = p.id;
      this.root.append(box);
      entry = this.panels[p.id] = { box, plot, toggle, note, bound: false };
      return entry;
    }

    // The scale a panel is drawn with: the user's choice (this page's URL, else the last one
    // made for this chart), else log when its values span decades. Zoomed, the data's
    // verdict is kept from the whole run's view, so a zoom never flips the axis under you.
    scaleOf(p) {
      const chosen = this.choice[p.id] || stored("y." + p.id);
      if (chosen === "log" || chosen === "linear") return chosen === "log";
      if (this.range && p.id in this.logY) return this.logY[p.id];
      return Boolean(p.auto_log);
    }

    traces(fig) {
      const data = fig.data || [];
      if (!this.smooth) return data;
      const out = [];
      const colorway = (fig.layout && fig.layout.colorway) || [];
      let i = 0;
      for (const t of data) {
        if (!isLine(t)) { out.push(t); continue; }
        const colour = (t.line && t.line.color) || colorway[i % Math.max(1, colorway.length)];
        i += 1;
        const line = Object.assign({}, t.line || {}, { color: colour });
        // The raw values stay, faint, under the smoothed line.
        out.push(Object.assign({}, t, { line: Object.assign({}, line, { width: 1 }), opacity: 0.25,
          showlegend: false, hoverinfo: "skip", hovertemplate: undefined, name: t.name + " (raw)" }));
        out.push(Object.assign({}, t, { y: ema(Array.from(t.y || []), this.smooth), line, meta: undefined }));
      }
      return out;
    }

    async render(data) {
      const seen = new Set();
      this.syncing = true;
      try {
        for (const p of data.panels) {
          seen.add(p.id);
          const entry = this.panelBox(p);
          entry.note.textContent = p.note || "";
          const fig = p.figure;
          const layout = Object.assign({}, fig.layout || {});
          const log = p.log_toggle ? this.scaleOf(p) : false;
          if (p.log_toggle) {
            this.logY[p.id] = log;
            entry.toggle.checked = log;
            entry.box.dataset.scale = log ? "log" : "linear";
            layout.yaxis = Object.assign({}, layout.yaxis || {}, { type: log ? "log" : "linear" });
          }
          layout.xaxis = Object.assign({}, layout.xaxis || {}, this.range ? { range: this.range.slice(), autorange: false } : { autorange: true });
          if (DARK) {
            Object.assign(layout, DARK_LAYOUT);
            for (const ax of ["xaxis", "yaxis", "yaxis3"]) if (layout[ax]) layout[ax] = Object.assign({}, layout[ax], DARK_AXIS);
          }
          await Plotly.react(entry.plot, this.traces(fig), layout, PLOT_CONFIG);
          if (!entry.bound) {
            entry.plot.on("plotly_relayout", (ev) => this.onRelayout(p.id, ev));
            entry.plot.on("plotly_click", (ev) => this.onClick(ev));
            entry.bound = true;
          }
        }
        for (const id of Object.keys(this.panels)) {
          if (!seen.has(id)) { Plotly.purge(this.panels[id].plot); this.panels[id].box.remove(); delete this.panels[id]; }
        }
      } finally {
        this.syncing = false;
      }
      this.renders += 1;
      if (this.renders === 1 && window.performance && performance.mark) performance.mark("stethoscope-charts-rendered");
      this.root.dataset.rendered = String(this.renders);
      if (data.run) {
        this.drawn = versionKey(data.run);
        this.root.dataset.lastStep = String(data.run.last_step);
      }
    }

    onClick(ev) {
      // A click on an alert's flag zooms every chart to the alert's detected range.
      const pt = ev && ev.points && ev.points[0];
      if (!pt || !pt.data || !pt.data.meta || !pt.data.meta.alerts || !pt.customdata) return;
      const [start, end] = pt.customdata;
      this.zoomTo(start, end, true);
    }

    zoomTo(start, end, padded) {
      const pad = padded ? Math.max(5, Math.ceil((end - start) * ZOOM_PAD)) : 0;
      const range = [Math.max(0, start - pad), end + pad];
      this.applyRange(range, null);
      this.root.scrollIntoView({ block: "start" });
    }

    applyRange(range, sourceId) {
      this.range = range;
      setParam("start", range ? String(Math.floor(range[0])) : null);
      setParam("end", range ? String(Math.ceil(range[1])) : null);
      this.syncing = true;
      const update = range ? { "xaxis.range": range.slice(), "xaxis.autorange": false } : { "xaxis.autorange": true };
      const moves = Object.entries(this.panels).filter(([id]) => id !== sourceId).map(([, e]) => Plotly.relayout(e.plot, update));
      Promise.all(moves).finally(() => { this.syncing = false; });
      clearTimeout(this.zoomTimer);
      this.zoomTimer = setTimeout(() => this.load(), ZOOM_DEBOUNCE_MS);
    }

    onRelayout(sourceId, ev) {
      if (this.syncing) return;
      let range;
      if (ev["xaxis.autorange"] === true) range = null;
      else if (ev["xaxis.range[0]"] !== undefined) range = [ev["xaxis.range[0]"], ev["xaxis.range[1]"]];
      else if (Array.isArray(ev["xaxis.range"])) range = ev["xaxis.range"].slice();
      else return;  // a y-only change, a legend click...
      this.applyRange(range, sourceId);
    }

    // The live poll's news for the charts: redraw when the run's version moved.
    onState(st) {
      if (this.drawn !== null && versionKey(st) !== this.drawn) this.load();
    }
  }

  function versionKey(v) {
    return [v.status, v.last_step, v.alerts, v.alert_version, v.events].join("|");
  }

  function setText(selector, text) {
    const node = document.querySelector(selector);
    if (node && node.textContent !== text) node.textContent = text;
  }

  // ---- the page's one live poll -------------------------------------------------------
  // Every table and list of the page (data-region) and a run's chart state come in one reply;
  // the regions only when their fingerprint (v) changed.
  function parseRegion(target, html) {
    const table = target.tagName === "TBODY";
    const doc = new DOMParser().parseFromString(table ? `<table><tbody>${html}</tbody></table>` : html, "text/html");
    const from = table ? doc.querySelector("tbody") : doc.body;
    return Array.from(from.childNodes).map((n) => document.importNode(n, true));
  }

  const live = {
    hooks: [],
    swap(regions) {
      for (const [name, html] of Object.entries(regions)) {
        const target = document.querySelector(`[data-region="${name}"]`);
        if (!target) continue;
        const picked = new Set(Array.from(target.querySelectorAll("input.pick-run:checked")).map((i) => i.value));
        target.replaceChildren(...parseRegion(target, html));
        for (const i of target.querySelectorAll("input.pick-run")) i.checked = picked.has(i.value);
        target.dataset.updates = String(Number(target.dataset.updates || 0) + 1);
      }
      for (const h of this.hooks) h();
    },
    start(src, version, pollMs, onReply) {
      let v = version;
      let slow = false;
      const tick = async () => {
        if (!document.hidden) {
          try {
            const reply = await getJSON(src + (src.includes("?") ? "&" : "?") + "v=" + encodeURIComponent(v));
            if (reply.regions) this.swap(reply.regions);
            v = reply.v;
            document.body.dataset.liveV = v;
            slow = onReply ? onReply(reply) === "slow" : false;
          } catch (e) {
            console.warn("stethoscope: live update failed:", e.message);
          }
        }
        setTimeout(tick, slow ? pollMs * IDLE_POLL_FACTOR : pollMs);
      };
      setTimeout(tick, pollMs);
    },
  };

  function runPageState(st, charts) {
    const indicator = document.querySelector("[data-live-indicator]");
    if (indicator) indicator.hidden = st.status !== "running";
    setText("[data-live-step]", st.last_step === null ? "—" : String(st.last_step));
    const status = document.querySelector("[data-live-status] .status");
    if (status && status.textContent !== st.status) { status.textContent = st.status; status.className = "status status-" + st.status; }
    if (charts) charts.onState(st);
    // A finished run may be resumed, so keep listening, but less often.
    return st.status === "running" ? "fast" : "slow";
  }

  // ---- sortable tables ----------------------------------------------------------------
  function bindSort(table) {
    let key = null, dir = 1;
    const saved = (stored("sort." + table.id) || "").split(":");
    if (saved[0]) { key = saved[0]; dir = saved[1] === "desc" ? -1 : 1; }
    const apply = () => {
      if (key === null) return;
      const th = table.querySelector(`th[data-sort-key="${key}"]`);
      if (!th) return;
      const col = Array.from(th.parentNode.children).indexOf(th);
      const numeric = th.dataset.sortType === "num";
      const body = table.tBodies[0];
      const rows = Array.from(body.rows).filter((r) => !r.classList.contains("empty"));
      const value = (r) => {
        const cell = r.cells[col];
        const raw = cell ? (cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim()) : "";
        if (!numeric) return raw.toLowerCase();
        const n = parseFloat(raw);
        return Number.isFinite(n) ? n : -Infinity;
      };
      rows.sort((a, b) => { const x = value(a), y = value(b); return (x < y ? -1 : x > y ? 1 : 0) * dir; });
      for (const r of rows) body.append(r);
      for (const h of table.querySelectorAll("th[data-sort-key]")) h.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
    };
    table.querySelector("thead").addEventListener("click", (ev) => {
      const th = ev.target.closest("th[data-sort-key]");
      if (!th) return;
      dir = key === th.dataset.sortKey ? -dir : (th.dataset.sortType === "num" ? -1 : 1);
      key = th.dataset.sortKey;
      store("sort." + table.id, key + ":" + (dir > 0 ? "asc" : "desc"));
      apply();
    });
    apply();
    live.hooks.push(apply);  // a live update keeps the order the user chose
  }

  // ---- alerts -------------------------------------------------------------------------
  function bindClicks(charts) {
    document.addEventListener("click", async (ev) => {
      const zoom = ev.target.closest("button.zoom[data-zoom]");
      if (zoom && charts) {
        const [s, e] = zoom.dataset.zoom.split(",").map(Number);
        charts.zoomTo(s, e, false);
        return;
      }
      const btn = ev.target.closest("button[data-ack]");
      if (!btn) return;
      btn.disabled = true;
      try {
        await getJSON(`/api/v1/alerts/${encodeURIComponent(btn.dataset.ack)}/ack`, { method: "POST" });
        btn.replaceWith(el("span", { className: "muted", textContent: "acknowledged" }));
      } catch (e) {
        btn.disabled = false;
        btn.textContent = "Acknowledge (failed: " + e.message + ")";
      }
    });
  }

  // ---- boot ---------------------------------------------------------------------------
  // This script runs at the end of <body>, before the deferred plotly.js: ask for the chart
  // data now, so the server works while the browser compiles plotly.js.
  const chartsRoot = document.getElementById("charts");
  let early = null;
  if (chartsRoot) {
    early = new Charts(chartsRoot);
    early.firstData = getJSON(early.url());
    early.firstData.catch(() => {});  // handled in load(); no unhandled-rejection noise
  }

  document.addEventListener("DOMContentLoaded", () => {
    let charts = null;
    if (chartsRoot && window.Plotly) {
      charts = early;
      window.stethoscopeCharts = charts;
      const filter = document.getElementById("series-filter");
      if (filter) charts.bindFilter(filter);
      const smoothing = document.getElementById("smoothing");
      if (smoothing) charts.bindSmoothing(smoothing, document.getElementById("smoothing-value"));
      charts.load(charts.firstData);
    }
    bindClicks(charts);
    for (const t of document.querySelectorAll("table.sortable")) bindSort(t);
    if (chartsRoot && chartsRoot.dataset.live) {
      live.start(chartsRoot.dataset.live, chartsRoot.dataset.liveV, Number(chartsRoot.dataset.pollMs || 1000),
        (reply) => runPageState(reply.state, charts));
    } else if (document.body.dataset.liveSrc) {
      live.start(document.body.dataset.liveSrc, document.body.dataset.liveV, Number(document.body.dataset.pollMs || 3000));
    }
    const settings = document.getElementById("settings");
    if (settings && window.StethoscopeSettings) window.StethoscopeSettings(settings, { el, getJSON });
  });
})();
