/* The task detail page: state, charts, log and events, live over /ws/tasks/<id>/.
 *
 * Log lines carry contiguous sequence numbers. The page remembers the last one it shows
 * (`lastSeq`), drops any line it already has, and when a batch does not follow on it asks the
 * server for a backfill from `lastSeq`. Every (re)connection sends `?after=<lastSeq>`, so a
 * reconnect replays exactly the missing lines.
 *
 * The cards that follow the task (error, details, checkpoints, exports, command line) are rendered
 * on the server only: the socket sends their revision (`cards`) when it changes, and the page then
 * fetches them from `data-cards-url` and swaps them in (no polling).
 */
(function () {
  "use strict";
  const root = document.getElementById("task-page");
  if (!root) return;
  const L = FTP.labels();
  const names = L.status || {};
  const eventNames = L.events || {};
  const MAX_DOM_LINES = 5000;

  let lastSeq = Number(root.dataset.after) || 0;
  const metricsAfter = Number(root.dataset.metricsAfter) || 0;
  let backfillAsked = false;
  const state = JSON.parse(document.getElementById("task-state").textContent);
  let elapsedBase = { value: state.elapsed_seconds, at: Date.now() };

  function field(name) { return root.querySelector('[data-field="' + name + '"]'); }

  // --- state ---------------------------------------------------------------------------------------
  function renderState() {
    const badge = field("status");
    badge.className = "badge badge-" + state.status;
    badge.textContent = names[state.status] || state.status;
    field("bar").style.width = Math.round(state.progress || 0) + "%";
    field("progress").textContent = FTP.fmt.percent(state.progress);
    field("step").textContent = state.max_steps ? state.current_step + " / " + state.max_steps : "–";
    const kinds = state.nonfinite || {}; // NaN / ±infinity from swift: null here, its kind there
    field("epoch").textContent = FTP.fmt.sig(state.epoch, 3, kinds.epoch);
    field("eta").textContent = state.status === "running" ? FTP.fmt.duration(state.eta_seconds) : "–";
    field("loss").textContent = FTP.fmt.sig(state.loss, 4, kinds.loss);
    field("lr").textContent = FTP.fmt.sig(state.learning_rate, 3, kinds.learning_rate);
    field("checkpoint").textContent = state.last_checkpoint || "–";
    root.querySelectorAll("[data-show-when-active]").forEach(function (node) { node.hidden = !state.is_active; });
    // Resume: a stopped or failed task with a checkpoint (the server checks again).
    const resumable = (state.status === "stopped" || state.status === "failed") && !!state.last_checkpoint;
    root.querySelectorAll("[data-resume-form]").forEach(function (node) { node.hidden = !resumable; });
    root.dataset.status = state.status;
    tick();
  }

  function tick() {
    if (elapsedBase.value === null || elapsedBase.value === undefined) {
      field("elapsed").textContent = "–";
      return;
    }
    const running = state.status === "running";
    field("elapsed").textContent = FTP.fmt.duration(elapsedBase.value + (running ? (Date.now() - elapsedBase.at) / 1000 : 0));
  }
  window.setInterval(tick, 1000);

  function applyState(changed) {
    Object.assign(state, changed);
    if ("elapsed_seconds" in changed) elapsedBase = { value: changed.elapsed_seconds, at: Date.now() };
    renderState();
  }

  // --- charts ----------------------------------------------------------------------------------------
  const points = { train: new Map(), eval: new Map() };
  let charts = null;
  let chartsDirty = false;

  function makeCharts() {
    if (!window.Chart) return null;
    const common = {
      animation: false, responsive: true, maintainAspectRatio: false, parsing: false, normalized: true,
      interaction: { mode: "nearest", intersect: false },
      scales: { x: { type: "linear", title: { display: true, text: L.step || "Step" } } },
      // An empty series (no evaluation yet) leaves no crossed-out legend entry.
      plugins: { legend: { display: true, labels: { filter: function (item, data) {
        return data.datasets[item.datasetIndex].data.length > 0;
      } } } },
      elements: { point: { radius: 0, hitRadius: 6 }, line: { borderWidth: 2 } },
    };
    const loss = new window.Chart(document.getElementById("loss-chart"), {
      type: "line",
      data: { datasets: [
        { label: L.trainLoss || "Training loss", data: [], borderColor: "#3b5bdb", backgroundColor: "#3b5bdb" },
        { label: L.evalLoss || "Evaluation loss", data: [], borderColor: "#e8590c", backgroundColor: "#e8590c",
          hidden: false, elements: { point: { radius: 3 } } },
      ] },
      options: common,
    });
    const lr = new window.Chart(document.getElementById("lr-chart"), {
      type: "line",
      data: { datasets: [{ label: L.learningRate || "Learning rate", data: [], borderColor: "#2b8a3e",
        backgroundColor: "#2b8a3e" }] },
      options: Object.assign({}, common, { scales: { x: common.scales.x, y: { ticks: { callback: function (v) {
        return FTP.fmt.sig(v, 2);
      } } } } }),
    });
    return { loss: loss, lr: lr };
  }

  function series(kind, key) {
    // A step swift logged as NaN / ±infinity has a null value here: the line skips it.
    const out = [];
    points[kind].forEach(function (point, step) {
      if (point[key] !== null && point[key] !== undefined) out.push({ x: step, y: point[key] });
    });
    out.sort(function (a, b) { return a.x - b.x; });
    return out;
  }

  function drawCharts() {
    chartsDirty = false;
    if (!charts) charts = makeCharts();
    if (!charts) return;
    charts.loss.data.datasets[0].data = series("train", "loss");
    charts.loss.data.datasets[1].data = series("eval", "loss");
    charts.loss.data.datasets[1].hidden = charts.loss.data.datasets[1].data.length === 0;
    charts.lr.data.datasets[0].data = series("train", "learning_rate");
    charts.loss.update("none");
    charts.lr.update("none");
    root.dataset.chartPoints = String(charts.loss.data.datasets[0].data.length);
  }

  function addMetrics(metrics) {
    metrics.forEach(function (m) {
      const kind = m.kind === "eval" ? "eval" : "train";
      points[kind].set(m.step, m);
    });
    const empty = root.querySelector("[data-empty-charts]");
    if (empty && (points.train.size || points.eval.size)) empty.hidden = true;
    if (!chartsDirty) {
      chartsDirty = true;
      window.requestAnimationFrame(drawCharts);
    }
  }

  // The page opens with a bounded sample of the task's points (every point of a short run); the
  // socket adds the points it sends on top (a Map by step: a point it repeats is drawn once).
  const sample = document.getElementById("chart-points");
  if (sample) {
    const initial = JSON.parse(sample.textContent);
    if (initial.length) addMetrics(initial);
  }

  // --- log -------------------------------------------------------------------------------------------
  const log = document.getElementById("log");
  const search = document.getElementById("log-search");
  const matches = document.getElementById("log-matches");
  const jump = document.getElementById("log-jump");
  let stick = true;
  let needle = "";

  log.addEventListener("scroll", function () {
    stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    jump.hidden = stick;
  });
  jump.addEventListener("click", function () {
    stick = true;
    jump.hidden = true;
    log.scrollTop = log.scrollHeight;
  });

  function matchesNeedle(text) { return !needle || text.toLowerCase().indexOf(needle) !== -1; }

  function countMatches() {
    if (!needle) { matches.textContent = ""; return; }
    const n = log.querySelectorAll(".line:not(.hidden)").length;
    matches.textContent = FTP.interpolate(L.matches || "%(n)s", { n: n });
  }

  search.addEventListener("input", function () {
    needle = search.value.trim().toLowerCase();
    log.querySelectorAll(".line").forEach(function (line) {
      line.classList.toggle("hidden", !matchesNeedle(line.textContent));
    });
    countMatches();
    if (stick) log.scrollTop = log.scrollHeight;
  });

  function addLines(lines) {
    const fresh = [];
    for (const line of lines) {
      if (line.seq <= lastSeq) continue; // already shown
      if (line.seq !== lastSeq + 1) {
        // A gap: ask the server for everything after the last line held; it resends in order.
        if (!backfillAsked) {
          backfillAsked = true;
          socket.send({ type: "backfill", after: lastSeq });
        }
        break;
      }
      fresh.push(line);
      lastSeq = line.seq;
    }
    if (!fresh.length) return;
    backfillAsked = false;
    const empty = log.querySelector("[data-log-empty]");
    if (empty) empty.remove();
    const fragment = document.createDocumentFragment();
    for (const line of fresh) {
      const div = document.createElement("div");
      div.className = matchesNeedle(line.text) ? "line" : "line hidden";
      div.dataset.seq = line.seq;
      div.textContent = line.text;
      fragment.appendChild(div);
    }
    log.appendChild(fragment);
    let extra = log.childElementCount - MAX_DOM_LINES;
    while (extra-- > 0) log.firstElementChild.remove();
    root.dataset.lastSeq = String(lastSeq);
    if (needle) countMatches();
    if (stick) log.scrollTop = log.scrollHeight;
  }

  // --- events ----------------------------------------------------------------------------------------
  const timeline = document.getElementById("events");
  const seenEvents = new Set();
  timeline.querySelectorAll("li[data-key]").forEach(function (li) { seenEvents.add(li.dataset.key); });
  // The page shows the latest events only (data-since: the oldest it shows); the socket's catch-up
  // sends every event, and the older ones stay out. New ones are added, the oldest dropped past a cap.
  const eventsSince = timeline.dataset.since ? Date.parse(timeline.dataset.since) : NaN;
  const MAX_DOM_EVENTS = 500;

  function addEvents(events) {
    events.forEach(function (event) {
      const key = event.kind + "|" + event.time + "|" + event.message;
      if (seenEvents.has(key)) return;
      if (event.time && Date.parse(event.time) < eventsSince) return;
      seenEvents.add(key);
      const placeholder = timeline.querySelector("[data-events-empty]");
      if (placeholder) placeholder.remove();
      const li = document.createElement("li");
      li.className = "ev-" + event.kind;
      li.dataset.key = key;
      const time = document.createElement("time");
      time.dateTime = event.time || "";
      time.textContent = event.time ? event.time.replace("T", " ").slice(0, 19) : "";
      const strong = document.createElement("strong");
      strong.textContent = eventNames[event.kind] || event.kind;
      const span = document.createElement("span");
      span.textContent = event.message || "";
      li.append(time, " ", strong, " ", span);
      timeline.appendChild(li);
    });
    let extra = timeline.childElementCount - MAX_DOM_EVENTS;
    while (extra-- > 0) timeline.firstElementChild.remove();
  }

  // --- the cards that follow the task: server-rendered, fetched when the socket says they changed ---------
  let cardsRev = root.dataset.cardsRev || ""; // what the page shows
  let wantedRev = cardsRev; // what the socket last announced
  let cardsBusy = false;
  let cardsAgain = false;
  let cardsRetries = 0;

  function swapCards(html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    const fresh = template.content.querySelector("[data-cards]");
    if (!fresh) return;
    fresh.querySelectorAll("[data-card]").forEach(function (card) {
      const old = root.querySelector('[data-card="' + card.dataset.card + '"]');
      if (!old) return;
      // Keep what the reader opened (an export's log, swift's last lines) open.
      old.querySelectorAll("details[open][data-keep-open]").forEach(function (details) {
        const again = card.querySelector('details[data-keep-open="' + details.dataset.keepOpen + '"]');
        if (again) again.open = true;
      });
      card.querySelectorAll("[data-copy]").forEach(function (button) {
        button.addEventListener("click", function () {
          const target = document.querySelector(button.dataset.copy);
          if (target && navigator.clipboard) navigator.clipboard.writeText(target.textContent);
        });
      });
      old.replaceWith(card);
    });
    cardsRev = fresh.dataset.cardsRev || "";
    root.dataset.cardsRev = cardsRev;
    renderState();
  }

  function refreshCards() {
    if (cardsBusy) { cardsAgain = true; return; }
    if (wantedRev === cardsRev) return;
    cardsBusy = true;
    cardsAgain = false;
    fetch(root.dataset.cardsUrl, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        cardsRetries = 0;
        swapCards(html);
      }, function () {
        // Retried a few times; after that, the next change the socket announces fetches again.
        if (cardsRetries < 3) {
          cardsRetries += 1;
          window.setTimeout(refreshCards, 2000 * cardsRetries);
        }
      })
      .then(function () {
        cardsBusy = false;
        // A change announced while this fetch ran may be newer than what it brought.
        if (cardsAgain) refreshCards();
      });
  }

  function cardsChanged(rev) {
    wantedRev = rev;
    refreshCards();
  }

  // --- the socket --------------------------------------------------------------------------------------
  const socket = new FTP.LiveSocket(root.dataset.wsPath, {
    // The chart opened with a sample of the points up to data-metrics-after: only later ones are sent.
    params: function () { return "after=" + lastSeq + "&metrics_after=" + metricsAfter; },
    onStatus: FTP.setConnection,
    onOpen: function () { backfillAsked = false; },
    onMessage: function (message) {
      if (message.type === "deleted") {
        socket.stop();
        FTP.setConnection("deleted");
        root.querySelector("[data-deleted]").hidden = false;
        return;
      }
      if (message.type !== "update") return;
      if (message.lines) addLines(message.lines);
      if (message.metrics) addMetrics(message.metrics);
      if (message.events) addEvents(message.events);
      if (message.state) applyState(message.state);
      if (message.cards) cardsChanged(message.cards);
    },
  });
  FTP.taskSocket = socket;
  renderState();
})();
