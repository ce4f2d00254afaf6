/* The usage pages (/usage/ and /usage/all/): a bar chart of GPU-hours and CPU-slot hours per day
 * over the last 30 days, from the series the server embeds (json_script "usage-daily":
 * {days: ["YYYY-MM-DD"…], gpu_hours: […], cpu_slot_hours: […], labels: {…}}).
 *
 * The chart is kept on `window.usageChart`, and the page's root gets `data-chart-days` once it is
 * drawn (the browser test reads both).
 */
(function () {
  "use strict";
  const root = document.getElementById("usage-page");
  const canvas = document.getElementById("usage-chart");
  const source = document.getElementById("usage-daily");
  if (!root || !canvas || !source || !window.Chart) return;
  const data = JSON.parse(source.textContent);
  const L = data.labels || {};
  const lang = document.documentElement.lang || undefined;
  const dayLabel = new Intl.DateTimeFormat(lang, { month: "short", day: "numeric", timeZone: "UTC" });
  const labels = data.days.map(function (day) { return dayLabel.format(new Date(day + "T00:00:00Z")); });

  window.usageChart = new window.Chart(canvas, {
    type: "bar",
    data: {
      labels: labels,
      datasets: [
        { label: L.gpuHours || "GPU-hours", data: data.gpu_hours, backgroundColor: "#3b5bdb", yAxisID: "y" },
        { label: L.cpuSlotHours || "CPU-slot hours", data: data.cpu_slot_hours, backgroundColor: "#fab005",
          yAxisID: "y1" },
      ],
    },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      scales: {
        x: { grid: { display: false } },
        // GPU-hours on the left, CPU-slot hours on the right: an export's hours on a few slots would
        // otherwise flatten the GPU bars.
        y: { beginAtZero: true, position: "left", title: { display: true, text: L.gpuHours || "GPU-hours" } },
        y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false },
          title: { display: true, text: L.cpuSlotHours || "CPU-slot hours" } },
      },
      plugins: {
        tooltip: { callbacks: { label: function (item) {
          return item.dataset.label + ": " + Number(item.raw).toFixed(2);
        } } },
      },
    },
  });
  root.dataset.chartDays = String(labels.length);
})();
