/* The deployment detail page: status and log follow the JSON API (the database is the truth:
 * `logs/?after=<seq>` resumes exactly after the last line shown), and the chat playground streams
 * the model's answer (server-sent events relayed by the platform) into the page as it arrives.
 */
(function () {
  "use strict";
  const root = document.getElementById("deployment-page");
  if (!root) return;
  const L = FTP.labels();
  const names = L.status || {};
  const api = root.dataset.api;
  const csrf = (document.querySelector("[name=csrfmiddlewaretoken]") || {}).value || "";
  let status = root.dataset.status;
  let lastSeq = Number(root.dataset.after) || 0;
  const ACTIVE = ["pending", "starting", "running"];

  function field(name) { return root.querySelector('[data-field="' + name + '"]'); }
  function fmtTime(value) { return value ? value.replace("T", " ").slice(0, 19) : "–"; }

  // --- state ---------------------------------------------------------------------------------------
  function render(d) {
    status = d.status;
    root.dataset.status = d.status;
    const badge = field("status");
    badge.className = "badge badge-" + d.status;
    badge.textContent = names[d.status] || d.status;
    const error = field("error");
    error.textContent = d.error_message || "";
    error.hidden = !d.error_message;
    const reason = field("stop-reason");
    reason.textContent = d.stop_reason || "";
    reason.hidden = !(d.status === "stopped" && d.stop_reason);
    field("where").textContent = d.host ? d.host + (d.port ? " · 127.0.0.1:" + d.port : "") : field("where").textContent;
    field("requests").textContent = d.request_count;
    field("tokens").textContent = d.prompt_tokens + " + " + d.completion_tokens;
    field("ready").textContent = fmtTime(d.ready_at);
    field("stopped").textContent = fmtTime(d.stopped_at);
    if (d.command_line) field("command").textContent = d.command_line;
    root.querySelectorAll("[data-show-when-active]").forEach(function (node) {
      node.hidden = ACTIVE.indexOf(d.status) === -1;
    });
    document.getElementById("chat-send").disabled = d.status !== "running";
    const hint = root.querySelector("[data-chat-hint]");
    if (hint) hint.hidden = d.status === "running";
  }

  function pollState() {
    fetch(api, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (d) { if (d) render(d); })
      .catch(function () {})
      .finally(function () { window.setTimeout(pollState, ACTIVE.indexOf(status) !== -1 ? 2000 : 10000); });
  }

  // --- log -----------------------------------------------------------------------------------------
  const log = document.getElementById("log");
  let stick = true;
  log.addEventListener("scroll", function () { stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8; });

  function addLines(lines) {
    const fragment = document.createDocumentFragment();
    lines.forEach(function (line) {
      if (line.seq <= lastSeq) return;
      lastSeq = line.seq;
      const div = document.createElement("div");
      div.className = "line";
      div.dataset.seq = line.seq;
      div.textContent = line.text;
      fragment.appendChild(div);
    });
    if (!fragment.childNodes.length) return;
    const empty = log.querySelector("[data-log-empty]");
    if (empty) empty.remove();
    log.appendChild(fragment);
    while (log.childNodes.length > 5000) log.removeChild(log.firstChild);
    if (stick) log.scrollTop = log.scrollHeight;
  }

  function pollLog() {
    let more = false;
    fetch(api + "logs/?after=" + lastSeq + "&limit=1000", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (page) {
        if (!page) return;
        addLines(page.lines);
        more = page.lines.length === 1000;
      })
      .catch(function () {})
      .finally(function () {
        window.setTimeout(pollLog, more ? 0 : (ACTIVE.indexOf(status) !== -1 ? 1000 : 10000));
      });
  }

  // --- chat playground -----------------------------------------------------------------------------
  const chat = document.getElementById("chat");
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const send = document.getElementById("chat-send");
  const history = [];

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "msg msg-" + role;
    div.textContent = text;
    chat.appendChild(div);
    chat.scrollTop = chat.scrollHeight;
    return div;
  }

  async function ask(event) {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || send.disabled) return;
    input.value = "";
    history.push({ role: "user", content: text });
    bubble("user", text);
    const answer = bubble("assistant", L.thinking || "…");
    send.disabled = true;
    let content = "";
    try {
      const response = await fetch(root.dataset.chat, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
        body: JSON.stringify({ model: root.dataset.model, messages: history, stream: true,
          max_tokens: Number(document.getElementById("chat-max-tokens").value) || 128 }),
      });
      if (!response.ok || !response.body) {
        let message = (L.failed || "The request failed") + " (" + response.status + ")";
        try { message = (await response.json()).error.message || message; } catch (e) { /* keep */ }
        throw new Error(message);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const part = await reader.read();
        if (part.done) break;
        buffer += decoder.decode(part.value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) !== -1) {
          const eventText = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          eventText.split("\n").forEach(function (line) {
            if (line.indexOf("data:") !== 0) return;
            const data = line.slice(5).trim();
            if (!data || data === "[DONE]") return;
            try {
              const chunk = JSON.parse(data);
              const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
              if (delta && delta.content) content += delta.content;
            } catch (e) { /* a partial or foreign line */ }
          });
          answer.textContent = content;
          chat.scrollTop = chat.scrollHeight;
        }
      }
      answer.textContent = content;
      history.push({ role: "assistant", content: content });
    } catch (error) {
      answer.className = "msg msg-error";
      answer.textContent = error.message;
      history.pop();
    } finally {
      send.disabled = status !== "running";
    }
  }

  form.addEventListener("submit", ask);
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  document.getElementById("chat-clear").addEventListener("click", function () {
    history.length = 0;
    chat.textContent = "";
  });

  pollState();
  pollLog();
})();
