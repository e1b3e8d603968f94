// The live pages' small part in the browser (tasks.views_live): the time a call has been
// in flight, counted on; and, if the event stream cannot stay open, polling instead.
(function () {
  "use strict";

  // "for 12 s", "for 3 min 5 s": the call in flight's time, from its start.
  function elapsed(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 60) return "for " + seconds + " s";
    var minutes = Math.floor(seconds / 60);
    if (minutes < 60) return "for " + minutes + " min " + (seconds % 60) + " s";
    return "for " + Math.floor(minutes / 60) + " h " + (minutes % 60) + " min";
  }
  setInterval(function () {
    document.querySelectorAll("time[data-since]").forEach(function (node) {
      node.textContent = elapsed(Date.now() / 1000 - Number(node.dataset.since));
    });
  }, 1000);

  // The stream's last event id is the page's cursor: the fallback starts from it.
  document.addEventListener("htmx:sseMessage", function (event) {
    var live = document.getElementById("run-live");
    var id = event.detail && event.detail.lastEventId;
    if (live && id) live.dataset.cursor = id;
  });

  // Three errors in a row with nothing received between them (a proxy that buffers or
  // closes the stream): stop streaming and ask for the changes every two seconds.
  var errors = 0;
  document.addEventListener("htmx:sseOpen", function () { errors = 0; });
  document.addEventListener("htmx:sseMessage", function () { errors = 0; });
  document.addEventListener("htmx:sseError", function () {
    errors += 1;
    if (errors >= 3) poll();
  });

  var polling = false;
  function poll() {
    var live = document.getElementById("run-live");
    if (!live || polling || !live.dataset.changes) return;
    polling = true;
    var source = live["htmx-internal-data"] && live["htmx-internal-data"].sseEventSource;
    if (source) source.close();
    live.removeAttribute("sse-connect");
    function look() {
      var url = live.dataset.changes + "?cursor=" + encodeURIComponent(live.dataset.cursor);
      fetch(url, { credentials: "same-origin", headers: { "HX-Request": "true" } })
        .then(function (response) {
          if (!response.ok) throw new Error(response.status);
          live.dataset.cursor = response.headers.get("X-Live-Cursor") || live.dataset.cursor;
          var finished = response.headers.get("X-Live-Finished") === "true";
          return response.text().then(function (html) {
            if (html.trim()) htmx.swap(live, html, { swapStyle: "none" });
            if (!finished) setTimeout(look, 2000);
          });
        })
        .catch(function () { setTimeout(look, 5000); });
    }
    look();
  }
  // A browser without EventSource polls from the start.
  document.addEventListener("DOMContentLoaded", function () {
    if (!window.EventSource) poll();
  });
})();
