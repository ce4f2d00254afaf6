/* The queue page: waiting tasks in dispatch order, live over /ws/gpus/?topics=queue.
 *
 * The server renders the page from the same entries the socket sends ({"type": "queue",
 * "entries": [...]}); each message patches the rows in place (keyed by task id, or by position for
 * another user's task, whose id the page never learns), adds rows from the <template> and removes
 * the tasks that started or left. A priority being typed is never overwritten. The waited time and
 * the estimated start tick locally between messages.
 */
(function () {
  "use strict";
  const root = document.getElementById("queue-page");
  if (!root) return;
  const L = FTP.labels();
  const actionBase = root.dataset.actionBase || "/queue/";
  const body = root.querySelector("[data-entries]");
  const rowTemplate = document.getElementById("queue-row-template");
  const clocks = {}; // row key → {waited, startsIn, at}

  function field(node, name) { return node.querySelector('[data-field="' + name + '"]'); }
  function setText(node, text) { if (node && node.textContent !== String(text)) node.textContent = String(text); }
  function show(node, visible) { if (node) node.hidden = !visible; }
  function keyOf(entry) { return entry.visible ? "t" + entry.id : "p" + entry.position; }

  /** Mirrors gpus.consumers.starts_in_text. */
  function startsIn(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (seconds < 60) return L.withinMinute;
    let minutes = Math.round(seconds / 60);
    if (minutes < 60) return FTP.interpolate(L.inMinutes, { m: minutes });
    const hours = Math.floor(minutes / 60);
    minutes = minutes % 60;
    if (hours < 24) return FTP.interpolate(L.inHours, { h: hours, m: minutes });
    return FTP.interpolate(L.inDays, { d: Math.floor(hours / 24), h: hours % 24 });
  }

  function taskNodes(entry) {
    const nodes = [];
    if (entry.visible) {
      const link = document.createElement("a");
      link.href = entry.url;
      link.className = "strong";
      link.textContent = entry.name;
      const who = document.createElement("span");
      who.className = "muted small";
      who.textContent = "#" + entry.id + " · " + entry.owner;
      nodes.push(link, document.createTextNode(" "), who);
    } else {
      const anonymous = document.createElement("span");
      anonymous.className = "muted";
      anonymous.textContent = entry.name;
      nodes.push(anonymous);
    }
    return nodes;
  }

  function patch(row, entry) {
    const key = keyOf(entry);
    row.dataset.key = key;
    clocks[key] = { waited: entry.waited_seconds, startsIn: entry.starts_in_seconds, at: Date.now() };
    const signature = JSON.stringify([entry.position, entry.visible, entry.id, entry.name, entry.owner, entry.mine,
      entry.priority, entry.held, entry.request_label, entry.note, entry.estimated_start]);
    if (row.dataset.signature === signature) return;
    row.dataset.signature = signature;
    row.classList.toggle("mine", !!entry.mine);
    setText(field(row, "position"), entry.position);
    const task = field(row, "task");
    while (task.firstChild) task.removeChild(task.firstChild);
    taskNodes(entry).forEach(function (node) { task.appendChild(node); });
    show(field(row, "held"), entry.held);
    setText(field(row, "request"), entry.request_label);
    setText(field(row, "note"), entry.note);
    field(row, "starts-in").title = entry.estimated_start || "";

    // Priority: a number for others' tasks, a small form for the owner and staff.
    setText(field(row, "priority"), entry.priority);
    show(field(row, "priority"), !entry.visible);
    const forms = {};
    row.querySelectorAll("form[data-form]").forEach(function (form) { forms[form.dataset.form] = form; });
    show(field(row, "no-actions"), !entry.visible);
    Object.keys(forms).forEach(function (name) {
      if (entry.visible) forms[name].action = actionBase + entry.id + "/" + name + "/";
    });
    show(forms.priority, entry.visible);
    const input = forms.priority.querySelector("input[name=priority]");
    if (document.activeElement !== input) input.value = entry.priority;
    show(forms.hold, entry.visible && !entry.held);
    show(forms.release, entry.visible && entry.held);
    show(forms.cancel, entry.visible);
    if (entry.visible) forms.cancel.dataset.confirm = FTP.interpolate(L.confirmCancel, { name: entry.name });
  }

  function render(entries) {
    const existing = {};
    body.querySelectorAll("tr[data-key]").forEach(function (row) { existing[row.dataset.key] = row; });
    Object.keys(clocks).forEach(function (key) { delete clocks[key]; });
    entries.forEach(function (entry, i) {
      const key = keyOf(entry);
      let row = existing[key];
      delete existing[key];
      if (!row) row = rowTemplate.content.firstElementChild.cloneNode(true);
      patch(row, entry);
      if (body.children[i] !== row) body.insertBefore(row, body.children[i] || null);
    });
    Object.keys(existing).forEach(function (key) { existing[key].remove(); });
    show(root.querySelector("[data-queue-table]"), entries.length > 0);
    show(root.querySelector("[data-empty]"), entries.length === 0);
    setText(field(root, "summary"), FTP.interpolate(L.summary, {
      n: entries.length,
      held: entries.filter(function (e) { return e.held; }).length,
      mine: entries.filter(function (e) { return e.mine; }).length,
    }));
    tick();
  }

  function tick() {
    body.querySelectorAll("tr[data-key]").forEach(function (row) {
      const clock = clocks[row.dataset.key];
      if (!clock) return;
      const passed = (Date.now() - clock.at) / 1000;
      setText(field(row, "waited"), FTP.fmt.duration(clock.waited + passed));
      setText(field(row, "starts-in"),
        clock.startsIn === null || clock.startsIn === undefined ? "" : startsIn(Math.max(0, clock.startsIn - passed)));
    });
  }
  window.setInterval(tick, 1000);

  render(JSON.parse(document.getElementById("queue-snapshot").textContent));

  FTP.queueSocket = new FTP.LiveSocket("/ws/gpus/", {
    params: function () { return "topics=queue&lang=" + encodeURIComponent(root.dataset.lang || ""); },
    onStatus: FTP.setConnection,
    onMessage: function (message) {
      if (message.type === "queue") render(message.entries);
    },
  });
})();
