// Stethoscope dashboard: charts (linked zoom, zoom re-fetch, log toggles, live polling),
// alert acknowledgement and project settings. Text from the server is only ever set with
// textContent or as a property value, never as HTML.
"use strict";
(function () {
  const ZOOM_DEBOUNCE_MS = 250;
  const IDLE_POLL_FACTOR = 5;  // finished, failed or diverged runs are polled 5x less often
  const PLOT_CONFIG = { responsive: true, displaylogo: false, scrollZoom: false,
    modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d"] };

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const c of children || []) node.append(c);
    return node;
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

  // ---- charts -------------------------------------------------------------------------
  class Charts {
    constructor(root) {
      this.root = root;
      this.src = root.dataset.src;
      this.stateUrl = root.dataset.state || null;
      this.pollMs = Number(root.dataset.pollMs || 1500);
      this.range = null;          // [start, end] in steps while zoomed, else null
      this.logY = {};             // panel id -> bool
      this.panels = {};           // panel id -> {box, plot, toggle}
      this.syncing = false;       // true while we move the other panels ourselves
      this.loading = false;
      this.again = false;
      this.renders = 0;
      this.drawn = null;          // the run's version (steps, alerts, events) the charts show
      this.zoomTimer = null;
      this.match = "";            // series whose name contains this are drawn first
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

    async load(first) {
      if (this.loading) { this.again = true; return; }
      this.loading = true;
      try {
        const data = await (first || getJSON(this.url()));
        await this.render(data);
      } catch (e) {
        console.warn("stethoscope: chart data not loaded:", e.message);
      } finally {
        this.loading = false;
        if (this.again) { this.again = false; this.load(); }
      }
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

    async render(data) {
      const seen = new Set();
      this.syncing = true;
      try {
        for (const p of data.panels) {
          seen.add(p.id);
          const entry = this.panelBox(p);
          entry.note.textContent = p.note || "";
          const fig = p.figure;
          const layout = fig.layout || {};
          layout.yaxis = Object.assign(layout.yaxis || {}, this.logY[p.id] ? { type: "log" } : {});
          layout.xaxis = Object.assign(layout.xaxis || {}, this.range ? { range: this.range.slice(), autorange: false } : { autorange: true });
          await Plotly.react(entry.plot, fig.data || [], layout, PLOT_CONFIG);
          if (!entry.bound) {
            entry.plot.on("plotly_relayout", (ev) => this.onRelayout(p.id, ev));
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

    onRelayout(sourceId, ev) {
      if (this.syncing) return;
      let range;
      if (ev["xaxis.autorange"] === true) range = null;
      else if (ev["xaxis.range[0]"] !== undefined) range = [ev["xaxis.range[0]"], ev["xaxis.range[1]"]];
      else if (Array.isArray(ev["xaxis.range"])) range = ev["xaxis.range"].slice();
      else return;  // a y-only change, a legend click...
      this.range = range;
      this.syncing = true;
      const update = range ? { "xaxis.range": range.slice(), "xaxis.autorange": false } : { "xaxis.autorange": true };
      const moves = Object.entries(this.panels).filter(([id]) => id !== sourceId).map(([, e]) => Plotly.relayout(e.plot, update));
      Promise.all(moves).finally(() => { this.syncing = false; });
      clearTimeout(this.zoomTimer);
      this.zoomTimer = setTimeout(() => this.load(), ZOOM_DEBOUNCE_MS);
    }

    startLive() {
      if (!this.stateUrl) return;
      const indicator = document.querySelector("[data-live-indicator]");
      const tick = async () => {
        try {
          const st = await getJSON(this.stateUrl);
          this.state = st;
          if (indicator) indicator.hidden = st.status !== "running";
          setText("[data-live-step]", st.last_step === null ? "—" : String(st.last_step));
          const status = document.querySelector("[data-live-status] .status");
          if (status && status.textContent !== st.status) { status.textContent = st.status; status.className = "status status-" + st.status; }
          if (this.drawn !== null && versionKey(st) !== this.drawn) this.load();
        } catch (e) {
          console.warn("stethoscope: live update failed:", e.message);
        }
        // A finished run may be resumed, so keep listening, but less often.
        const running = !this.state || this.state.status === "running";
        setTimeout(tick, running ? this.pollMs : this.pollMs * IDLE_POLL_FACTOR);
      };
      setTimeout(tick, this.pollMs);
    }
  }

  function versionKey(v) {
    return [v.status, v.last_step, v.alerts, v.alert_version, v.events].join("|");
  }

  function setText(selector, text) {
    const node = document.querySelector(selector);
    if (node && node.textContent !== text) node.textContent = text;
  }

  // ---- alerts -------------------------------------------------------------------------
  function bindAcks() {
    document.addEventListener("click", async (ev) => {
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
  const firstData = chartsRoot ? getJSON(chartsRoot.dataset.src) : null;
  if (firstData) firstData.catch(() => {});  // handled in load(); no unhandled-rejection noise

  document.addEventListener("DOMContentLoaded", () => {
    bindAcks();
    if (chartsRoot && window.Plotly) {
      const charts = new Charts(chartsRoot);
      window.stethoscopeCharts = charts;
      const filter = document.getElementById("series-filter");
      if (filter) charts.bindFilter(filter);
      charts.load(firstData).then(() => charts.startLive());
    }
    const settings = document.getElementById("settings");
    if (settings && window.StethoscopeSettings) window.StethoscopeSettings(settings, { el, getJSON });
  });
})();
