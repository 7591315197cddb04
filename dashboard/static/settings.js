// Project settings: detector thresholds (GET/PUT /api/v1/projects/{p}/detectors) and webhooks
// (GET/POST /api/v1/projects/{p}/webhooks, POST /api/v1/webhooks/{id}/test). All text is set
// with textContent or as input values.
"use strict";
window.StethoscopeSettings = function (root, { el, getJSON }) {
  const api = root.dataset.api;
  // Per detector: its summary, a "what to do" line and each setting's meaning, unit and
  // default, read by the server from the detectors' source (stethoscope_dashboard._detector_help).
  let docs = {};
  try { docs = JSON.parse(root.dataset.docs || "{}"); } catch (_) { docs = {}; }

  function fmtDefault(v) {
    return typeof v === "string" ? v : JSON.stringify(v);
  }

  function say(id, text, ok) {
    const node = document.getElementById(id);
    node.textContent = text;
    node.className = "msg " + (ok ? "ok" : "err");
  }

  function paramInput(name, value) {
    const input = el("input", { name });
    if (typeof value === "boolean") { input.type = "checkbox"; input.checked = value; input.dataset.kind = "bool"; }
    else if (typeof value === "number") {
      // JSON cannot tell 6.0 from 6: send what was typed ("8.5" stays 8.5, "128" stays 128).
      input.type = "number"; input.step = "any"; input.value = String(value); input.dataset.kind = "number";
    } else if (typeof value === "string") { input.type = "text"; input.value = value; input.dataset.kind = "str"; }
    else { input.type = "text"; input.value = JSON.stringify(value); input.dataset.kind = "json"; }
    return input;
  }

  function readInput(input) {
    switch (input.dataset.kind) {
      case "bool": return input.checked;
      case "number": {
        const n = Number(input.value);
        if (input.value.trim() === "" || !Number.isFinite(n)) throw new Error(`${input.name}: not a number`);
        return n;
      }
      case "json": return JSON.parse(input.value);
      default: return input.value;
    }
  }

  async function loadDetectors() {
    const box = document.getElementById("detectors");
    let settings;
    try {
      settings = await getJSON(api + "/detectors");
    } catch (e) {
      box.replaceChildren(el("p", { className: "muted", textContent: `Detector settings are not available (${e.status || ""} ${e.message}).` }));
      return;
    }
    const cards = [];
    for (const [name, cfg] of Object.entries(settings)) {
      const enabled = el("input", { type: "checkbox", checked: cfg.enabled !== false, name: "enabled" });
      enabled.dataset.kind = "bool";
      const doc = docs[name] || { params: {} };
      const rows = Object.entries(cfg).filter(([k]) => k !== "enabled").map(([k, v]) => {
        const p = (doc.params || {})[k] || {};
        const input = paramInput(k, v);
        const label = el("label", { className: "param" }, [
          el("span", { className: "pname" }, [el("span", { textContent: k }),
            p.unit ? el("span", { className: "unit", textContent: " (" + p.unit + ")" }) : ""]), input]);
        label.title = p.description || "";
        const about = [];
        if (p.description) about.push(el("span", { className: "desc", textContent: p.description }));
        if ("default" in p) about.push(el("span", { className: "default", textContent: " Default: " + fmtDefault(p.default) + "." }));
        const row = el("div", { className: "param-row" }, [label, el("div", { className: "muted about" }, about)]);
        row.dataset.param = k;
        return row;
      });
      const head = [el("h3", {}, [el("span", { textContent: name }), el("label", {}, [enabled, " enabled"])])];
      if (doc.summary) head.push(el("p", { className: "muted summary", textContent: doc.summary }));
      if (doc.advice) head.push(el("p", { className: "todo", textContent: doc.advice }));
      const card = el("div", { className: "detector" }, [...head, ...rows]);
      card.dataset.detector = name;
      cards.push(card);
    }
    box.replaceChildren(...cards);
  }

  document.getElementById("detectors-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const changes = {};
    try {
      for (const card of document.querySelectorAll(".detector")) {
        const cfg = {};
        for (const input of card.querySelectorAll("input")) cfg[input.name] = readInput(input);
        changes[card.dataset.detector] = cfg;
      }
      await getJSON(api + "/detectors", { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(changes) });
      say("detectors-msg", "Saved.", true);
      loadDetectors();
    } catch (e) {
      say("detectors-msg", "Not saved: " + e.message, false);
    }
  });

  async function loadWebhooks() {
    const body = document.getElementById("webhooks");
    let hooks;
    try {
      hooks = await getJSON(api + "/webhooks");
    } catch (e) {
      if (e.status !== 404) {  // 404: a project with no runs yet, so no webhooks either
        body.replaceChildren(el("tr", {}, [el("td", { colSpan: 5, className: "muted", textContent: `Webhooks are not available (${e.status || ""} ${e.message}).` })]));
        return;
      }
      hooks = [];
    }
    if (!hooks.length) {
      body.replaceChildren(el("tr", {}, [el("td", { colSpan: 5, className: "muted", textContent: "No webhooks yet." })]));
      return;
    }
    body.replaceChildren(...hooks.map((h) => {
      const result = el("span", { className: "msg" });
      const test = el("button", { type: "button", textContent: "Send test" });
      test.dataset.webhook = String(h.id);
      test.addEventListener("click", async () => {
        test.disabled = true;
        result.textContent = "sending…";
        try {
          const r = await getJSON(`/api/v1/webhooks/${encodeURIComponent(h.id)}/test`, { method: "POST" });
          // The reply is the test delivery: status "delivered" or "failed", with the receiver's code.
          const code = r.last_status_code ? ` (HTTP ${r.last_status_code})` : "";
          const ok = r.status === "delivered";
          result.textContent = ok ? `delivered${code}` : `failed${code}: ${r.last_error || r.status}`;
          result.className = "msg " + (ok ? "ok" : "err");
        } catch (e) {
          result.textContent = "failed: " + e.message;
          result.className = "msg err";
        } finally {
          test.disabled = false;
        }
      });
      // Disable keeps the webhook (and its secret) but sends nothing; delete removes it.
      const toggle = el("button", { type: "button", className: "toggle", textContent: h.enabled ? "Disable" : "Enable" });
      toggle.addEventListener("click", async () => {
        toggle.disabled = true;
        try {
          await getJSON(`/api/v1/webhooks/${encodeURIComponent(h.id)}`, { method: "PATCH", body: JSON.stringify({ enabled: !h.enabled }) });
          loadWebhooks();
        } catch (e) {
          toggle.disabled = false;
          result.textContent = "not changed: " + e.message;
          result.className = "msg err";
        }
      });
      const remove = el("button", { type: "button", className: "delete", textContent: "Delete" });
      remove.addEventListener("click", async () => {
        if (!window.confirm("Delete this webhook and its delivery log?")) return;
        remove.disabled = true;
        try {
          await getJSON(`/api/v1/webhooks/${encodeURIComponent(h.id)}`, { method: "DELETE" });
          loadWebhooks();
        } catch (e) {
          remove.disabled = false;
          result.textContent = "not deleted: " + e.message;
          result.className = "msg err";
        }
      });
      const row = el("tr", {}, [
        el("td", {}, [el("code", { textContent: h.url })]),
        el("td", { textContent: h.format }),
        el("td", { textContent: (h.severities || []).join(", ") || "all" }),
        el("td", { className: "enabled", textContent: h.enabled ? "yes" : "no" }),
        el("td", {}, [test, " ", toggle, " ", remove, " ", result]),
      ]);
      row.dataset.webhookId = String(h.id);
      return row;
    }));
  }

  document.getElementById("webhook-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    const severities = form.severities.value.split(",").map((s) => s.trim()).filter(Boolean);
    try {
      const hook = await getJSON(api + "/webhooks", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ url: form.url.value, format: form.format.value, severities }) });
      say("webhook-msg", hook && hook.secret ? `Added. Signing secret (shown once): ${hook.secret}` : "Added.", true);
      form.url.value = "";
      loadWebhooks();
    } catch (e) {
      say("webhook-msg", "Not added: " + e.message, false);
    }
  });

  loadDetectors();
  loadWebhooks();
};
