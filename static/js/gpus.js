/* The GPUs page: hosts and their GPUs, live over /ws/gpus/?topics=gpus.
 *
 * The server renders the page from the same snapshot the socket sends ({"type": "gpus", "hosts":
 * [...]}); each message patches the host cards (keyed by host name) and GPU rows (keyed by GPU id)
 * in place, creating new ones from the <template> elements and removing those that went away, so
 * focus and an open confirmation are not disturbed. "Last seen" ticks locally between messages.
 */
(function () {
  "use strict";
  const root = document.getElementById("gpus-page");
  if (!root) return;
  const L = FTP.labels();
  const states = L.states || {};
  const base = root.dataset.gpuBase || "/gpus/";
  const hostList = root.querySelector("[data-hosts]");
  const hostTemplate = document.getElementById("host-template");
  const rowTemplate = document.getElementById("gpu-row-template");
  const seen = {}; // host name → {ago: seconds at `at`, at: ms}

  function field(node, name) { return node.querySelector('[data-field="' + name + '"]'); }
  function setText(node, text) { if (node && node.textContent !== String(text)) node.textContent = String(text); }
  function show(node, visible) { if (node) node.hidden = !visible; }
  function clone(template) { return template.content.firstElementChild.cloneNode(true); }

  /** A holder's name: a link for its owner and staff, plain words otherwise; its status badge. */
  function holderNodes(holder, withStatus) {
    const nodes = [];
    if (!holder) {
      const none = document.createElement("span");
      none.className = "muted";
      none.textContent = withStatus ? "–" : (L.free || "free");
      return [none];
    }
    const name = document.createElement(holder.url ? "a" : "span");
    if (holder.url) name.href = holder.url; else name.className = withStatus ? "muted" : "";
    name.textContent = holder.name;
    nodes.push(name);
    if (withStatus) {
      const badge = document.createElement("span");
      badge.className = "badge badge-" + holder.status;
      badge.textContent = holder.status_label || holder.status;
      nodes.push(document.createTextNode(" "), badge);
    }
    return nodes;
  }

  function replaceChildren(node, children) {
    while (node.firstChild) node.removeChild(node.firstChild);
    children.forEach(function (child) { node.appendChild(child); });
  }

  function patchGpu(row, host, gpu) {
    const signature = JSON.stringify(gpu);
    if (row.dataset.signature === signature) return;
    row.dataset.signature = signature;
    row.dataset.gpuId = gpu.id;
    row.dataset.state = gpu.state;
    setText(field(row, "index"), gpu.index);
    setText(field(row, "name"), gpu.name);
    setText(field(row, "uuid"), gpu.uuid);
    field(row, "uuid").title = gpu.uuid;
    const memPct = Math.round(gpu.memory_pct || 0);
    field(row, "mem-bar").style.width = memPct + "%";
    const meter = field(row, "mem-meter");
    meter.setAttribute("aria-valuenow", memPct);
    meter.classList.toggle("high", memPct >= 90);
    setText(field(row, "mem"), Number(gpu.memory_used_gb).toFixed(1) + " / " + Number(gpu.memory_total_gb).toFixed(1) + " GiB");
    const util = Math.round(gpu.utilization_pct || 0);
    field(row, "util-bar").style.width = util + "%";
    field(row, "util-bar").parentNode.setAttribute("aria-valuenow", util);
    setText(field(row, "util"), util + "%");
    setText(field(row, "temp"), gpu.temperature_c === null || gpu.temperature_c === undefined ? "–" : gpu.temperature_c + " °C");
    const badge = field(row, "state");
    badge.className = "badge badge-gpu-" + gpu.state;
    setText(badge, states[gpu.state] || gpu.state);
    replaceChildren(field(row, "holder"), holderNodes(gpu.holder, true));
    // Operator buttons (present for staff only).
    const values = { index: gpu.index, host: host.name };
    const disable = row.querySelector('[data-form="disable"]');
    if (disable) {
      disable.action = base + gpu.id + "/disable/";
      disable.dataset.confirm = FTP.interpolate(L.confirmDrain, values);
      show(disable, gpu.enabled);
    }
    const enable = row.querySelector('[data-form="enable"]');
    if (enable) {
      enable.action = base + gpu.id + "/enable/";
      enable.dataset.confirm = FTP.interpolate(L.confirmEnable, values);
      show(enable, !gpu.enabled);
    }
  }

  function patchHost(card, host) {
    card.dataset.host = host.name;
    setText(field(card, "host-name"), host.name);
    const live = field(card, "live");
    live.className = "badge " + (host.live ? "badge-host-live" : "badge-host-offline");
    setText(live, host.live ? L.live : L.offline);
    show(field(card, "host-disabled"), !host.enabled);
    setText(field(card, "backend"), host.backend);
    setText(field(card, "cpu"), host.cpu_slots.length
      ? FTP.interpolate(L.cpuHeld, { held: host.cpu_held, total: host.cpu_slots.length }) : L.noSlots);
    show(field(card, "error"), !!host.error);
    setText(field(card, "error-text"), host.error || "");
    seen[host.name] = { ago: host.seen_seconds_ago, at: Date.now() };
    field(card, "seen").title = host.last_seen || "";

    // GPU rows, keyed by id, in the snapshot's order.
    const body = card.querySelector("[data-gpus]");
    const existing = {};
    body.querySelectorAll("tr[data-gpu-id]").forEach(function (row) { existing[row.dataset.gpuId] = row; });
    host.gpus.forEach(function (gpu, i) {
      let row = existing[gpu.id];
      delete existing[gpu.id];
      if (!row) row = clone(rowTemplate);
      patchGpu(row, host, gpu);
      if (body.children[i] !== row) body.insertBefore(row, body.children[i] || null);
    });
    Object.keys(existing).forEach(function (id) { existing[id].remove(); });
    show(field(card, "gpu-table"), host.gpus.length > 0);
    show(field(card, "no-gpu"), host.gpus.length === 0);

    // CPU slots: small, no forms; rebuilt when they change.
    const slots = field(card, "slots");
    const slotSignature = JSON.stringify(host.cpu_slots);
    if (slots.dataset.signature !== slotSignature) {
      slots.dataset.signature = slotSignature;
      replaceChildren(slots, host.cpu_slots.map(function (slot) {
        const item = document.createElement("li");
        item.className = "slot" + (slot.holder ? " held" : "");
        const label = document.createElement("span");
        label.className = "muted";
        label.textContent = FTP.interpolate(L.slot, { n: slot.slot });
        item.appendChild(label);
        item.appendChild(document.createTextNode(" "));
        holderNodes(slot.holder, false).forEach(function (node) { item.appendChild(node); });
        return item;
      }));
    }
  }

  function render(hosts) {
    const existing = {};
    hostList.querySelectorAll("[data-host]").forEach(function (card) { existing[card.dataset.host] = card; });
    hosts.forEach(function (host, i) {
      let card = existing[host.name];
      delete existing[host.name];
      if (!card) card = clone(hostTemplate);
      patchHost(card, host);
      if (hostList.children[i] !== card) hostList.insertBefore(card, hostList.children[i] || null);
    });
    Object.keys(existing).forEach(function (name) { existing[name].remove(); delete seen[name]; });
    show(root.querySelector("[data-empty]"), hosts.length === 0);
    const gpus = [].concat.apply([], hosts.map(function (h) { return h.gpus; }));
    setText(field(root, "summary"), FTP.interpolate(L.summary, {
      free: gpus.filter(function (g) { return g.state === "free"; }).length,
      total: gpus.length,
      live: hosts.filter(function (h) { return h.live; }).length,
      hosts: hosts.length,
    }));
    tick();
  }

  function tick() {
    hostList.querySelectorAll("[data-host]").forEach(function (card) {
      const last = seen[card.dataset.host];
      if (!last) return;
      const text = last.ago === null || last.ago === undefined
        ? L.neverSeen
        : FTP.interpolate(L.seenAgo, { when: FTP.fmt.duration(last.ago + (Date.now() - last.at) / 1000) });
      setText(field(card, "seen"), text);
    });
  }
  window.setInterval(tick, 1000);

  render(JSON.parse(document.getElementById("gpu-snapshot").textContent));

  FTP.gpuSocket = new FTP.LiveSocket("/ws/gpus/", {
    params: function () { return "topics=gpus&lang=" + encodeURIComponent(root.dataset.lang || ""); },
    onStatus: FTP.setConnection,
    onMessage: function (message) {
      if (message.type === "gpus") render(message.hosts);
    },
  });
})();
