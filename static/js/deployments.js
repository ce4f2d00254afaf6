/* The deployment pages, live over /ws/deployments/ (no HTTP polling).
 *
 * Detail: the socket sends the state with the page's parts re-rendered by the server
 * ({"type": "state", "state": {...}, "html": {...}}) and the log lines after `?after=<last seq>`
 * ({"type": "lines", ...}); a reconnect resumes exactly after the last line shown. The chat
 * playground streams the model's answer (server-sent events relayed by the platform) as it arrives.
 * List: rows re-rendered by the server when a deployment changes.
 */
(function () {
  "use strict";
  // --- the deployment list: rows re-rendered by the server when a deployment changes --------------
  const list = document.getElementById("deployment-list");
  if (list) {
    const ids = Array.from(list.querySelectorAll("tr[data-deployment-id]")).map(function (r) { return r.dataset.deploymentId; });
    if (ids.length) {
      FTP.deploymentListSocket = new FTP.LiveSocket(list.dataset.wsPath, {
        params: function () { return "ids=" + ids.join(",") + "&lang=" + encodeURIComponent(list.dataset.lang || ""); },
        onMessage: function (message) {
          if (message.type !== "deployments") return;
          message.deployments.forEach(function (d) { FTP.replaceRow(list, d.html); });
        },
      });
    }
  }

  const root = document.getElementById("deployment-page");
  if (!root) return;
  const L = FTP.labels();
  const csrf = (document.querySelector("[name=csrfmiddlewaretoken]") || {}).value || "";
  let status = root.dataset.status;
  let lastSeq = Number(root.dataset.after) || 0;
  let backfillAsked = false;

  // --- state: the parts that follow the deployment are rendered by the server ---------------------
  function applyState(state, html) {
    status = state.status;
    root.dataset.status = state.status;
    FTP.swapParts(root, html);
    root.querySelectorAll("[data-show-when-active]").forEach(function (node) { node.hidden = !state.is_active; });
    document.getElementById("chat-send").disabled = state.status !== "running";
    const hint = root.querySelector("[data-chat-hint]");
    if (hint) hint.hidden = state.status === "running";
  }

  // --- log: lines carry contiguous sequence numbers; a gap asks the server for a backfill ----------
  const log = document.getElementById("log");
  let stick = true;
  log.addEventListener("scroll", function () { stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8; });

  function addLines(lines) {
    const fragment = document.createDocumentFragment();
    for (const line of lines) {
      if (line.seq <= lastSeq) continue;
      if (line.seq !== lastSeq + 1) {
        if (!backfillAsked) { backfillAsked = true; socket.send({ type: "backfill", after: lastSeq }); }
        break;
      }
      lastSeq = line.seq;
      const div = document.createElement("div");
      div.className = "line";
      div.dataset.seq = line.seq;
      div.textContent = line.text;
      fragment.appendChild(div);
    }
    if (!fragment.childNodes.length) return;
    backfillAsked = false;
    const empty = log.querySelector("[data-log-empty]");
    if (empty) empty.remove();
    log.appendChild(fragment);
    while (log.childNodes.length > 5000) log.removeChild(log.firstChild);
    root.dataset.lastSeq = String(lastSeq);
    if (stick) log.scrollTop = log.scrollHeight;
  }

  const socket = new FTP.LiveSocket(root.dataset.wsPath, {
    params: function () { return "after=" + lastSeq + "&lang=" + encodeURIComponent(root.dataset.lang || ""); },
    onStatus: FTP.setConnection,
    onOpen: function () { backfillAsked = false; },
    onMessage: function (message) {
      if (message.type === "deleted") { socket.stop(); FTP.setConnection("deleted"); return; }
      if (message.type === "state") applyState(message.state, message.html);
      if (message.type === "lines") addLines(message.lines);
    },
  });
  FTP.deploymentSocket = socket;

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
      let cutShort = "";  // the gateway's final error event (answer too long, token revoked, …)
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
              if (chunk.error && chunk.error.message) { cutShort = chunk.error.message; return; }
              const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
              if (delta && delta.content) content += delta.content;
            } catch (e) { /* a partial or foreign line */ }
          });
          answer.textContent = content;
          chat.scrollTop = chat.scrollHeight;
        }
      }
      answer.textContent = content;
      if (cutShort) throw new Error((content ? content + "\n\n" : "") + cutShort);
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
})();
