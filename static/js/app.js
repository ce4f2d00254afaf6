/* Finetune Platform: the small amount of JavaScript the pages need (no framework, no CDN).
 *
 * FTP.fmt        numbers for humans (mirrors tasks/templatetags/task_format.py)
 * FTP.LiveSocket a WebSocket that reconnects by itself with backoff
 * FTP.swapParts  server-rendered parts a socket sends, swapped in (keyed rows, text, elements)
 * FTP.tick       times that move between messages (data-tick, data-tick-dir, data-tick-format)
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

  /** A plain notice at the top of the page about its live updates; null removes it. */
  function liveNotice(text) {
    let node = document.querySelector("[data-live-notice]");
    if (!text) { if (node) node.remove(); return; }
    if (!node) {
      node = document.createElement("div");
      node.className = "flash flash-warning";
      node.setAttribute("role", "status");
      node.setAttribute("data-live-notice", "");
      const main = document.querySelector("main") || document.body;
      main.insertBefore(node, main.firstChild);
    }
    node.textContent = text;
  }

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
        // Cleared once the socket stays open (one past the cap is opened, then closed with 4429).
        window.setTimeout(function () { if (ws.readyState === WebSocket.OPEN) liveNotice(null); }, 1000);
        options.onStatus && options.onStatus("connected");
        options.onOpen && options.onOpen();
      };
      ws.onmessage = function (event) {
        let message;
        try { message = JSON.parse(event.data); } catch (e) { return; }
        options.onMessage(message);
      };
      ws.onclose = function (event) {
        if (stopped) return;
        if (event.code === 4429) {
          // Too many live pages of this account are open (FINETUNE_MAX_SOCKETS_PER_USER): say so, retry slowly.
          liveNotice(labels().too_many || "Too many pages with live updates are open. Close some tabs; this page will try again.");
          delay = 15000;
        }
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

  // --- server-rendered parts, swapped in from the sockets (each live row is rendered once: on the server)
  function csrfToken() {
    const input = document.querySelector("[name=csrfmiddlewaretoken]");
    if (input && input.value && input.value !== "live") return input.value;
    const cookie = document.cookie.split("; ").find(function (c) { return c.indexOf("csrftoken=") === 0; });
    return cookie ? cookie.slice(10) : "";
  }

  /** Forms rendered by a socket carry a placeholder instead of a CSRF token: put the page's in. */
  function adoptForms(node) {
    const token = csrfToken();
    node.querySelectorAll("input[name=csrfmiddlewaretoken]").forEach(function (input) { input.value = token; });
  }

  function fragment(html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    adoptForms(template.content);
    return template.content;
  }

  /** Children keyed by `data-key`, in the new order; a child being edited (focus inside) is kept. */
  function morphList(container, html) {
    const existing = {};
    Array.from(container.children).forEach(function (child) {
      if (child.dataset.key !== undefined) existing[child.dataset.key] = child;
    });
    const fresh = Array.from(fragment(html).children);
    fresh.forEach(function (node, i) {
      const key = node.dataset.key;
      let current = existing[key];
      delete existing[key];
      if (current && !current.isEqualNode(node) && !current.contains(document.activeElement)) {
        current.replaceWith(node);
        current = node;
      }
      if (!current) current = node;
      if (container.children[i] !== current) container.insertBefore(current, container.children[i] || null);
    });
    Object.keys(existing).forEach(function (key) { existing[key].remove(); });
  }

  /** Swap the parts a socket sent (`{key: html}`) into the elements marked `data-live-part="key"`:
   *  `data-live-list` → keyed children; `data-live-text` → text; otherwise the element itself. */
  FTP.swapParts = function (root, parts) {
    Object.keys(parts || {}).forEach(function (key) {
      const node = root.querySelector('[data-live-part="' + key + '"]');
      if (!node) return;
      if (node.hasAttribute("data-live-list")) morphList(node, parts[key]);
      else if (node.hasAttribute("data-live-text")) node.textContent = parts[key];
      else {
        const fresh = fragment(parts[key]).firstElementChild;
        if (fresh && !node.isEqualNode(fresh)) node.replaceWith(fresh);
      }
    });
    FTP.tick();
  };

  /** Replace the row of `container` with the same `data-key` as the rendered `html`. */
  FTP.replaceRow = function (container, html) {
    const fresh = fragment(html).firstElementChild;
    if (!fresh) return;
    const row = container.querySelector('[data-key="' + fresh.dataset.key + '"]');
    if (row && !row.isEqualNode(fresh)) row.replaceWith(fresh);
    FTP.tick();
  };

  // --- times that move between messages: data-tick="<seconds>" data-tick-dir="up|down|" data-tick-format
  const tickBase = new WeakMap();
  function startsIn(seconds) {
    const L = labels();
    if (seconds < 60) return L.withinMinute || "";
    let minutes = Math.round(seconds / 60);
    if (minutes < 60) return interpolate(L.inMinutes || "%(m)s min", { m: minutes });
    const hours = Math.floor(minutes / 60);
    minutes = minutes % 60;
    if (hours < 24) return interpolate(L.inHours || "%(h)s h %(m)s min", { h: hours, m: minutes });
    return interpolate(L.inDays || "%(d)s d %(h)s h", { d: Math.floor(hours / 24), h: hours % 24 });
  }
  const TICK_FORMATS = {
    duration: function (s) { return FTP.fmt.duration(s); },
    ago: function (s) { return interpolate(labels().seenAgo || "%(when)s", { when: FTP.fmt.duration(s) }); },
    startsIn: startsIn,
  };
  FTP.tick = function () {
    const now = Date.now();
    document.querySelectorAll("[data-tick]").forEach(function (node) {
      if (node.dataset.tick === "") return;
      let base = tickBase.get(node);
      if (!base) { base = { value: Number(node.dataset.tick), at: now }; tickBase.set(node, base); }
      const passed = (now - base.at) / 1000;
      const dir = node.dataset.tickDir;
      const value = dir === "up" ? base.value + passed : dir === "down" ? Math.max(0, base.value - passed) : base.value;
      const text = (TICK_FORMATS[node.dataset.tickFormat] || TICK_FORMATS.duration)(value);
      if (node.textContent !== text) node.textContent = text;
    });
  };
  window.setInterval(FTP.tick, 1000);

  /** Live rows of the task tables on the page (dashboard, task list): rows re-rendered by the server. */
  FTP.liveTaskTable = function (config) {
    const body = document.querySelector("[data-live-tasks] [data-live-part=rows]");
    if (!body) return;
    const ids = Array.from(body.querySelectorAll("tr[data-task-id]")).map(function (row) { return row.dataset.taskId; });
    if (!ids.length) return;
    FTP.taskTableSocket = new FTP.LiveSocket("/ws/tasks/", {
      params: function () {
        return "ids=" + ids.join(",") + "&latest=" + (config.latest || 0) + "&lang=" + encodeURIComponent(config.lang || "");
      },
      onMessage: function (message) {
        if (message.type === "tasks") message.tasks.forEach(function (task) { FTP.replaceRow(body, task.html); });
        if (message.type === "gone") message.ids.forEach(function (id) {
          const row = body.querySelector('tr[data-task-id="' + id + '"]');
          if (row) row.classList.add("gone");
        });
        if (message.type === "new_tasks") document.querySelectorAll("[data-new-tasks]").forEach(function (n) {
          n.hidden = false;
        });
        FTP.tick();
      },
    });
  };

  /** A page whose live parts are server-rendered and sent whole by a snapshot socket. */
  FTP.livePage = function (root, path, params, onMessage) {
    return new FTP.LiveSocket(path, {
      params: params,
      onStatus: FTP.setConnection,
      onMessage: function (message) {
        if (message.html) FTP.swapParts(root, message.html);
        if (onMessage) onMessage(message);
      },
    });
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
