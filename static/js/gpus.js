/* The GPUs page: host cards live over /ws/gpus/?topics=gpus.
 *
 * The server renders the cards (gpus/_host.html) for the page and for every message of the socket
 * ({"type": "gpus", "hosts": [...], "html": {"hosts", "summary"}}); the page swaps in the cards that
 * changed (keyed by host name), so an open confirmation is not disturbed. "Last seen" ticks locally.
 */
(function () {
  "use strict";
  const root = document.getElementById("gpus-page");
  if (!root) return;
  FTP.gpuSocket = FTP.livePage(root, "/ws/gpus/", function () {
    return "topics=gpus&lang=" + encodeURIComponent(root.dataset.lang || "");
  }, function (message) {
    if (message.type === "gpus") root.querySelector("[data-empty]").hidden = message.hosts.length > 0;
  });
  FTP.tick();
})();
