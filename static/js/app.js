/* Finetune Platform: the small amount of JavaScript the pages need (no framework, no CDN).
 *
 * FTP.fmt        numbers for humans (mirrors tasks/templatetags/task_format.py)
 * FTP.LiveSocket a WebSocket that reconnects by itself with backoff
 * FTP.liveTaskTable  live rows of a task table (/ws/tasks/)
 * plus: confirmation of forms with data-confirm, auto-submitting selects, the GPU request fields,
 * copy buttons.
 */
(function () {
  "use strict";
  const FTP = (window.FTP = window.FTP || {});

  function labels() {
    const node = document.getElementById("live-labels");
    return node ? JSON.parse(node.textContent) : {};
  }
  FTP.labels = labels;

  function interpolate(template, values) {
    return template.replace(/%\((\w+)\)(0?\d*)([dsf])/g, function (_, name, pad, kind) {
      let value = values[name];
      if (kind === "d") value = String(Math.trunc(value));
      if (pad && pad.startsWith("0")) value = String(value).padStart(parseInt(pad, 10), "0");
      return String(value);
    });
  }
  FTP.interpolate = interpolate;

  const DURATION = { dh: "%(d)dd %(h)02dh", hm: "%(h)dh %(m)02dm", ms: "%(m)dm %(s)02ds", s: "%(s)ds" };

  FTP.fmt = {
    /** 3725 → "1h 02m"; null → "–" */
    duration: function (seconds) {
      if (seconds === null || seconds === undefined || seconds === "" || !isFinite(seconds) || seconds < 0) return "–";
      const total = Math.round(Number(seconds));
      const formats = Object.assign({}, DURATION, labels().durations || {});
      const d = Math.floor(total / 86400), h = Math.floor((total % 86400) / 3600);
      const m = Math.floor((total % 3600) / 60), s = total % 60;
      if (d) return interpolate(formats.dh, { d: d, h: h });
      if (h) return interpolate(formats.hm, { h: h, m: m });
      if (m) return interpolate(formats.ms, { m: m, s: s });
      return interpolate(formats.s, { s: s });
    },
    /** "NaN", "∞" or "−∞" for the kind of a value swift reported non-finite (the server sends such
     *  a value as null with its kind beside it: `nonfinite: {"loss": "nan"}`); null for another kind */
    nonfinite: function (kind) {
      return { nan: "NaN", inf: "∞", "-inf": "−∞" }[kind] || null;
    },
    /** a float to n significant digits, without trailing zeros; `kind` says why a null is null */
    sig: function (value, digits, kind) {
      if (value === null || value === undefined || value === "") return FTP.fmt.nonfinite(kind) || "–";
      const number = Number(value);
      if (!isFinite(number)) {
        if (number === Infinity || number === -Infinity) return number > 0 ? "∞" : "−∞";
        return typeof value === "number" ? "NaN" : String(value);
      }
      return String(parseFloat(number.toPrecision(digits || 4)));
    },
    percent: function (value) {
      return Math.round(Number(value) || 0) + "%";
    },
  };

  /** A WebSocket to `path` that reconnects with exponential backoff (0.5 s … 15 s, jittered).
   *  `params()` gives the query string for each (re)connection, e.g. the last sequence held. */
  FTP.LiveSocket = function (path, options) {
    const self = this;
    let delay = 500;
    let stopped = false;
    let timer = null;
    self.ws = null;

    function url() {
      const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
      const query = options.params ? options.params() : "";
      return scheme + window.location.host + path + (query ? "?" + query : "");
    }

    function connect() {
      timer = null;
      if (stopped) return;
      options.onStatus && options.onStatus(self.ws ? "reconnecting" : "connecting");
      const ws = new WebSocket(url());
      self.ws = ws;
      ws.onopen = function () {
        delay = 500;
        options.onStatus && options.onStatus("connected");
        options.onOpen && options.onOpen();
      };
      ws.onmessage = function (event) {
        let message;
        try { message = JSON.parse(event.data); } catch (e) { return; }
        options.onMessage(message);
      };
      ws.onclose = function () {
        if (stopped) return;
        options.onStatus && options.onStatus("reconnecting");
        const wait = delay * (0.75 + Math.random() * 0.5);
        delay = Math.min(delay * 2, 15000);
        timer = window.setTimeout(connect, wait);
      };
    }

    self.send = function (message) {
      if (self.ws && self.ws.readyState === WebSocket.OPEN) self.ws.send(JSON.stringify(message));
    };
    self.stop = function () {
      stopped = true;
      if (timer) window.clearTimeout(timer);
      if (self.ws) self.ws.close();
    };
    // Reconnect at once when the page comes back online or into view.
    window.addEventListener("online", function () {
      if (timer) { window.clearTimeout(timer); delay = 500; connect(); }
    });
    connect();
  };

  FTP.setConnection = function (status) {
    const text = labels()[status] || status;
    document.querySelectorAll("[data-connection]").forEach(function (node) {
      node.textContent = text;
      node.dataset.state = status;
    });
  };

  /** Live rows of the task tables on the page (dashboard, task list). */
  FTP.liveTaskTable = function (config) {
    const rows = {};
    document.querySelectorAll("tr[data-task-id]").forEach(function (row) {
      rows[row.dataset.taskId] = row;
    });
    const ids = Object.keys(rows);
    if (!ids.length) return;
    const names = labels().status || {};
    const elapsedBase = {};
    ids.forEach(function (id) {
      const cell = rows[id].querySelector('[data-field="elapsed"]');
      if (cell && cell.dataset.elapsed) elapsedBase[id] = { value: Number(cell.dataset.elapsed), at: Date.now() };
    });

    function field(row, name) { return row.querySelector('[data-field="' + name + '"]'); }

    function update(state) {
      const row = rows[state.id];
      if (!row) return;
      row.dataset.status = state.status;
      const badge = field(row, "status");
      badge.className = "badge badge-" + state.status;
      badge.textContent = names[state.status] || state.status;
      field(row, "bar").style.width = Math.round(state.progress) + "%";
      field(row, "progress").textContent = FTP.fmt.percent(state.progress) +
        (state.max_steps ? " · " + state.current_step + "/" + state.max_steps : "");
      field(row, "loss").textContent = FTP.fmt.sig(state.loss, 4, (state.nonfinite || {}).loss);
      field(row, "eta").textContent = state.status === "running" ? FTP.fmt.duration(state.eta_seconds) : "–";
      if (state.elapsed_seconds !== null && state.elapsed_seconds !== undefined) {
        elapsedBase[state.id] = { value: state.elapsed_seconds, at: Date.now() };
      }
      field(row, "elapsed").dataset.running = state.status === "running" ? "1" : "";
      tick();
    }

    function tick() {
      ids.forEach(function (id) {
        const cell = field(rows[id], "elapsed");
        const base = elapsedBase[id];
        if (!cell || !base) return;
        const running = cell.dataset.running === "1";
        cell.textContent = FTP.fmt.duration(base.value + (running ? (Date.now() - base.at) / 1000 : 0));
      });
    }
    window.setInterval(tick, 1000);

    const socket = new FTP.LiveSocket("/ws/tasks/", {
      params: function () { return "ids=" + ids.join(",") + "&latest=" + (config.latest || 0); },
      onMessage: function (message) {
        if (message.type === "tasks") message.tasks.forEach(update);
        if (message.type === "gone") message.ids.forEach(function (id) {
          if (rows[id]) rows[id].classList.add("gone");
        });
        if (message.type === "new_tasks") document.querySelectorAll("[data-new-tasks]").forEach(function (n) {
          n.hidden = false;
        });
      },
    });
    FTP.taskTableSocket = socket;
  };

  // --- forms -------------------------------------------------------------------------------------
  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) event.preventDefault();
  });

  document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });

  document.querySelectorAll("[data-gpu-request]").forEach(function (box) {
    function sync() {
      const checked = box.querySelector('input[name$="gpu_mode"]:checked');
      const mode = checked ? checked.value : "count";
      box.querySelectorAll("[data-gpu-when]").forEach(function (part) {
        part.hidden = part.dataset.gpuWhen !== mode;
      });
    }
    box.addEventListener("change", sync);
    sync();
  });

  document.querySelectorAll("[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      const target = document.querySelector(button.dataset.copy);
      if (target && navigator.clipboard) navigator.clipboard.writeText(target.textContent);
    });
  });
})();
