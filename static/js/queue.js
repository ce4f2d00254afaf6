/* The queue page: waiting tasks in dispatch order, live over /ws/queue/.
 *
 * The server renders the rows (tasks/_queue_row.html) for the page and for every message of the
 * socket ({"type": "queue", "entries": [...], "html": {"entries", "summary"}}); the page swaps in the
 * rows that changed (keyed by task id, or by position for another user's task). A row whose priority
 * is being typed is left alone. The waited time and the estimated start tick locally.
 */
(function () {
  "use strict";
  const root = document.getElementById("queue-page");
  if (!root) return;
  FTP.queueSocket = FTP.livePage(root, "/ws/queue/", function () {
    return "lang=" + encodeURIComponent(root.dataset.lang || "");
  }, function (message) {
    if (message.type !== "queue") return;
    root.querySelector("[data-queue-table]").hidden = message.entries.length === 0;
    root.querySelector("[data-empty]").hidden = message.entries.length > 0;
  });
  FTP.tick();
})();
