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

  // The stream's last event id is the page's cursor: the fallback starts from it, and
  // so does a new stream (htmx's extension opens one from sse-connect after a failed
  // reconnect, and a new EventSource sends no Last-Event-ID).
  document.addEventListener("htmx:sseMessage", function (event) {
    var live = document.getElementById("run-live");
    var id = event.detail && event.detail.lastEventId;
    if (!live || !id) return;
    live.dataset.cursor = id;
    var url = live.getAttribute("sse-connect");
    if (url) live.setAttribute("sse-connect", url.split("?")[0] + "?cursor=" + encodeURIComponent(id));
  });

  // A step sent again (a reconnect from an older cursor) replaces the one shown
  // instead of standing twice.
  document.addEventListener("htmx:oobBeforeSwap", function (event) {
    var detail = event.detail || {};
    if (!detail.target || detail.target.id !== "timeline" || !detail.fragment) return;
    detail.fragment.querySelectorAll("li[id^='step-']").forEach(function (step) {
      var shown = document.getElementById(step.id);
      if (shown && shown.parentNode === detail.target) shown.remove();
    });
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
          if (response.status >= 400 && response.status < 500) {
            // Logged out, the run gone, a cursor refused: asking again will not help.
            stopped(live);
            return;
          }
          if (!response.ok || response.redirected) throw new Error(response.status);
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
  function stopped(live) {
    var note = document.createElement("p");
    note.className = "notice failed";
    note.textContent = "This page stopped following the run: reload it.";
    live.prepend(note);
  }

  // A browser without EventSource polls from the start.
  document.addEventListener("DOMContentLoaded", function () {
    if (!window.EventSource) poll();
  });
})();
